"""Mixed batches at one adapter's cost: gather each row's low-rank factors (Punica BGMV, S-LoRA).

With ``adapter_index=`` the looped path (``jpeft._intercept._run``) runs every active adapter on the
whole batch and selects rows, so N adapters cost N adapter passes. A method whose delta is a
low-rank product can instead implement the classmethod hook

    ``gather_forward(module, y, args, kwargs, adapters, slot) -> output | None``

where ``adapters`` lists ``(method, deltas)`` of the adapters present on the site, ``y`` is the
base output (computed once), and ``slot`` holds each row's position in ``adapters``
(``len(adapters)``: the base model). It returns ``None`` where it does not apply (the looped path
then runs). :class:`jpeft.LoRA` implements it with :func:`low_rank`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

_STATE = threading.local()


@contextlib.contextmanager
def looped() -> Iterator[None]:
    """While active (at trace time), mixed batches take the looped path: the oracle and the baseline."""
    before = getattr(_STATE, "looped", False)
    _STATE.looped = True
    try:
        yield
    finally:
        _STATE.looped = before


def slots(index: jax.Array, present: Sequence[tuple[int, str]]) -> jax.Array:
    """Each row's position in ``present`` (``len(present)`` for ``-1`` rows and adapters absent here)."""
    slot = jnp.full(index.shape, len(present), jnp.int32)
    for k, (i, _) in enumerate(present):
        slot = jnp.where(index == i, k, slot)
    return slot


def mixed(
    module: Any,
    out: Any,
    args: tuple,
    kwargs: dict,
    store: Any,
    present: Sequence[tuple[int, str]],
    forward_of: Callable[[str], Any],
    index: jax.Array,
) -> Any | None:
    """The gathered mixed-batch output of one site, or ``None`` where the adapters' methods have no
    common ``gather_forward`` hook (or it declines) and the looped path must run."""
    if getattr(_STATE, "looped", False):
        return None
    methods = [getattr(forward_of(n), "__self__", None) for _, n in present]
    hooks = {getattr(getattr(type(m), "gather_forward", None), "__func__", None) for m in methods}
    if len(hooks) != 1 or None in hooks:
        return None
    return type(methods[0]).gather_forward(
        module,
        out,
        args,
        kwargs,
        [(m, store[n]) for m, (_, n) in zip(methods, present, strict=True)],
        slots(index, present),
    )


def low_rank(
    module: Any,
    linear: Any,
    y: jax.Array,
    x: jax.Array,
    factors: Sequence[tuple[jax.Array, jax.Array, float]],
    slot: jax.Array,
) -> jax.Array:
    """``y + s_i (x_i A_i) B_i`` per row ``i``, with ``(A, B, s)`` = ``factors[slot[i]]`` (none past the end).

    The factors are stacked with unequal ranks zero-padded and a zero adapter appended for the base
    rows, gathered per row to ``(B, *d_in, r)`` / ``(B, r, d_out)``, and applied with one batched
    down- and up-projection: the FLOPs of one adapter whatever the number of adapters.
    """
    dtype = jnp.promote_types(factors[0][0].dtype, y.dtype)
    r = max(a.shape[-1] for a, _, _ in factors)

    def pad(v: jax.Array, axis: int) -> jax.Array:
        widths = [(0, 0)] * v.ndim
        widths[axis] = (0, r - v.shape[axis])
        return jnp.pad(v.astype(dtype), widths)

    a_all = jnp.stack([pad(a, -1) for a, _, _ in factors])
    b_all = jnp.stack([pad(b.reshape(b.shape[0], -1), 0) for _, b, _ in factors])
    a_all = jnp.concatenate([a_all, jnp.zeros_like(a_all[:1])])
    b_all = jnp.concatenate([b_all, jnp.zeros_like(b_all[:1])])
    scales = jnp.asarray([s for _, _, s in factors] + [0.0], dtype)
    a_rows, b_rows, s_rows = a_all[slot], b_all[slot], scales[slot]
    h = jax.vmap(lambda xi, ai: linear.down(module, xi[None], ai)[0])(x.astype(dtype), a_rows)
    h = h * s_rows.reshape((-1,) + (1,) * (h.ndim - 1))
    d_out = factors[0][1].shape[1:]
    delta = jnp.einsum("btr,bro->bto", h.reshape(h.shape[0], -1, r), b_rows)
    return y + delta.reshape(h.shape[:-1] + d_out).astype(y.dtype)
