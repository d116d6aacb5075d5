"""jpeft.generate: greedy decoding with the KV cache equals the wrapped model run token by token without it."""

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


CASES = [
    ("gpt2", jpeft.PromptTuning(num_virtual_tokens=3)),
    ("gpt2", jpeft.PTuningV2(num_virtual_tokens=3)),
    ("gpt2", jpeft.PrefixTuning(num_virtual_tokens=3, projection_hidden_size=8)),
    ("gpt2", jpeft.LoRA(targets=("c_attn",), rank=2)),
    ("llama", jpeft.PromptTuning(num_virtual_tokens=3)),
    ("llama", jpeft.PTuningV2(num_virtual_tokens=3)),
]


@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f}-{type(m).__name__}" for f, m in CASES])
def test_cached_generation_equals_uncached_wrapped_model(family: str, method: jpeft.Method, key: jax.Array) -> None:
    params = sharp(family)[1]
    peft, other = (jpeft.apply(method, params, key=k) for k in jax.random.split(key))
    if isinstance(method, jpeft.LoRA):  # B = 0 at init: ``other`` stays the base model, ``peft`` moves
        peft = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.5 if "lora_b" in jax.tree_util.keystr(p) else x, peft)
    elif isinstance(method, jpeft.PrefixTuning):  # larger keys and values steer this random model more
        peft, other = (
            jax.tree_util.tree_map_with_path(lambda p, x: 5 * x if RESERVED in jax.tree_util.keystr(p) else x, t)
            for t in (peft, other)
        )
    ids = jnp.asarray(np.random.RandomState(1).randint(3, H.VOCAB, (2, 4)), jnp.int32)
    apply = apply_of(family)
    out = np.asarray(jpeft.generate(apply, method, peft, ids, NEW))
    assert out.shape == (2, 4 + NEW)
    np.testing.assert_array_equal(out[:, :4], ids)
    np.testing.assert_array_equal(out, without_cache(apply, method, peft, ids, NEW))
    if not (family == "gpt2" and isinstance(method, jpeft.PromptTuning)):
        # the deltas steer the tokens, so the equality above is not vacuous. (On this random GPT-2
        # the input prompt barely moves the arg-max; its cache path is the one prefix tuning uses.)
        assert (out != np.asarray(jpeft.generate(apply, method, other, ids, NEW))).any()


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
    bert = H.make("bert")
    peft_bert = jpeft.apply(method, bert.params, key=key)
    with pytest.raises(jpeft.JpeftError, match=r"apply_fn does not take HF's cache interface"):
        jpeft.generate(bert.apply, method, peft_bert, ids, 2)
