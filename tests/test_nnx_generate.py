"""Cached decoding on an NNX model with a KV cache API (``nnx.MultiHeadAttention(decode=True)``).

After ``jpeft.apply`` the model's own call runs the deltas, so the model's own cache API decodes
with them: no jpeft sampler is needed. The oracle is an uncached greedy arg-max loop over the same
adapted model on the growing sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft

VOCAB, D, HEADS, PROMPT, NEW = 13, 16, 2, 3, 4


class Decoder(nnx.Module):
    """Embedding, one causal self-attention block with nnx's KV cache, and a head."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, ids: jax.Array, decode: bool = False) -> jax.Array:
        h = self.embed(ids)
        mask = None if decode else nnx.make_causal_mask(ids)
        h = h + self.attn(h, mask=mask, decode=decode)
        return self.head(h + jnp.tanh(self.mlp(h)))


def uncached(model: Decoder, prompt: jax.Array) -> np.ndarray:
    ids = prompt
    for _ in range(NEW):
        nxt = jnp.argmax(model(ids)[:, -1], axis=-1)
        ids = jnp.concatenate([ids, nxt[:, None]], axis=1)
    return np.asarray(ids[:, PROMPT:])


def cached(model: Decoder, prompt: jax.Array) -> np.ndarray:
    model.attn.init_cache((prompt.shape[0], PROMPT + NEW, D))
    logits = None
    for t in range(PROMPT):  # prefill one token at a time through the cache
        logits = model(prompt[:, t : t + 1], decode=True)
    out = []
    for _ in range(NEW):
        nxt = jnp.argmax(logits[:, -1], axis=-1)
        out.append(nxt)
        logits = model(nxt[:, None], decode=True)
    return np.stack([np.asarray(o) for o in out], axis=1)


@pytest.mark.parametrize(
    "method",
    [
        jpeft.LoRA(targets=r"attn/(query|value)|mlp", rank=2, alpha=4.0),
        jpeft.IA3(targets=r"attn/(key|value)|mlp", feedforward=("mlp",)),
    ],
    ids=["lora", "ia3"],
)
def test_the_models_own_kv_cache_decodes_with_the_deltas(method):
    base = Decoder(nnx.Rngs(0))
    model = jpeft.apply(method, base, key=jax.random.key(1))
    rng = np.random.RandomState(0)
    for path, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):
        var[...] = jnp.asarray(rng.normal(0, 1.0, var.shape) + (1.0 if "ia3" in str(path[-1]) else 0.0), var.dtype)
    prompt = jnp.asarray(rng.randint(0, VOCAB, (2, PROMPT)), jnp.int32)
    want = uncached(model, prompt)
    assert not np.allclose(model(prompt), base(prompt), atol=1e-3), "the deltas must change the model"
    np.testing.assert_array_equal(cached(model, prompt), want)


def test_jpeft_generate_refuses_a_non_tunix_nnx_model_and_names_the_models_own_cache():
    model = jpeft.apply(jpeft.LoRA(targets="mlp", rank=2), Decoder(nnx.Rngs(0)), key=jax.random.key(1))
    with pytest.raises(jpeft.JpeftError, match="decode another NNX model with its own KV cache or sampler"):
        jpeft.generate(model, jnp.ones((1, 2), jnp.int32), 2)
    with pytest.raises(jpeft.JpeftError, match=r"is jpeft.generate\(model, input_ids, max_new_tokens"):
        jpeft.generate(model, jpeft.LoRA(targets="mlp", rank=2), {}, jnp.ones((1, 2), jnp.int32), 2)


def test_prompt_methods_refuse_a_root_call_with_a_kv_cache():
    from tests import _nnx_llama as NL

    class CachedLlama(NL.LlamaForCausalLM):
        def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None):
            return super().__call__(input_ids, attention_mask, position_ids)

    base = NL.llama()
    object.__setattr__(base, "__class__", CachedLlama)
    model = jpeft.apply(jpeft.PromptTuning(num_virtual_tokens=2), base, key=jax.random.key(1))
    ids = jnp.ones((1, 3), jnp.int32)
    assert model(ids).logits.shape[1] == 3  # no cache: the prompt runs
    for call in (lambda: model(ids, cache={"k": 0}), lambda: model(ids, None, None, {"k": 0})):
        with pytest.raises(
            jpeft.JpeftError, match=r"PromptTuning on an NNX model: the root call got cache=.*jpeft.generate"
        ):
            call()
