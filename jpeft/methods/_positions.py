"""Which positions of an extended (virtual-token) call are the caller's: context for heads and gates.

A prompt or prefix method runs the model on ``P`` virtual positions in front of the caller's
``T``. Two things here let code inside the model tell them apart:

- :func:`exits` cuts the outputs of each layer stack, so that a prefix method's placeholders never
  reach a head (BERT's pooler, a classifier, an LM head);
- :data:`_REAL` holds, per side of the model, a mask of the caller's real, unpadded positions, which
  UniPELT's gates average over (:func:`real_mask`).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft._tree import join
from jpeft.profiles import Profile

_REAL: contextvars.ContextVar[Mapping[str, jax.Array] | None] = contextvars.ContextVar("jpeft_real", default=None)
"""Within a wrapped call: ``{'encoder': m, 'decoder': m}``, ``m: (B, S)`` float, 1 at the caller's
real, unpadded positions of the extended inputs and 0 at virtual and padded ones (UniPELT's gates)."""


_SIDE: contextvars.ContextVar[Any] = contextvars.ContextVar("jpeft_side", default=None)
"""Inside an encoder-decoder (see ``_prompt.regions``): ``'encoder'``, ``'decoder'``, or, inside a
cross-attention, ``('cross', q)`` with ``q`` the name of its query projection."""


def real_mask(module: nn.Module, length: int) -> jax.Array | None:
    """The :data:`_REAL` mask for an input of ``length`` positions of ``module``, or ``None``.

    In an encoder-decoder the side follows :data:`_SIDE`: a cross-attention's query projection reads
    decoder positions, its other projections encoder positions. ``None`` outside a wrapped call of a
    virtual-token method, or when the mask's length is not ``length``.
    """
    masks = _REAL.get()
    if masks is None:
        return None
    side = _SIDE.get()
    if isinstance(side, tuple):
        side = "decoder" if module.name == side[1] else "encoder"
    mask = masks.get(side or "encoder")
    return mask if mask is not None and mask.shape[1] == length else None


def stack_of(layer_pattern: str, path: str) -> bool:
    """Whether module ``path`` is a layer stack: its child ``'0'`` is layer 0 of ``layer_pattern``."""
    m = re.search(layer_pattern, path + "/0")
    return m is not None and m.end() == len(path) + 2 and m.group(1) == "0" and not re.search(layer_pattern, path)


@contextlib.contextmanager
def exits(profile: Profile, cut: Callable[[tuple, Any], Any]) -> Iterator[None]:
    """Within the block, each layer stack's output is passed through ``cut`` (leaf by leaf).

    A *layer stack* is the module whose children are the layers of ``profile.layer_pattern``
    (BERT's ``encoder/layer``, GPT-2's ``h``). Prefix methods drop their virtual positions there,
    so that the model's heads (a pooler, a classifier, an LM head) see only the caller's positions.
    """

    def intercept(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        scope = context.module.scope
        if context.method_name == "__call__" and scope is not None and stack_of(profile.layer_pattern, join(tuple(scope.path))):
            return jax.tree_util.tree_map_with_path(cut, out)
        return out

    with nn.intercept_methods(intercept):
        yield


def real_positions(mask: Any, batch: int, length: int, n: int) -> jax.Array:
    """``(B, n + T)`` float: 0 at the ``n`` virtual positions, then the caller's mask (ones if none)."""
    mask = jnp.ones((batch, length), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    return jnp.concatenate([jnp.zeros((batch, n), jnp.float32), mask], axis=1)
