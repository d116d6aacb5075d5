"""QLoRA: LoRA on NF4-quantised kernels, on tiny HF GPT-2 and BERT, the synthetic scan model and nn.Dense.

The conformance checks that apply: identity at init against the *dequantised* base, the wrapped
output against a NumPy reference and against plain LoRA on the dequantised weights, merge, gradients
reaching exactly the LoRA leaves, the closed-form trainable count, jit == no-jit, nn.scan. Then the
bf16 promise (< 1e-2 relative to bf16 LoRA on the dequantised weights) and the errors.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.quant import NF4Array
from tests import _hf_models as H
from tests import _models as M
from tests.quant.test_nf4 import np_dequantize, np_quantize

RANK, ALPHA = 2, 4.0
TOL = dict(rtol=1e-5, atol=1e-5)
FAMILIES = ("gpt2", "bert")
# What is quantised (every linear of every block) and what gets LoRA (a subset: the rest runs
# dequantised without factors).
QUANTISED = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "bert": r".*/encoder/layer/\d+/(attention/self/(query|key|value)|attention/output/dense|intermediate/dense|output/dense)",
}
LORA_TARGETS = {"gpt2": ("c_attn", "c_fc"), "bert": ("query", "value")}
# (d_in, d_out) of each LoRA target per layer, written down from tests/_hf_models.py's configs.
D, F = H.HIDDEN, H.FFN
LORA_DIMS = {"gpt2": [(D, 3 * D), (D, F)], "bert": [(D, D), (D, D)]}
NF4 = jpeft.NF4(block_size=64, dq_block_size=8)  # tiny kernels hold 16-48 blocks: several second-level blocks


def randomize(peft: Any, seed: int, scale: float = 0.1) -> Any:
    """Replaces every delta leaf by NumPy noise; the base leaves (quantised ones too) are the same objects."""
    rng = np.random.RandomState(seed)

    def visit(node: Any, in_delta: bool) -> Any:
        if isinstance(node, dict):
            return {k: visit(v, in_delta or k == jpeft.RESERVED) for k, v in node.items()}
        return jnp.asarray(scale * rng.standard_normal(node.shape), node.dtype) if in_delta else node

    return visit(peft, False)


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.cache
def setup(family: str, compute_dtype: str = "float32") -> tuple[Any, jpeft.QLoRA, Any, Any, Any]:
    """(hf model, method, quantised params, tree after apply, tree with random deltas)."""
    hf = H.make(family)
    method = jpeft.QLoRA(targets=LORA_TARGETS[family], rank=RANK, alpha=ALPHA, quant=NF4, compute_dtype=compute_dtype)
    q = jpeft.quantize(hf.params, NF4, targets=QUANTISED[family])
    peft = jpeft.apply(method, q, key=jax.random.key(1))
    return hf, method, q, peft, randomize(peft, seed=2)


def run(hf: Any, fn: Any, params: Any) -> np.ndarray:
    return np.asarray(hf.logits(fn({"params": params}, **hf.inputs)))


def lora_twin(method: jpeft.QLoRA) -> jpeft.LoRA:
    return jpeft.LoRA(targets=method.targets, rank=method.rank, alpha=method.alpha, layouts=method.layouts)


def as_lora(tree: Any, dtype: Any = None) -> Any:
    """The tree plain LoRA sees: kernels dequantised, the empty delta entries of un-adapted modules dropped."""

    def visit(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        return {k: visit(v) for k, v in node.items() if not (k == jpeft.RESERVED and v == {"default": {}})}

    return visit(jpeft.dequantize(tree, dtype))


@functools.cache
def jitted(family: str, kind: str) -> Any:
    """One compiled program per family and kind, reused by every test: ``params -> logits``."""
    hf, method, *_ = setup(family, "bfloat16" if kind == "qlora_bf16" else "float32")
    fn = {
        "base": hf.apply,
        "qlora": jpeft.wrap(hf.apply, method),
        "qlora_bf16": jpeft.wrap(hf.apply, method),
        "lora": jpeft.wrap(hf.apply, lora_twin(method)),
    }[kind]
    return jax.jit(lambda p: hf.logits(fn({"params": p}, **hf.inputs)))


# --- conformance ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_against_dequantised_base(family):
    hf, method, q, peft, _ = setup(family)
    got = jitted(family, "qlora")(peft)
    want = jitted(family, "base")(jpeft.dequantize(q))
    np.testing.assert_allclose(got, want, **TOL)
    assert rel(want, jitted(family, "base")(hf.params)) > 1e-4  # the base really is quantised


@pytest.mark.parametrize("family", FAMILIES)
def test_random_deltas_equal_lora_on_dequantised_weights(family):
    hf, method, _, _, peft = setup(family)
    got = jitted(family, "qlora")(peft)
    want = jitted(family, "lora")(as_lora(peft))
    np.testing.assert_allclose(got, want, **TOL)
    assert rel(got, jitted(family, "base")(jpeft.dequantize(setup(family)[2]))) > 1e-3  # the deltas matter


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_compute_within_1e_2_of_bf16_lora(family):
    hf, method, _, _, peft = setup(family, "bfloat16")
    got = jitted(family, "qlora_bf16")(peft)
    want = jitted(family, "lora")(as_lora(peft, jnp.bfloat16))  # kernels bf16; the LoRA factors stay float32
    err = rel(got, want)
    assert err < 1e-2, err  # measured: gpt2 2.4e-3, bert 4.9e-5
    assert err > 0  # the base matmul really ran in bf16


def test_dense_and_dense_general_match_numpy_reference():
    x = np.random.RandomState(0).standard_normal((3, 64)).astype(np.float32)

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="dense")(x), nn.DenseGeneral((2, 4), name="dg")(x)

    params = jax.tree.map(lambda s: jnp.asarray(0.1 * np.random.RandomState(1).standard_normal(s.shape), s.dtype),
                          jax.eval_shape(Two().init, jax.random.key(0), x)["params"])  # fmt: skip
    cfg = jpeft.NF4(block_size=8, dq_block_size=4)
    method = jpeft.QLoRA(
        targets=("dense", "dg"), rank=RANK, alpha=ALPHA, quant=cfg, compute_dtype="float32",
        layouts=(("dg", "dense_general:1,2"),),
    )  # fmt: skip
    peft = randomize(jpeft.apply(method, jpeft.quantize(params, method), key=jax.random.key(2)), seed=3)
    y_dense, y_dg = jpeft.wrap(Two().apply, method)({"params": peft}, x)
    s = ALPHA / RANK
    for name, y in (("dense", y_dense), ("dg", y_dg)):
        w = np.asarray(params[name]["kernel"])
        wq = np_dequantize(np_quantize(w, 8, 4), w.shape, 8)
        d = peft[name][jpeft.RESERVED]["default"]
        a, b = np.asarray(d["lora_a"], np.float64), np.asarray(d["lora_b"], np.float64)
        want = np.tensordot(x, wq, 1) + np.asarray(params[name]["bias"]) + s * np.tensordot(x @ a, b, 1)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_wrapped_and_keeps_structure(family):
    hf, method, q, _, peft = setup(family)
    merged = jpeft.merge(method, peft)
    np.testing.assert_allclose(jitted(family, "base")(merged), jitted(family, "qlora")(peft), **TOL)
    assert jax.tree.structure(merged) == jax.tree.structure(hf.params)  # plain float params again
    want = {p: (x.shape, x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(hf.params)[0]}
    assert {p: (x.shape, x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(merged)[0]} == want
    emb = ("transformer", "wte") if family == "gpt2" else ("bert", "embeddings", "word_embeddings")
    node_m, node_p = merged, hf.params
    for k in emb:
        node_m, node_p = node_m[k], node_p[k]
    assert node_m["embedding"] is node_p["embedding"]  # untouched leaves are the same objects


@pytest.mark.parametrize("family", FAMILIES)
def test_grads_reach_exactly_the_lora_leaves(family):
    hf, method, _, _, peft = setup(family)
    trainable, frozen = jpeft.split(method, peft)
    paths = set(jpeft.list_paths(trainable))
    assert paths and all(p.split("/")[-1] in ("lora_a", "lora_b") for p in paths)
    assert len(paths) == 2 * len(LORA_DIMS[family]) * H.LAYERS
    assert sum(isinstance(x, NF4Array) for x in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, NF4Array)))
    wrapped = jpeft.wrap(hf.apply, method)
    weights = jax.random.normal(jax.random.key(3), jitted(family, "qlora")(peft).shape)

    def loss(t):
        return jnp.sum(hf.logits(wrapped({"params": jpeft.combine(t, frozen)}, **hf.inputs)) * weights)

    grads = jax.jit(jax.grad(loss))(trainable)
    for path, g in zip(jpeft.list_paths(grads), jax.tree.leaves(grads), strict=True):
        assert np.all(np.isfinite(g)) and np.any(g != 0), path
    labels = jpeft.labels(method, peft)
    assert {lab for p, lab in zip(jpeft.list_paths(peft), jax.tree.leaves(labels), strict=True) if "kernel" in p} == {
        "frozen"
    }
    # The optimizer accepts the full tree (quantised nodes included) and the trainable half.
    tx = jpeft.optimizer(optax.adam(1e-2), method, peft)
    tx.init(peft)
    tx = jpeft.optimizer(optax.adam(1e-2), method, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    assert all(np.any(u != 0) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_count_is_closed_form(family):
    _, method, q, peft, _ = setup(family)
    want = H.LAYERS * sum(RANK * (d_in + d_out) for d_in, d_out in LORA_DIMS[family])
    assert method.param_count(q) == want
    trainable, _ = jpeft.split(method, peft)
    assert sum(x.size for x in jax.tree.leaves(trainable)) == want
    assert f"trainable params: {want:,} ||" in jpeft.summary(method, peft)


def test_quantised_modules_without_lora_get_empty_deltas():
    _, _, _, peft, _ = setup("gpt2")
    block = peft["transformer"]["h"]["0"]
    assert block["attn"]["c_proj"][jpeft.RESERVED] == {"default": {}}
    assert isinstance(block["attn"]["c_proj"]["kernel"], NF4Array)
    assert set(block["attn"]["c_attn"][jpeft.RESERVED]["default"]) == {"lora_a", "lora_b"}


def test_jit_equals_no_jit_without_recompiling():
    hf, method, _, _, peft = setup("gpt2")
    wrapped = jpeft.wrap(hf.apply, method)
    traces = []

    @jax.jit
    def f(p):
        traces.append(None)
        return hf.logits(wrapped({"params": p}, **hf.inputs))

    np.testing.assert_allclose(np.asarray(f(peft)), run(hf, wrapped, peft), **TOL)
    f(randomize(peft, seed=5))
    assert len(traces) == 1


def test_scan_model_gets_stacked_deltas():
    method = jpeft.QLoRA(
        targets=r"layers/(q|v|dg_in)", rank=RANK, alpha=ALPHA, compute_dtype="float32", layouts=M.LAYOUTS,
        quant=jpeft.NF4(block_size=8, dq_block_size=4),
    )  # fmt: skip
    q = jpeft.quantize(M.params(), method, targets=r"layers/(q|v|o|dg_in)")
    peft = jpeft.apply(method, q, key=jax.random.key(1))
    d = peft["layers"]["dg_in"][jpeft.RESERVED]["default"]
    assert d["lora_a"].shape == (M.LAYERS, M.D, RANK) and d["lora_b"].shape == (M.LAYERS, RANK, *M.DG_OUT)
    ids = M.inputs()
    wrapped = jpeft.wrap(lambda v: M.Model().apply(v, ids), method)
    np.testing.assert_allclose(
        np.asarray(wrapped({"params": peft})), np.asarray(M.Model().apply({"params": jpeft.dequantize(q)}, ids)), **TOL
    )
    peft = randomize(peft, seed=4)
    want = jpeft.wrap(lambda v: M.Model().apply(v, ids), lora_twin(method))({"params": as_lora(peft)})
    np.testing.assert_allclose(np.asarray(jax.jit(wrapped)({"params": peft})), np.asarray(want), **TOL)


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(quant=64), r"QLoRA\(quant=64\): quant must be a jpeft.NF4\(...\) config"),
        (dict(use_dora=True), r"QLoRA\(use_dora=True\): DoRA on quantised kernels is not supported"),
        (dict(compute_dtype="int8"), r"QLoRA\(compute_dtype='int8'\): compute_dtype must name a float dtype"),
        (dict(compute_dtype="nope"), r"QLoRA\(compute_dtype='nope'\): compute_dtype must name a float dtype"),
    ],
)
def test_bad_fields(kwargs, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.QLoRA(targets=("q",), **kwargs)


def tiny() -> dict[str, Any]:
    rng = np.random.RandomState(0)
    return {"q": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32), "w": jnp.ones((16, 8))}}


def test_apply_errors():
    method = jpeft.QLoRA(targets=("q",), quant=jpeft.NF4(block_size=16))
    with pytest.raises(jpeft.JpeftError, match=r"QLoRA: params hold no NF4-quantised kernel. Quantise first"):
        jpeft.apply(method, tiny(), key=jax.random.key(0))
    q = jpeft.quantize(tiny(), method.quant, targets=r"q/w")
    with pytest.raises(jpeft.JpeftError, match=r"QLoRA: q/w is NF4-quantised, but QLoRA computes only linear"):
        jpeft.apply(method, q, key=jax.random.key(0))
    q = jpeft.quantize(tiny(), method)
    extra = jpeft.QLoRA(targets=("q",), quant=jpeft.NF4(block_size=16), extra_trainable=r"q/.*")
    with pytest.raises(jpeft.JpeftError, match=r"selects the quantised leaf 'q/kernel'; quantised weights cannot"):
        jpeft.apply(extra, q, key=jax.random.key(0))


def test_unsupported_layouts():
    cfg = jpeft.NF4(block_size=8, dq_block_size=4)
    q = jpeft.quantize(M.params(), cfg, targets=r"layers/(q|conv)")
    method = jpeft.QLoRA(targets=("q",), quant=cfg, layouts=M.LAYOUTS)
    with pytest.raises(jpeft.JpeftError, match=r"'layers/conv' holds a quantised kernel of layout 'conv:1'"):
        jpeft.apply(method, q, key=jax.random.key(0))
    # A layout override that disagrees with the module type passes apply; the forward pass refuses.
    lying = jpeft.QLoRA(targets=("q",), quant=cfg, layouts=((r"layers/conv", "dense"),))
    peft = jpeft.apply(lying, q, key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"'layers/conv' \(Conv, layout 'conv:1'\) holds a quantised kernel"):
        jpeft.wrap(lambda v: M.Model().apply(v, M.inputs()), lying)({"params": peft})
