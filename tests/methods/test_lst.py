"""Ladder side tuning: pruning init and gated side network vs NumPy, no backward pass through the
backbone (counted in the training step's jaxpr), dependence on the backbone, and bad inputs."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import jpeft

os.environ.setdefault("HF_HUB_OFFLINE", "1")
R = jpeft.RESERVED
T, B = 6, 2


@pytest.fixture(autouse=True)
def _hf_broadcasts():
    with jax.numpy_rank_promotion("allow"):  # HF's Flax models add (d,) biases to (B, T, d) (tests/_hf_models.py)
        yield


@functools.cache
def gpt2():
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=128, vocab_size=50, n_positions=16)
    return FlaxGPT2LMHeadModel(cfg, seed=1)


@functools.cache
def bert():
    from transformers import BertConfig, FlaxBertModel

    cfg = BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16,
    )  # fmt: skip
    return FlaxBertModel(cfg, seed=2, add_pooling_layer=False)


def batch():
    ids = jnp.asarray(np.random.RandomState(0).randint(1, 40, (B, T)), jnp.int32)
    mask = jnp.asarray([[1] * T, [1] * (T - 2) + [0, 0]], jnp.int32)
    return ids, mask, jnp.broadcast_to(jnp.arange(T), (B, T))


def bert_out(params, method=None):
    ids, mask, _ = batch()
    fn = bert().module.apply if method is None else jpeft.wrap(bert().module.apply, method)
    return fn({"params": params}, ids, mask, jnp.zeros_like(ids), None, None, output_hidden_states=True)


# --- NumPy reference -----------------------------------------------------------------------------
def np_layers(family, params):
    """Per layer (q, k, v, o, fc, proj) as (in, out) NumPy matrices with their biases."""
    out = []
    for i in range(2):
        if family == "gpt2":
            h = params["transformer"]["h"][str(i)]
            qkv, bqkv = np.asarray(h["attn"]["c_attn"]["kernel"]).T, np.asarray(h["attn"]["c_attn"]["bias"])
            mats = {n: (qkv[:, j * 32 : (j + 1) * 32], bqkv[j * 32 : (j + 1) * 32]) for j, n in enumerate("qkv")}
            for n, m in (("o", h["attn"]["c_proj"]), ("fc", h["mlp"]["c_fc"]), ("proj", h["mlp"]["c_proj"])):
                mats[n] = (np.asarray(m["kernel"]).T, np.asarray(m["bias"]))
        else:
            lay = params["encoder"]["layer"][str(i)]
            a = lay["attention"]
            mods = {"q": a["self"]["query"], "k": a["self"]["key"], "v": a["self"]["value"], "o": a["output"]["dense"]}
            mods |= {"fc": lay["intermediate"]["dense"], "proj": lay["output"]["dense"]}
            mats = {n: (np.asarray(m["kernel"]), np.asarray(m["bias"])) for n, m in mods.items()}
        out.append(mats)
    return out


def np_topk(score, k):
    return np.sort(np.argsort(-score, kind="stable")[:k])


def np_init(family, params, heads, r):
    layers = np_layers(family, params)
    d, f = layers[0]["fc"][0].shape
    dh = d // heads
    hid = sum(
        sum(np.abs(m[n][0]).sum(1) for n in ("q", "k", "v", "fc"))
        + np.abs(m["o"][0]).sum(0)
        + np.abs(m["proj"][0]).sum(0)
        for m in layers
    )
    s = np_topk(hid, d // r)
    sel = np.zeros((d, d // r))
    sel[s, np.arange(d // r)] = 1
    out = []
    for m in layers:
        a = {n: np.abs(w) for n, (w, _) in m.items()}
        head = a["q"].sum(0) + a["k"].sum(0) + a["v"].sum(0) + a["o"].sum(1)
        cols = np.concatenate([i * dh + np_topk(head[i * dh : (i + 1) * dh], dh // r) for i in range(heads)])
        ffn = np_topk(a["fc"].sum(0) + a["proj"].sum(1), f // r)
        e = {n: m[n][0][np.ix_(s, cols)] for n in "qkv"} | {n + "_b": m[n][1][cols] for n in "qkv"}
        e |= {"o": m["o"][0][np.ix_(cols, s)], "o_b": m["o"][1][s], "fc": m["fc"][0][np.ix_(s, ffn)]}
        e |= {"fc_b": m["fc"][1][ffn], "proj": m["proj"][0][np.ix_(ffn, s)], "proj_b": m["proj"][1][s]}
        out.append(e)
    return sel, out


NAMES = {"q": "q_kernel", "k": "k_kernel", "v": "v_kernel", "o": "o_kernel", "fc": "fc_kernel", "proj": "proj_kernel"}
NAMES |= {"q_b": "q_bias", "k_b": "k_bias", "v_b": "v_bias", "o_b": "o_bias", "fc_b": "fc_bias", "proj_b": "proj_bias"}


def deltas_of(family, peft, i):
    node = peft["transformer"]["h"] if family == "gpt2" else peft["encoder"]["layer"]
    return node[str(i)][R]["default"]


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_pruning_init_matches_numpy(family):
    params = gpt2().params if family == "gpt2" else bert().params
    method = jpeft.LadderSideTuning(num_heads=4, reduction=4)
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    sel, ref = np_init(family, params, 4, 4)
    for i in range(2):
        got = deltas_of(family, peft, i)
        for n, name in NAMES.items():
            np.testing.assert_array_equal(np.asarray(got[name]), ref[i][n], err_msg=f"layer {i} {name}")
        np.testing.assert_array_equal(got["down_kernel"], sel)
        assert float(got["alpha"]) == 0.0 and got["ln1_scale"].shape == (8,)
    assert "in_kernel" in deltas_of(family, peft, 0) and "in_kernel" not in deltas_of(family, peft, 1)
    np.testing.assert_array_equal(deltas_of(family, peft, 1)["up_kernel"], sel.T)
    assert method.param_count(params) == sum(x.size for x in jax.tree.leaves(jpeft.split(method, peft)[0]))


def np_ln(x, g, b):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b


def np_block(p, x, mask, heads):
    from math import erf

    h = np_ln(x, p["ln1_scale"], p["ln1_bias"])
    q, k, v = (np.reshape(h @ p[f"{n}_kernel"] + p[f"{n}_bias"], (B, T, heads, -1)) for n in "qkv")
    sc = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    sc = np.where(mask[:, None, None, :] > 0, sc, -1e30)
    pr = np.exp(sc - sc.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    x = x + np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(B, T, -1) @ p["o_kernel"] + p["o_bias"]
    u = np_ln(x, p["ln2_scale"], p["ln2_bias"]) @ p["fc_kernel"] + p["fc_bias"]
    gelu = u * 0.5 * (1 + np.vectorize(erf)(u / math.sqrt(2)))
    return x + gelu @ p["proj_kernel"] + p["proj_bias"]


def test_gated_side_network_matches_numpy():
    """BERT (bidirectional, padding mask), random deltas and gates: the side network's up-projected
    last state replaces the last hidden state; the NumPy ladder reads BERT's own hidden states."""
    method = jpeft.LadderSideTuning(num_heads=4, reduction=4)
    peft = jpeft.apply(method, bert().params, key=jax.random.key(0))
    rng = np.random.RandomState(3)
    peft = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(x + rng.normal(0, 0.3, x.shape), x.dtype) if R in jax.tree_util.keystr(p) else x, peft
    )
    hidden = [np.asarray(h, np.float64) for h in bert_out(bert().params).hidden_states]
    mask = np.asarray(batch()[1])
    p0, p1 = (jax.tree.map(lambda x: np.asarray(x, np.float64), deltas_of("bert", peft, i)) for i in range(2))
    s = hidden[0] @ p0["in_kernel"] + p0["in_bias"]
    for i, p in enumerate((p0, p1)):
        mu = 1 / (1 + np.exp(-p["alpha"] / 0.1))
        s = np_block(p, mu * (hidden[i + 1] @ p["down_kernel"] + p["down_bias"]) + (1 - mu) * s, mask, 4)
    want = s @ p1["up_kernel"] + p1["up_bias"]
    got = bert_out(peft, method)
    np.testing.assert_allclose(np.asarray(got.last_hidden_state), want, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(got.hidden_states[1]), hidden[1], atol=1e-5)  # backbone layers untouched
    add = bert_out(peft, jpeft.LadderSideTuning(num_heads=4, reduction=4, output="add")).last_hidden_state
    np.testing.assert_allclose(np.asarray(add), want + hidden[2], atol=2e-4, rtol=2e-4)


# --- gradients -----------------------------------------------------------------------------------
def lm_loss(fn, params):
    ids, mask, pos = batch()
    logits = fn({"params": params}, ids, mask, pos).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def kernel_dots(jaxpr, shapes):
    """dot_general equations (nested jaxprs included) with an operand shaped like a backbone kernel."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            n += any(tuple(v.aval.shape) in shapes for v in eqn.invars)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += kernel_dots(inner, shapes)
    return n


class _Leaky(jpeft.LadderSideTuning):
    detach = False  # reads the backbone without stop_gradient: the check below must catch it


def grad_dots(method):
    """The backbone-kernel dots in the jaxpr of the gradient with respect to *every* leaf (backbone
    included), and that gradient function (traced once, jitted for the values)."""
    params = gpt2().params
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    fn = jpeft.wrap(gpt2().module.apply, method)
    layer = flatten_dict(params["transformer"]["h"])
    shapes = {tuple(x.shape) for k, x in layer.items() if k[-1] == "kernel"}
    shapes |= {s[::-1] for s in shapes}
    traced = jax.jit(jax.grad(lambda p: lm_loss(fn, p))).trace(peft)
    return kernel_dots(traced.jaxpr.jaxpr, shapes), lambda: traced.lower().compile()(peft)


def test_no_backward_through_backbone():
    """Each backbone kernel feeds one dot (its forward matmul) in the LST step even when every leaf,
    backbone included, is differentiated; its gradients are zero. LST without stop_gradient uses the
    kernels again in the backward pass (so the count catches a backward pass through the layers)."""
    forward = 4 * 2  # c_attn, attn c_proj, c_fc, mlp c_proj per layer, 2 layers
    n, grads = grad_dots(jpeft.LadderSideTuning(num_heads=4, reduction=4))
    assert n == forward
    grads = grads()
    assert all(float(jnp.abs(x).max()) == 0 for k, x in flatten_dict(grads["transformer"]["h"]).items() if R not in k)
    assert any(float(jnp.abs(x).max()) > 0 for k, x in flatten_dict(grads["transformer"]["h"]).items() if R in k)
    assert grad_dots(_Leaky(num_heads=4, reduction=4))[0] > forward


def test_output_depends_on_backbone():
    method = jpeft.LadderSideTuning(num_heads=4, reduction=4)
    params = gpt2().params
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    fn = jpeft.wrap(gpt2().module.apply, method)
    ids, mask, pos = batch()
    out = fn({"params": peft}, ids, mask, pos).logits
    flat = flatten_dict(peft)
    key = ("transformer", "h", "0", "mlp", "c_fc", "kernel")
    flat[key] = flat[key] * 1.5  # a backbone weight of the lowest layer, not a delta
    out2 = fn({"params": unflatten_dict(flat)}, ids, mask, pos).logits
    assert np.isfinite(np.asarray(out)).all() and float(jnp.abs(out2 - out).max()) > 1e-4
    # and the side network is what the head reads: changing the up-projection changes the logits
    up = ("transformer", "h", "1", R, "default", "up_bias")
    flat = flatten_dict(peft)
    flat[up] = flat[up] + 1.0
    assert float(jnp.abs(fn({"params": unflatten_dict(flat)}, ids, mask, pos).logits - out).max()) > 1e-4


# --- bad inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        ({}, r"num_heads=None\): pass the backbone's number of attention heads"),
        ({"num_heads": 4, "reduction": 0}, r"reduction"),
        ({"num_heads": 4, "temperature": -1.0}, r"temperature"),
        ({"num_heads": 4, "output": "concat"}, r"output"),
        ({"num_heads": 4, "nonlinearity": "swishy"}, r"nonlinearity"),
    ],
)
def test_bad_fields(kw, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.LadderSideTuning(**kw)


def test_bad_inputs():
    params = gpt2().params
    with pytest.raises(jpeft.JpeftError, match=r"reduction=3\).*head size 8.*multiples of reduction"):
        jpeft.apply(jpeft.LadderSideTuning(num_heads=4, reduction=3), params, key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"num_heads=5\).*query width 32.*not a multiple of num_heads"):
        jpeft.apply(jpeft.LadderSideTuning(num_heads=5), params, key=jax.random.key(0))
    d = 16  # a tunix decoder's tree (its layers return (cache, x)): refused
    shapes = {f"layers/0/attn/{m}/w": (d, 2, 8) for m in ("q_proj", "k_proj", "v_proj")}
    shapes |= {"layers/0/attn/o_proj/kernel": (2, 8, d), "layers/0/mlp/gate_proj/kernel": (d, 32)}
    shapes |= {"layers/0/mlp/up_proj/kernel": (d, 32), "layers/0/mlp/down_proj/kernel": (32, d)}
    shapes |= {"embedder/input_embedding": (10, d)}
    tunix = unflatten_dict({tuple(k.split("/")): jnp.zeros(s) for k, s in shapes.items()})
    with pytest.raises(jpeft.JpeftError, match=r"the 'tunix' profile is not supported"):
        jpeft.apply(jpeft.LadderSideTuning(num_heads=2, reduction=2), tunix, key=jax.random.key(0))
    method = jpeft.LadderSideTuning(num_heads=4, reduction=4)
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    ids, mask, pos = batch()
    with pytest.raises(jpeft.JpeftError, match=r"cached decoding"):
        jpeft.wrap(gpt2().module.apply, method)({"params": peft}, ids, mask, pos, init_cache=True, mutable=["cache"])
    with pytest.raises(jpeft.JpeftError, match=r"layer 1 ran without the side state of layer 0"):
        jpeft.wrap(gpt2().module.apply, method, drop_layers=[0])({"params": peft}, ids, mask, pos)
    with pytest.raises(jpeft.JpeftError, match=r"side network stopped after layer 0: the last layer"):
        jpeft.wrap(gpt2().module.apply, method, drop_layers=[1])({"params": peft}, ids, mask, pos)
    with pytest.raises(jpeft.JpeftError, match=r"adapter_index= \(a mixed batch\) is not supported"):
        jpeft.wrap(gpt2().module.apply, method)({"params": peft}, ids, mask, pos, adapter_index=jnp.zeros(B, int))


# --- NNX -----------------------------------------------------------------------------------------
def nnx_gpt2():
    """HF GPT-2 (tiny) rewritten in NNX with the same parameter paths, holding the same weights."""
    from flax import nnx

    from tests._nnx_models import load

    d, heads, rngs = 32, 4, nnx.Rngs(0)

    class Conv1D(nnx.Module):  # HF's FlaxConv1D: kernel (out, in)
        def __init__(self, n_in, n_out):
            self.kernel, self.bias = nnx.Param(jnp.zeros((n_out, n_in))), nnx.Param(jnp.zeros((n_out,)))

        def __call__(self, x):
            return x @ self.kernel[...].T + self.bias[...][None, None]

    class Attn(nnx.Module):
        def __init__(self):
            self.c_attn, self.c_proj = Conv1D(d, 3 * d), Conv1D(d, d)

        def __call__(self, x, mask):
            q, k, v = (a.reshape(B, T, heads, -1) for a in jnp.split(self.c_attn(x), 3, axis=-1))
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
            ok = jnp.tril(jnp.ones((T, T), bool))[None, None] & (mask[:, None, None, :] > 0)
            p = jax.nn.softmax(jnp.where(ok, s, jnp.finfo(s.dtype).min), axis=-1)
            return self.c_proj(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, d))

    class Mlp(nnx.Module):
        def __init__(self):
            self.c_fc, self.c_proj = Conv1D(d, 128), Conv1D(128, d)

        def __call__(self, x):
            return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))

    class Block(nnx.Module):
        def __init__(self):
            self.ln_1, self.ln_2 = (nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs) for _ in range(2))
            self.attn, self.mlp = Attn(), Mlp()

        def __call__(self, x, mask):
            x = x + self.attn(self.ln_1(x), mask)
            return x + self.mlp(self.ln_2(x))

    class Body(nnx.Module):
        def __init__(self):
            self.wte, self.wpe = nnx.Embed(50, d, rngs=rngs), nnx.Embed(16, d, rngs=rngs)
            self.h = nnx.List([Block() for _ in range(2)])
            self.ln_f = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self):
            self.transformer = Body()

        def __call__(self, ids, mask, pos):
            t = self.transformer
            x = t.wte(ids) + t.wpe(pos)
            for block in t.h:
                x = block(x, mask)
            return t.ln_f(x) @ t.wte.embedding[...].T

    return load(Model(), jax.tree.map(np.asarray, gpt2().params))


def test_nnx_model_equals_linen():
    """The same hooks on an NNX twin of GPT-2: base and LST outputs equal the linen HF model's."""
    ids, mask, pos = batch()
    method = jpeft.LadderSideTuning(num_heads=4, reduction=4)
    model = nnx_gpt2()
    base = gpt2().module.apply({"params": gpt2().params}, ids, mask, pos).logits
    np.testing.assert_allclose(np.asarray(model(ids, mask, pos)), np.asarray(base), atol=1e-4, rtol=1e-4)
    peft = jpeft.apply(method, gpt2().params, key=jax.random.key(0))
    want = jpeft.wrap(gpt2().module.apply, method)({"params": peft}, ids, mask, pos).logits
    adapted = jpeft.apply(method, model, key=jax.random.key(0))
    got = adapted(ids, mask, pos)
    assert float(jnp.abs(want - base).max()) > 1e-3  # the side network's output, not the base model's
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
