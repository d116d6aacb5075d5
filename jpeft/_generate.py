"""Greedy generation with the KV cache, for wrapped decoder-only models (HF Flax GPT-2, Llama)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jpeft import _core, _intercept
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import PyTree
from jpeft.methods._prompt import VirtualTokens, writing


def _logits(out: Any) -> jax.Array:
    return out.logits if hasattr(out, "logits") else out[0]


def generate(
    apply_fn: Callable[..., Any],
    method: Method,
    peft_params: PyTree,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    attention_mask: jax.Array | None = None,
    name: str = "default",
) -> jax.Array:
    """Greedy decoding of a wrapped causal LM, one new token per step, with the model's KV cache.

    ``apply_fn`` is a bare HF Flax causal-LM module's apply (``model.module.apply``): it must take
    ``input_ids``, ``attention_mask``, ``position_ids``, ``init_cache`` and ``mutable=['cache']``
    as keywords. The first call runs the prompt (for prompt and prefix methods extended by the P
    virtual positions, which it writes, so the prefix keys and values enter the cache); each later
    call feeds one token at position ``P + T + i`` and writes nothing. The result equals running
    ``jpeft.wrap(apply_fn, method)`` on the whole sequence at every step (no cache) and taking the
    arg-max of the last logits. Positions are ``cumsum(attention_mask) - 1`` (HF's convention), so
    left padding works; EOS does not stop decoding: all ``max_new_tokens`` are produced.

    Nothing here is jitted: ``jax.jit(generate, static_argnums=(0, 1, 4))`` compiles it whole.

    Args:
      apply_fn: the bare module's apply.
      method: the jpeft method whose deltas ``peft_params`` holds.
      peft_params: the tree from ``jpeft.apply``.
      input_ids: ``(B, T)`` int token ids.
      max_new_tokens: how many tokens to append.
      attention_mask: ``(B, T)``, ones by default.
      name: the adapter to run.

    Returns:
      ``(B, T + max_new_tokens)`` token ids: the inputs, then the generated tokens.

    Raises:
      JpeftError: on bad shapes or counts, or an ``apply_fn`` without HF's cache interface.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft, transformers
      >>> config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
      >>> with jax.numpy_rank_promotion("allow"):  # HF's Flax code relies on implicit rank promotion
      ...   model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
      >>> method = jpeft.PromptTuning(num_virtual_tokens=3)
      >>> peft = jpeft.apply(method, model.params, key=jax.random.key(0))
      >>> with jax.numpy_rank_promotion("allow"):
      ...   out = jpeft.generate(model.module.apply, method, peft, jnp.ones((2, 4), jnp.int32), 5)
      >>> out.shape
      (2, 9)
    """
    _core._check_method(method, "jpeft.generate")
    _core._check_params(peft_params, "jpeft.generate")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise JpeftError(f"jpeft.generate(max_new_tokens={max_new_tokens!r}): must be a positive int.")
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise JpeftError(
            f"jpeft.generate: input_ids must be a (batch, seq) int array; got shape {ids.shape} and dtype {ids.dtype}."
        )
    batch, length = ids.shape
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, ids.dtype)
    if mask.shape != ids.shape:
        raise JpeftError(
            f"jpeft.generate: attention_mask has shape {mask.shape}; expected the shape of input_ids, {ids.shape}."
        )
    if isinstance(method, VirtualTokens):
        n = method.num_virtual_tokens
        method.profile_of(peft_params)
        params = method.materialize(peft_params, method.active_name(name))
    else:
        n, params = 0, peft_params
    total = n + length + max_new_tokens

    def run(variables: PyTree, write: int | None, **inputs: Any) -> Any:
        if not method.has_deltas:
            return apply_fn(variables, **inputs, mutable=["cache"])
        with nn.intercept_methods(_intercept.interceptor(method.forward, name)), writing(write):
            return apply_fn(variables, **inputs, mutable=["cache"])

    # The cache holds all P + T + max_new_tokens positions; future ones are masked by the model.
    full_mask = jnp.concatenate([jnp.ones((batch, n), ids.dtype), mask, jnp.ones((batch, max_new_tokens), ids.dtype)], 1)
    dummy = jnp.zeros((batch, total), ids.dtype)
    try:
        shapes = jax.eval_shape(
            lambda: apply_fn(
                {"params": params}, input_ids=dummy, attention_mask=full_mask, position_ids=dummy,
                init_cache=True, mutable=["cache"],
            )[1]["cache"]
        )
    except TypeError as e:
        raise JpeftError(
            f"jpeft.generate: apply_fn does not take HF's cache interface (init_cache=True, mutable=['cache']): {e}. "
            "Pass a Flax causal LM module's apply, such as FlaxGPT2LMHeadModel(...).module.apply."
        ) from None
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) + n
    positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=ids.dtype), (batch, n)), positions], 1)
    ext = jnp.concatenate([jnp.zeros((batch, n), ids.dtype), ids], 1)
    out, state = run(
        {"params": params, "cache": cache}, n, input_ids=ext, attention_mask=full_mask, position_ids=positions
    )
    first = jnp.argmax(_logits(out)[:, -1], axis=-1).astype(ids.dtype)

    def step(carry: tuple[PyTree, jax.Array, jax.Array], _: Any) -> tuple[tuple[PyTree, jax.Array, jax.Array], jax.Array]:
        cache, token, pos = carry
        out, state = run(
            {"params": params, "cache": cache}, None,
            input_ids=token[:, None], attention_mask=full_mask, position_ids=pos[:, None],
        )
        nxt = jnp.argmax(_logits(out)[:, -1], axis=-1).astype(ids.dtype)
        return (state["cache"], nxt, pos + 1), nxt

    last = positions[:, -1] + 1
    _, rest = lax.scan(step, (state["cache"], first, last), None, length=max_new_tokens - 1)
    return jnp.concatenate([ids, first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)
