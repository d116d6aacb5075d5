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
