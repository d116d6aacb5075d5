"""Greedy generation with the KV cache for NNX models from ``jpeft.apply`` with tunix's call convention.

tunix's decoders (``tunix.models.llama3.model.Llama3``, ``tunix.models.qwen3.model.Qwen3``) are
called ``model(input_tokens, positions, cache, attention_mask) -> (logits, cache)``; the cache is a
dict ``{'layer_<i>': {'k', 'v': (B, S, K, H), 'end_index': (B,)}}`` whose slots ``0 .. S-1`` the
``(B, T, S)`` mask addresses. After ``jpeft.apply`` the model's own call runs the deltas, so a
weight method (LoRA) decodes through that cache as it is. A prompt or prefix method extends the
root call by ``P`` virtual positions, which must enter the cache once: :func:`generate` runs the
prompt on ``P + T`` positions with the root hook off and the virtual-token context on (the prompt
overwrites the embeddings of slots ``0 .. P-1``, the prefixes the keys and values there, before
RoPE at positions ``0 .. P-1``, exactly as the uncached extended call does), then feeds one token
per step at slot and position ``P + T + i`` with nothing overwritten. The result equals the
adapted model run on the whole growing sequence at every step, arg-max of the last logits.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jpeft import _nnx, _nnx_apply, _nnx_root
from jpeft._errors import JpeftError
from jpeft.methods._prompt import virtual_part, writing

CALL = ("input_tokens", "positions", "cache", "attention_mask")
"""The leading parameters of a tunix decoder's ``__call__``, which :func:`generate` decodes."""


def generate(
    model: nnx.Module,
    input_ids: Any,
    max_new_tokens: Any,
    *,
    attention_mask: Any = None,
    active: str | Sequence[str] | None = None,
) -> jax.Array:
    """``jpeft.generate(model, input_ids, max_new_tokens)`` for an NNX model (see ``jpeft.generate``)."""
    if isinstance(input_ids, (str, tuple)) or not hasattr(input_ids, "shape"):
        raise JpeftError(
            "jpeft.generate on an NNX model is jpeft.generate(model, input_ids, max_new_tokens): the model holds its "
            f"methods and deltas; got {type(input_ids).__name__} where input_ids (a (batch, seq) int array) goes."
        )
    base = getattr(type(model), "_jpeft_base", type(model))
    params = list(inspect.signature(base.__call__).parameters)[1:5]
    if tuple(params) != CALL:
        raise JpeftError(
            f"jpeft.generate on an NNX model decodes tunix's decoders, called model{CALL} -> (logits, cache); "
            f"{base.__qualname__}.__call__ takes {tuple(params)}. The deltas run inside the model's own call, so decode "
            "another NNX model with its own KV cache or sampler (prompt and prefix methods refuse a cached root call)."
        )
    from jpeft._generate import checked_ids

    ids = checked_ids(input_ids, max_new_tokens)
    ids = ids.astype(jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
    if mask.shape != ids.shape:
        raise JpeftError(
            f"jpeft.generate: attention_mask has shape {mask.shape}; expected the shape of input_ids, {ids.shape} "
            "(1 at real tokens, 0 at left padding)."
        )
    names = _nnx_apply.held_names(model, active, "jpeft.generate") if active is not None else None
    chosen = names or _nnx_apply.active_names(model)
    virtual, n = _check(model, chosen)
    cache = _cache(model, ids.shape[0], n + ids.shape[1] + max_new_tokens)
    return _decode(model, ids, mask, cache, max_new_tokens, names, virtual, n)


def _check(model: nnx.Module, active: tuple[str, ...]) -> tuple[tuple[str, Any] | None, int]:
    """The active prompt or prefix method ``(name, method)`` and its P (``None, 0`` for none); refuses what
    cached decoding cannot follow."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window_size", None) or getattr(config, "sliding_window", None)
    if window:
        raise JpeftError(
            f"jpeft.generate: {type(model).__name__} has sliding-window attention (window {window}); its cache drops "
            "old slots, which jpeft.generate does not follow. Decode by calling the model on the whole sequence."
        )
    for m in _nnx.modules(model).values():
        if _nnx.RNG in vars(m) and not getattr(m, "deterministic", True):
            raise JpeftError(
                f"jpeft.generate: the module at {'/'.join(m._jpeft_path) or '<root>'} has delta dropout on "
                "(model.train()); greedy decoding is deterministic. Call model.eval() first."
            )
    for name, method in _nnx_apply.methods(model):
        if name in active and getattr(method, "sequence_gates", False):
            raise JpeftError(
                f"jpeft.generate({type(method).__name__}): its gates average over the whole sequence, so every "
                "token's output depends on the tokens after it, and no cached decoding equals the model run on the "
                "full sequence. Pass force_open=True (the gates fixed at 1), or decode by calling the model on the "
                "whole sequence at each step."
            )
    parts = [(n, m) for n, m in vars(model).get("_jpeft_root", ()) if n in active]
    if not parts:
        return None, 0
    if len(active) != 1:
        raise JpeftError(
            f"jpeft.generate: adapters {list(active)} are active and {parts[0][0]!r} is a prompt or prefix method, "
            "which runs one adapter at a time. Pass active='<name>' (or jpeft.set_adapter(model, '<name>'))."
        )
    return parts[0], virtual_part(parts[0][1])[0].num_virtual_tokens


def _cache(model: nnx.Module, batch: int, size: int) -> dict[str, Any]:
    """An empty tunix cache of ``size`` slots: the model's ``init_cache``, or tunix's layout from the weights."""
    config = getattr(model, "config", None)
    if callable(getattr(model, "init_cache", None)):
        return model.init_cache(batch, size, getattr(config, "dtype", jnp.float32))
    layers = getattr(model, "layers", None)
    try:
        keys = [layer.attn.k_proj for layer in layers]
        shapes = [tuple(_nnx.read(getattr(k, _nnx_weight(k))).shape[-2:]) for k in keys]
    except (AttributeError, TypeError):
        raise JpeftError(
            f"jpeft.generate: {type(model).__name__} has no init_cache and no layers[i].attn.k_proj to size tunix's "
            "cache from (weight (D, K, H)). Give the model an init_cache(batch, cache_size, dtype) method."
        ) from None
    dtype = _nnx.read(getattr(keys[0], _nnx_weight(keys[0]))).dtype
    return {
        f"layer_{i}": {
            "k": jnp.zeros((batch, size) + shape, dtype),
            "v": jnp.zeros((batch, size) + shape, dtype),
            "end_index": jnp.zeros((batch,), jnp.int32),
        }
        for i, shape in enumerate(shapes)
    }


def _nnx_weight(module: nnx.Module) -> str:
    from jpeft import _nnx_linear

    linear = _nnx_linear.record(module)
    return (linear.weight if linear is not None else None) or "kernel"


@functools.partial(nnx.jit, static_argnums=(4, 5, 6, 7))  # nnx.jit: tunix's Qwen 3 config is not hashable
def _decode(
    model: nnx.Module,
    ids: jax.Array,
    mask: jax.Array,
    cache: Any,
    new: int,
    names: tuple[str, ...] | None,
    virtual: tuple[str, Any] | None,
    n: int,
) -> jax.Array:
    batch, length = ids.shape
    size = n + length + new
    # Slots 0 .. n-1 hold the virtual positions, then the caller's tokens, then the new ones.
    valid = jnp.concatenate([jnp.ones((batch, n), jnp.int32), mask, jnp.ones((batch, new), jnp.int32)], 1) > 0
    slots = jnp.arange(size)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) + n
    positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n)), positions], 1)
    tokens = jnp.concatenate([jnp.zeros((batch, n), jnp.int32), ids], 1)
    first_mask = (slots[None, : n + length, None] >= slots[None, None, :]) & valid[:, None, :]

    def inside(*args: Any) -> Any:  # the model's call without the root hook (no second extension)
        return _nnx_root.inside(model, _nnx._adapted_call, *args) if virtual is not None else model(*args)

    with _nnx_apply.calling(None, names):
        if virtual is None:
            logits, cache = inside(tokens, positions, cache, first_mask)
        else:
            name, method = virtual
            part, component = virtual_part(method)
            part.profile_of(_nnx.tree(model))
            params = part.materialize(_nnx.tree(model), name, component)
            with _nnx_root.installed(model, params, name, method, (name,)), writing(n):
                logits, cache = inside(tokens, positions, cache, first_mask)
        first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

        def step(
            carry: tuple[Any, jax.Array, jax.Array], slot: jax.Array
        ) -> tuple[tuple[Any, jax.Array, jax.Array], jax.Array]:
            cache, token, pos = carry
            step_mask = ((slots <= slot)[None, :] & valid)[:, None, :]
            logits, cache = inside(token[:, None], pos[:, None], cache, step_mask)
            nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            return (cache, nxt, pos + 1), nxt

        start = n + length
        _, rest = jax.lax.scan(step, (cache, first, positions[:, -1] + 1), start + jnp.arange(new - 1))
    return jnp.concatenate([ids, first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)
