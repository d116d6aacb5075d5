"""The one quantiser interface: ``jpeft.quantize`` / ``jpeft.dequantize`` over every storage format.

A format is a small config class (:class:`jpeft.NF4`, :class:`jpeft.Int8`, :class:`jpeft.Int4`) with
an array node of its own (``NF4Array``, ``IntArray``). Target selection, the NNX path (the same
``Variable`` at the same state path) and dequantisation of whole trees are shared here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._tree import PyTree
from jpeft.quant import _int, _nf4
from jpeft.quant._int import IntArray, IntFormat, is_quantized

FORMATS = "jpeft.NF4(...), jpeft.Int8(...) or jpeft.Int4(...)"


def dequantize_array(q: Any, dtype: Any = None) -> jax.Array:
    """The float array of a quantised kernel of any format; traceable."""
    if isinstance(q, IntArray):
        return _int.dequantize_array(q, dtype)
    return _nf4.dequantize_array(q, dtype)


def quantize(params: PyTree, config: Any, *, targets: Any = None) -> PyTree:
    """Replaces the selected float leaves of a tree (or an NNX model's kernels) by quantised nodes.

    ``config`` picks the format: :class:`jpeft.NF4` (QLoRA's 4-bit NormalFloat, or a ``jpeft.QLoRA``
    method; see ``jpeft.quant.quantize``), :class:`jpeft.Int8` (absmax per output channel or per
    block) or :class:`jpeft.Int4` (absmax per block, two codes per byte). A leaf is selected when
    ``targets`` matches its path, or matches its module's path and the leaf is named ``kernel``.
    Any method then runs on the quantised base through :func:`jpeft.on_quantized`.

    Args:
      params: a nested mapping of arrays, or a ``flax.nnx.Module`` (then a new model sharing every
        other array, whose selected variables hold the quantised values).
      config: the format.
      targets: a regex over '/'-joined paths, matched in full, or a sequence of path suffixes.

    Raises:
      JpeftError: on an unknown config, a target that matches nothing, or a selected leaf the format
        cannot hold (rank < 2, a block size that does not divide its axis, not float).

    Example:
      >>> import numpy as np, jpeft
      >>> params = {"dense": {"kernel": np.random.RandomState(0).randn(32, 8).astype("float32"), "bias": np.zeros(8)}}
      >>> q = jpeft.quantize(params, jpeft.Int8(), targets=["dense"])
      >>> q["dense"]["kernel"]
      IntArray(shape=(32, 8), bits=8, block_size=None, orig_dtype=float32)
      >>> jpeft.dequantize(q)["dense"]["kernel"].shape
      (32, 8)
    """
    if not isinstance(config, IntFormat):
        if isinstance(config, _nf4.NF4) or isinstance(getattr(config, "quant", None), _nf4.NF4):
            return _nf4.quantize(params, config, targets=targets)
        raise JpeftError(
            f"jpeft.quantize expects a jpeft.NF4 config (or a jpeft.QLoRA method); got {type(config).__name__}. "
            "Other formats: jpeft.Int8(...), jpeft.Int4(...)."
        )
    if targets is None:
        raise JpeftError(
            f"jpeft.quantize(params, {config!r}, targets=...) needs targets: a regex over leaf or module "
            "paths, or module-name suffixes like ('c_attn', 'c_fc')."
        )
    return _nf4.quantize_tree(
        params,
        targets,
        lambda p, x: config.check("jpeft.quantize", p, x),
        lambda x: _int.quantize_array(x, config),
    )


def dequantize(x: Any, dtype: Any = None) -> Any:
    """Restores a quantised kernel (any format), or every one in a tree or NNX model, to float.

    Args:
      x: an ``NF4Array`` / ``IntArray``, a nested mapping holding some, or a ``flax.nnx.Module``.
      dtype: the result dtype; by default each array's original dtype.

    Returns:
      An array, the tree with float arrays in place of the quantised nodes (other leaves are the
      same objects), or a new NNX model (``x`` is not changed).

    Example:
      >>> import numpy as np, jpeft
      >>> from jpeft.quant import int_quantize_array
      >>> jpeft.dequantize(int_quantize_array(np.ones((4, 2), "float32"))).sum()
      Array(8., dtype=float32)
    """
    if is_quantized(x):
        return dequantize_array(x, dtype)
    from jpeft import _nnx

    if _nnx.is_model(x):
        from jpeft.quant import _nnx as _nnx_quant

        return _nnx_quant.dequantize_model(x, lambda v: dequantize_array(v, dtype), is_quantized)
    if isinstance(x, Mapping):
        return jax.tree.map(
            lambda v: dequantize_array(v, dtype) if is_quantized(v) else v, _tree.as_dicts(x), is_leaf=is_quantized
        )
    raise JpeftError(
        f"jpeft.dequantize expects an NF4Array or a tree holding some; got {type(x).__name__} (an IntArray of "
        f"jpeft.Int8/Int4 works too). Quantise with jpeft.quantize(params, {FORMATS}, targets=...) first (a tree or "
        "a flax.nnx.Module)."
    )
