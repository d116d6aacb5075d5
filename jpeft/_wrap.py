"""The public tree API: ``wrap``, which runs a Flax apply function with a method's deltas in effect.

It also holds wrap's checks of AdapterDrop (``drop_layers`` / ``drop_random``) and of mixed batches
(``adapter_index``), which the NNX call (``jpeft.call``) shares. Nothing here is jitted.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jpeft import _errors, _intercept, _nnx, _remat, _tree
from jpeft._core import _check_method, _check_name, _sites
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import RESERVED, PyTree, join


def wrap(
    apply_fn: Callable[..., Any],
    method: Method,
    *,
    active: str | Sequence[str] = "default",
    drop_layers: Sequence[int] | None = None,
    drop_random: int | None = None,
    layer_pattern: str | None = None,
    remat: bool | str | None = None,
) -> Callable[..., Any]:
    """Wraps a Flax apply function so that it runs with a method's deltas in effect.

    The result has the signature of ``flax.linen.Module.apply``: ``(variables, *args, rngs=...,
    **kwargs)``. It holds no state and works under ``jit``, ``grad``, ``nn.scan``, ``nn.remat`` and
    ``shard_map``. Dropout inside a method draws from the ``'dropout'`` rng the caller passes.

    A mixed batch: pass ``adapter_index=`` (an int array with one entry per example) to the
    wrapped function, and each example runs only adapter ``active[adapter_index[i]]`` (``-1``: the
    base model), as if it ran alone.

    Args:
      apply_fn: ``model.apply`` (for HF Flax models, ``model.module.apply``).
      method: the method whose deltas ``variables['params']`` holds.
      active: the adapter name to run, or a list of names: stacked (their changes add up), or the
        choices of a mixed batch.
      drop_layers: AdapterDrop at inference: layer indices whose modules run without their deltas
        (``range(5)`` drops the lowest five layers). The skipped work is not computed at all.
      drop_random: AdapterDrop in training: when the caller passes a ``'dropout'`` rng, each call
        draws ``n`` uniformly from ``0..drop_random`` and drops the deltas of layers ``< n``.
      layer_pattern: a regex with one group that captures the layer index from a module path, for
        ``drop_layers`` / ``drop_random``; by default the detected profile's ``layer_pattern``.
      remat: recompute each block in the backward pass instead of keeping its activations
        (``True`` / ``'blocks'``: the detected profile's layers; or a regex matching the blocks'
        module paths). Unlike ``jax.checkpoint`` per block, it also holds on XLA:CPU's default
        scheduler (see ``jpeft._remat``). Gradients are unchanged.

    Returns:
      The wrapped apply function.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> model = nn.Dense(3)
      >>> x = jnp.ones((2, 4))
      >>> params = {"params": model.init(jax.random.key(0), x)["params"]}
      >>> method = jpeft.LoRA(targets=".*", rank=2)
      >>> peft = jpeft.apply(method, params["params"], key=jax.random.key(1))
      >>> y = jpeft.wrap(model.apply, method)({"params": peft}, x)
      >>> bool(jnp.allclose(y, model.apply(params, x)))  # B = 0 at init
      True
      >>> loss = lambda f: lambda p: jnp.sum(f({"params": p}, x) ** 2)
      >>> g0 = jax.grad(loss(jpeft.wrap(model.apply, method)))(peft)
      >>> g1 = jax.grad(loss(jpeft.wrap(model.apply, method, remat=r"^$")))(peft)  # recompute the root module
      >>> all(bool(jnp.allclose(a, b)) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
      True
    """
    _check_method(method, "jpeft.wrap")
    if _nnx.is_model(apply_fn):
        raise JpeftError(
            f"jpeft.wrap({type(apply_fn).__name__}, ...): an NNX model needs no wrapper. The model jpeft.apply returns "
            "runs its deltas when called; choose adapters with jpeft.set_adapter and mix them per row with jpeft.call."
        )
    names = (active,) if isinstance(active, str) else tuple(active) if isinstance(active, Sequence) else (active,)
    if not names or len(set(names)) != len(names):
        raise JpeftError(f"jpeft.wrap(active={active!r}): active must name one adapter or distinct adapters.")
    for n in names:
        _check_name(n)
    if not callable(apply_fn):
        raise JpeftError(f"jpeft.wrap expects a callable apply function; got {type(apply_fn).__name__}.")
    remat = _remat.check_remat(remat)
    if not method.has_deltas:
        return _without_deltas(apply_fn, method, drop_layers, drop_random, remat)
    dropping = drop_layers is not None or drop_random is not None
    if dropping:
        _check_droppable(method)
    if drop_layers is not None:
        try:
            dropped = frozenset(int(i) for i in drop_layers)
        except (TypeError, ValueError):
            raise JpeftError(
                f"jpeft.wrap(drop_layers={drop_layers!r}): expected a sequence of layer indices."
            ) from None
    if drop_random is not None and (
        isinstance(drop_random, bool) or not isinstance(drop_random, int) or drop_random < 0
    ):
        raise JpeftError(f"jpeft.wrap(drop_random={drop_random!r}): expected an int >= 0 (the most layers to drop).")
    if layer_pattern is not None:
        _errors.regex("jpeft.wrap", "layer_pattern", layer_pattern)

    def layer_of(pattern: str) -> Callable[[Any], int | None]:
        compiled = re.compile(pattern)

        def index(module: Any) -> int | None:
            m = compiled.search(join(module.path))
            return int(m.group(1)) if m else None

        return index

    @functools.wraps(apply_fn)
    def wrapped(variables: PyTree, *args: Any, **kwargs: Any) -> Any:
        params = variables.get("params") if isinstance(variables, Mapping) else None
        held = set()
        if isinstance(params, Mapping):
            for p in _sites(params):
                held.update(_tree.get(params, p)[RESERVED])
        missing = [n for n in names if n not in held]
        if missing:
            raise JpeftError(
                f"jpeft.wrap({type(method).__name__}): variables['params'] holds no deltas of adapter "
                f"{missing[0]!r} (it holds {sorted(held) or 'none'}). Call peft = jpeft.apply(method, params, "
                "key=..., name=...) and pass {'params': peft}."
            )
        index = kwargs.pop("adapter_index", None)
        if index is not None:
            if not method.mixed_batches:
                raise JpeftError(
                    f"jpeft.wrap({type(method).__name__}): adapter_index= (a mixed batch) is not supported: "
                    f"{method.mixed_batches_why or 'the method cannot run one adapter per row'}. Run one adapter per call (active='<name>'), or merge each adapter and batch the merged models."
                )
            _check_adapter_index(index, names, args, kwargs)
        drop = None
        if dropping:
            pattern = layer_pattern or _layer_pattern(params)
            layer = layer_of(pattern)
            n = None
            rngs = kwargs.get("rngs")
            if drop_random is not None and isinstance(rngs, Mapping) and "dropout" in rngs:
                key = jax.random.fold_in(rngs["dropout"], 0x4AD0)  # a stream apart from the model's dropout
                n = jax.random.randint(key, (), 0, drop_random + 1)

            def drop(module: Any) -> Any:
                i = layer(module)
                if i is None:
                    return False
                if drop_layers is not None and i in dropped:
                    return True
                return False if n is None else i < n

        intercept = _intercept.method_interceptor(method, names, index, drop)
        outer = contextlib.nullcontext()
        if remat is not None:
            outer = nn.intercept_methods(_remat.remat_interceptor(_remat.block_regex(remat, params)))
        with outer, nn.intercept_methods(intercept):
            return method.call(apply_fn, variables, args, kwargs, active=active)

    return wrapped


def _check_droppable(method: Method) -> None:
    """AdapterDrop cannot drop a layer's prefix: its placeholder positions would stay visible there."""
    from jpeft.methods._prefix import PrefixTuning
    from jpeft.methods._prompt import virtual_part

    part = virtual_part(method)
    if part is not None and isinstance(part[0], PrefixTuning):
        raise JpeftError(
            f"jpeft.wrap({type(method).__name__}, drop_layers=/drop_random=): AdapterDrop is not supported with "
            f"prefixes ({type(part[0]).__name__}): a layer without its prefix would still attend to the P "
            "placeholder positions, which only the prefix's keys and values make meaningful. Drop adapters "
            "of a composition without a prefix, or run without drop_layers=/drop_random=."
        )


def _without_deltas(
    apply_fn: Callable[..., Any], method: Method, drop_layers: Any, drop_random: Any, remat: str | None = None
) -> Callable[..., Any]:
    """``wrap`` for methods that only choose which base leaves train (BitFit, Freeze, Full).

    The model runs unchanged. AdapterDrop and mixed batches have nothing to act on, so asking for
    them is an error rather than a silent no-op.
    """
    name = type(method).__name__
    if drop_layers is not None or drop_random is not None:
        raise JpeftError(
            f"jpeft.wrap({name}, drop_layers=/drop_random=): {name} trains base leaves in place and adds no "
            "delta leaves, so there is nothing to drop. AdapterDrop applies to methods with deltas (adapters, "
            "LoRA, ...); remove drop_layers=/drop_random=."
        )

    @functools.wraps(apply_fn)
    def wrapped(variables: PyTree, *args: Any, **kwargs: Any) -> Any:
        if "adapter_index" in kwargs:
            raise JpeftError(
                f"jpeft.wrap({name}): adapter_index= (a mixed batch) needs named delta adapters, but {name} trains "
                "base leaves in place, so every row runs the same weights. Run one model per weight set instead."
            )
        if remat is None:
            return apply_fn(variables, *args, **kwargs)
        blocks = _remat.block_regex(remat, variables.get("params") if isinstance(variables, Mapping) else None)
        with nn.intercept_methods(_remat.remat_interceptor(blocks)):
            return apply_fn(variables, *args, **kwargs)

    return wrapped


def _layer_pattern(params: PyTree) -> str:
    from jpeft import profiles

    found = profiles.matching(params)
    if not found:
        raise JpeftError(
            "jpeft.wrap(drop_layers=/drop_random=): no known architecture matches the tree, so jpeft cannot "
            "tell layer indices. Pass layer_pattern=r'(?:^|/)layers_(\\d+)(?=/|$)' (one group: the index)."
        )
    return found[0].layer_pattern


def _check_adapter_index(
    index: Any, names: tuple[str, ...], args: tuple, kwargs: dict, where: str = "jpeft.wrap"
) -> None:
    shape = getattr(index, "shape", None)
    dtype = getattr(index, "dtype", None)
    if shape is None or len(shape) != 1 or not jax.numpy.issubdtype(dtype, jax.numpy.integer):
        raise JpeftError(
            f"{where}: adapter_index must be a 1-D int array, one entry per example (-1 for the base "
            f"model); got {type(index).__name__} with shape {shape} and dtype {dtype}."
        )
    first = next((a for a in (*args, *kwargs.values()) if hasattr(a, "shape") and len(a.shape) >= 1), None)
    if first is not None and first.shape[0] != shape[0]:
        raise JpeftError(
            f"{where}: adapter_index has {shape[0]} entries but the batch has {first.shape[0]} examples "
            f"(first input shape {tuple(first.shape)}). Pass one adapter index per example."
        )
    if not isinstance(index, jax.core.Tracer):
        bad = sorted({int(i) for i in np.asarray(index) if not -1 <= int(i) < len(names)})
        if bad:
            raise JpeftError(
                f"{where}: adapter_index holds {bad}; valid are -1 (base) and 0..{len(names) - 1} "
                f"for active={list(names)}."
            )
