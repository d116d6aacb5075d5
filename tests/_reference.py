"""Plain NumPy references for the forward passes and merges of the LoRA family.

Everything here computes in float64 from the *merged* kernel, ``W + s A B`` (or DoRA's
``m (W + s A B) / ||W + s A B||_c``), and then runs the layer's own reference forward. jpeft runs
the unmerged path ``f(x; W) + s (x A) B``, so the two agree only if the algebra is right.

Kernels are in Flax's layouts: dense ``(d_in, d_out)``, transposed ``(d_out, d_in)`` (HF GPT-2's
``Conv1D``), dense_general ``(*in, *out)``, embedding ``(vocab, d)`` and convolution
``(*window, c_in, c_out)``. Factors are ``a: (*in, r)`` and ``b: (r, *out)``; for a convolution,
``in`` is ``(*window, c_in)``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np


def f64(x: Any) -> np.ndarray:
    """Returns ``x`` as a float64 NumPy array (integers stay integers)."""
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.integer) else x.astype(np.float64)


def scale(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """The LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


# --- layers ------------------------------------------------------------------------------------
def dense(x: Any, w: Any, bias: Any = None) -> np.ndarray:
    """``x W + bias`` for ``W: (d_in, d_out)``."""
    y = np.tensordot(f64(x), f64(w), axes=1)
    return y if bias is None else y + f64(bias)


def transposed(x: Any, w: Any, bias: Any = None) -> np.ndarray:
    """``x W^T + bias`` for ``W: (d_out, d_in)``, HF GPT-2's ``Conv1D``."""
    return dense(x, f64(w).T, bias)


def dense_general(x: Any, w: Any, n_in: int, bias: Any = None) -> np.ndarray:
    """Contracts the last ``n_in`` axes of ``x`` with the first ``n_in`` axes of ``w``."""
    y = np.tensordot(f64(x), f64(w), axes=n_in)
    return y if bias is None else y + f64(bias)


def embed(ids: Any, table: Any) -> np.ndarray:
    """The rows of ``table`` at ``ids``."""
    return f64(table)[np.asarray(ids)]


def conv(x: Any, w: Any, bias: Any = None) -> np.ndarray:
    """An N-d convolution, stride 1 and 'SAME' padding, by an explicit loop over window offsets.

    ``x: (batch, *spatial, c_in)`` and ``w: (*window, c_in, c_out)``, as ``flax.linen.Conv``.
    """
    x, w = f64(x), f64(w)
    window = w.shape[:-2]
    spatial = x.shape[1:-1]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in window] + [(0, 0)]
    xp = np.pad(x, pads)
    y = np.zeros(x.shape[:1] + spatial + w.shape[-1:])
    for offset in itertools.product(*(range(k) for k in window)):
        index = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, spatial, strict=True)) + (slice(None),)
        y += np.tensordot(xp[index], w[offset], axes=1)
    return y if bias is None else y + f64(bias)


# --- deltas and merges -------------------------------------------------------------------------
def lora_kernel(a: Any, b: Any, s: float) -> np.ndarray:
    """``s A B`` laid out ``(*in, *out)``: the LoRA weight delta (before any transposition)."""
    return s * np.tensordot(f64(a), f64(b), axes=1)


def merge_lora(w: Any, a: Any, b: Any, s: float, *, is_transposed: bool = False) -> np.ndarray:
    """LoRA's merged kernel ``W + s A B``; for a transposed ``(d_out, d_in)`` kernel, ``W + (s A B)^T``."""
    delta = lora_kernel(a, b, s)
    return f64(w) + (delta.T if is_transposed else delta)


def merge_dora(w: Any, a: Any, b: Any, m: Any, s: float, *, n_out: int = 1, is_transposed: bool = False) -> np.ndarray:
    """DoRA's merged kernel ``m (W + s A B) / ||W + s A B||_c``, the norm per output feature.

    The norm runs over every input axis: all but the last ``n_out`` axes of an ``(*in, *out)``
    kernel, or the last axis of a transposed ``(d_out, d_in)`` one.
    """
    v = merge_lora(w, a, b, s, is_transposed=is_transposed)
    if is_transposed:
        return f64(m)[:, None] * v / np.sqrt(np.sum(v * v, axis=-1, keepdims=True))
    axes = tuple(range(v.ndim - n_out))
    return f64(m) * v / np.sqrt(np.sum(v * v, axis=axes, keepdims=True))


def column_norm(w: Any, *, n_out: int = 1, is_transposed: bool = False) -> np.ndarray:
    """``||W||_c``, DoRA's initial magnitude: the L2 norm over input axes, one per output feature."""
    w = f64(w)
    if is_transposed:
        return np.sqrt(np.sum(w * w, axis=-1))
    return np.sqrt(np.sum(w * w, axis=tuple(range(w.ndim - n_out))))


# --- forwards ----------------------------------------------------------------------------------
def forward(
    kind: str, x: Any, own: dict[str, Any], deltas: dict[str, Any] | None, s: float, *, n_in: int = 1
) -> np.ndarray:
    """A layer's output with LoRA (or DoRA, when ``deltas`` holds ``'magnitude'``) merged in.

    Args:
      kind: ``'dense'``, ``'transposed'``, ``'dense_general'``, ``'embed'`` or ``'conv'``.
      x: the layer's input (token ids for ``'embed'``).
      own: the layer's base leaves, ``kernel`` or ``embedding`` and maybe ``bias``.
      deltas: ``lora_a``, ``lora_b`` and maybe ``magnitude``; ``None`` for the base layer.
      s: the LoRA scale.
      n_in: the number of input axes of a ``'dense_general'`` kernel.
    """
    leaf = "embedding" if kind == "embed" else "kernel"
    w = f64(own[leaf])
    if deltas is not None:
        a, b = deltas["lora_a"], deltas["lora_b"]
        n_out = 1 if kind != "dense_general" else w.ndim - n_in
        if "magnitude" in deltas:
            w = merge_dora(w, a, b, deltas["magnitude"], s, n_out=n_out, is_transposed=kind == "transposed")
        else:
            w = merge_lora(w, a, b, s, is_transposed=kind == "transposed")
    bias = own.get("bias")
    if kind == "dense":
        return dense(x, w, bias)
    if kind == "transposed":
        return transposed(x, w, bias)
    if kind == "dense_general":
        return dense_general(x, w, n_in, bias)
    if kind == "embed":
        return embed(x, w)
    if kind == "conv":
        return conv(x, w, bias)
    raise ValueError(f"forward(kind={kind!r}): unknown kind.")


# --- (IA)^3 and diff pruning -------------------------------------------------------------------
def ia3_forward(
    kind: str, x: Any, own: dict[str, Any], *, out: Any = None, inp: Any = None, n_in: int = 1
) -> np.ndarray:
    """A layer with (IA)^3 applied to its activations: ``out * f(x)`` or ``f(inp * x)``.

    ``out`` runs over the output features (the last axes of ``y``); ``inp`` over the input
    features: the last ``n_in`` axes of ``x`` for ``'dense_general'``, else the last axis (the
    channels of a convolution).
    """
    x = f64(x)
    if inp is not None:
        v = f64(inp)
        x = x * v.reshape((1,) * (x.ndim - v.ndim) + v.shape)
    y = forward(kind, x, own, None, 0.0, n_in=n_in)
    if out is not None:
        v = f64(out)
        y = y * v.reshape((1,) * (y.ndim - v.ndim) + v.shape)
    return y


def hard_concrete_gate(log_alpha: Any, gamma: float = -0.1, zeta: float = 1.1) -> np.ndarray:
    """The deterministic hard-concrete gate ``clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``."""
    s = 1.0 / (1.0 + np.exp(-f64(log_alpha)))
    return np.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)


def l0_penalty(log_alpha: Any, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1) -> float:
    """The expected L0 norm of hard-concrete gates, ``sum sigmoid(log_alpha - beta log(-gamma / zeta))``."""
    return float(np.sum(1.0 / (1.0 + np.exp(-(f64(log_alpha) - beta * np.log(-gamma / zeta))))))


def diff_pruning_forward(kind: str, x: Any, own: dict[str, Any], w: Any, log_alpha: Any, *, n_in: int = 1) -> np.ndarray:
    """A layer whose kernel is ``W + z w``, ``z`` the deterministic gate (``w`` in the kernel's layout)."""
    leaf = "embedding" if kind == "embed" else "kernel"
    own = {**own, leaf: f64(own[leaf]) + hard_concrete_gate(log_alpha) * f64(w)}
    return forward(kind, x, own, None, 0.0, n_in=n_in)


# --- bottleneck adapters (Houlsby, Pfeiffer, parallel, multi-head parallel) --------------------
def activation(name: str, x: Any) -> np.ndarray:
    """An adapter nonlinearity in float64: relu, swish, gelu (erf), gelu_new (tanh), tanh, identity."""
    x = f64(x)
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "swish":
        return x / (1.0 + np.exp(-x))
    if name == "gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    if name == "gelu_new":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "tanh":
        return np.tanh(x)
    if name == "identity":
        return x
    raise ValueError(f"activation(name={name!r}): unknown nonlinearity.")


def bottleneck(u: Any, deltas: dict[str, Any], f: str) -> np.ndarray:
    """``f(u W_down + b_down) W_up + b_up``."""
    h = activation(f, dense(u, deltas["down_kernel"], deltas["down_bias"]))
    return dense(h, deltas["up_kernel"], deltas["up_bias"])


def multi_head_parallel(q: Any, pk: Any, pv: Any, f: str) -> np.ndarray:
    """``f(q_i P_k^(i)T) P_v^(i)`` per head, merged back to ``(..., heads * d_h)``, by a loop over heads."""
    q, pk, pv = f64(q), f64(pk), f64(pv)
    heads, _, d_h = pk.shape
    out = [activation(f, q[..., i * d_h : (i + 1) * d_h] @ pk[i].T) @ pv[i] for i in range(heads)]
    return np.concatenate(out, axis=-1)


def layer_norm(x: Any, scale: Any, bias: Any, eps: float) -> np.ndarray:
    x = f64(x)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * f64(scale) + f64(bias)


def bert_layer(
    x: Any,
    mask: Any,
    p: dict[str, Any],
    *,
    heads: int,
    eps: float = 1e-12,
    attn_adapter: tuple[dict[str, Any], str] | None = None,
    ffn_adapter: tuple[dict[str, Any], str] | None = None,
    parallel: tuple[dict[str, Any], str, Any] | None = None,
    multi_head: tuple[Any, Any, str] | None = None,
) -> np.ndarray:
    """One post-LN BERT layer (HF ``FlaxBertLayer``, eval mode, exact GELU) with adapters inserted.

    ``p`` is the layer's parameter dict (``attention/self/query``, ...); ``mask: (batch, seq)``
    masks keys. Adapters, each where its paper puts it:

    * ``attn_adapter = (deltas, f)``: Houlsby's, ``o <- o + g(o)`` on the attention output projection;
    * ``ffn_adapter = (deltas, f)``: Houlsby's second / Pfeiffer's, ``h <- h + g(h)`` on the FFN output;
    * ``parallel = (deltas, f, s)``: ``h <- h + s g(a)``, ``a`` the FFN input;
    * ``multi_head = (P_k, P_v, f)``: ``head_i <- head_i + f(q_i P_k^(i)T) P_v^(i)`` before ``W_o``.
    """
    x = f64(x)
    att, out = p["attention"], p["output"]

    def lin(node: dict[str, Any], u: Any) -> np.ndarray:
        return dense(u, node["kernel"], node["bias"])

    q = lin(att["self"]["query"], x)
    k = lin(att["self"]["key"], x)
    v = lin(att["self"]["value"], x)
    b, t, d = q.shape
    d_h = d // heads
    split = lambda z: z.reshape(b, t, heads, d_h)  # noqa: E731
    scores = np.einsum("bqhe,bkhe->bhqk", split(q), split(k)) / math.sqrt(d_h)
    scores = scores + np.where(np.asarray(mask)[:, None, None, :] > 0, 0.0, -1e30)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    context = np.einsum("bhqk,bkhe->bqhe", weights, split(v)).reshape(b, t, d)
    if multi_head is not None:
        context = context + multi_head_parallel(q, *multi_head)
    o = lin(att["output"]["dense"], context)
    if attn_adapter is not None:
        o = o + bottleneck(o, *attn_adapter)
    ln1 = att["output"]["LayerNorm"]
    a = layer_norm(o + x, ln1["scale"], ln1["bias"], eps)
    h = lin(out["dense"], activation("gelu", lin(p["intermediate"]["dense"], a)))
    if ffn_adapter is not None:
        h = h + bottleneck(h, *ffn_adapter)
    if parallel is not None:
        deltas, f, s = parallel
        h = h + f64(s) * bottleneck(a, deltas, f)
    return layer_norm(h + a, out["LayerNorm"]["scale"], out["LayerNorm"]["bias"], eps)
