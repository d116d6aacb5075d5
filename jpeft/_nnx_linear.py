"""How jpeft reads ``flax.nnx`` linear modules: their kernel layout and how to apply a down factor.

The records are the same :class:`jpeft.Linear` type as on linen, so every method's ``forward``
calls ``linear_of(module).down(module, x, a)`` on both backends. They cover ``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Embed`` and ``nnx.Conv``, and *einsum-style* modules
of real model code: one ≥2-D weight applied to the input by an einsum string held in an attribute
(tunix's attention ``Einsum``: ``w: (D, N, H)`` with ``'BTD,DNH->BTNH'``), and embedders whose lookup
is an ``encode`` method over a table ``input_embedding`` (tunix's ``Embedder``). Those are recognised
by their attributes, so tunix, MaxText or EasyDeL code needs no registration.
"""

from __future__ import annotations

import string
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jpeft._errors import JpeftError
from jpeft._intercept import Linear, _embed_down, _general_down, _matmul_down
from jpeft._layout import Layout
from jpeft._tree import join


def _tuple(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _general_layout(view: Any) -> Layout:
    m = view.module
    if m.batch_axis:
        raise JpeftError(
            f"nnx.LinearGeneral at {join(view.path)!r} has batch_axis={dict(m.batch_axis)}; jpeft supports "
            "LinearGeneral without batch axes only. Exclude it from targets."
        )
    return Layout("dense_general", n_in=len(_tuple(m.axis)), n_out=len(_tuple(m.out_features)))


def _conv_layout(view: Any) -> Layout:
    m = view.module
    if m.feature_group_count != 1 or m.mask is not None:
        raise JpeftError(
            f"nnx.Conv at {join(view.path)!r} has feature_group_count={m.feature_group_count} or a mask; "
            "LoRA on grouped or masked convolutions is not supported. Exclude it from targets."
        )
    return Layout("conv", n_in=len(_tuple(m.kernel_size)) + 1)


class _Shadow:
    """A plain object with a module's attributes, to run the module class's own ``__call__`` on."""


def _conv_down(view: Any, x: jax.Array, a: jax.Array) -> jax.Array:
    # nnx.Conv's own __call__ (padding modes, strides, dilation, batch flattening) with ``a`` as the
    # kernel and no bias, run on a shadow so that the module itself is not touched.
    shadow = object.__new__(_Shadow)
    vars(shadow).update(vars(view.module))
    vars(shadow).update(kernel=a, bias=None, use_bias=False, kernel_shape=a.shape, mask=None, dtype=a.dtype)
    return nnx.Conv.__call__(shadow, x)


def _parse(spec: str, path: Any, shape: tuple[int, ...]) -> tuple[str, str, str, str, str]:
    """Splits ``'in,kernel->out'`` into (in, kernel, out, contracted, kernel outputs), or raises.

    ``shape`` is the weight's shape; leading stack axes (``nnx.vmap`` layers) are allowed. The
    weight's axes may come in any order, and its output axes may sit anywhere in the output.
    """
    spec = spec.replace(" ", "")
    try:
        operands, out = spec.split("->")
        x, w = operands.split(",")
    except ValueError:
        raise JpeftError(
            f"Einsum module at {join(path)!r} has einsum_str {spec!r}; jpeft expects exactly 'input,weight->output'."
        ) from None
    contracted = "".join(c for c in w if c in x and c not in out)
    outs = "".join(c for c in w if c not in contracted)
    ok = (
        "." not in w
        and len(w) <= len(shape)
        and len(set(w)) == len(w)
        and all(c in out and c not in x for c in outs)
        and all(c in x or c in w or c == "." for c in out)
    )
    if not ok or not contracted or not outs:
        raise JpeftError(
            f"Einsum module at {join(path)!r} ({spec!r}, weight shape {shape}) is not a linear map jpeft can "
            "factor: every weight axis must be either contracted with the input (LoRA's A axes) or an output "
            "axis the input lacks (B's axes), as in 'BTD,DNH->BTNH', 'BTD,NDH->BTNH' or 'BSD,CKDH->CBSKH'; a "
            "weight axis shared by input and output (a per-head weight) is not. Register the type with "
            "jpeft.register_linear(T, jpeft.Linear(layout, down=..., weight=...)), or exclude it from targets."
        )
    return x, w, out, contracted, outs


def einsum_linear(weight: str = "kernel", spec: str = "einsum_str") -> Linear:
    """A :class:`jpeft.Linear` record for an NNX module that applies ``weight`` with an einsum string.

    The weight's contracted axes are LoRA's input axes (``A: (*in, r)``) and its remaining axes the
    output axes (``B: (r, *out)``), each in the weight's order, wherever they sit in the weight and
    the output (tunix Gemma 3's ``'BSD,CKDH->CBSKH'``: ``A: (D, r)``, ``B: (r, C, K, H)``). jpeft finds such modules by themselves (an ``einsum_str``
    attribute and one ≥2-D weight); register this record for a type whose attributes differ.

    Args:
      weight: the attribute holding the weight (tunix: ``'w'``; ``nnx.Einsum``: ``'kernel'``).
      spec: the attribute holding the einsum string.

    Example:
      >>> import jax.numpy as jnp, jpeft
      >>> from flax import nnx
      >>> class Proj(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.spec = "btd,dnh->btnh"
      ...     self.w = nnx.Param(jnp.ones((4, 2, 3)))
      ...   def __call__(self, x):
      ...     return jnp.einsum(self.spec, x, self.w[...])
      >>> jpeft.register_linear(Proj, jpeft.einsum_linear(weight="w", spec="spec"))
    """

    def parsed(view: Any) -> tuple[str, str, str, str, str]:
        return _parse(getattr(view.module, spec), view.path, tuple(getattr(view.module, weight).shape))

    def layout(view: Any) -> Layout:
        _, w, _, contracted, outs = parsed(view)
        in_axes = tuple(w.index(c) for c in contracted)
        lead = in_axes == tuple(range(len(contracted)))
        return Layout("dense_general", n_in=len(contracted), n_out=len(outs), in_axes=None if lead else in_axes)

    def down(view: Any, x: jax.Array, a: jax.Array) -> jax.Array:
        # ``a`` is a down factor (*in, r): returns (*rest, r) with the output's other axes in its
        # order; or the whole weight as_down (*in, *out) (QLoRA's dequantised base, DoRA): the output.
        xs, w, out, contracted, outs = parsed(view)
        if a.ndim - len(contracted) != 1:
            return jnp.einsum(f"{xs},{contracted}{outs}->{out}", x, a)
        r = next(c for c in string.ascii_letters if c not in xs + w + out)
        rest = "".join(c for c in out if c not in outs)
        return jnp.einsum(f"{xs},{contracted}{r}->{rest}{r}", x, a)

    def place(view: Any, d: jax.Array) -> jax.Array:
        _, _, out, _, outs = parsed(view)
        rest = "".join(c for c in out if c not in outs)
        return d if rest + outs == out else jnp.einsum(f"{rest}{outs}->{out}", d)

    return Linear(layout, down, weight=weight, place=place)


_NNX: dict[type, Linear] = {
    nnx.Linear: Linear(Layout("dense"), _matmul_down),
    nnx.LinearGeneral: Linear(_general_layout, _general_down),
    nnx.Embed: Linear(Layout("embed"), _embed_down),
    nnx.Conv: Linear(_conv_layout, _conv_down),
    nnx.Einsum: einsum_linear("kernel"),
}


def _einsum_style(module: nnx.Module) -> Linear | None:
    """An einsum-style module: a string ``einsum_str`` and exactly one ≥2-D ``nnx.Param``."""
    spec = getattr(module, "einsum_str", None)
    if not isinstance(spec, str) or "->" not in spec:
        return None
    weights = [k for k, v in vars(module).items() if isinstance(v, nnx.Param) and getattr(v, "ndim", 0) >= 2]
    return einsum_linear(weights[0]) if len(weights) == 1 else None


def _embedder_style(module: nnx.Module) -> Linear | None:
    """An embedder whose lookup is ``encode`` (tunix): a 2-D ``nnx.Param`` ``input_embedding`` and an ``encode``."""
    table = vars(module).get("input_embedding")
    if isinstance(table, nnx.Param) and getattr(table, "ndim", 0) == 2 and callable(getattr(module, "encode", None)):
        return Linear(Layout("embed"), _embed_down, weight="input_embedding")
    return None


def record(module: nnx.Module) -> Linear | None:
    """The :class:`jpeft.Linear` record of an NNX module, or ``None`` where jpeft has none."""
    from jpeft._intercept import _REGISTRY

    base = getattr(type(module), "_jpeft_base", type(module))
    for cls in base.__mro__:
        if cls in _REGISTRY and issubclass(cls, nnx.Module):
            return _REGISTRY[cls]
        if cls in _NNX:
            return _NNX[cls]
    return _einsum_style(module) or _embedder_style(module)


def weight_attr(linear: Linear | None, leaf: str) -> str:
    """The module attribute that holds the tree leaf ``leaf`` (``'kernel'`` may be stored as ``w``)."""
    if linear is not None and linear.weight is not None and leaf in ("kernel", "embedding"):
        return linear.weight
    return leaf
