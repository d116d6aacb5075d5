"""Greedy generation with the KV cache: wrapped HF Flax decoder-only (GPT-2, Llama) and encoder-decoder
(BART) models here, NNX models from ``jpeft.apply`` with tunix's call convention in ``_generate_nnx``."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jpeft import _core, _intercept, _nnx
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import PyTree, join
from jpeft.methods._prompt import regions, virtual_part, writing


def checked_ids(input_ids: Any, max_new_tokens: Any) -> jax.Array:
    """``input_ids`` as a ``(batch, seq)`` int array, or a clear error (and one for ``max_new_tokens``)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise JpeftError(f"jpeft.generate(max_new_tokens={max_new_tokens!r}): must be a positive int.")
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise JpeftError(
            f"jpeft.generate: input_ids must be a (batch, seq) int array; got shape {ids.shape} and dtype {ids.dtype}."
        )
    return ids


def _logits(out: Any) -> jax.Array:
    return out.logits if hasattr(out, "logits") else out[0]


def generate(
    apply_fn: Callable[..., Any],
    method: Method,
    peft_params: PyTree = None,
    input_ids: jax.Array | None = None,
    max_new_tokens: int | None = None,
    *,
    attention_mask: jax.Array | None = None,
    decoder_input_ids: jax.Array | None = None,
    name: str | None = None,
) -> jax.Array:
    """Greedy decoding of a wrapped causal LM, one new token per step, with the model's KV cache.

    NNX models: ``jpeft.generate(model, input_ids, max_new_tokens, attention_mask=None, name=None)``
    decodes an NNX model from ``jpeft.apply`` with tunix's call convention (``tunix.models.llama3``,
    ``qwen3``: ``model(input_tokens, positions, cache, attention_mask) -> (logits, cache)``), for
    weight methods (LoRA, ...) and prompt and prefix methods (prompt tuning, P-tuning v2, prefix
    tuning), whose ``P`` virtual positions enter the cache once; ``name`` chooses the active
    adapter(s) (default: the model's). Left padding follows ``attention_mask``. The result equals
    the adapted model called on the whole growing sequence (positions ``cumsum(mask) - 1``, a
    causal mask without the padded keys), arg-max of the last logits, at every step. It compiles
    once per model structure and shapes. Refused: sliding-window attention, delta dropout left on
    (call ``model.eval()``), sequence-mean gates (UniPELT without ``force_open``), and a prompt or
    prefix method with several adapters active.

    ``apply_fn`` is a bare HF Flax causal-LM module's apply (``model.module.apply``): it must take
    ``input_ids``, ``attention_mask``, ``position_ids``, ``init_cache`` and ``mutable=['cache']``
    as keywords. The first call runs the prompt (for prompt and prefix methods, bare or inside
    ``jpeft.compose``, MAM and UniPELT, extended by the P virtual positions, which it writes, so the
    prefix keys and values enter the cache); each later
    call feeds one token at position ``P + T + i`` and writes nothing. The result equals running
    ``jpeft.wrap(apply_fn, method)`` on the whole sequence at every step (no cache) and taking the
    arg-max of the last logits. Positions are ``cumsum(attention_mask) - 1`` (HF's convention), so
    left padding works; EOS does not stop decoding: all ``max_new_tokens`` are produced.

    Encoder-decoders (HF Flax BART): pass ``decoder_input_ids`` (the decoder's start, such as
    ``[[decoder_start_token_id]]`` per example); ``input_ids`` is the encoder's input. The first call
    runs the encoder (on ``P + T`` positions for prompt and prefix methods) and the decoder on its
    start (on ``P`` more positions for prefix methods) and creates the decoder's self-attention
    cache; later calls feed one decoder token. The cross-attention keys and values are recomputed
    from the encoder output each step (HF's Flax BART does not cache them), so cross-attention
    prefixes are written at every step; the encoder itself runs once (its output is reused when the
    model's profile is known). The result equals ``jpeft.wrap(apply_fn, method)`` on the whole
    decoder sequence at every step. Encoder positions are ``arange(P + T)``, as HF's wrapper makes.

    On linen nothing here is jitted: ``jax.jit(generate, static_argnums=(0, 1, 4))`` compiles it whole.

    Args:
      apply_fn: the bare module's apply.
      method: the jpeft method whose deltas ``peft_params`` holds.
      peft_params: the tree from ``jpeft.apply``.
      input_ids: ``(B, T)`` int token ids.
      max_new_tokens: how many tokens to append.
      attention_mask: ``(B, T)``, ones by default.
      decoder_input_ids: ``(B, S)`` int: the decoder's start for an encoder-decoder; ``None`` for a
        decoder-only model.
      name: the adapter to run (linen: ``"default"`` if ``None``; NNX: the model's active adapters).

    Returns:
      ``(B, T + max_new_tokens)`` token ids: the inputs, then the generated tokens; for an
      encoder-decoder ``(B, S + max_new_tokens)``: ``decoder_input_ids``, then the generated tokens.

    Raises:
      JpeftError: on bad shapes or counts, an ``apply_fn`` without HF's cache interface, or a method
        whose outputs depend on later tokens (UniPELT's sequence-mean gates, unless ``force_open``).

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

      An NNX model (tunix's Llama 3) with P-tuning v2:

      >>> from flax import nnx
      >>> from tunix.models.llama3 import model as llama3
      >>> config = llama3.ModelConfig(num_layers=1, vocab_size=32, embed_dim=16, hidden_dim=32, num_heads=2,
      ...                             head_dim=8, num_kv_heads=1, rope_theta=1_000_000, norm_eps=1e-6)
      >>> base = llama3.Llama3(config, rngs=nnx.Rngs(0))
      >>> tuned = jpeft.apply(jpeft.PTuningV2(num_virtual_tokens=2), base, key=jax.random.key(0))
      >>> with jax.numpy_rank_promotion("allow"):  # tunix's RMSNorm relies on implicit rank promotion
      ...   out = jpeft.generate(tuned, jnp.ones((2, 4), jnp.int32), 3)
      >>> out.shape
      (2, 7)
    """
    if _nnx.is_model(apply_fn):  # jpeft.generate(model, input_ids, max_new_tokens)
        from jpeft import _generate_nnx

        if input_ids is not None or max_new_tokens is not None or decoder_input_ids is not None:
            raise JpeftError(
                "jpeft.generate on an NNX model is jpeft.generate(model, input_ids, max_new_tokens, attention_mask=..., "
                "name=...): the model holds its methods and deltas, so pass no method or tree (and no "
                "decoder_input_ids: tunix's decoders are decoder-only)."
            )
        return _generate_nnx.generate(apply_fn, method, peft_params, attention_mask=attention_mask, active=name)
    name = "default" if name is None else name
    _core._check_method(method, "jpeft.generate")
    if _nnx.is_model(peft_params):
        raise JpeftError(
            "jpeft.generate: peft_params is an NNX model. Pass it first, jpeft.generate(model, input_ids, "
            "max_new_tokens): the model holds its methods and deltas."
        )
    if input_ids is None or max_new_tokens is None:
        raise JpeftError(
            "jpeft.generate(apply_fn, method, peft_params, input_ids, max_new_tokens): input_ids and max_new_tokens "
            "are required for a linen model."
        )
    _core._check_params(peft_params, "jpeft.generate")
    ids = checked_ids(input_ids, max_new_tokens)
    batch, length = ids.shape
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, ids.dtype)
    if mask.shape != ids.shape:
        raise JpeftError(
            f"jpeft.generate: attention_mask has shape {mask.shape}; expected the shape of input_ids, {ids.shape}."
        )
    if getattr(method, "sequence_gates", False):
        raise JpeftError(
            f"jpeft.generate({type(method).__name__}): its gates average over the whole sequence, so every "
            "token's output depends on the tokens after it, and no cached decoding equals the model run on "
            "the full sequence. Pass force_open=True (the gates fixed at 1), or decode without the cache by "
            "running jpeft.wrap(apply_fn, method) on the whole sequence at each step."
        )
    if decoder_input_ids is not None:
        return _seq2seq(apply_fn, method, peft_params, ids, mask, decoder_input_ids, max_new_tokens, name)
    part = virtual_part(method)  # a prompt or prefix method, bare or inside jpeft.compose (MAM, UniPELT)
    if part is not None:
        virtual, component = part
        n = virtual.num_virtual_tokens
        virtual.profile_of(peft_params)
        params = virtual.materialize(peft_params, virtual.active_name(name), component)
    else:
        n, params = 0, peft_params
    total = n + length + max_new_tokens

    def run(variables: PyTree, write: int | None, **inputs: Any) -> Any:
        if not method.has_deltas:
            return apply_fn(variables, **inputs, mutable=["cache"])
        with nn.intercept_methods(_intercept.method_interceptor(method, name)), writing(write):
            return apply_fn(variables, **inputs, mutable=["cache"])

    # The cache holds all P + T + max_new_tokens positions; future ones are masked by the model.
    full_mask = jnp.concatenate([jnp.ones((batch, n), ids.dtype), mask, jnp.ones((batch, max_new_tokens), ids.dtype)], 1)
    dummy = jnp.zeros((batch, total), ids.dtype)
    try:  # under the method's interceptor: a module may not run alone (QLoRA's NF4 kernels)
        shapes = jax.eval_shape(
            lambda: run(
                {"params": params}, None, input_ids=dummy, attention_mask=full_mask, position_ids=dummy,
                init_cache=True,
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


def _seq2seq(
    apply_fn: Callable[..., Any], method: Method, peft_params: PyTree, ids: jax.Array, mask: jax.Array,
    decoder_input_ids: Any, max_new_tokens: int, name: str,
) -> jax.Array:
    """:func:`generate` for an HF Flax encoder-decoder (``_get_encoder_module``, ``_get_decoder_module``)."""
    from jpeft import profiles

    dec = jnp.asarray(decoder_input_ids)
    batch, length = ids.shape
    if dec.ndim != 2 or dec.shape[0] != batch or not jnp.issubdtype(dec.dtype, jnp.integer):
        raise JpeftError(
            f"jpeft.generate: decoder_input_ids must be a (batch, seq) int array with batch {batch} (that of "
            f"input_ids); got shape {dec.shape} and dtype {dec.dtype}."
        )
    found = profiles.matching(peft_params)
    profile = found[0] if len(found) == 1 and found[0].encoder_prefix is not None else None
    part = virtual_part(method)
    if part is not None:
        virtual, component = part
        profile = virtual.profile_of(peft_params)
        if profile.encoder_prefix is None:
            raise JpeftError(
                f"jpeft.generate: decoder_input_ids is for encoder-decoder models, and profile {profile.name!r} "
                "has no encoder_prefix; leave decoder_input_ids out for a decoder-only model."
            )
        n, m = virtual.counts(profile)
        params = virtual.materialize(peft_params, virtual.active_name(name), component)
    else:
        n = m = 0
        params = peft_params
    start = dec.shape[1]
    total = m + start + max_new_tokens
    enc = {
        "input_ids": jnp.concatenate([jnp.zeros((batch, n), ids.dtype), ids], 1),
        "attention_mask": jnp.concatenate([jnp.ones((batch, n), ids.dtype), mask], 1),
        "position_ids": jnp.broadcast_to(jnp.arange(n + length, dtype=ids.dtype), (batch, n + length)),
    }
    # The decoder's cache holds all m + S + max_new_tokens positions; future ones are masked by the model.
    full_mask = jnp.ones((batch, total), ids.dtype)

    def init(module: nn.Module, input_ids, attention_mask, position_ids, decoder_input_ids, decoder_attention_mask,
             decoder_position_ids, **kwargs: Any) -> Any:
        hidden = module._get_encoder_module()(input_ids, attention_mask, position_ids, **kwargs)[0]
        return module._get_decoder_module()(
            decoder_input_ids, decoder_attention_mask, decoder_position_ids, encoder_hidden_states=hidden,
            encoder_attention_mask=attention_mask, init_cache=True, **kwargs,
        )

    dummy = jnp.zeros((batch, total), ids.dtype)

    def init_shapes() -> Any:  # under the method's interceptor: a module may not run alone (QLoRA)
        with contextlib.ExitStack() as stack:
            if method.has_deltas:
                stack.enter_context(nn.intercept_methods(_intercept.method_interceptor(method, name)))
            return apply_fn(
                {"params": params}, **enc, decoder_input_ids=dummy, decoder_attention_mask=full_mask,
                decoder_position_ids=dummy, method=init, mutable=["cache"],
            )[1]["cache"]

    try:
        shapes = jax.eval_shape(init_shapes)
    except (TypeError, AttributeError) as e:
        raise JpeftError(
            f"jpeft.generate: apply_fn is not an HF Flax encoder-decoder's apply (one whose module has "
            f"_get_encoder_module and _get_decoder_module, and takes method=...): {e}. Pass, for example, "
            "FlaxBartForConditionalGeneration(...).module.apply."
        ) from None
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    encoder_out: dict[str, Any] = {}

    def keep_encoder(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
        """Stores the encoder's output on the first call and returns it, without running it, later."""
        scope = context.module.scope
        if (
            context.method_name != "__call__" or scope is None or profile is None
            or not re.fullmatch(profile.encoder_prefix, join(tuple(scope.path)))
        ):
            return next_fun(*args, **kwargs)
        if "out" not in encoder_out:
            encoder_out["out"] = next_fun(*args, **kwargs)
        return encoder_out["out"]

    def run(variables: PyTree, decoder: int | None, **inputs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            stack.enter_context(nn.intercept_methods(keep_encoder))
            if method.has_deltas:
                stack.enter_context(nn.intercept_methods(_intercept.method_interceptor(method, name)))
            if n or m:
                stack.enter_context(writing(n))
                stack.enter_context(regions(profile, n or None, decoder))
            return apply_fn(variables, **enc, **inputs, mutable=["cache"])

    first_ids = jnp.concatenate([jnp.zeros((batch, m), ids.dtype), dec.astype(ids.dtype)], 1)
    first_pos = jnp.broadcast_to(jnp.arange(m + start, dtype=ids.dtype), (batch, m + start))
    out, state = run(
        {"params": params, "cache": cache}, m or None,
        decoder_input_ids=first_ids, decoder_attention_mask=full_mask, decoder_position_ids=first_pos,
    )
    first = jnp.argmax(_logits(out)[:, -1], axis=-1).astype(ids.dtype)

    def step(carry: tuple[PyTree, jax.Array, jax.Array], _: Any) -> tuple[tuple[PyTree, jax.Array, jax.Array], jax.Array]:
        cache, token, pos = carry
        out, state = run(
            {"params": params, "cache": cache}, None,
            decoder_input_ids=token[:, None], decoder_attention_mask=full_mask, decoder_position_ids=pos[:, None],
        )
        nxt = jnp.argmax(_logits(out)[:, -1], axis=-1).astype(ids.dtype)
        return (state["cache"], nxt, pos + 1), nxt

    last = jnp.full((batch,), m + start, ids.dtype)
    _, rest = lax.scan(step, (state["cache"], first, last), None, length=max_new_tokens - 1)
    return jnp.concatenate([dec.astype(ids.dtype), first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)
