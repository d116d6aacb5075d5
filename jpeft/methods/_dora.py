"""DoRA: weight-decomposed low-rank adaptation, LoRA with ``use_dora=True``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.methods._lora import LoRA


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoRA(LoRA):
    """LoRA with ``use_dora=True``: weight-decomposed low-rank adaptation.

    ``W' = m * (W + s A B) / ||W + s A B||_c``, the norm per output feature and held constant in
    the backward pass. See :class:`LoRA` for the arguments.

    Example:
      >>> import jpeft
      >>> jpeft.DoRA(targets=("query", "value")).use_dora
      True

    References:
      Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024.
    """

    use_dora: bool = True


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums ``x`` over the axes that ``shape`` (same rank) broadcasts."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True)


def combine(y: jax.Array, delta: jax.Array, factor: jax.Array, bias: jax.Array) -> jax.Array:
    """DoRA's output ``y + (f - 1) (y - bias) + f delta``, i.e. ``bias + f z`` with ``z = x (W + s A B)``.

    ``y = x W + bias`` is the frozen layer's output, ``delta = s x A B`` and ``f = m / ||W + s A B||_c``
    broadcast against ``y``. The backward pass needs ``z`` for the magnitude's gradient (``sum g z``);
    instead of keeping ``y - bias`` and ``delta`` (two ``(tokens, out)`` buffers per layer) it keeps
    only the output, which the next layer (attention, GELU) keeps anyway, and recovers
    ``z = (out - bias) / f``. A magnitude entry of exactly 0 has no ``z`` to recover: its gradient is
    NaN (loud, never a silent 0).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jpeft.methods._dora import combine
      >>> y, d, f, b = jnp.ones((2, 3)), jnp.full((2, 3), 0.5), jnp.full((1, 3), 2.0), jnp.zeros((1, 3))
      >>> combine(y, d, f, b)[0].tolist()
      [3.0, 3.0, 3.0]
    """
    # Under shard_map the custom_vjp's cotangents must keep each input's varying mesh axes: cast every
    # input to y's first, so that autodiff of the cast (a psum) sums the replicated inputs' gradients.
    vma = tuple(sorted(_varying(y)))
    if vma:
        delta, factor, bias = (_vary(v, vma) for v in (delta, factor, bias))
    return _combine(y, delta, factor, bias)


def _varying(v: jax.Array) -> frozenset:
    """The mesh axes ``v`` varies over inside ``shard_map`` (empty outside it)."""
    return getattr(getattr(jax.typeof(v), "manual_axis_type", None), "varying", frozenset())


def _vary(v: jax.Array, vma: tuple[str, ...]) -> jax.Array:
    missing = tuple(a for a in vma if a not in _varying(v))
    return jax.lax.pcast(v, missing, to="varying") if missing else v


@jax.custom_vjp
def _combine(y: jax.Array, delta: jax.Array, factor: jax.Array, bias: jax.Array) -> jax.Array:
    dtype = delta.dtype
    return (y + ((factor - 1) * (y.astype(dtype) - bias) + factor * delta).astype(y.dtype)).astype(y.dtype)


def _combine_fwd(y, delta, factor, bias):
    out = _combine(y, delta, factor, bias)
    return out, (out, factor, bias)


def _combine_bwd(res, g):
    out, factor, bias = res
    dtype = factor.dtype
    g = g.astype(dtype)
    gz = factor * g
    # sum(g z) = (sum(g out) - bias sum(g)) / f, summed over the axes the small shapes broadcast:
    # neither bias nor f is broadcast to the output's shape here. (With ``(out - bias) / f`` XLA
    # merges that broadcast of the bias with the forward pass's ``x W + bias`` and keeps it, one more
    # (tokens, out) buffer per layer until the backward pass.)
    small = jnp.broadcast_shapes(factor.shape, bias.shape)
    sum_g = _sum_to(g, small)
    sum_gz = (_sum_to(g * out.astype(dtype), small) - bias * sum_g) / factor
    return gz.astype(out.dtype), gz, _sum_to(sum_gz, factor.shape), _sum_to((1 - factor) * sum_g, bias.shape)


_combine.defvjp(_combine_fwd, _combine_bwd)
