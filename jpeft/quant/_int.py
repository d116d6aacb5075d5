"""Symmetric absmax INT8 and INT4 quantisation of kernels, stored as a plain pytree.

A quantised kernel is an :class:`IntArray`: a registered pytree node whose children are the integer
codes and the float32 scales, its shape, dtype and block size static aux data, like
:class:`jpeft.NF4Array`. It sits at the kernel's own path, and leading (stack) axes such as
``nn.scan``'s layer axis are quantised independently, so lifted transforms slice every child.

The scales run over the *contraction* axis (axis -2, the input axis of a Flax ``(in, out)`` kernel):
one scale per output column (``block_size=None``, per output channel) or per block of
``block_size`` consecutive inputs of a column. That is LLM.int8()'s vector-wise absmax for the
weights (Dettmers et al. 2022) *without* its mixed-precision outlier decomposition, and the
scheme of qwix's int8/int4 weights with the output axis channel-wise (``channelwise_axes``) and
the contraction axis tiled (``tile_size``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft._errors import JpeftError
from jpeft._tree import Path, join
from jpeft.quant._nf4 import QuantizedArray


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntFormat:
    """Symmetric absmax integer quantisation of kernels; use :class:`Int8` or :class:`Int4`.

    Each column of the last axis is cut along axis -2 into blocks of ``block_size`` values (the
    whole axis when ``block_size`` is None). A block stores ``q = round(w / s)`` with
    ``s = max |w| / qmax`` (``qmax = 2**(bits-1) - 1``: 127 or 7), so ``|w - q s| <= s / 2``.

    Args:
      bits: 8 or 4.
      block_size: values per scale along axis -2, or None for one scale per output channel.

    Example:
      >>> import jpeft
      >>> from jpeft.quant import IntFormat
      >>> isinstance(jpeft.Int8(), IntFormat), jpeft.Int4(block_size=32).bits
      (True, 4)
    """

    bits: int = 8
    block_size: int | None = None

    name: ClassVar[str] = "IntFormat"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise JpeftError(
                f"{name}(bits={self.bits!r}): bits must be 4 or 8 (jpeft.Int4 / jpeft.Int8); for 4-bit "
                "NormalFloat use jpeft.NF4."
            )
        bs = self.block_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0):
            raise JpeftError(f"{name}(block_size={bs!r}): block_size must be a positive int or None (per channel).")
        if self.bits == 4 and bs is not None and bs % 2:
            raise JpeftError(
                f"{name}(block_size={bs}): 4-bit codes are packed two per byte along axis -2, so block_size "
                "must be even (64 is usual)."
            )

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def bits_per_param(self, rows: int) -> float:
        """Storage bits per weight for a kernel with ``rows`` entries on axis -2 (float32 scales)."""
        return self.bits + 32 / (self.block_size or rows)

    def check(self, owner: str, path: Path, x: Any) -> None:
        """Raises a :class:`JpeftError` before any tracing unless ``x`` can be stored in this format."""
        where = f"{owner}: {join(path)!r}" if path else owner
        if is_quantized(x):
            raise JpeftError(
                f"{where} is already quantised ({type(x).__name__}); narrow targets so it is selected once."
            )
        shape, dtype = tuple(np.shape(x)), getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise JpeftError(
                f"{where} has dtype {dtype}, expected a float array. Only float weights can be quantised; "
                "narrow targets to kernels (see jpeft.list_paths(params))."
            )
        if len(shape) < 2:
            raise JpeftError(
                f"{where} has shape {shape}; {self!r} quantises arrays of rank >= 2 (kernels, scaled per "
                "output column along axis -2), not biases or norms. Narrow targets to kernels, e.g. targets=r'.*/kernel'."
            )
        rows, bs = shape[-2], self.block_size
        if bs is not None and rows % bs:
            raise JpeftError(
                f"{where} has shape {shape}: block_size={bs} does not divide its axis -2 ({rows} rows). Pick a "
                f"block_size dividing {rows}, block_size=None (per channel), or exclude it."
            )
        if self.bits == 4 and rows % 2:
            raise JpeftError(
                f"{where} has shape {shape}: Int4 packs two codes per byte along axis -2, which has an odd "
                f"size ({rows}). Exclude it, or use jpeft.Int8."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8(IntFormat):
    """INT8 kernels: symmetric absmax per output channel (default) or per block along the input axis.

    ``q = round(w / s)`` in ``[-127, 127]`` with ``s = max |w| / 127`` over each column of axis -2
    (``block_size=None``) or each block of ``block_size`` rows of a column; float32 scales. 8 bits
    per weight plus ``32 / block_size`` (per channel: ``32 / d_in``). Reference: LLM.int8()'s
    vector-wise weight quantisation without the outlier decomposition (Dettmers et al. 2022), as in
    qwix's int8 weights (channel-wise output axis, optionally tiled contraction axis).

    Example:
      >>> import numpy as np, jpeft
      >>> w = np.random.RandomState(0).normal(size=(16, 4)).astype("float32")
      >>> q = jpeft.quantize({"d": {"kernel": w}}, jpeft.Int8(), targets=["d"])["d"]["kernel"]
      >>> q.codes.dtype.name, q.scales.shape, q.shape
      ('int8', (1, 4), (16, 4))
    """

    bits: int = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int4(IntFormat):
    """INT4 kernels: symmetric absmax per block of ``block_size`` input rows, two codes per byte.

    ``q = round(w / s)`` in ``[-7, 7]`` with ``s = max |w| / 7`` per block (float32), stored as
    ``q + 8`` nibbles, rows ``2i`` (high) and ``2i + 1`` (low) of a column in one uint8: 4 bits per
    weight plus ``32 / block_size``. Reference: qwix's int4 weights with a tiled contraction axis.

    Example:
      >>> import numpy as np, jpeft
      >>> w = np.random.RandomState(0).normal(size=(16, 4)).astype("float32")
      >>> q = jpeft.quantize({"d": {"kernel": w}}, jpeft.Int4(block_size=8), targets=["d"])["d"]["kernel"]
      >>> q.codes.dtype.name, q.codes.shape, q.scales.shape
      ('uint8', (8, 4), (2, 4))
    """

    bits: int = 4
    block_size: int | None = 64


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["rows", "orig_dtype", "bits", "block_size"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class IntArray(QuantizedArray):
    """An INT8/INT4-quantised kernel: integer codes and float32 scales, shape and format static.

    Attributes:
      codes: int8 ``(*S, rows, out)``; for 4 bits uint8 ``(*S, rows / 2, out)``, two codes a byte.
      scales: float32 ``(*S, rows / block, out)``, one per column block (``block = rows`` per channel).
      rows: the size of axis -2.
      orig_dtype: the dtype :func:`dequantize_array` restores by default.
      bits: 8 or 4.
      block_size: rows per scale, or None (one scale per output channel).

    Example:
      >>> import numpy as np, jpeft
      >>> from jpeft.quant import int_quantize_array
      >>> int_quantize_array(np.ones((8, 3), "float32"), jpeft.Int4(block_size=4))
      IntArray(shape=(8, 3), bits=4, block_size=4, orig_dtype=float32)
    """

    codes: jax.Array
    scales: jax.Array
    rows: int
    orig_dtype: str
    bits: int
    block_size: int | None

    @property
    def config(self) -> IntFormat:
        """The format this array was quantised with."""
        return (Int8 if self.bits == 8 else Int4)(block_size=self.block_size)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-2]) + (self.rows, self.codes.shape[-1])

    @property
    def dtype(self) -> np.dtype:
        """The storage dtype of the codes, so that float-only code refuses it; see ``orig_dtype``."""
        return np.dtype(np.int8 if self.bits == 8 else np.uint8)

    def __repr__(self) -> str:
        shape = self.shape if hasattr(self.codes, "shape") else f"(..., {self.rows}, ...)"
        return f"IntArray(shape={shape}, bits={self.bits}, block_size={self.block_size}, orig_dtype={self.orig_dtype})"


def quantize_array(x: Any, config: IntFormat = Int8()) -> IntArray:
    """Quantises one concrete float array of rank >= 2; see :class:`Int8` / :class:`Int4`.

    It runs once, on the host, in NumPy (no compilation per shape).

    Example:
      >>> import numpy as np, jpeft
      >>> from jpeft.quant import int_quantize_array
      >>> w = np.random.RandomState(0).normal(size=(32, 8)).astype("float32")
      >>> q = int_quantize_array(w, jpeft.Int8(block_size=16))
      >>> bool(np.all(np.abs(w - np.asarray(jpeft.dequantize(q))) <= np.repeat(q.scales, 16, 0) / 2 + 1e-7))
      True
    """
    if not isinstance(config, IntFormat):
        raise JpeftError(f"int quantize_array expects jpeft.Int8(...) or jpeft.Int4(...); got {type(config).__name__}.")
    config.check("jpeft.quantize", (), x)
    dtype = jnp.dtype(x.dtype).name
    w = np.asarray(x, np.float32)
    stack, rows, out = tuple(w.shape[:-2]), w.shape[-2], w.shape[-1]
    bs = config.block_size or rows
    blocks = w.reshape(stack + (rows // bs, bs, out))
    absmax = np.abs(blocks).max(axis=-2)
    scales = (absmax / np.float32(config.qmax)).astype(np.float32)
    q = np.round(blocks / np.where(scales > 0, scales, np.float32(1))[..., None, :])
    q = np.clip(q, -config.qmax, config.qmax).astype(np.int8).reshape(w.shape)
    if config.bits == 4:
        nib = (q + 8).astype(np.uint8).reshape(stack + (rows // 2, 2, out))
        codes = (nib[..., 0, :] << 4) | nib[..., 1, :]
    else:
        codes = q
    return IntArray(jnp.asarray(codes), jnp.asarray(scales), rows, dtype, config.bits, config.block_size)


def codes_of(q: IntArray) -> jax.Array:
    """The signed integer codes ``(*S, rows, out)`` as int8 (4-bit codes unpacked); traceable."""
    if q.bits == 8:
        return q.codes
    hi = (q.codes >> 4).astype(jnp.int8) - 8
    lo = (q.codes & 15).astype(jnp.int8) - 8
    stack = tuple(q.codes.shape[:-2])
    return jnp.stack([hi, lo], axis=-2).reshape(stack + (q.rows, q.codes.shape[-1]))


def dequantize_array(q: IntArray, dtype: Any = None) -> jax.Array:
    """``codes * scale`` per block, computed in float32 and cast to ``dtype`` (default: the original); traceable.

    Exported as ``jpeft.quant.int_dequantize_array``. Each value is within half a scale of the original.

    Example:
      >>> import numpy as np, jpeft
      >>> from jpeft.quant import int_dequantize_array, int_quantize_array
      >>> w = np.random.RandomState(0).normal(size=(16, 4)).astype("float32")
      >>> q = int_quantize_array(w, jpeft.Int8())
      >>> err = np.abs(np.asarray(int_dequantize_array(q)) - w)
      >>> bool((err <= np.asarray(q.scales) / 2 + 1e-7).all()), int_dequantize_array(q, "bfloat16").dtype
      (True, dtype(bfloat16))
    """
    codes = codes_of(q).astype(jnp.float32)
    stack, out = tuple(q.codes.shape[:-2]), q.codes.shape[-1]
    bs = q.block_size or q.rows
    w = codes.reshape(stack + (q.rows // bs, bs, out)) * q.scales[..., None, :]
    return w.reshape(stack + (q.rows, out)).astype(q.orig_dtype if dtype is None else dtype)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantised kernel of any jpeft format (:class:`IntArray` or ``NF4Array``).

    Example:
      >>> import numpy as np, jpeft
      >>> from jpeft.quant import is_quantized
      >>> q = jpeft.quantize({"d": {"kernel": np.ones((64, 8), "float32")}}, jpeft.NF4(), targets=["d"])
      >>> is_quantized(q["d"]["kernel"]), is_quantized(np.ones(3))
      (True, False)
    """
    from jpeft.quant._nf4 import NF4Array

    return isinstance(x, (IntArray, NF4Array))
