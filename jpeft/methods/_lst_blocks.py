"""Ladder side tuning's side blocks, one kind per backbone family, and their pruning init.

Two kinds of side block of width ``d_s = d / r`` (``jpeft.LadderSideTuning`` runs one per layer):

* ``'mha'`` (GPT-2, BERT, RoBERTa): pre-LayerNorm multi-head attention and a one-input FFN, with
  biases; causal for GPT-2, a padding mask for BERT;
* ``'llama'`` (Llama-style decoders): pre-RMSNorm causal attention with rotary positions (HF's
  rotate-half form, at head width ``d_head / r`` with the backbone's rope base), grouped-query
  capable, and the gated MLP ``down(silu(gate(h)) * up(h))``; no biases, as the backbone.

Pruning (:func:`prune`) copies the backbone layer's kernels restricted to the kept features: the
hidden set ``S`` (shared by every layer), per head (``'mha'``) or per key-value group (``'llama'``:
the query heads of a group and its key-value head keep the same features, so ``q k`` and ``v o``
stay matched) the head features with the largest L1 norms, and the FFN features. For ``'llama'``
head features are kept in rotary pairs ``(j, j + d_head / 2)`` so the side block's rotate-half
pairs them as the backbone does.

Example:
    >>> import numpy as np
    >>> from jpeft.methods._lst_blocks import Dims, shapes
    >>> dims = Dims(d=32, heads=4, kv_heads=2, head=8, ffn=64, r=4)
    >>> shapes("llama", dims)["k_kernel"], shapes("llama", dims)["gate_kernel"]
    ((8, 4), (8, 16))
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _tree, profiles
from jpeft._errors import JpeftError
from jpeft._method import Context
from jpeft._tree import Path, join
from jpeft.methods._adapters import _module_paths, _own

KIND = {"gpt2": "mha", "bert": "mha", "roberta": "mha", "llama": "llama"}
"""The side block of each supported profile."""
CAUSAL = ("gpt2", "llama")
ACTIVATION = {"gpt2": "gelu_new", "bert": "gelu", "roberta": "gelu", "llama": "swish"}
"""The family's FFN nonlinearity (``jpeft.methods._adapters.ACTIVATIONS`` names), the side FFN's default."""
RMS_EPS = 1e-6
"""The side RMSNorm's epsilon (a side-network constant; the backbone's is not in the tree)."""


@dataclasses.dataclass(frozen=True)
class Dims:
    """The backbone's sizes: hidden ``d``, query / key-value heads, head width, FFN width; reduction ``r``."""

    d: int
    heads: int
    kv_heads: int
    head: int
    ffn: int
    r: int

    @property
    def side(self) -> tuple[int, int, int]:
        """``(d_s, head_s, ffn_s)``: the side network's widths."""
        return self.d // self.r, self.head // self.r, self.ffn // self.r


def shapes(kind: str, dims: Dims) -> dict[str, tuple[int, ...]]:
    """The side block's parameter shapes (the ladder's gate and projections are the method's)."""
    ds, hs, fs = dims.side
    qo, kv = dims.heads * hs, dims.kv_heads * hs
    out = {"ln1_scale": (ds,), "q_kernel": (ds, qo), "k_kernel": (ds, kv), "v_kernel": (ds, kv), "o_kernel": (qo, ds)}
    out |= {"ln2_scale": (ds,), "fc_kernel": (ds, fs), "proj_kernel": (fs, ds)}
    if kind == "llama":
        return out | {"gate_kernel": (ds, fs)}
    out |= {"q_bias": (qo,), "k_bias": (kv,), "v_bias": (kv,), "o_bias": (ds,), "fc_bias": (fs,), "proj_bias": (ds,)}
    return out | {"ln1_bias": (ds,), "ln2_bias": (ds,)}


def xp_of(*arrays: Any) -> Any:
    """NumPy for concrete arrays (no per-op compiles at init), ``jax.numpy`` under tracing."""
    return jnp if any(isinstance(a, jax.core.Tracer) for a in arrays) else np


def top_k(score: Any, k: int) -> Any:
    """The indices of the ``k`` largest scores (ties: the lower index), in increasing order."""
    xp = xp_of(score)
    return xp.sort(xp.argsort(-score, stable=True)[:k])


IN_SIDE, OUT_SIDE = ("q", "k", "v", "fc", "gate"), ("o", "proj")
"""Kernels that read the hidden features (rows) and that write them (columns)."""


def hidden_score(k: Mapping[str, Any]) -> Any:
    """One layer's L1 importance of each hidden feature (summed over the layers to choose ``S``)."""
    xp = xp_of(*k.values())
    a = {n: xp.abs(xp.asarray(v, xp.float32)) for n, v in k.items() if n in IN_SIDE + OUT_SIDE}
    return sum(a[n].sum(1) for n in IN_SIDE if n in a) + sum(a[n].sum(0) for n in OUT_SIDE)


def _head_columns(kind: str, a: Mapping[str, Any], dims: Dims, xp: Any) -> tuple[Any, Any]:
    """``(query/output columns, key/value columns)`` of the kept head features."""
    dh, hs = dims.head, dims.head // dims.r
    qo = (a["q"].sum(0) + a["o"].sum(1)).reshape(dims.heads, dh)
    if kind == "mha":  # one selection per head (as many key-value heads as query heads)
        score = qo + (a["k"].sum(0) + a["v"].sum(0)).reshape(dims.heads, dh)
        cols = xp.concatenate([i * dh + top_k(score[i], hs) for i in range(dims.heads)])
        return cols, cols
    groups = dims.heads // dims.kv_heads
    score = qo.reshape(dims.kv_heads, groups, dh).sum(1) + (a["k"].sum(0) + a["v"].sum(0)).reshape(dims.kv_heads, dh)
    pairs = [top_k(s[: dh // 2] + s[dh // 2 :], hs // 2) for s in score]  # rotary pairs (j, j + dh/2)
    keep = [xp.concatenate([p, p + dh // 2]) for p in pairs]
    q = xp.concatenate([i * dh + keep[i // groups] for i in range(dims.heads)])
    return q, xp.concatenate([g * dh + keep[g] for g in range(dims.kv_heads)])


def prune(kind: str, k: Mapping[str, Any], keep: Any, dims: Dims, dtype: Any) -> dict[str, jax.Array]:
    """The side block pruned from one layer's kernels ``k`` (``(in, out)``; biases as ``'<n>_b'``)."""
    xp = xp_of(*k.values())
    k = {n: xp.asarray(v, dtype) for n, v in k.items()}
    a = {n: xp.abs(v) for n, v in k.items()}
    qcols, kvcols = _head_columns(kind, a, dims, xp)
    ffn = top_k(a["fc"].sum(0) + a["proj"].sum(1) + (a["gate"].sum(0) if "gate" in a else 0), dims.ffn // dims.r)
    ones = np.ones((dims.d // dims.r,), dtype)
    cols = {"q": qcols, "k": kvcols, "v": kvcols}
    out = {"ln1_scale": ones, "ln2_scale": ones}
    out |= {f"{n}_kernel": k[n][keep][:, cols[n]] for n in "qkv"} | {"o_kernel": k["o"][qcols][:, keep]}
    out |= {f"{n}_kernel": k[n][keep][:, ffn] for n in ("fc", "gate") if n in k}
    out["proj_kernel"] = k["proj"][ffn][:, keep]
    if kind == "mha":
        out |= {f"{n}_bias": k[n + "_b"][cols[n]] for n in "qkv"} | {"o_bias": k["o_b"][keep]}
        out |= {"fc_bias": k["fc_b"][ffn], "proj_bias": k["proj_b"][keep], "ln1_bias": 0 * ones, "ln2_bias": 0 * ones}
    return {n: jnp.asarray(v, dtype) for n, v in out.items()}


# --- the backbone layer ----------------------------------------------------------------------
def layer_kernels(name: str, profile: profiles.Profile, path: Path, ctx: Context) -> dict[str, jax.Array]:
    """The layer's q, k, v, o, fc, proj (and Llama's gate) kernels as ``(in, out)`` matrices, biases as ``'<n>_b'``."""
    llama = KIND[profile.name] == "llama"
    node = _tree.get(ctx.params, path)
    found: dict[str, jax.Array] = {}
    fields = {"query": "q", "key": "k", "value": "v", "attn_out": "o", "ffn_in": "fc", "ffn_out": "proj"}
    for sub, child in _module_paths(node).items():
        full = tuple(path) + sub
        own = _own(child)
        for field, short in fields.items():
            if not re.fullmatch(getattr(profile, field), join(full)):
                continue
            short = "gate" if field == "ffn_in" and "gate" in str(full[-1]) else short
            layout = ctx.layout(name, full, own, profile.layouts)
            kernel = own.get(layout.leaf)
            if kernel is None or layout.kind not in ("dense", "transposed") or kernel.ndim != 2:
                shape = None if kernel is None else tuple(kernel.shape)
                raise JpeftError(
                    f"{name}: {join(full)} (the {field} site) has kernel shape {shape} and layout "
                    f"{layout.kind!r}; ladder side tuning needs one unstacked 2-D Dense or Conv1D kernel per site "
                    "(no nn.scan stack, no quantised base)."
                )
            if llama and "bias" in own:
                raise JpeftError(
                    f"{name}: {join(full)} has a bias {tuple(own['bias'].shape)}; the Llama side block has "
                    "no biases (as Llama). Use a model without projection biases (attention_bias=False)."
                )
            xp = xp_of(kernel)
            w = xp.asarray(kernel).T if layout.kind == "transposed" else xp.asarray(kernel)
            bias = xp.asarray(own["bias"]) if "bias" in own else xp.zeros(w.shape[1], w.dtype)
            found[short], found[short + "_b"] = w, bias
    missing = [f for f, s in fields.items() if s not in found] + (["gate"] if llama and "gate" not in found else [])
    if missing:
        raise JpeftError(f"{name}: layer {join(path)} has no {missing} site under the {profile.name} profile.")
    if profile.qkv_fused is not None:
        w, bias = found["q"], found["q_b"]
        d = w.shape[1] // 3
        for j, n in enumerate("qkv"):
            found[n], found[n + "_b"] = w[:, j * d : (j + 1) * d], bias[j * d : (j + 1) * d]
    return found


# --- forward -------------------------------------------------------------------------------------
def _vec(v: jax.Array, ndim: int) -> jax.Array:
    return v.reshape((1,) * (ndim - 1) + v.shape)


def lin(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ kernel + bias`` with the bias broadcast explicitly (no implicit rank promotion)."""
    y = x @ kernel
    return y if bias is None else y + _vec(bias, x.ndim)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * _vec(scale, x.ndim) + _vec(bias, x.ndim)


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + RMS_EPS) * _vec(scale, x.ndim)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF Llama's rotate-half rotary embedding of ``x: (B, T, heads, width)`` at ``positions: (B, T)``."""
    width = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, width, 2) / width))
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)[None, None]  # (B, T, width/2)
    emb = jnp.concatenate([angle, angle], -1)[:, :, None, :]
    half = width // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


def block(
    kind: str,
    p: Mapping[str, jax.Array],
    x: jax.Array,
    mask: jax.Array | None,
    positions: jax.Array | None,
    *,
    heads: int,
    causal: bool,
    act: Callable[[jax.Array], jax.Array],
    rope_theta: float,
) -> jax.Array:
    """One side block on ``x: (B, T, d_s)`` (``mask``: ``(B, T)`` or None; ``positions`` for ``'llama'``)."""
    b, t, _ = x.shape
    llama = kind == "llama"
    bias = (lambda n: None) if llama else (lambda n: p[f"{n}_bias"])  # noqa: E731
    h = _rms_norm(x, p["ln1_scale"]) if llama else _layer_norm(x, p["ln1_scale"], p["ln1_bias"])
    hs = p["q_kernel"].shape[1] // heads
    q, k, v = (lin(h, p[f"{n}_kernel"], bias(n)).reshape(b, t, -1, hs) for n in "qkv")
    if llama:
        pos = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
        q, k = rope(q, pos, rope_theta), rope(k, pos, rope_theta)
        k, v = (jnp.repeat(a, heads // a.shape[2], axis=2) for a in (k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hs)
    allowed = jnp.ones((b, 1, t, t), bool)
    if mask is not None:
        allowed = allowed & (mask[:, None, None, :] > 0)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((t, t), bool))[None, None]
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, -1)
    x = x + lin(o, p["o_kernel"], bias("o"))
    if llama:
        h = _rms_norm(x, p["ln2_scale"])
        return x + lin(act(lin(h, p["gate_kernel"])) * lin(h, p["fc_kernel"]), p["proj_kernel"])
    h = _layer_norm(x, p["ln2_scale"], p["ln2_bias"])
    return x + lin(act(lin(h, p["fc_kernel"], p["fc_bias"])), p["proj_kernel"], p["proj_bias"])
