"""Adapters, AdapterFusion, compose, MAM and UniPELT on flax.nnx models (issue 11, Deliver 6).

The oracle is the linen twin: the linen model wrapped with ``jpeft.wrap`` and the NNX model with
the same weights and the same (random, copied by path) deltas give the same outputs. Mixed batches
are checked row by row against each adapter run alone, and the base row against the plain model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft import _nnx
from tests import _hf_models as H
from tests import _models as M
from tests import _nnx_models as N
from tests._models import random_deltas

TOL = dict(rtol=1e-5, atol=1e-5)

SYN = jpeft.profiles.Profile(
    name="synthetic",
    detect=r"layers/q/kernel",
    embedding="embed",
    query="layers/q",
    key="layers/k",
    value="layers/v",
    attn_out="layers/o",
    ffn_in="layers/dg_in",
    ffn_out="layers/dg_out",
    layer_pattern=r"(layers)",
    layouts=M.LAYOUTS,
    inputs=("ids",),
)
"""The synthetic model's sites: its block is both the attention and the 'FFN' (dg_in -> dg_out)."""

PFEIFFER = jpeft.PfeifferAdapter(reduction_factor=2, profile=SYN)
PARALLEL = jpeft.ParallelAdapter(bottleneck=3, profile=SYN)
MULTI_HEAD = jpeft.MultiHeadParallelAdapter(bottleneck=3, num_heads=2, profile=SYN)

METHODS = {
    "houlsby": jpeft.HoulsbyAdapter(reduction_factor=2, profile=SYN),
    "pfeiffer": PFEIFFER,
    "parallel": PARALLEL,
    "scaled_parallel_learned": jpeft.ScaledParallelAdapter(bottleneck=3, scaling="learned", profile=SYN),
    "multi_head_parallel": MULTI_HEAD,
    # LoRA on the parallel adapter's sink: the adapter's inner hook runs inside LoRA's, on both backends.
    "compose_lora_on_sink_parallel": jpeft.compose(
        jpeft.LoRA(targets=r"layers/dg_out", rank=2, layouts=M.LAYOUTS),
        jpeft.ParallelAdapter(bottleneck=2, profile=SYN),
    ),
    "compose_ia3_multi_head": jpeft.compose(jpeft.IA3(targets=("k", "v", "o"), feedforward=("o",)), MULTI_HEAD),
}


def _ids(batch: int = M.BATCH) -> jax.Array:
    return jnp.asarray(np.random.RandomState(5).randint(0, M.VOCAB, (batch, M.SEQ)), jnp.int32)


def _paths(tree_or_model):
    tree = _nnx.tree(tree_or_model) if isinstance(tree_or_model, nnx.Module) else tree_or_model
    return jpeft.list_paths(tree)


def _pair(methods: dict[str, jpeft.Method], seed: int = 3):
    """The linen tree and the NNX synthetic model, each adapted by ``methods`` (name -> method), same deltas."""
    tree, model = M.params(), N.synthetic()
    for i, (name, method) in enumerate(methods.items()):
        tree = jpeft.apply(method, tree, key=jax.random.key(i), name=name)
        model = jpeft.apply(method, model, key=jax.random.key(i), name=name)
    assert _paths(tree) == _paths(model)
    tree = random_deltas(tree, seed, scale=0.3)
    N.load(model, tree)
    return tree, model


@functools.cache
def _base(batch: int) -> jax.Array:
    """The plain NNX model's output on ``_ids(batch)``."""
    return N.synthetic()(_ids(batch))


def _linen(method: jpeft.Method, tree, ids, **kw):
    return jpeft.wrap(M.Model().apply, method, **kw)({"params": tree}, ids)


def _classes(model: nnx.Module) -> tuple:
    """Each module's class, and the graph definition (a call must not change it: nnx.jit would retrace)."""
    return {path: type(module) for path, module in _nnx.modules(model).items()}, nnx.graphdef(model)


def _no_leftover_classes(model: nnx.Module, before: dict) -> None:
    """Every module is of the class it had before the call, and no hook is left on the stack."""
    assert _classes(model) == before
    assert getattr(_nnx._CALL, "hooks", ()) == ()


@pytest.mark.parametrize("name", list(METHODS))
def test_synthetic_linen_and_nnx_agree(name):
    method = METHODS[name]
    tree, model = _pair({"default": method})
    ids = _ids()
    expected, before = _linen(method, tree, ids), _classes(model)
    assert float(jnp.max(jnp.abs(expected - _base(M.BATCH)))) > 1e-3  # the deltas act
    np.testing.assert_allclose(model(ids), expected, **TOL)
    _no_leftover_classes(model, before)


def test_parallel_adapter_gradients_equal_linen():
    tree, model = _pair({"default": PARALLEL})
    ids, before = _ids(), _classes(model)
    grads = nnx.grad(lambda m: jnp.mean(m(ids) ** 2), argnums=nnx.DiffState(0, jpeft.Delta))(model)
    linen_grads = jax.grad(lambda t: jnp.mean(_linen(PARALLEL, t, ids) ** 2))(tree)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == 4
    for path, g in flat:
        node = linen_grads
        for k in path:
            node = node[str(k)]
        np.testing.assert_allclose(g[...], node, rtol=1e-4, atol=1e-6)
    _no_leftover_classes(model, before)


# --- a real architecture: HF Flax Llama and its NNX twin --------------------------------------
@functools.cache
def _llama():
    from tests import _nnx_llama

    return H.make("llama"), _nnx_llama


def _logits(model: nnx.Module, inputs) -> jax.Array:
    with jax.numpy_rank_promotion("allow"):  # as HF's own Llama code needs (tests/_hf_models.make)
        return model(**inputs).logits


LLAMA_METHODS = {
    "houlsby": jpeft.HoulsbyAdapter(reduction_factor=4),
    "parallel": jpeft.ParallelAdapter(bottleneck=3),
    "multi_head_parallel": jpeft.MultiHeadParallelAdapter(bottleneck=3, num_heads=H.HEADS),
    # With prefixes (the NNX root call extends k/v): the padded row 1 checks UniPELT's masked gates.
    "mam": jpeft.MAM(prefix_tokens=2, adapter_bottleneck=4),
    "mam_prefix_projection": jpeft.MAM(prefix_tokens=2, adapter_bottleneck=4, prefix_projection=True),
    "unipelt": jpeft.UniPELT(lora_targets=("q_proj", "v_proj"), rank=2, prefix_tokens=2, reduction_factor=4),
    "compose_prefix_multi_head": jpeft.compose(
        jpeft.PrefixTuning(num_virtual_tokens=2), jpeft.MultiHeadParallelAdapter(bottleneck=2, num_heads=H.HEADS)
    ),
}


@pytest.mark.parametrize("name", list(LLAMA_METHODS))
def test_llama_linen_and_nnx_agree(name):
    hf, nl = _llama()
    method = LLAMA_METHODS[name]
    tree = jpeft.apply(method, hf.params, key=jax.random.key(1))
    model = jpeft.apply(method, nl.llama(), key=jax.random.key(1))
    assert _paths(tree) == _paths(model)
    tree = random_deltas(tree, 3, scale=0.3)
    N.load(model, tree)
    expected, before = hf.logits(jpeft.wrap(hf.apply, method)({"params": tree}, **hf.inputs)), _classes(model)
    np.testing.assert_allclose(_logits(model, hf.inputs), expected, **TOL)
    _no_leftover_classes(model, before)


def test_llama_scan_stacks_parallel_deltas_and_equals_unrolled():
    hf, nl = _llama()
    unrolled = jpeft.apply(LLAMA_METHODS["parallel"], nl.llama(), key=jax.random.key(1))
    tree = random_deltas(_nnx.tree(unrolled), 3, scale=0.3)
    N.load(unrolled, tree)
    profile = dataclasses.replace(nl.SCANNED, layer_pattern=r"(?:^|/)(layers)(?=/|$)")  # one stacked layer module
    scanned_method = jpeft.ParallelAdapter(bottleneck=3, profile=profile)
    scanned = jpeft.apply(scanned_method, nl.llama(scan=True), key=jax.random.key(1))
    layers = tree["model"]["layers"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[str(i)] for i in range(H.LAYERS)])
    store = _nnx.tree(scanned)["model"]["layers"]["mlp"][jpeft.RESERVED]["default"]
    assert {k: v.shape for k, v in store.items()} == {
        k: v.shape for k, v in stacked["mlp"][jpeft.RESERVED]["default"].items()
    }
    N.load(scanned, {**tree, "model": {**tree["model"], "layers": stacked}})
    np.testing.assert_allclose(_logits(scanned, hf.inputs), _logits(unrolled, hf.inputs), **TOL)


# --- AdapterFusion -------------------------------------------------------------------------------
def test_adapter_fusion_of_two_trained_pfeiffer_adapters():
    fusion = jpeft.AdapterFusion(adapters=("a", "b"), adapter=PFEIFFER)
    tree, model = _pair({"a": PFEIFFER, "b": PFEIFFER, "fusion": fusion})
    jpeft.set_adapter(model, "fusion")
    ids = _ids()
    np.testing.assert_allclose(model(ids), _linen(fusion, tree, ids, active="fusion"), **TOL)

    # Only the fusion layer trains (jpeft.Delta would also pick the fused adapters' leaves).
    flat = nnx.to_flat_state(nnx.state(model, jpeft.trainable(fusion, model)))
    assert {path[-1] for path, _ in flat} == {"query", "query_bias", "key", "key_bias", "value"}
    assert all("fusion" in path for path, _ in flat)


# --- named adapters: stacking and mixed batches ----------------------------------------------------
@pytest.mark.parametrize("name", ["houlsby", "parallel"])
def test_stacked_adapters_equal_linen(name):
    method = METHODS[name]
    tree, model = _pair({"a": method, "b": method})
    ids = _ids()
    jpeft.set_adapter(model, ("a", "b"))
    np.testing.assert_allclose(model(ids), _linen(method, tree, ids, active=("a", "b")), **TOL)


@pytest.mark.parametrize("name", ["pfeiffer", "parallel", "multi_head_parallel"])
def test_mixed_batch_rows_equal_each_adapter_alone(name):
    method = METHODS[name]
    _, model = _pair({"a": method, "b": method})
    ids = _ids(3)
    base = _base(3)
    jpeft.set_adapter(model, "a")
    alone_a = model(ids)
    jpeft.set_adapter(model, "b")  # changes a static attribute, hence the graph definition
    alone_b = model(ids)
    before = _classes(model)
    run = nnx.jit(lambda m, x, i: jpeft.call(m, x, adapter_index=i, active=("a", "b")))
    mixed = run(model, ids, jnp.array([1, -1, 0]))
    np.testing.assert_allclose(mixed[0], alone_b[0], **TOL)
    np.testing.assert_allclose(mixed[1], base[1], **TOL)
    np.testing.assert_allclose(mixed[2], alone_a[2], **TOL)
    assert float(jnp.max(jnp.abs(alone_a - alone_b))) > 1e-3
    _no_leftover_classes(model, before)


# --- errors ----------------------------------------------------------------------------------------
def test_sink_before_source_raises_and_leaves_nothing_behind():
    backwards = dataclasses.replace(SYN, ffn_out="layers/q")  # q runs before dg_in
    model = jpeft.apply(jpeft.ParallelAdapter(bottleneck=2, profile=backwards), N.synthetic(), key=jax.random.key(0))
    before = _classes(model)
    with pytest.raises(jpeft.JpeftError, match=r"'layers/q' ran before any ffn_in module"):
        model(_ids())
    _no_leftover_classes(model, before)


def test_applying_an_adapter_twice_under_one_name_raises():
    model = jpeft.apply(PARALLEL, N.synthetic(), key=jax.random.key(0), name="a")
    with pytest.raises(jpeft.JpeftError, match="adapter 'a' already exists at 'layers'"):
        jpeft.apply(PARALLEL, model, key=jax.random.key(1), name="a")


def test_merge_of_an_adapter_is_refused():
    model = jpeft.apply(PARALLEL, N.synthetic(), key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match="ParallelAdapter cannot be merged into the base weights"):
        jpeft.merge(PARALLEL, model)


def test_fusion_of_an_adapter_the_model_lacks_raises():
    model = jpeft.apply(PFEIFFER, N.synthetic(), key=jax.random.key(0), name="a")
    fusion = jpeft.AdapterFusion(adapters=("a", "zz"), adapter=PFEIFFER)
    with pytest.raises(jpeft.JpeftError, match=r"'layers/dg_out' holds no deltas of adapter\(s\) \['zz'\]"):
        jpeft.apply(fusion, model, key=jax.random.key(1), name="fusion")
