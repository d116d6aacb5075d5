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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import _intercept
from jpeft._tree import join
from jpeft.profiles import Profile
from jpeft.profiles._profile import module_paths

_REAL: contextvars.ContextVar[Mapping[str, jax.Array] | None] = contextvars.ContextVar("jpeft_real", default=None)
"""Within a wrapped call: ``{'encoder': m, 'decoder': m}``, ``m: (B, S)`` float, 1 at the caller's
real, unpadded positions of the extended inputs and 0 at virtual and padded ones (UniPELT's gates)."""


_SIDE: contextvars.ContextVar[Any] = contextvars.ContextVar("jpeft_side", default=None)
"""Inside an encoder-decoder (see ``_prompt.regions``): ``'encoder'``, ``'decoder'``, or, inside a
cross-attention, ``('cross', q)`` with ``q`` the name of its query projection."""


def real_mask(module: Any, length: int) -> jax.Array | None:
    """The :data:`_REAL` mask for an input of ``length`` positions of ``module``, or ``None``.

    In an encoder-decoder the side follows :data:`_SIDE`: a cross-attention's query projection reads
    decoder positions, its other projections encoder positions. ``None`` outside a wrapped call of a
    virtual-token method, or when the mask's length is not ``length``.
    """
    masks = _REAL.get()
    if masks is None:
        return None
    side = _SIDE.get()
    if isinstance(side, tuple):  # the module's own name: the last component of its path (linen or NNX)
        side = "decoder" if tuple(module.path)[-1:] == (side[1],) else "encoder"
    mask = masks.get(side or "encoder")
    return mask if mask is not None and mask.shape[1] == length else None


def stack_of(layer_pattern: str, path: str) -> bool:
    """Whether module ``path`` is a layer stack: its child ``'0'`` is layer 0 of ``layer_pattern``."""
    m = re.search(layer_pattern, path + "/0")
    return m is not None and m.end() == len(path) + 2 and m.group(1) == "0" and not re.search(layer_pattern, path)


class _LinenRoot:
    """The root of a linen ``apply``: every bound module is below it (``_intercept.submodule_calls``)."""

    path = ()


def module_calls(
    root: Any, select: Callable[[tuple], bool], around: Callable[[tuple, Callable[..., Any], tuple, dict], Any]
) -> contextlib.AbstractContextManager[None]:
    """Within the block, each ``__call__`` of a module whose path ``select(path)`` runs ``around(path, next_fun, args, kwargs)``.

    The backend-neutral seam of the virtual-token methods' ``call`` (:func:`exits`, ``_prompt.regions``).
    ``root``: what ``apply_fn.jpeft_root`` holds (on NNX, a view of the root model that re-classes
    its submodules for the call, see ``jpeft._nnx_root``), or ``None`` on linen, where
    ``flax.linen.intercept_methods`` sees every bound module. Paths are tuples of str.
    """

    def inner(module: Any, next_fun: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        path = tuple(str(k) for k in module.path)
        return around(path, next_fun, args, kwargs) if select(path) else next_fun(*args, **kwargs)

    return _intercept.submodule_calls(_LinenRoot if root is None else root, inner)


def stacks(profile: Profile, params: Any) -> frozenset[tuple]:
    """The layer stacks of ``params``: module paths whose child ``'0'`` is layer 0 of the profile.

    A stack of layers made by ``nn.scan`` / ``nnx.vmap`` has no child ``'0'``, so it is none: its
    module runs once per layer, and cutting its output would cut every layer's.
    """
    mods = {tuple(p.split("/")) for p in module_paths(params)}
    return frozenset(p for p in mods if p + ("0",) in mods and stack_of(profile.layer_pattern, join(p)))


def exits(
    profile: Profile, cut: Callable[[tuple, Any], Any], params: Any = None, root: Any = None
) -> contextlib.AbstractContextManager[None]:
    """Within the block, each layer stack's output is passed through ``cut`` (leaf by leaf).

    A *layer stack* is the module whose children are the layers of ``profile.layer_pattern``
    (BERT's ``encoder/layer``, GPT-2's ``h``); with ``params``, only those of :func:`stacks`.
    Prefix methods drop their virtual positions there, so that the model's heads (a pooler, a
    classifier, an LM head) see only the caller's positions. ``root``: see :func:`module_calls`.
    """
    found = None if params is None else stacks(profile, params)

    def select(path: tuple) -> bool:
        return path in found if found is not None else stack_of(profile.layer_pattern, join(path))

    def around(path: tuple, next_fun: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return jax.tree_util.tree_map_with_path(cut, next_fun(*args, **kwargs))

    return module_calls(root, select, around)


def real_positions(mask: Any, batch: int, length: int, n: int) -> jax.Array:
    """``(B, n + T)`` float: 0 at the ``n`` virtual positions, then the caller's mask (ones if none)."""
    mask = jnp.ones((batch, length), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    return jnp.concatenate([jnp.zeros((batch, n), jnp.float32), mask], axis=1)
