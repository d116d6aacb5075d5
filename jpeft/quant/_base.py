"""Any method on a quantised base: ``jpeft.on_quantized(method)``.

``jpeft.quantize`` stores the frozen kernels as ``IntArray`` (INT8 / INT4) or ``NF4Array`` nodes.
:class:`OnQuantized` is a named composition (a :class:`jpeft.Compose` of the given methods) that
also gives every quantised module an empty delta entry, so that the interceptor reaches it on
linen and on NNX, and computes those layers itself in :meth:`OnQuantized.base_forward`: QLoRA's
dequantise-and-multiply, for every format. The methods' own ``forward`` then wraps that base
output unchanged, so LoRA, (IA)^3, adapters, prompts and prefixes need no quantisation code.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _nnx, _tree
from jpeft._errors import JpeftError
from jpeft._method import Context, Method
from jpeft._tree import Path, PyTree, join
from jpeft.methods._compose import Compose
from jpeft.methods._qlora import _COMPUTED as COMPUTED
from jpeft.methods._qlora import float_dtype_name, quantized_forward
from jpeft.quant._api import dequantize, dequantize_array, quantize
from jpeft.quant._int import IntArray, is_quantized
from jpeft.quant._nf4 import NF4, NF4Array


def _abstract(own: Mapping[str, Any]) -> dict[str, Any]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.orig_dtype) if is_quantized(v) else v for k, v in own.items()}


def _abstract_tree(params: PyTree) -> PyTree:
    """The tree with each quantised kernel shown as its float shape and original dtype (what methods read)."""
    return jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.orig_dtype) if is_quantized(v) else v,
        _tree.as_dicts(params),
        is_leaf=is_quantized,
    )


def _abstract_ctx(ctx: Context) -> Context:
    """``ctx`` over the abstract tree (cached on ``ctx``): methods size their deltas from float kernels."""
    if "_on_quantized" not in ctx.__dict__:
        view = copy.copy(ctx)
        view.params = _abstract_tree(ctx.params)
        ctx.__dict__["_on_quantized"] = view
    return ctx.__dict__["_on_quantized"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnQuantized(Compose):
    """Runs methods on a base whose frozen kernels ``jpeft.quantize`` stored as INT8, INT4 or NF4.

    Each quantised layer computes ``x dequant(W) + b`` with the kernel dequantised in
    ``compute_dtype`` (the input cast to it, the result cast to the module's dtype), as
    :class:`jpeft.QLoRA` does for NF4; with ``remat`` the dequantised kernel is recomputed in the
    backward pass rather than kept, so only the integer codes stay resident. The methods then act on
    that output exactly as on a float layer: their deltas, labels, optimizer rules and parameter
    counts are those of ``jpeft.compose(*methods)`` (their leaves sit under the component keys).
    Quantised leaves are frozen: a method that would train one (``Freeze``'s last layers, an
    ``extra_trainable`` pattern) is refused, so quantise only the layers that stay frozen.

    ``jpeft.merge`` folds deltas only into float kernels; a delta on a quantised kernel is refused
    (it would re-quantise): use :func:`merge_requantized` (the merged kernel quantised again in its
    format, with the error) or ``jpeft.merge(method, jpeft.dequantize(tree))`` (float weights).

    Args:
      methods: the methods, as in :class:`jpeft.Compose`.
      compute_dtype: the dtype of the dequantised kernel and the base matmul.
      remat: dequantise the kernel again from its codes in the backward pass (a ``custom_vjp`` whose
        residual is the codes), so a step holds one float kernel at a time; False keeps every layer's.

    Raises:
      JpeftError: on a bad field; from ``jpeft.apply``, on a tree without quantised kernels, a
        quantised leaf that is not a ``kernel`` or that a method trains, or a quantised module of a
        layout other than ``dense``, ``transposed`` or ``dense_general``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> model, x = nn.Dense(8), jnp.ones((2, 16))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> method = jpeft.on_quantized(jpeft.LoRA(targets=".*", rank=2), compute_dtype="float32")
      >>> peft = jpeft.apply(method, jpeft.quantize(params, jpeft.Int8(), targets="kernel"), key=jax.random.key(1))
      >>> y = jpeft.wrap(model.apply, method)({"params": peft}, x)
      >>> bool(jnp.allclose(y, model.apply({"params": jpeft.dequantize(peft)}, x), atol=1e-5))
      True
    """

    compute_dtype: str = "bfloat16"
    remat: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        from jpeft.methods._qlora import QLoRA

        name = self._name()
        if any(isinstance(m, QLoRA) for m in self.methods):
            raise JpeftError(f"{name}: QLoRA already computes its quantised base; pass jpeft.LoRA(...) instead.")
        object.__setattr__(self, "compute_dtype", float_dtype_name(name, self.compute_dtype))
        if not isinstance(self.remat, bool):
            raise JpeftError(f"{name}(remat={self.remat!r}): remat must be a bool.")

    @property  # type: ignore[override]
    def has_deltas(self) -> bool:
        return True  # quantised modules get (empty) delta entries so that base_forward reaches them

    def _layouts(self) -> tuple[tuple[str, str], ...]:
        return tuple(pair for m in self.methods for pair in (getattr(m, "layouts", None) or ()))

    # --- structure -----------------------------------------------------------------------------
    def _quantised(self, params: PyTree) -> list[Path]:
        label = self.base_labeller(params)
        found = []
        for path, own in _tree.modules(params).items():
            for leaf, v in own.items():
                if not is_quantized(v):
                    continue
                where = join(path + (leaf,))
                if leaf != "kernel":
                    raise JpeftError(
                        f"{self._name()}: {where} is quantised, but only linear layers' 'kernel' leaves can be "
                        "computed from a quantised base. Quantise kernels only (targets=r'.*/kernel')."
                    )
                if label(path + (leaf,)) != "frozen":
                    raise JpeftError(
                        f"{self._name()}: {where} is quantised, but {label(path + (leaf,))!r} would train it; "
                        "integer codes cannot train. Quantise only the frozen layers (for Freeze(l), leave the "
                        "last l layers and extra_trainable leaves out of jpeft.quantize's targets)."
                    )
                found.append(path)
        if not found:
            raise JpeftError(
                f"{self._name()}: params hold no quantised kernel. Quantise first: q = jpeft.quantize(params, "
                "jpeft.Int8(), targets=...), then jpeft.apply(method, q, key=...)."
            )
        return found

    def select(self, params: PyTree) -> list[Path]:
        quantised = self._quantised(params)
        abstract = _abstract_tree(params)
        chosen = self._selection(abstract)
        if not chosen:
            for m in self.methods:  # base-only components (Freeze, BitFit) validate their own selection
                m.select(abstract)
        order = {p: i for i, p in enumerate(_tree.all_paths(params))}
        return sorted(
            set(chosen) | set(quantised),
            key=lambda p: min((v for q, v in order.items() if q[: len(p)] == p), default=0),
        )

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        if any(is_quantized(v) for v in own.values()):
            layout = ctx.layout(self._name(), path, _abstract(own), self._layouts())
            if layout.kind not in COMPUTED:
                raise JpeftError(
                    f"{self._name()}: {join(path)!r} holds a quantised kernel of layout {layout.spec()!r}; only "
                    f"layouts {COMPUTED} are computed from quantised kernels. Leave it out of jpeft.quantize's targets."
                )
        return super().init_module(key, path, _abstract(own), _abstract_ctx(ctx))

    def param_count(self, params: PyTree) -> int:
        return super().param_count(_abstract_tree(params))

    # --- forward -------------------------------------------------------------------------------
    def base_forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict) -> Any:
        """``x dequant(W) + b`` in ``compute_dtype`` for a quantised layer; otherwise the components' base."""
        kernel = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") else None
        if not is_quantized(kernel):
            return super().base_forward(module, next_fun, args, kwargs)
        return quantized_forward(
            self._name(), module, kernel, args, kwargs, self.compute_dtype, dequantize_array, self.remat
        )

    # --- merge ---------------------------------------------------------------------------------
    def merge_module(self, path: Path, own: Mapping[str, Any], deltas: Any, ctx: Context) -> dict[str, Any]:
        if deltas is not None and any(is_quantized(v) for v in own.values()):
            if jax.tree.leaves(deltas):
                raise JpeftError(
                    f"{self._name()}: merging into the quantised kernel {join(path + ('kernel',))!r} would re-quantise "
                    "it (lossy). Call jpeft.quant.merge_requantized(method, tree) for the re-quantised base and its "
                    "error, or jpeft.merge(method, jpeft.dequantize(tree)) for float weights."
                )
            return {}
        return super().merge_module(path, own, deltas, ctx)


def on_quantized(*methods: Method, compute_dtype: str = "bfloat16", remat: bool = True) -> OnQuantized:
    """Runs ``methods`` (one or several, composed) on a base quantised by ``jpeft.quantize``.

    See :class:`OnQuantized`.

    Example:
      >>> import jpeft
      >>> jpeft.on_quantized(jpeft.LoRA(targets=["q"], rank=4)).keys
      ('lora',)
    """
    return OnQuantized(methods=tuple(methods), compute_dtype=compute_dtype, remat=remat)


def _config_of(q: Any) -> Any:
    if isinstance(q, IntArray):
        return q.config
    assert isinstance(q, NF4Array)
    return NF4(block_size=q.block_size, double_quant=q.dq_block_size is not None, dq_block_size=q.dq_block_size or 256)


def merge_requantized(method: Method, tree: Any, *, name: str = "default") -> tuple[Any, dict[str, dict[str, float]]]:
    """Merges a method into a quantised base and quantises the merged kernels again, in their formats.

    The float merge ``W' = dequant(W) + delta`` (``jpeft.merge`` of the dequantised tree) is
    re-quantised kernel by kernel with the format each kernel had; the report gives, per kernel
    path, ``max_abs_error`` = ``max |W' - dequant(requant(W'))|`` and ``rel_error`` (Frobenius,
    relative to ``W'``). Kernels the method does not change are re-quantised too, and unchanged.

    Args:
      method: the method (an :class:`OnQuantized`) that made the deltas.
      tree: its tree from ``jpeft.apply`` (trained), or the NNX model.
      name: the adapter to fold in.

    Returns:
      ``(merged, report)``: the tree (or NNX model) without deltas, its kernels quantised, and the report.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> from jpeft.quant import merge_requantized
      >>> model, x = nn.Dense(8), jnp.ones((2, 16))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> method = jpeft.on_quantized(jpeft.LoRA(targets=".*", rank=2))
      >>> peft = jpeft.apply(method, jpeft.quantize(params, jpeft.Int8(), targets="kernel"), key=jax.random.key(1))
      >>> merged, report = merge_requantized(method, peft)
      >>> type(merged["kernel"]).__name__, sorted(report["kernel"])
      ('IntArray', ['max_abs_error', 'rel_error'])
    """
    view = _nnx.tree(tree) if _nnx.is_model(tree) else tree
    formats = {p: _config_of(x) for p, x in _tree.leaves(view) if is_quantized(x)}
    if not formats:
        raise JpeftError("merge_requantized: the tree holds no quantised kernel; use jpeft.merge.")
    from jpeft._core import merge

    merged = merge(method, dequantize(tree), name=name)
    out = merged
    for config in set(formats.values()):
        paths = [p for p, c in formats.items() if c == config]
        out = quantize(out, config, targets="|".join(re.escape(join(p)) for p in paths))
    floats = dict(_tree.leaves(_nnx.tree(merged) if _nnx.is_model(merged) else merged))
    quants = dict(_tree.leaves(_nnx.tree(out) if _nnx.is_model(out) else out))
    report = {}
    for p in formats:
        w = np.asarray(floats[p], np.float64)
        err = w - np.asarray(dequantize_array(quants[p], jnp.float32), np.float64)
        report[join(p)] = {
            "max_abs_error": float(np.abs(err).max()),
            "rel_error": float(np.linalg.norm(err) / max(np.linalg.norm(w), 1e-30)),
        }
    return out, report
