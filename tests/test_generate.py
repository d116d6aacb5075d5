"""jpeft.generate: greedy decoding with the KV cache equals the wrapped model run token by token without it.

On GPT-2, Llama and BART (encoder-decoder), for prompt tuning, prefix tuning, LoRA and a Houlsby adapter.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jpeft
from jpeft._tree import RESERVED
from tests import _hf_models as H
from tests._models import random_deltas

NEW = 4


@functools.cache
def sharp(family: str) -> tuple[Any, dict[str, Any]]:
    """A tiny causal LM with larger random weights (std 0.3): its arg-max tokens are well separated."""
    shapes = dict(vocab_size=H.VOCAB, hidden_size=H.HIDDEN, num_hidden_layers=H.LAYERS, num_attention_heads=H.HEADS,
                  intermediate_size=H.FFN, max_position_embeddings=64, initializer_range=0.3)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=H.VOCAB, n_embd=H.HIDDEN, n_layer=H.LAYERS, n_head=H.HEADS, n_inner=H.FFN, n_positions=64,
            initializer_range=0.3, tie_word_embeddings=False,
        )
        cls = transformers.FlaxGPT2LMHeadModel
    elif family == "bart":
        config = transformers.BartConfig(
            vocab_size=H.VOCAB, d_model=H.HIDDEN, encoder_layers=H.LAYERS, decoder_layers=H.LAYERS,
            encoder_attention_heads=H.HEADS, decoder_attention_heads=H.HEADS, encoder_ffn_dim=H.FFN,
            decoder_ffn_dim=H.FFN, max_position_embeddings=64, init_std=0.3,
        )
        cls = transformers.FlaxBartForConditionalGeneration
    else:
        config, cls = transformers.LlamaConfig(**shapes), transformers.FlaxLlamaForCausalLM
    with jax.numpy_rank_promotion("allow"):
        model = cls(config, seed=0)
    return model, dict(model.params)


def apply_of(family: str) -> Any:
    model = sharp(family)[0]

    def apply(variables: Any, **inputs: Any) -> Any:
        with jax.numpy_rank_promotion("allow"):
            return model.module.apply(variables, **{"deterministic": True, **inputs})

    return apply


def without_cache(apply: Any, method: jpeft.Method, peft: Any, ids: jax.Array, steps: int) -> np.ndarray:
    """The oracle: the wrapped model on the whole sequence at every step, arg-max of the last logits.

    The sequence sits in a fixed buffer of T + steps positions with the unfilled tail masked out; the
    models are causal, so the tail changes nothing before it, and one compiled shape serves every step.
    """
    batch, length = ids.shape
    size = length + steps
    pos = jnp.broadcast_to(jnp.arange(size), (batch, size))
    run = jax.jit(
        lambda seq, mask: jpeft.wrap(apply, method)(
            {"params": peft}, input_ids=seq, attention_mask=mask, position_ids=pos
        ).logits
    )
    seq = jnp.concatenate([ids, jnp.zeros((batch, steps), ids.dtype)], axis=1)
    for cur in range(length, size):
        logits = run(seq, (jnp.arange(size) < cur).astype(jnp.int32)[None].repeat(batch, 0))
        seq = seq.at[:, cur].set(jnp.argmax(logits[:, cur - 1], -1).astype(seq.dtype))
    return np.asarray(seq)


def without_cache_seq2seq(apply: Any, method: jpeft.Method, peft: Any, ids: jax.Array, start: jax.Array, steps: int) -> np.ndarray:
    """The encoder-decoder oracle: the wrapped model on the encoder input and the whole decoder sequence.

    The decoder sequence sits in a fixed buffer of S + steps positions; the decoder is causal, so the
    unfilled tail changes nothing before it.
    """
    batch, length = ids.shape
    size = start.shape[1] + steps
    run = jax.jit(
        lambda seq: jpeft.wrap(apply, method)(
            {"params": peft}, input_ids=ids, attention_mask=jnp.ones_like(ids),
            position_ids=jnp.broadcast_to(jnp.arange(length), (batch, length)),
            decoder_input_ids=seq, decoder_attention_mask=jnp.ones_like(seq),
            decoder_position_ids=jnp.broadcast_to(jnp.arange(size), (batch, size)),
        ).logits
    )
    seq = jnp.concatenate([start, jnp.zeros((batch, steps), start.dtype)], axis=1)
    for cur in range(start.shape[1], size):
        seq = seq.at[:, cur].set(jnp.argmax(run(seq)[:, cur - 1], -1).astype(seq.dtype))
    return np.asarray(seq)


def steered(method: jpeft.Method, peft: Any) -> Any:
    """Deltas that move this random model's arg-max: LoRA's B and an adapter's up-projection are 0 at init."""
    def bump(path: Any, x: jax.Array) -> jax.Array:
        name = jax.tree_util.keystr(path)
        if isinstance(method, jpeft.LoRA) and "lora_b" in name:
            return x + 0.5
        if isinstance(method, jpeft.HoulsbyAdapter) and "_kernel" in name:  # random, not constant (LayerNorm)
            return x + 3 * jax.random.normal(jax.random.key(len(name)), x.shape, x.dtype)
        if isinstance(method, jpeft.PrefixTuning) and RESERVED in name:  # larger keys and values steer more
            return 5 * x
        return x

    return jax.tree_util.tree_map_with_path(bump, peft)


def not_greedy(logits: jax.Array, tokens: np.ndarray) -> bool:
    """Whether ``tokens`` differs from the arg-max of ``logits``, the other tree's logits on the same sequence.

    Teacher forcing decides it in one call: another tree's greedy decoding yields ``tokens`` exactly
    when its arg-max after every prefix of ``tokens`` is the next token.
    """
    return bool((np.asarray(jnp.argmax(logits, -1)) != tokens).any())


CASES = [
    ("gpt2", jpeft.PromptTuning(num_virtual_tokens=3)),
    ("gpt2", jpeft.PTuningV2(num_virtual_tokens=3)),
    ("gpt2", jpeft.PrefixTuning(num_virtual_tokens=3, projection_hidden_size=8)),
    ("gpt2", jpeft.LoRA(targets=("c_attn",), rank=2)),
    ("gpt2", jpeft.HoulsbyAdapter(reduction_factor=8)),
    ("llama", jpeft.PromptTuning(num_virtual_tokens=3)),
    ("llama", jpeft.PTuningV2(num_virtual_tokens=3)),
]


@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f}-{type(m).__name__}" for f, m in CASES])
def test_cached_generation_equals_uncached_wrapped_model(family: str, method: jpeft.Method, key: jax.Array) -> None:
    params = sharp(family)[1]
    peft, other = (jpeft.apply(method, params, key=k) for k in jax.random.split(key))
    peft = steered(method, peft)  # LoRA, adapters: ``other`` stays the base model (zero at init)
    if isinstance(method, jpeft.PrefixTuning):
        other = steered(method, other)
    ids = jnp.asarray(np.random.RandomState(1).randint(3, H.VOCAB, (2, 4)), jnp.int32)
    apply = apply_of(family)
    out = np.asarray(jpeft.generate(apply, method, peft, ids, NEW))
    assert out.shape == (2, 4 + NEW)
    np.testing.assert_array_equal(out[:, :4], ids)
    np.testing.assert_array_equal(out, without_cache(apply, method, peft, ids, NEW))
    if not (family == "gpt2" and isinstance(method, jpeft.PromptTuning)):
        # the deltas steer the tokens, so the equality above is not vacuous. (On this random GPT-2
        # the input prompt barely moves the arg-max; its cache path is the one prefix tuning uses.)
        pos = jnp.broadcast_to(jnp.arange(out.shape[1]), out.shape)
        logits = jpeft.wrap(apply, method)(
            {"params": other}, input_ids=out, attention_mask=jnp.ones_like(out), position_ids=pos
        ).logits
        assert not_greedy(logits[:, 3:-1], out[:, 4:])


BART_CASES = [  # PTuningV2 runs the same prefix path as PrefixTuning, without the MLP
    jpeft.PromptTuning(num_virtual_tokens=3),
    jpeft.PrefixTuning(num_virtual_tokens=3, projection_hidden_size=8),
    jpeft.HoulsbyAdapter(reduction_factor=8),
]


@pytest.mark.parametrize("method", BART_CASES, ids=[type(m).__name__ for m in BART_CASES])
def test_bart_cached_generation_equals_uncached_wrapped_model(method: jpeft.Method, key: jax.Array) -> None:
    model, params = sharp("bart")
    peft, other = (steered(method, jpeft.apply(method, params, key=k)) for k in jax.random.split(key))
    if not isinstance(method, jpeft.PrefixTuning):
        other = jpeft.apply(method, params, key=key)  # prompt: another init; adapter: the base model
    ids = jnp.asarray(np.random.RandomState(1).randint(3, H.VOCAB, (2, 5)), jnp.int32)
    start = jnp.full((2, 1), model.config.decoder_start_token_id, jnp.int32)
    apply = apply_of("bart")
    generate = jax.jit(jpeft.generate, static_argnums=(0, 1, 4))  # compiled whole (the other cases run eagerly)
    out = np.asarray(generate(apply, method, peft, ids, NEW, decoder_input_ids=start))
    assert out.shape == (2, 1 + NEW)
    np.testing.assert_array_equal(out[:, :1], start)
    np.testing.assert_array_equal(out, without_cache_seq2seq(apply, method, peft, ids, start, NEW))
    # the deltas steer the tokens, so the equality above is not vacuous
    pos = jnp.broadcast_to(jnp.arange(out.shape[1]), out.shape)
    logits = jpeft.wrap(apply, method)(
        {"params": other}, input_ids=ids, attention_mask=jnp.ones_like(ids),
        position_ids=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
        decoder_input_ids=out, decoder_attention_mask=jnp.ones_like(out), decoder_position_ids=pos,
    ).logits
    assert not_greedy(logits[:, :-1], out[:, 1:])


COMPOSED = [
    ("gpt2", jpeft.MAM(prefix_tokens=3, adapter_bottleneck=8)),
    ("gpt2", jpeft.MAM(prefix_tokens=3, adapter_bottleneck=8, prefix_projection=True)),
    ("gpt2", jpeft.UniPELT(lora_targets=("c_attn",), rank=2, prefix_tokens=3, reduction_factor=8, force_open=True)),
    ("gpt2", jpeft.compose(jpeft.PromptTuning(num_virtual_tokens=3), jpeft.LoRA(targets=("c_attn",), rank=2))),
    ("llama", jpeft.MAM(prefix_tokens=3, adapter_bottleneck=8)),
]


@pytest.mark.parametrize(("family", "method"), COMPOSED, ids=["mam", "mam_mlp", "unipelt_open", "prompt_lora", "llama_mam"])
def test_composed_virtual_tokens_cached_generation_equals_uncached(family: str, method: jpeft.Method, key: jax.Array) -> None:
    """MAM, UniPELT and compose(PromptTuning, LoRA): generate finds the prompt or prefix component.

    Before, only a bare prompt or prefix method added its virtual positions, so the cached run of a
    composition ran without its prompt or prefixes and differed from the wrapped model.
    """
    params = sharp(family)[1]
    peft = random_deltas(jpeft.apply(method, params, key=key), seed=3, scale=0.5)
    ids = jnp.asarray(np.random.RandomState(1).randint(3, H.VOCAB, (2, 4)), jnp.int32)
    apply = apply_of(family)
    out = np.asarray(jpeft.generate(apply, method, peft, ids, NEW))
    np.testing.assert_array_equal(out, without_cache(apply, method, peft, ids, NEW))
    # not vacuous: the base model's greedy decoding gives other tokens
    pos = jnp.broadcast_to(jnp.arange(out.shape[1]), out.shape)
    base = apply({"params": params}, input_ids=jnp.asarray(out), attention_mask=jnp.ones_like(out), position_ids=pos).logits
    assert not_greedy(base[:, 3:-1], out[:, 4:])


def test_bart_mam_cached_generation_equals_uncached(key: jax.Array) -> None:
    model, params = sharp("bart")
    method = jpeft.MAM(prefix_tokens=3, adapter_bottleneck=8, prefix_projection=True)
    peft = random_deltas(jpeft.apply(method, params, key=key), seed=3, scale=0.5)
    ids = jnp.asarray(np.random.RandomState(1).randint(3, H.VOCAB, (2, 5)), jnp.int32)
    start = jnp.full((2, 1), model.config.decoder_start_token_id, jnp.int32)
    apply = apply_of("bart")
    out = np.asarray(jpeft.generate(apply, method, peft, ids, NEW, decoder_input_ids=start))
    np.testing.assert_array_equal(out, without_cache_seq2seq(apply, method, peft, ids, start, NEW))


def test_errors(key: jax.Array) -> None:
    method = jpeft.PromptTuning(num_virtual_tokens=2)
    params = sharp("gpt2")[1]
    peft = jpeft.apply(method, params, key=key)
    ids = jnp.ones((2, 4), jnp.int32)
    apply = apply_of("gpt2")
    with pytest.raises(jpeft.JpeftError, match=r"max_new_tokens=0\): must be a positive int"):
        jpeft.generate(apply, method, peft, ids, 0)
    with pytest.raises(jpeft.JpeftError, match=r"input_ids must be a \(batch, seq\) int array; got shape \(4,\)"):
        jpeft.generate(apply, method, peft, ids[0], 2)
    with pytest.raises(jpeft.JpeftError, match=r"attention_mask has shape \(2, 3\); expected .* \(2, 4\)"):
        jpeft.generate(apply, method, peft, ids, 2, attention_mask=jnp.ones((2, 3)))
    start = jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(jpeft.JpeftError, match=r"decoder_input_ids must be a \(batch, seq\) int array with batch 2 .* got shape \(3, 1\)"):
        jpeft.generate(apply, method, peft, ids, 2, decoder_input_ids=jnp.zeros((3, 1), jnp.int32))
    with pytest.raises(jpeft.JpeftError, match=r"decoder_input_ids is for encoder-decoder models, and profile 'gpt2'"):
        jpeft.generate(apply, method, peft, ids, 2, decoder_input_ids=start)
    adapter = jpeft.HoulsbyAdapter(reduction_factor=8)
    with pytest.raises(jpeft.JpeftError, match=r"apply_fn is not an HF Flax encoder-decoder's apply"):
        jpeft.generate(apply, adapter, jpeft.apply(adapter, params, key=key), ids, 2, decoder_input_ids=start)
    gated = jpeft.UniPELT(lora_targets=("c_attn",), rank=2, prefix_tokens=2, reduction_factor=8)
    with pytest.raises(jpeft.JpeftError, match=r"generate\(UniPELT\): its gates average over the whole sequence"):
        jpeft.generate(apply, gated, jpeft.apply(gated, params, key=key), ids, 2)
    bert = H.make("bert")
    peft_bert = jpeft.apply(method, bert.params, key=key)
    with pytest.raises(jpeft.JpeftError, match=r"apply_fn does not take HF's cache interface"):
        jpeft.generate(bert.apply, method, peft_bert, ids, 2)


def test_qlora_cached_generation_equals_uncached_wrapped_model(key: jax.Array) -> None:
    """QLoRA's NF4 kernels cannot run through the module's own ``__call__``: the cache-shape trace runs
    under the method's interceptor too (it used to raise ScopeParamShapeError, found by the feature matrix)."""
    method = jpeft.QLoRA(targets=("c_attn",), rank=2, compute_dtype="float32")
    params = jpeft.quantize(sharp("gpt2")[1], method.quant, targets=("c_attn", "c_fc"))  # c_fc: quantised, no LoRA
    peft = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if "lora_b" in jax.tree_util.keystr(p) else x, jpeft.apply(method, params, key=key)
    )
    ids = jnp.asarray(np.random.RandomState(1).randint(3, H.VOCAB, (2, 4)), jnp.int32)
    apply = apply_of("gpt2")
    out = np.asarray(jpeft.generate(apply, method, peft, ids, NEW))
    np.testing.assert_array_equal(out, without_cache(apply, method, peft, ids, NEW))
