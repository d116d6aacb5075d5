"""NF4 quantisation with double quantisation (QLoRA), stored as a plain pytree.

A quantised kernel is an :class:`NF4Array`: a registered pytree node whose children are arrays
(packed 4-bit codes and the quantised block scales) and whose static metadata (shape, dtype, block
sizes) is aux data. It sits at the kernel's own path, so ``jpeft.list_paths`` and ``jpeft.summary``
still name and count the kernel, and ``jit``, ``nn.scan`` and checkpointing see only arrays.

Leading axes beyond the last two (the layer axis of ``nn.scan``) are quantised independently, so
lifted transforms can slice every child along them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _errors, _tree
from jpeft._errors import JpeftError
from jpeft._tree import RESERVED, Path, PyTree, join

NF4_OFFSET = 1 - 0.5 * (1 / 30 + 1 / 32)
"""The quantile offset ``delta`` of the NF4 construction (0.9677083...)."""


def nf4_levels(offset: float = NF4_OFFSET) -> np.ndarray:
    """The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.

    ``q = sort(Phi^-1(linspace(offset, 0.5, 9)[:-1]) ++ [0] ++ -Phi^-1(linspace(offset, 0.5, 8)[:-1]))``,
    divided by its maximum: 8 positive levels, 7 negative and 0 (bitsandbytes'
    ``create_normal_map(offset, use_extra_value=True)``). ``Phi^-1`` is the stdlib's float64
    ``statistics.NormalDist().inv_cdf``.

    Example:
      >>> from jpeft.quant import nf4_levels
      >>> [round(float(v), 4) for v in nf4_levels()[6:9]]
      [-0.091, 0.0, 0.0796]

    References:
      Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023, appendix E.
    """
    ppf = statistics.NormalDist().inv_cdf
    pos = [ppf(float(p)) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(float(p)) for p in np.linspace(offset, 0.5, 8)[:-1]]
    v = np.sort(np.array(pos + [0.0] + neg))
    return (v / v.max()).astype(np.float32)


NF4_LEVELS = nf4_levels()
"""The NF4 code book, float32 of shape (16,), ascending; code ``i`` stands for ``NF4_LEVELS[i]``."""

_DQ_MAX = 127.0  # double quantisation: signed 8-bit codes in [-127, 127]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4:
    """The NF4 storage format: blockwise 4-bit NormalFloat with optional double quantisation.

    Each block of ``block_size`` consecutive weights (row-major over the last two axes) stores 4-bit
    codes, the index of the nearest ``NF4_LEVELS`` entry to ``w / c``, where ``c = max |w|`` over
    the block. Without ``double_quant`` the scales ``c`` are float32: ``4 + 32 / block_size`` bits
    per weight. With it, their mean ``mu`` is subtracted and ``c - mu`` is quantised to signed 8-bit
    codes in blocks of ``dq_block_size``, one float32 scale per block:
    ``4 + 8 / block_size + 32 / (block_size * dq_block_size)`` bits per weight (about 4.127).

    Args:
      block_size: weights per absmax block (64 in the paper); an even int.
      double_quant: whether to quantise the block scales too.
      dq_block_size: scales per second-level block (256 in the paper).

    Raises:
      JpeftError: on a non-positive or odd ``block_size``, a non-positive ``dq_block_size`` or a
        non-bool ``double_quant``.

    Example:
      >>> import jpeft
      >>> round(jpeft.NF4().bits_per_param, 4)
      4.127

    References:
      Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023.
    """

    block_size: int = 64
    double_quant: bool = True
    dq_block_size: int = 256

    def __post_init__(self) -> None:
        _errors.positive_int("NF4", "block_size", self.block_size)
        _errors.positive_int("NF4", "dq_block_size", self.dq_block_size)
        if self.block_size % 2:
            raise JpeftError(
                f"NF4(block_size={self.block_size}): block_size must be even (two 4-bit codes share a "
                "byte); the paper uses 64."
            )
        if not isinstance(self.double_quant, bool):
            raise JpeftError(f"NF4(double_quant={self.double_quant!r}): double_quant must be a bool.")

    @property
    def bits_per_param(self) -> float:
        """Storage bits per weight, from the config alone (what :func:`bits_per_param` returns)."""
        return bits_per_param(self)


def bits_per_param(config: NF4) -> float:
    """Storage bits per weight of a config, excluding one float32 mean per tensor.

    ``4 + 8 / block_size + 32 / (block_size * dq_block_size)`` with double quantisation, else
    ``4 + 32 / block_size``. (Tensors whose block count is not a multiple of ``dq_block_size`` pay
    one more float32 for the last, partial, second-level block.)

    Example:
      >>> import jpeft
      >>> from jpeft.quant import bits_per_param
      >>> bits_per_param(jpeft.NF4(double_quant=False))
      4.5
    """
    if not isinstance(config, NF4):
        raise JpeftError(f"bits_per_param expects a jpeft.NF4 config; got {type(config).__name__}.")
    if config.double_quant:
        return 4 + 8 / config.block_size + 32 / (config.block_size * config.dq_block_size)
    return 4 + 32 / config.block_size


class QuantizedArray:
    """What every quantised kernel (:class:`NF4Array`, ``IntArray``) derives from its ``shape`` and children."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: the sum over the children."""
        return sum(int(x.nbytes) for x in jax.tree.leaves(self))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax", "absmax_scale", "absmax_offset"],
    meta_fields=["core_shape", "orig_dtype", "block_size", "dq_block_size"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class NF4Array(QuantizedArray):
    """An NF4-quantised array: a pytree of arrays with static shape and block sizes.

    ``S`` are the leading (stack) axes, ``n = prod(core_shape)`` the size of the last two axes and
    ``nb = n / block_size`` the number of blocks per stack entry.

    Attributes:
      codes: uint8 ``(*S, n / 2)``; byte ``i`` holds code ``2i`` in its high nibble, ``2i + 1`` low.
      absmax: the block scales ``(*S, nb)``: int8 codes with double quantisation, else float32.
      absmax_scale: float32 ``(*S, ceil(nb / dq_block_size))``, the step of the int8 codes; or None.
      absmax_offset: float32 ``(*S,)``, the mean subtracted from the scales; or None.
      core_shape: the last two axes of the original array.
      orig_dtype: the dtype :func:`dequantize` restores by default.
      block_size: weights per block.
      dq_block_size: scales per second-level block; None without double quantisation.

    Example:
      >>> import numpy as np, jpeft
      >>> w = np.random.RandomState(0).normal(size=(64, 32)).astype(np.float32)
      >>> q = jpeft.quantize({"d": {"kernel": w}}, jpeft.NF4(), targets=["d"])["d"]["kernel"]
      >>> q.shape, q.codes.shape, q.codes.dtype.name, q.absmax.dtype.name
      ((64, 32), (1024,), 'uint8', 'int8')
    """

    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array | None
    absmax_offset: jax.Array | None
    core_shape: tuple[int, ...]
    orig_dtype: str
    block_size: int
    dq_block_size: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape, stack axes included (follows the children under ``nn.scan``)."""
        return tuple(self.codes.shape[:-1]) + tuple(self.core_shape)

    @property
    def dtype(self) -> np.dtype:
        """The storage dtype, uint8, so that float-only code refuses it; see ``orig_dtype``."""
        return np.dtype(np.uint8)

    def __repr__(self) -> str:
        dq = f", dq_block_size={self.dq_block_size}" if self.dq_block_size else ""
        shape = self.shape if hasattr(self.codes, "shape") else f"(..., {', '.join(map(str, self.core_shape))})"
        return f"NF4Array(shape={shape}, orig_dtype={self.orig_dtype}, block_size={self.block_size}{dq})"


def quantize_array(x: jax.typing.ArrayLike, config: NF4 = NF4()) -> NF4Array:
    """Quantises one concrete float array of rank >= 2 to NF4; see :class:`NF4` for the format.

    It runs once, before training, in NumPy on the host (no compilation per shape); the children
    of the result are device arrays.

    Raises:
      JpeftError: on a rank < 2, a non-float dtype or a block size that does not divide the size
        of the last two axes.

    Example:
      >>> import numpy as np, jpeft
      >>> from jpeft.quant import quantize_array
      >>> w = np.random.RandomState(0).standard_normal((64, 32)).astype("float32")
      >>> q = quantize_array(w)
      >>> q.codes.shape, q.absmax.dtype, q.shape
      ((1024,), dtype('int8'), (64, 32))
    """
    _check_leaf("jpeft.quantize", (), x, config)
    dtype = jnp.dtype(x.dtype).name
    w = np.asarray(x, np.float32)  # one-off preprocessing on the host: NumPy, no compilation per shape
    stack, core = tuple(w.shape[:-2]), tuple(w.shape[-2:])
    n, bs = math.prod(core), config.block_size
    nb = n // bs
    blocks = w.reshape(stack + (nb, bs))
    absmax = np.abs(blocks).max(axis=-1)
    normed = blocks / np.where(absmax > 0, absmax, np.float32(1))[..., None]
    idx = np.searchsorted((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2, normed).astype(np.uint8)  # nearest level
    idx = idx.reshape(stack + (n // 2, 2))
    codes = jnp.asarray((idx[..., 0] << 4) | idx[..., 1])
    if not config.double_quant:
        return NF4Array(codes, jnp.asarray(absmax), None, None, core, dtype, bs, None)
    dq = config.dq_block_size
    nd = -(-nb // dq)
    offset = absmax.mean(axis=-1, dtype=np.float32)
    centred = absmax - offset[..., None]
    padded = np.pad(centred, [(0, 0)] * len(stack) + [(0, nd * dq - nb)]).reshape(stack + (nd, dq))
    step = (np.abs(padded).max(axis=-1) / _DQ_MAX).astype(np.float32)
    q = np.round(padded / np.where(step > 0, step, np.float32(1))[..., None])
    q = np.clip(q, -_DQ_MAX, _DQ_MAX).astype(np.int8).reshape(stack + (nd * dq,))[..., :nb]
    return NF4Array(codes, jnp.asarray(q), jnp.asarray(step), jnp.asarray(offset), core, dtype, bs, dq)


def _absmax(q: NF4Array) -> jax.Array:
    """The float32 block scales ``(*S, nb)`` of ``q``, double quantisation undone."""
    if q.dq_block_size is None:
        return q.absmax.astype(jnp.float32)
    stack, nb, dq = q.absmax.shape[:-1], q.absmax.shape[-1], q.dq_block_size
    nd = q.absmax_scale.shape[-1]
    codes = jnp.pad(q.absmax.astype(jnp.float32), [(0, 0)] * len(stack) + [(0, nd * dq - nb)])
    scales = (codes.reshape(stack + (nd, dq)) * q.absmax_scale[..., None]).reshape(stack + (nd * dq,))
    return scales[..., :nb] + q.absmax_offset[..., None]


def dequantize_array(q: NF4Array, dtype: Any = None) -> jax.Array:
    """Restores the float array of an :class:`NF4Array`; traceable (it runs inside forward passes).

    ``w = NF4_LEVELS[code] * c`` per block, computed in float32 and cast to ``dtype`` (by default
    the original dtype). ``jpeft.quant.dequantize_array`` takes an NF4 or an integer kernel.

    Example:
      >>> import numpy as np
      >>> from jpeft.quant import dequantize_array, quantize_array
      >>> w = np.random.RandomState(0).standard_normal((64, 32)).astype("float32")
      >>> back = np.asarray(dequantize_array(quantize_array(w)))
      >>> back.shape, bool(np.abs(back - w).max() < 0.5 * np.abs(w).max())
      ((64, 32), True)
    """
    stack = tuple(q.codes.shape[:-1])
    hi, lo = q.codes >> 4, q.codes & 15
    idx = jnp.stack([hi, lo], axis=-1).reshape(stack + (-1,))
    values = jnp.take(jnp.asarray(NF4_LEVELS), idx.astype(jnp.int32), axis=0)
    w = values.reshape(stack + (-1, q.block_size)) * _absmax(q)[..., None]
    return w.reshape(q.shape).astype(q.orig_dtype if dtype is None else dtype)


def _check_leaf(owner: str, path: Path, x: Any, config: NF4) -> None:
    where = f"{owner}: {join(path)!r}" if path else owner
    if isinstance(x, NF4Array):
        raise JpeftError(f"{where} is already NF4-quantised; narrow targets so it is selected once.")
    shape, dtype = tuple(np.shape(x)), getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise JpeftError(
            f"{where} has dtype {dtype}, expected a float array. Only float weights can be quantised; "
            "narrow targets to kernels (see jpeft.list_paths(params))."
        )
    if len(shape) < 2:
        raise JpeftError(
            f"{where} has shape {shape}; NF4 quantises arrays of rank >= 2 (kernels), not biases or "
            "norms. Narrow targets to kernels, e.g. targets=r'.*/kernel'."
        )
    n = math.prod(shape[-2:])
    if n % config.block_size:
        raise JpeftError(
            f"{where} has shape {shape}: its last two axes hold {n} weights, which block_size="
            f"{config.block_size} does not divide. Pick NF4(block_size=...) dividing {n}, or exclude it."
        )


def quantize(params: PyTree, config: Any, *, targets: Any = None) -> PyTree:
    """Replaces the selected float leaves of a tree by :class:`NF4Array` nodes.

    A leaf is selected when ``targets`` matches its path, or matches its module's path and the
    leaf is named ``kernel``: ``targets=("c_attn", "c_fc")`` quantises those modules' kernels.
    Other leaves stay the same objects; ``params`` is not mutated.

    Args:
      params: a nested mapping of arrays, or a ``flax.nnx.Module``: then the result is a new model
        (sharing every other array) whose selected variables, of the same type at the same state
        path, hold :class:`NF4Array` values; ``jpeft.apply(jpeft.QLoRA(...), model)`` runs it.
      config: a :class:`NF4` config, or a ``jpeft.QLoRA`` method (its ``quant`` and, unless
        ``targets`` is given, its ``targets``).
      targets: a regex over '/'-joined paths, matched in full, or a sequence of path suffixes.

    Returns:
      The tree with quantised leaves (or the new NNX model).

    Raises:
      JpeftError: on a target that matches nothing, or a selected leaf that is not a float array
        of rank >= 2 whose last two axes a block holds a whole number of times.

    Example:
      >>> import jax.numpy as jnp, numpy as np, jpeft
      >>> params = {"dense": {"kernel": jnp.asarray(np.random.RandomState(0).randn(32, 8), "float32"),
      ...                     "bias": jnp.zeros(8)}}
      >>> q = jpeft.quantize(params, jpeft.NF4(), targets=("dense",))
      >>> q["dense"]["kernel"]
      NF4Array(shape=(32, 8), orig_dtype=float32, block_size=64, dq_block_size=256)
      >>> jpeft.list_paths(q)
      ['dense/bias', 'dense/kernel']
      >>> w = jpeft.dequantize(q)["dense"]["kernel"]
      >>> bool(jnp.linalg.norm(w - params["dense"]["kernel"]) < 0.1 * jnp.linalg.norm(w))
      True
      >>> from flax import nnx
      >>> model = jpeft.quantize(nnx.Linear(32, 8, rngs=nnx.Rngs(0)), jpeft.NF4(), targets="kernel")
      >>> model.kernel.get_value()
      NF4Array(shape=(32, 8), orig_dtype=float32, block_size=64, dq_block_size=256)
    """
    if not isinstance(config, NF4):
        method_quant = getattr(config, "quant", None)
        if not isinstance(method_quant, NF4):
            raise JpeftError(
                f"jpeft.quantize expects a jpeft.NF4 config (or a jpeft.QLoRA method); got {type(config).__name__}."
            )
        targets = config.targets if targets is None else targets
        config = method_quant
    if targets is None:
        raise JpeftError(
            "jpeft.quantize(params, jpeft.NF4(), targets=...) needs targets: a regex over leaf or module "
            "paths, or module-name suffixes like ('c_attn', 'c_fc')."
        )
    return quantize_tree(
        params,
        targets,
        lambda p, x: _check_leaf("jpeft.quantize", p, x, config),
        lambda x: quantize_array(x, config),
    )


def quantize_tree(
    params: Any, targets: Any, check: Callable[[Path, Any], None], quantize_leaf: Callable[[Any], Any]
) -> Any:
    """``jpeft.quantize``'s walk, for every format: ``targets`` (not yet normalised) selects leaves of a
    tree or an NNX model, ``check(path, leaf)`` raises on a leaf the format cannot hold (before any
    is quantised), ``quantize_leaf`` quantises one."""
    targets = _tree.normalize_targets("jpeft.quantize", targets)
    from jpeft import _nnx

    if _nnx.is_model(params):
        from jpeft.quant import _nnx as _nnx_quant

        return _nnx_quant.quantize_model(params, lambda tree: _hits(tree, targets, check), quantize_leaf)
    if not isinstance(params, Mapping):
        raise JpeftError(
            f"jpeft.quantize expects a nested mapping of arrays; got {type(params).__name__}. Pass a params "
            "tree or a flax.nnx.Module."
        )
    out = _tree.as_dicts(params)
    for p, x in _hits(params, targets, check):
        _tree.get(out, p[:-1])[p[-1]] = quantize_leaf(x)
    return out


def _hits(params: PyTree, targets: Any, check: Callable[[Path, Any], None]) -> list[tuple[Path, Any]]:
    """The leaves ``targets`` selects for quantisation, each checked; raises if none."""
    pairs = [(p, x) for p, x in _tree.leaves(params) if RESERVED not in p]
    hit = [
        (p, x) for p, x in pairs if _tree.matches(targets, p) or (p[-1] == "kernel" and _tree.matches(targets, p[:-1]))
    ]
    if not hit:
        example = join(pairs[0][0]) if pairs else "<no leaves>"
        raise JpeftError(
            f"jpeft.quantize(targets={targets!r}) matched 0 of {len(pairs)} parameter paths.\n"
            f"Paths look like {example!r}; see jpeft.list_paths(params). A regex must match a whole leaf "
            "or module path (use '.*/c_attn'); suffixes must be whole path components."
        )
    for p, x in hit:
        check(p, x)
    return hit


def dequantize(x: Any, dtype: Any = None) -> Any:
    """Restores an :class:`NF4Array`, or every one in a tree, to a float array.

    Args:
      x: an ``NF4Array``, a nested mapping that holds some, or a ``flax.nnx.Module`` from
        :func:`quantize` (or ``jpeft.apply`` of QLoRA on one).
      dtype: the result dtype; by default each array's original dtype.

    Returns:
      An array, or the tree with arrays in place of the quantised nodes (other leaves are the same
      objects), or a new NNX model of float kernels (``x`` is not changed).

    Raises:
      JpeftError: if ``x`` is neither.

    Example:
      >>> import numpy as np, jpeft
      >>> from jpeft.quant import quantize_array
      >>> jpeft.dequantize(quantize_array(np.ones((4, 16), "float32"))).sum()
      Array(64., dtype=float32)
    """
    if isinstance(x, NF4Array):
        return dequantize_array(x, dtype)
    from jpeft import _nnx

    if _nnx.is_model(x):
        from jpeft.quant import _nnx as _nnx_quant

        return _nnx_quant.dequantize_model(x, lambda v: dequantize_array(v, dtype), lambda v: isinstance(v, NF4Array))
    if isinstance(x, Mapping):
        return jax.tree.map(
            lambda v: dequantize_array(v, dtype) if isinstance(v, NF4Array) else v,
            _tree.as_dicts(x),
            is_leaf=lambda v: isinstance(v, NF4Array),
        )
    raise JpeftError(
        f"jpeft.dequantize expects an NF4Array or a tree holding some; got {type(x).__name__}. "
        "Quantise with jpeft.quantize(params, jpeft.NF4(), targets=...) first (a tree or a flax.nnx.Module)."
    )
