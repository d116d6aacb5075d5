"""UniPELT (gated LoRA + prefix + adapter) and MAM (prefix + scaled parallel adapter)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods._unipelt import GATE, GatedLoRA
from tests import _hf_models as H
from tests._models import random_deltas

R = jpeft.RESERVED
TOL = dict(rtol=1e-5, atol=1e-5)
TARGETS = {"bert": ("query", "value"), "gpt2": ("c_attn",)}


def strip_gates(tree):
    if not isinstance(tree, dict):
        return tree
    return {k: strip_gates(v) for k, v in tree.items() if k not in GATE}


def run(hf, method, tree):
    return hf.logits(jpeft.wrap(hf.apply, method)({"params": tree}, **hf.inputs))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_unipelt_with_open_gates_equals_the_ungated_composition(family):
    hf = H.make(family)
    kw = dict(lora_targets=TARGETS[family], rank=2, prefix_tokens=3, reduction_factor=8)
    gated = jpeft.UniPELT(**kw, force_open=True)
    tree = random_deltas(jpeft.apply(gated, hf.params, key=jax.random.key(0)), seed=1, scale=0.2)
    plain = jpeft.compose(
        jpeft.LoRA(targets=TARGETS[family], rank=2, alpha=16.0),
        jpeft.PrefixTuning(num_virtual_tokens=3, prefix_projection=False),
        jpeft.PfeifferAdapter(reduction_factor=8),
        keys=("lora", "prefix", "adapter"),
    )
    np.testing.assert_allclose(run(hf, gated, tree), run(hf, plain, strip_gates(tree)), **TOL)
    free = jpeft.UniPELT(**kw)  # the same leaves with learned gates give another output
    assert np.abs(run(hf, free, tree) - run(hf, gated, tree)).max() > 1e-4


class One(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="lin")(x)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_gated_lora_matches_numpy():
    """y = x W + b + G_L x A B with G_L = mean_t sigmoid(x_t W_g + b_g): one scalar per example (the
    gate replaces alpha / r); the old code gated each token and kept alpha / r."""
    x = np.random.RandomState(0).normal(size=(2, 3, 4)).astype(np.float32)
    params = One().init(jax.random.key(0), x)["params"]
    method = GatedLoRA(targets=("lin",), rank=2, alpha=4.0)
    tree = random_deltas(jpeft.apply(method, params, key=jax.random.key(1)), seed=2, scale=0.5)
    d = {k: np.asarray(v, np.float64) for k, v in tree["lin"][R]["default"].items()}
    gate = sigmoid(x @ d["gate_kernel"] + d["gate_bias"]).mean(axis=1, keepdims=True)  # (B, 1, 1)
    want = x @ np.asarray(params["lin"]["kernel"]) + np.asarray(params["lin"]["bias"])
    want = want + gate * (x @ d["lora_a"] @ d["lora_b"])
    np.testing.assert_allclose(jpeft.wrap(One().apply, method)({"params": tree}, x), want, **TOL)
    assert method.param_count(params) == 2 * (4 + 5) + 4 + 1


def test_unipelt_gates_match_numpy_on_bert_with_padding():
    """Layer 0 of BERT (row 1 has a padded last position): every gate is the mean of sigmoid(u W_g + b_g)
    over the caller's unpadded positions, never the P prefix positions, in NumPy float64:

    - query, value: ``x W + b + G_L x A B``, ``x`` the layer input (hidden_states[0]);
    - key, value prefix rows: ``G_P * prefix``;
    - FFN output: ``y + G_A f(y W_down + b_down) W_up + b_up``, ``y`` the FFN output projection's output.
    """
    hf = H.make("bert")
    method = jpeft.UniPELT(lora_targets=("query", "value"), rank=2, prefix_tokens=3, reduction_factor=8)
    tree = random_deltas(jpeft.apply(method, hf.params, key=jax.random.key(0)), seed=1, scale=0.5)
    P = 3
    capture = dict(capture_intermediates=lambda m, _: m.name in ("query", "key", "value", "dense"), mutable=["intermediates"])
    out, state = jpeft.wrap(hf.apply, method)({"params": tree}, **hf.inputs, output_hidden_states=True, **capture)
    layer, node = state["intermediates"]["bert"]["encoder"]["layer"]["0"], tree["bert"]["encoder"]["layer"]["0"]
    got = lambda *path: np.asarray(functools.reduce(lambda n, k: n[k], path, layer)["__call__"][0], np.float64)  # noqa: E731
    deltas = lambda *path: jax.tree.map(lambda v: np.asarray(v, np.float64), functools.reduce(lambda n, k: n[k], path, node)[R]["default"])  # noqa: E731
    mask = np.asarray(hf.inputs["attention_mask"], np.float64)
    assert mask[1, -1] == 0 and mask.sum() < mask.size

    def g(u, d):
        s = sigmoid(u @ d["gate_kernel"] + d["gate_bias"])[..., 0]  # (B, T)
        return ((s * mask).sum(1) / mask.sum(1))[:, None, None]

    x = np.asarray(out.hidden_states[0], np.float64)  # (B, T, d): the real positions of layer 0's input
    for name in ("query", "value"):
        d = deltas("attention", "self", name)["lora"]
        base = hf.params["bert"]["encoder"]["layer"]["0"]["attention"]["self"][name]
        want = x @ np.asarray(base["kernel"]) + np.asarray(base["bias"]) + g(x, d) * (x @ d["lora_a"] @ d["lora_b"])
        np.testing.assert_allclose(got("attention", "self", name)[:, P:], want, rtol=1e-4, atol=1e-5)
    for name in ("key", "value"):
        d = deltas("attention", "self", name)["prefix"]
        np.testing.assert_allclose(got("attention", "self", name)[:, :P], g(x, d) * d["prefix"][None], rtol=1e-4, atol=1e-6)
    # the FFN output y, before the adapter: the output projection of the intermediate activation
    ffn = hf.params["bert"]["encoder"]["layer"]["0"]["output"]["dense"]
    h = np.asarray(jax.nn.gelu(got("intermediate", "dense")[:, P:], approximate=False), np.float64)
    y = h @ np.asarray(ffn["kernel"]) + np.asarray(ffn["bias"])
    d = deltas("output", "dense")["adapter"]
    adapter = np.maximum(y @ d["down_kernel"] + d["down_bias"], 0) @ d["up_kernel"] + d["up_bias"]
    np.testing.assert_allclose(got("output", "dense")[:, P:], y + g(y, d) * adapter, rtol=1e-4, atol=1e-5)


def test_unipelt_count_is_the_closed_form_and_gates_get_gradients():
    hf = H.make("bert")
    method = jpeft.UniPELT(lora_targets=("query", "value"), rank=2, prefix_tokens=3, reduction_factor=8)
    tree = random_deltas(jpeft.apply(method, hf.params, key=jax.random.key(0)), seed=1, scale=0.2)
    d, L, P, r = H.HIDDEN, H.LAYERS, 3, H.HIDDEN // 8
    lora = 2 * L * (2 * (d + d) + d + 1)  # query and value: r (d_in + d_out) + gate
    prefix = 2 * L * (P * d + d + 1)  # key and value modules: P d prefix + gate
    adapter = L * (2 * d * r + r + d + d + 1)  # Pfeiffer bottleneck + gate
    assert method.param_count(hf.params) == lora + prefix + adapter
    assert f"trainable params: {lora + prefix + adapter:,}" in jpeft.summary(method, tree)
    trainable, frozen = jpeft.split(method, tree)
    grads = jax.grad(lambda t: jnp.sum(run(hf, method, jpeft.combine(t, frozen)) ** 2))(trainable)
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    gates = [g for k, g in flat.items() if "gate_kernel" in k]
    assert len(gates) == 2 * L + 2 * L + L
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in gates)


def test_unipelt_bad_fields():
    with pytest.raises(jpeft.JpeftError, match="force_open must be a bool"):
        jpeft.UniPELT(force_open=1)
    with pytest.raises(jpeft.JpeftError, match="prefix_tokens must be a positive int"):
        jpeft.UniPELT(prefix_tokens=0)


def test_mam_is_prefix_plus_scaled_parallel_adapter():
    hf = H.make("gpt2")
    mam = jpeft.MAM(prefix_tokens=3, adapter_bottleneck=8)
    tree = random_deltas(jpeft.apply(mam, hf.params, key=jax.random.key(0)), seed=3, scale=0.2)
    d, L = H.HIDDEN, H.LAYERS
    assert mam.param_count(hf.params) == L * 2 * 3 * d + L * (2 * d * 8 + 8 + d)
    # With the adapter's up-projection at zero, MAM is its prefix component alone.
    quiet = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "up_" in jax.tree_util.keystr(p) else x, tree
    )
    prefix = jpeft.compose(jpeft.PrefixTuning(num_virtual_tokens=3, prefix_projection=False), keys=("prefix",))
    only_prefix = jpeft.remove(quiet, "default")
    for path in prefix.select(hf.params):
        node, src = only_prefix, quiet
        for k in path:
            node, src = node[k], src[k]
        node[R] = {"default": {"prefix": src[R]["default"]["prefix"]}}
    np.testing.assert_allclose(run(hf, mam, quiet), run(hf, prefix, only_prefix), **TOL)
    assert np.abs(run(hf, mam, tree) - run(hf, mam, quiet)).max() > 1e-4
    with pytest.raises(jpeft.JpeftError, match="adapter_bottleneck must be a positive int"):
        jpeft.MAM(adapter_bottleneck=0)


@pytest.mark.parametrize("name", ["unipelt", "mam", "fusion"])
def test_jit_agrees_and_does_not_retrace(name):
    family = "gpt2" if name == "mam" else "bert"
    hf = H.make(family)
    if name == "unipelt":
        method = jpeft.UniPELT(lora_targets=TARGETS[family], rank=2, prefix_tokens=3, reduction_factor=8)
        tree = random_deltas(jpeft.apply(method, hf.params, key=jax.random.key(0)), seed=1, scale=0.2)
    elif name == "mam":
        method = jpeft.MAM(prefix_tokens=3, adapter_bottleneck=8)
        tree = random_deltas(jpeft.apply(method, hf.params, key=jax.random.key(0)), seed=1, scale=0.2)
    else:
        pfeiffer = jpeft.PfeifferAdapter(reduction_factor=8)
        tree = random_deltas(jpeft.apply(pfeiffer, hf.params, key=jax.random.key(0), name="a"), seed=1, scale=0.2)
        method = jpeft.AdapterFusion(adapters=("a",), adapter=pfeiffer)
        tree = random_deltas(jpeft.apply(method, tree, key=jax.random.key(1), name="default"), seed=2, scale=0.2)
    traces = []

    def fn(t):
        traces.append(None)
        return run(hf, method, t)

    jitted = jax.jit(fn)
    np.testing.assert_allclose(jitted(tree), run(hf, method, tree), **TOL)
    jitted(random_deltas(tree, seed=5, scale=0.2))
    assert len(traces) == 1
