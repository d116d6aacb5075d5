"""QLoRA: LoRA on top of NF4-quantised, frozen base kernels."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._intercept import linear_of
from jpeft._method import Context
from jpeft._tree import Path, PyTree, join
from jpeft.methods._lora import LoRA, _broadcast_out
from jpeft.quant._nf4 import NF4, NF4Array, dequantize_array

_COMPUTED = ("dense", "transposed", "dense_general")  # layouts whose layer QLoRA computes itself


def _abstract(own: Mapping[str, Any]) -> dict[str, Any]:
    """The module's leaves with quantised ones shown as their float shape and original dtype."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.orig_dtype) if isinstance(v, NF4Array) else v for k, v in own.items()}


def float_dtype_name(owner: str, compute_dtype: Any) -> str:
    """``compute_dtype`` as a float dtype's name (QLoRA and ``on_quantized`` check it alike), or a clear error."""
    try:
        dt = jnp.dtype(compute_dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise JpeftError(
            f"{owner}(compute_dtype={compute_dtype!r}): compute_dtype must name a float dtype, e.g. 'bfloat16'."
        )
    return dt.name


def _after(q: Any, g: jax.Array) -> Any:
    """``q`` unchanged, but computed from ``g``: every leaf plus an exact zero read from ``g``.

    ``jax.lax.optimization_barrier`` cannot express this on XLA:CPU, whose ``cse_barrier_expander``
    pass removes barriers before CSE and scheduling run. ``0 * where(isfinite(g0), g0, 0)`` is an
    exact (signed) zero that XLA does not fold (``x * 0`` is not simplified for floats), so the
    backward's dequantisation depends on the cotangent: it is neither merged with the forward's nor
    scheduled before the layer's backward pass. Adding it to the codes and scales is fused into the
    dequantisation."""
    g0 = jnp.ravel(g)[0]
    zero = jnp.where(jnp.isfinite(g0), g0, jnp.zeros_like(g0)) * jnp.zeros_like(g0)
    return jax.tree.map(lambda a: a + zero.astype(a.dtype), q)


def _codes_matmul(
    matmul: Callable[[jax.Array, jax.Array], jax.Array],
    dequantize: Callable[[Any], jax.Array],
    x_type: Any,
) -> Callable[[jax.Array, Any], jax.Array]:
    """``f(x, q) = matmul(x, dequantize(q))`` whose backward keeps the codes, not the float kernel.

    The residual is ``q`` itself (codes and scales, already resident as the step's argument); the
    backward dequantises it again and transposes the matmul, ``dx = g W^T``. Under plain autodiff
    (and under ``jax.checkpoint``, whose recomputation depends on parameters only) XLA is free to
    compute every layer's ``W`` once and keep it from the forward to the backward pass: all layers'
    float kernels are then live at the peak. Here the backward's dequantisation reads ``q`` through
    :func:`_after` the cotangent ``g``, so XLA can neither CSE it with the forward's nor run it
    before that layer's backward starts; the forward's reads ``q`` after ``x``, so XLA does not
    run every layer's forward dequantisation at the start of the step either (on a stack of six
    INT8 ``nn.Dense`` layers it did, planning six float kernels at once): one float kernel is live
    at a time.
    ``x`` is kept only when ``q``'s float leaves (the scales) are differentiated, which
    ``jpeft.split`` never does; the gradient is then autodiff's through ``dequantize``.
    """

    def plain(x: jax.Array, q: Any) -> jax.Array:
        return matmul(x, dequantize(_after(q, x)))

    f = jax.custom_vjp(plain)

    def fwd(x: Any, q: Any) -> tuple[jax.Array, tuple[Any, Any]]:
        values = jax.tree.map(lambda p: p.value, q)
        perturbed = any(p.perturbed for p in jax.tree.leaves(q))
        return plain(x.value, values), (values, x.value if perturbed else None)

    def bwd(res: tuple[Any, Any], g: Any) -> tuple[Any, Any]:
        q, x = res
        if isinstance(g, SymbolicZero):
            return None, None
        if x is not None:  # the base itself is differentiated: autodiff through dequantize
            return jax.vjp(plain, x, q)[1](g)
        w = dequantize(_after(q, g))
        (dx,) = jax.linear_transpose(lambda v: matmul(v, w), x_type)(g)
        return dx, None

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def quantized_forward(
    owner: str,
    module: nn.Module,
    kernel: Any,
    args: tuple,
    kwargs: dict,
    compute_dtype: Any,
    dequantize: Callable[[Any, Any], jax.Array],
    remat: bool = True,
) -> Any:
    """``x dequantize(W) + b`` in ``compute_dtype``, cast to the layer's output dtype: the forward of a
    layer whose kernel is quantised (QLoRA's NF4, ``jpeft.on_quantized``'s every format).

    With ``remat`` (the default) the backward pass dequantises the kernel again from its codes
    (:func:`_codes_matmul`), so a training step holds one layer's float kernel at a time instead of
    all of them; without it autodiff keeps each dequantised kernel from the forward pass. Both give
    the same gradients."""
    linear = linear_of(module)
    layout = linear.layout_of(module)
    if layout.kind not in _COMPUTED:
        raise JpeftError(
            f"{owner}: {join(module.path)!r} ({type(module).__name__}, layout {layout.spec()!r}) holds a quantised "
            f"kernel; only layouts {_COMPUTED} are computed from quantised kernels. Leave it out of jpeft.quantize's "
            "targets."
        )
    x = linear.inputs(args, kwargs)
    cd = jnp.dtype(compute_dtype)
    module_dtype = getattr(module, "dtype", None)
    out_dtype = jnp.result_type(x.dtype, kernel.orig_dtype) if module_dtype is None else jnp.dtype(module_dtype)
    x = jnp.asarray(x, cd)

    def matmul(v: jax.Array, w: jax.Array) -> jax.Array:
        return linear.down(module, v, layout.as_down(w))

    def dequant(q: Any) -> jax.Array:
        return dequantize(q, cd)

    if remat:
        y = _codes_matmul(matmul, dequant, jax.typeof(x))(x, kernel)
    else:
        y = matmul(x, dequant(kernel))
    if module.has_variable("params", "bias"):
        y = y + _broadcast_out(module.get_variable("params", "bias").astype(cd), y.ndim)
    return y.astype(out_dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QLoRA(LoRA):
    """LoRA on NF4-quantised base kernels: ``y = x dequant(W_nf4) + b + s * dropout(x) A B``.

    The base kernels are stored by ``jpeft.quantize`` as :class:`jpeft.NF4Array` (4-bit NF4 codes,
    blockwise absmax scales, optionally double-quantised; about 4.127 bits per weight). In the
    forward pass the interceptor computes each quantised layer itself: it dequantises the kernel in
    ``compute_dtype`` (bf16 by default), multiplies the input (cast to ``compute_dtype``), adds the
    bias and casts to the module's dtype, then LoRA's unmerged ``s * x A B`` is added as in
    :class:`jpeft.LoRA`. Gradients flow through the dequantised weight to ``x`` only; the quantised
    leaves are labelled ``'frozen'`` (train with ``jpeft.split``: integer leaves have no gradient).
    The backward pass dequantises each kernel again from its codes, so a training step holds one
    layer's float kernel at a time, not all of them.

    Quantised modules that ``targets`` does not select still run dequantised (they get an empty
    delta entry); targeted modules with float kernels get plain LoRA. Trainable parameters per
    target: ``r (d_in + d_out)``. Mergeable: ``merge`` returns ``dequant(W) + s A B`` in the
    original dtype with the original structure (re-quantising would be lossy).

    Layers computed: ``nn.Dense``, ``nn.DenseGeneral`` (without batch_dims) and HF GPT-2's
    ``Conv1D``, or any type registered with a ``dense``, ``transposed`` or ``dense_general`` layout;
    on ``flax.nnx``, ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum`` and einsum-style modules
    (tunix's attention ``Einsum``). On an NNX model, ``jpeft.quantize(model, method)`` returns a new
    model whose selected kernels hold ``NF4Array`` values (the same ``nnx.Param`` at the same state
    path); train with ``wrt=jpeft.Delta`` or ``nnx.LoRAParam``, which leave those integer codes out.

    Args:
      targets: the modules that get LoRA factors, as in :class:`jpeft.LoRA`.
      quant: the :class:`jpeft.NF4` config; ``jpeft.quantize(params, method)`` uses it.
      compute_dtype: the dtype of the dequantised kernel and the base matmul.
      rank, alpha, dropout, use_rslora, init, layouts, dtype, extra_trainable: as in
        :class:`jpeft.LoRA` (``use_dora`` is refused).

    Raises:
      JpeftError: on a bad field; from ``apply``, on a tree without quantised kernels, a quantised
        leaf that is not a module's ``kernel``, a quantised module of an unsupported layout, or an
        ``extra_trainable`` pattern that selects a quantised leaf.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> model, x = nn.Dense(8), jnp.ones((2, 64))
      >>> params = {"dense": model.init(jax.random.key(0), x)["params"]}
      >>> method = jpeft.QLoRA(targets=["dense"], rank=2, compute_dtype="float32")
      >>> peft = jpeft.apply(method, jpeft.quantize(params, method), key=jax.random.key(1))
      >>> y = jpeft.wrap(lambda v, x: model.apply({"params": v["params"]["dense"]}, x), method)({"params": peft}, x)
      >>> base = model.apply({"params": jpeft.dequantize(peft)["dense"]}, x)
      >>> bool(jnp.allclose(y, base, atol=1e-5)), jpeft.labels(method, peft)["dense"]["kernel"]
      (True, 'frozen')

    References:
      Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023.
    """

    quant: NF4 = NF4()
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        if not isinstance(self.quant, NF4):
            raise JpeftError(f"{name}(quant={self.quant!r}): quant must be a jpeft.NF4(...) config.")
        if self.use_dora:
            raise JpeftError(f"{name}(use_dora=True): DoRA on quantised kernels is not supported; use jpeft.DoRA.")
        object.__setattr__(self, "compute_dtype", float_dtype_name(name, self.compute_dtype))

    # --- structure -----------------------------------------------------------------------------
    def select(self, params: PyTree) -> list[Path]:
        targets = _tree.select(self._name(), self.targets, params)
        quantised = []
        for path, own in _tree.modules(params).items():
            for leaf, v in own.items():
                if not isinstance(v, NF4Array):
                    continue
                if leaf != "kernel":
                    raise JpeftError(
                        f"{self._name()}: {join(path + (leaf,))} is NF4-quantised, but QLoRA computes only "
                        "linear layers from a quantised 'kernel'. Quantise kernels only, e.g. "
                        "jpeft.quantize(params, method)."
                    )
                if self.extra_trainable is not None and re.fullmatch(self.extra_trainable, join(path + (leaf,))):
                    raise JpeftError(
                        f"{self._name()}(extra_trainable={self.extra_trainable!r}) selects the quantised "
                        f"leaf {join(path + (leaf,))!r}; quantised weights cannot train. Narrow the pattern."
                    )
                quantised.append(path)
        if not quantised:
            raise JpeftError(
                f"{self._name()}: params hold no NF4-quantised kernel. Quantise first: "
                "q = jpeft.quantize(params, method), then jpeft.apply(method, q, key=...)."
            )
        return sorted(set(targets) | set(quantised))

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        if isinstance(own.get("kernel"), NF4Array):
            layout = ctx.layout(self._name(), path, _abstract(own), self.layouts)
            if layout.kind not in _COMPUTED:
                raise JpeftError(
                    f"{self._name()}: {join(path)!r} holds a quantised kernel of layout {layout.spec()!r}; "
                    f"QLoRA computes layers of layouts {_COMPUTED} only. Do not quantise this module."
                )
        if not _tree.matches(self.targets, path):
            return {}
        return super().init_module(key, path, _abstract(own), ctx)

    def param_count(self, params: PyTree) -> int:
        ctx = Context(params)
        modules = _tree.modules(params)
        total = self.extra_count(params)
        for path in _tree.select(self._name(), self.targets, params):
            _, stack, d_in, d_out = self._shapes(path, _abstract(modules[path]), ctx)
            total += math.prod(stack) * self.rank * (math.prod(d_in) + math.prod(d_out))
        return total

    # --- forward -------------------------------------------------------------------------------
    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        # ``next_fun`` ends in base_forward, which computes a quantised layer itself.
        return super().forward(module, next_fun, args, kwargs, deltas) if deltas else next_fun(*args, **kwargs)

    def base_forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict) -> Any:
        """``x dequant(W_nf4) + b`` in ``compute_dtype`` for a quantised layer; the module's own call otherwise."""
        kernel = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") else None
        if not isinstance(kernel, NF4Array):
            return next_fun(*args, **kwargs)
        return quantized_forward(self._name(), module, kernel, args, kwargs, self.compute_dtype, dequantize_array)

    # --- merge ---------------------------------------------------------------------------------
    def merge_module(self, path: Path, own: Mapping[str, Any], deltas: Any, ctx: Context) -> dict[str, Any]:
        kernel = own.get("kernel")
        if not isinstance(kernel, NF4Array):
            return super().merge_module(path, own, deltas, ctx) if deltas else {}
        w = dequantize_array(kernel, jnp.float32)
        if deltas:
            layout = ctx.layout(self._name(), path, _abstract(own), self.layouts)
            a, b = deltas["lora_a"].astype(jnp.float32), deltas["lora_b"].astype(jnp.float32)
            w = w + self.scale * layout.full_delta(a, b)
        return {"kernel": w.astype(kernel.orig_dtype)}
