"""Ladder side tuning on Llama (grouped-query attention, rotary positions, gated SiLU MLP): the
pruning init and the side network vs NumPy on HF's Flax Llama, the NNX Llama equal to it, no
backward pass through the backbone (counted in the training step's jaxpr), and bad inputs."""

from __future__ import annotations

import functools
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import jpeft
from tests.methods.test_lst import _hf_broadcasts, kernel_dots, np_topk  # noqa: F401 (an autouse fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
R = jpeft.RESERVED
B, T, D, HEADS, KV, FFN, THETA, VOCAB = 2, 6, 48, 6, 2, 64, 500.0, 80
DH = D // HEADS
# d_s = 24, side heads 6 x 4 (2 rotary pairs), 2 key-value heads, FFN 32: no side kernel has a backbone kernel's shape
METHOD = jpeft.LadderSideTuning(num_heads=HEADS, reduction=2, rope_theta=THETA)


@functools.cache
def llama():
    """A tiny HF Flax Llama module with NumPy-random weights in its parameter tree (no traced init)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_flax_llama import FlaxLlamaForCausalLMModule

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV,
        intermediate_size=FFN, max_position_embeddings=32,
    )  # fmt: skip
    shapes = {"model/embed_tokens/embedding": (VOCAB, D), "model/norm/weight": (D,), "lm_head/kernel": (D, VOCAB)}
    for i in range(2):
        shapes |= {
            f"model/layers/{i}/self_attn/{m}_proj/kernel": (D, w)
            for m, w in zip("qkv", (D, KV * DH, KV * DH), strict=True)
        }
        shapes |= {
            f"model/layers/{i}/self_attn/o_proj/kernel": (D, D),
            f"model/layers/{i}/mlp/down_proj/kernel": (FFN, D),
        }
        shapes |= {f"model/layers/{i}/mlp/{m}_proj/kernel": (D, FFN) for m in ("gate", "up")}
        shapes |= {f"model/layers/{i}/{n}_layernorm/weight": (D,) for n in ("input", "post_attention")}
    rng = np.random.RandomState(3)
    params = {
        tuple(k.split("/")): jnp.asarray(rng.normal(1.0 if k.endswith("weight") else 0.0, 0.2, s), jnp.float32)
        for k, s in shapes.items()
    }
    return types.SimpleNamespace(module=FlaxLlamaForCausalLMModule(cfg), params=unflatten_dict(params), config=cfg)


def batch():
    ids = jnp.asarray(np.random.RandomState(0).randint(1, VOCAB, (B, T)), jnp.int32)
    mask = jnp.asarray([[1] * T, [1] * (T - 2) + [0, 0]], jnp.int32)
    return ids, mask, jnp.broadcast_to(jnp.arange(T) + 3, (B, T))  # positions off zero: rope must read them


def run(params, method=None, **kw):
    fn = llama().module.apply if method is None else jpeft.wrap(llama().module.apply, method)
    return jax.jit(lambda p: fn({"params": p}, *batch(), **kw))(params)  # one compile, not one per op


@functools.cache
def adapted():
    """The LST tree with random deltas and gates (so the check sees every path of the side block)."""
    rng = np.random.RandomState(3)
    peft = jpeft.apply(METHOD, llama().params, key=jax.random.key(0))
    noisy = lambda p, x: jnp.asarray(x + rng.normal(0, 0.3, x.shape), x.dtype) if R in jax.tree_util.keystr(p) else x  # noqa: E731
    return peft, jax.tree_util.tree_map_with_path(noisy, peft)


# --- NumPy reference -----------------------------------------------------------------------------
def np_layers(params):
    names = {"q": "self_attn/q_proj", "k": "self_attn/k_proj", "v": "self_attn/v_proj", "o": "self_attn/o_proj"}
    names |= {"gate": "mlp/gate_proj", "fc": "mlp/up_proj", "proj": "mlp/down_proj"}
    flat = {"/".join(k): np.asarray(v, np.float64) for k, v in flatten_dict(params).items()}
    return [{n: flat[f"model/layers/{i}/{m}/kernel"] for n, m in names.items()} for i in range(2)]


def np_init(params, r):
    """Pruning by L1 norms: hidden set S; per key-value group rotary pairs (j, j + DH/2); FFN features."""
    layers = np_layers(params)
    inside, outside = ("q", "k", "v", "gate", "fc"), ("o", "proj")
    hid = sum(sum(np.abs(m[n]).sum(1) for n in inside) + sum(np.abs(m[n]).sum(0) for n in outside) for m in layers)
    s = np_topk(hid, D // r)
    out = []
    for m in layers:
        a = {n: np.abs(w) for n, w in m.items()}
        group = []
        for g in range(KV):
            score = a["k"].sum(0)[g * DH : (g + 1) * DH] + a["v"].sum(0)[g * DH : (g + 1) * DH]
            for i in range(g * HEADS // KV, (g + 1) * HEADS // KV):
                score = score + a["q"].sum(0)[i * DH : (i + 1) * DH] + a["o"].sum(1)[i * DH : (i + 1) * DH]
            pairs = np_topk(score[: DH // 2] + score[DH // 2 :], DH // r // 2)
            group.append(np.concatenate([pairs, pairs + DH // 2]))
        qcols = np.concatenate([i * DH + group[i * KV // HEADS] for i in range(HEADS)])
        kvcols = np.concatenate([g * DH + group[g] for g in range(KV)])
        ffn = np_topk(a["fc"].sum(0) + a["gate"].sum(0) + a["proj"].sum(1), FFN // r)
        e = {"q": m["q"][np.ix_(s, qcols)], "k": m["k"][np.ix_(s, kvcols)], "v": m["v"][np.ix_(s, kvcols)]}
        e |= {"o": m["o"][np.ix_(qcols, s)], "gate": m["gate"][np.ix_(s, ffn)], "fc": m["fc"][np.ix_(s, ffn)]}
        out.append(e | {"proj": m["proj"][np.ix_(ffn, s)]})
    return s, out


def np_rms(x, g, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * g


def np_rope(x, pos):
    w = x.shape[-1]
    ang = pos[..., None] * THETA ** (-np.arange(0, w, 2) / w)
    ang = np.concatenate([ang, ang], -1)[:, :, None]
    return x * np.cos(ang) + np.concatenate([-x[..., w // 2 :], x[..., : w // 2]], -1) * np.sin(ang)


def np_block(p, x, mask, pos):
    hs = p["q_kernel"].shape[1] // HEADS
    h = np_rms(x, p["ln1_scale"], 1e-6)
    q, k, v = (np.reshape(h @ p[f"{n}_kernel"], (B, T, -1, hs)) for n in "qkv")
    q, k = np_rope(q, pos), np_rope(k, pos)
    k, v = np.repeat(k, HEADS // KV, axis=2), np.repeat(v, HEADS // KV, axis=2)
    sc = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hs)
    sc = np.where(np.tril(np.ones((T, T), bool))[None, None] & (mask[:, None, None, :] > 0), sc, -1e30)
    pr = np.exp(sc - sc.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    x = x + np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(B, T, -1) @ p["o_kernel"]
    h = np_rms(x, p["ln2_scale"], 1e-6)
    u = h @ p["gate_kernel"]
    return x + (u / (1 + np.exp(-u)) * (h @ p["fc_kernel"])) @ p["proj_kernel"]


def deltas(peft, i):
    return peft["model"]["layers"][str(i)][R]["default"]


def test_pruning_init_matches_numpy():
    peft = adapted()[0]
    s, ref = np_init(llama().params, 2)
    for i in range(2):
        got = deltas(peft, i)
        for n, want in ref[i].items():
            np.testing.assert_array_equal(np.asarray(got[f"{n}_kernel"], np.float64), want, err_msg=f"layer {i} {n}")
        np.testing.assert_array_equal(np.asarray(got["down_kernel"]).argmax(0), s)
        assert float(got["alpha"]) == 0.0 and got["ln1_scale"].shape == (D // 2,) and "q_bias" not in got
    np.testing.assert_array_equal(np.asarray(deltas(peft, 1)["up_kernel"]).argmax(1), s)
    assert METHOD.param_count(llama().params) == sum(x.size for x in jax.tree.leaves(jpeft.split(METHOD, peft)[0]))


def test_side_network_matches_numpy_and_nnx():
    """Random deltas and gates: the NumPy ladder over the base model's own layer outputs (rotary
    positions 3.., a padded row, GQA) gives the logits; the output reads the backbone; the NNX
    Llama (jpeft.models' decoder) with the same weights and deltas gives the same logits."""
    params, peft = llama().params, adapted()[1]
    _, inter = run(params, capture_intermediates=True, mutable=["intermediates"])
    inter = inter["intermediates"]["model"]
    x = np.asarray(inter["embed_tokens"]["__call__"][0], np.float64)
    b = [np.asarray(inter["layers"][str(i)]["__call__"][0][0], np.float64) for i in range(2)]
    _, mask, pos = (np.asarray(a) for a in batch())
    p = [jax.tree.map(lambda a: np.asarray(a, np.float64), deltas(peft, i)) for i in range(2)]
    s = x @ p[0]["in_kernel"] + p[0]["in_bias"]
    for i in range(2):
        mu = 1 / (1 + np.exp(-p[i]["alpha"] / 0.1))
        s = np_block(p[i], mu * (b[i] @ p[i]["down_kernel"] + p[i]["down_bias"]) + (1 - mu) * s, mask, pos)
    y = np_rms(s @ p[1]["up_kernel"] + p[1]["up_bias"], np.asarray(params["model"]["norm"]["weight"]), 1e-6)
    want = y @ np.asarray(params["lm_head"]["kernel"], np.float64)
    got = run(peft, METHOD).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)
    flat = flatten_dict(peft)
    key = ("model", "layers", "0", "mlp", "up_proj", "kernel")
    flat[key] = flat[key] * 1.5  # a backbone weight of the lowest layer, not a delta
    assert float(jnp.abs(run(unflatten_dict(flat), METHOD).logits - got).max()) > 1e-4

    from jpeft.models import _llama
    from tests._nnx_models import load

    cfg = llama().config
    config = _llama.Config(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV,
        intermediate_size=FFN, max_position_embeddings=32, rms_norm_eps=cfg.rms_norm_eps,
    )  # fmt: skip
    model = jpeft.apply(METHOD, _llama.from_params(config, params), key=jax.random.key(0))
    load(model, peft)
    np.testing.assert_allclose(np.asarray(model(*batch()).logits), np.asarray(got), atol=1e-5, rtol=1e-5)


class _Leaky(jpeft.LadderSideTuning):
    detach = False  # reads the backbone without stop_gradient: the count below must catch it


def test_no_backward_through_backbone():
    """Each of the 7 backbone kernels per layer feeds one dot (its forward matmul) in the LST
    training step's jaxpr; without stop_gradient they feed their backward matmuls too."""
    layer = flatten_dict(llama().params["model"]["layers"])
    shapes = {tuple(x.shape) for k, x in layer.items() if k[-1] == "kernel"}
    shapes |= {s[::-1] for s in shapes}

    def dots(method, peft):
        tr, fr = jpeft.split(method, peft)
        fn = jpeft.wrap(llama().module.apply, method)
        loss = lambda t: fn({"params": jpeft.combine(t, fr)}, *batch()).logits.astype(jnp.float32).std()  # noqa: E731
        return kernel_dots(jax.make_jaxpr(jax.grad(loss))(tr).jaxpr, shapes)

    peft = adapted()[0]
    assert dots(METHOD, peft) == 7 * 2
    leaky = _Leaky(num_heads=HEADS, reduction=2, rope_theta=THETA, extra_trainable=r"model/layers/.*")
    assert dots(leaky, peft) > 7 * 2


def test_bad_inputs():
    params = llama().params
    with pytest.raises(jpeft.JpeftError, match=r"reduction=8\).*side head size 8 / 8 = 1 is odd"):
        jpeft.apply(jpeft.LadderSideTuning(num_heads=HEADS, reduction=8), params, key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"num_heads=5\).*query width 48.*not a multiple of num_heads"):
        jpeft.apply(jpeft.LadderSideTuning(num_heads=5), params, key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"rope_theta"):
        jpeft.LadderSideTuning(num_heads=HEADS, rope_theta=0.0)
    flat = flatten_dict(params)
    flat[("model", "layers", "0", "self_attn", "q_proj", "bias")] = jnp.zeros(D)
    with pytest.raises(jpeft.JpeftError, match=r"q_proj has a bias \(48,\); the Llama side block has no biases"):
        jpeft.apply(METHOD, unflatten_dict(flat), key=jax.random.key(0))
