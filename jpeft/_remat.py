"""``jpeft.wrap(..., remat=...)``: per-block rematerialisation that holds on XLA:CPU's default scheduler.

``jax.checkpoint`` over each block tells XLA *what* it may recompute, not *when*. XLA:CPU's
default (concurrency-optimized) scheduler is free to run every block's recomputation early, as
soon as its inputs (the block's input and parameters, all known after the forward pass) exist, and
then the recomputed activations are live together again: the plan's bytes do not change.
``jax.lax.optimization_barrier`` cannot order it on XLA:CPU either (its ``cse_barrier_expander``
removes barriers before CSE and scheduling). Here each block's backward first adds an exact zero
read from the block's output cotangent to the saved inputs (``jpeft.methods._qlora._after``, the
trick the quantised bases use for their kernels): the recomputation depends on the cotangent, so
it cannot start before that block's backward does, and one block's activations are live at a time.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _errors
from jpeft._errors import JpeftError
from jpeft._tree import join
from jpeft.methods._qlora import _after

_state = threading.local()


def _is_float_array(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)


def _first_float(tree: Any) -> jax.Array | None:
    return next((leaf for leaf in jax.tree.leaves(tree) if _is_float_array(leaf)), None)


def check_remat(remat: Any, where: str = "jpeft.wrap") -> str | None:
    """``remat`` as a block regex (``'blocks'`` stays as is for the profile lookup), or a clear error."""
    if remat is None or remat is False:
        return None
    if remat is True or remat == "blocks":
        return "blocks"
    if isinstance(remat, str):
        _errors.regex(where, "remat", remat)
        return remat
    raise JpeftError(
        f"{where}(remat={remat!r}): expected None, True / 'blocks' (recompute each layer of the detected "
        "profile) or a regex matching the block modules' paths."
    )


def block_regex(remat: str, params: Any) -> re.Pattern[str]:
    """The regex of the blocks to recompute: the profile's layers for ``'blocks'``, else ``remat`` itself."""
    if remat != "blocks":
        return re.compile(remat)
    from jpeft import profiles

    found = profiles.matching(params) if isinstance(params, Mapping) else []
    if not found:
        raise JpeftError(
            "jpeft.wrap(remat='blocks'): no known architecture matches the tree, so jpeft cannot tell which "
            "modules are the layers. Pass remat=r'(?:^|/)layers_\\d+$' (a regex matching each block's path)."
        )
    # the profile's layer pattern ends a layer path with (?=/|$); a block is the module whose path ends there
    return re.compile(found[0].layer_pattern.replace("(?=/|$)", "$"))


def remat_interceptor(blocks: re.Pattern[str]) -> Callable[..., Any]:
    """An ``intercept_methods`` interceptor that runs each matching block's ``__call__`` rematerialised.

    The block runs under ``nn.custom_vjp``: the forward keeps only what ``nn.checkpoint`` keeps
    (the block's inputs and parameters); the backward adds ``0 * g`` (an exact zero that XLA does not
    fold) to those residuals and then runs the checkpointed block's vjp, so the recomputation waits
    for the block's cotangent ``g``. Float array arguments are differentiated; other arguments
    (ints, bools, masks of ints, ``None``) are passed through unchanged.
    """

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (
            context.method_name != "__call__"
            or module.scope is None
            or getattr(_state, "inside", False)
            or not blocks.search(join(module.path))
        ):
            return next_fun(*args, **kwargs)
        leaves, treedef = jax.tree.flatten((args, kwargs))
        where = [i for i, leaf in enumerate(leaves) if _is_float_array(leaf)]

        def run(mdl: nn.Module, *arrays: jax.Array) -> Any:
            full = list(leaves)
            for i, a in zip(where, arrays, strict=True):
                full[i] = a
            a, k = jax.tree.unflatten(treedef, full)
            _state.inside = True
            try:
                return mdl(*a, **k)
            finally:
                _state.inside = False

        def fwd(mdl: nn.Module, *arrays: jax.Array) -> tuple[Any, Any]:
            return nn.vjp(nn.checkpoint(run, prevent_cse=False), mdl, *arrays)

        def bwd(vjp_fn: Any, g: Any) -> Any:
            g0 = _first_float(g)
            if g0 is not None:
                vjp_fn = jax.tree.map(lambda r: _after(r, g0) if _is_float_array(r) else r, vjp_fn)
            return vjp_fn(g)

        return nn.custom_vjp(run, forward_fn=fwd, backward_fn=bwd)(module, *[leaves[i] for i in where])

    return intercept
