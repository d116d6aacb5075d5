"""Cached greedy decoding of adapted tunix Llama 3 and Qwen 3 models equals uncached decoding.

``jpeft.generate(model, ids, n)`` decodes through tunix's KV cache. The oracle calls the adapted
model without a cache on the whole sequence at every step (its root call, so prompt and prefix
methods extend it by their virtual positions as in training) and takes the arg-max at the last
real position. To compile once, the oracle's sequence is a fixed buffer of ``T + NEW`` tokens whose
not-yet-generated tail the causal mask hides; a test checks that against the sequence so far.
Tiny random models are built directly (no checkpoint); one prompt of the batch is left-padded.
"""

import types

import numpy as np
import pytest

pytest.importorskip("tunix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jpeft  # noqa: E402

VOCAB, T, NEW = 40, 5, 6
SIZES = dict(num_layers=2, vocab_size=VOCAB, embed_dim=16, hidden_dim=32, num_heads=4, head_dim=8, num_kv_heads=2)
IDS = jnp.asarray(np.random.RandomState(0).randint(1, VOCAB, (2, T)), jnp.int32)
MASK = jnp.asarray([[1] * T, [0, 0] + [1] * (T - 2)], jnp.int32)  # the second prompt is left-padded
METHODS = {
    "lora": lambda: jpeft.LoRA(targets=r".*/(q_proj|k_proj|v_proj|o_proj|up_proj)", rank=2, alpha=4.0),
    "prompt": lambda: jpeft.PromptTuning(num_virtual_tokens=3),
    "ptuning_v2": lambda: jpeft.PTuningV2(num_virtual_tokens=3),
}


def _model(family):
    """A tiny model with weights ``N(0, 1 / fan_in)`` (tunix's init is near zero: the MLP is zeros), norms 1."""
    if family == "qwen3":
        from tunix.models.qwen3 import model as lib

        cfg = lib.ModelConfig(**SIZES, rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=True)
        model = lib.Qwen3(cfg, rngs=nnx.Rngs(0))
    else:
        from tunix.models.llama3 import model as lib

        model = lib.Llama3(lib.ModelConfig(**SIZES, rope_theta=1_000_000, norm_eps=1e-6), rngs=nnx.Rngs(0))
    rng = np.random.RandomState(2)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var.ndim > 1:
            scale = 1.0 if path[-1] == "input_embedding" else var.shape[0] ** -0.5
            var[...] = jnp.asarray(rng.normal(0, scale, var.shape), var.dtype)
    return model


@pytest.fixture(scope="module", params=["llama3", "qwen3"])
def family(request):
    with jax.numpy_rank_promotion("allow"):  # tunix's RMSNorm broadcasts (D,) against (B, T, D)
        base = _model(request.param)
        return request.param, base, uncached(base)


def _inputs(full):
    """Positions and the (B, L, L) causal mask without padded keys, as tunix's sampler makes them."""
    length = full.shape[1]
    positions = jnp.maximum(jnp.cumsum(full, axis=1) - 1, 0)
    return positions, jnp.tril(jnp.ones((length, length), bool))[None] & (full[:, None, :] > 0)


@nnx.jit
def _logits(model, tokens, full):
    """The adapted model's root call without a cache on the whole sequence ``tokens`` (padding: ``full``)."""
    positions, mask = _inputs(full)
    logits, cache = model(tokens, positions, None, mask)
    assert cache is None
    return logits


FULL = jnp.concatenate([MASK, jnp.ones((2, NEW), jnp.int32)], 1)


def uncached(model):
    """Greedy decoding, calling the model on the whole sequence at each step (compiled once: see above)."""
    tokens = jnp.concatenate([IDS, jnp.zeros((2, NEW), jnp.int32)], 1)
    with jax.numpy_rank_promotion("allow"):
        for i in range(NEW):
            nxt = jnp.argmax(_logits(model, tokens, FULL)[:, T + i - 1], axis=-1)
            tokens = tokens.at[:, T + i].set(nxt.astype(jnp.int32))
    return np.asarray(tokens)


def cached(model, **kw):
    with jax.numpy_rank_promotion("allow"):
        return np.asarray(jpeft.generate(model, IDS, NEW, attention_mask=MASK, **kw))


def adapted(method, base):
    model = jpeft.apply(method, base, key=jax.random.key(1))
    rng = np.random.RandomState(1)
    for _, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):  # LoRA's B is zero at init
        var[...] = jnp.asarray(rng.normal(0, 1.0, var.shape), var.dtype)
    return model


@pytest.mark.parametrize("name", list(METHODS))
def test_cached_decoding_equals_uncached(family, name):
    _, base, base_tokens = family
    model = adapted(METHODS[name](), base)
    want = uncached(model)
    assert (want[:, T:] != base_tokens[:, T:]).any(), "the adapter must change the generated tokens"
    np.testing.assert_array_equal(cached(model), want)


def test_the_oracles_fixed_buffer_equals_the_growing_sequence(family):
    """The oracle's hidden tail changes nothing: the model on the sequence so far gives the same logits."""
    _, base, _ = family
    model = adapted(METHODS["ptuning_v2"](), base)
    tokens = jnp.asarray(uncached(model))
    with jax.numpy_rank_promotion("allow"):
        whole = _logits(model, tokens, FULL)[:, T + 1]
        grown = _logits(model, tokens[:, : T + 2], FULL[:, : T + 2])[:, -1]
    np.testing.assert_allclose(np.asarray(whole), np.asarray(grown), atol=1e-5)


def test_mam_prefixes_from_an_mlp_and_the_adapter_chosen_by_name(family):
    """MAM: prefix tuning (its MLP computes the prefixes in the call) composed with a parallel FFN adapter."""
    _, base, base_tokens = family
    model = adapted(jpeft.MAM(prefix_tokens=2, adapter_bottleneck=4, prefix_projection=True), base)
    model = jpeft.apply(jpeft.LoRA(targets=r".*/v_proj", rank=2), model, key=jax.random.key(2), name="other")
    want = uncached(model)  # "default", the first adapter, is active
    assert (want[:, T:] != base_tokens[:, T:]).any()
    jpeft.set_adapter(model, "other")
    np.testing.assert_array_equal(cached(model, name="default"), want)


class _Tokenizer:
    """Space-separated ids, for tunix's Sampler."""

    def encode(self, text, **kw):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kw):
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return 0

    def pad_id(self):
        return 0


def test_tunix_sampler_decodes_a_lora_model_and_refuses_a_prompt(family):
    from tunix.generate import sampler

    _, base, _ = family
    config = sampler.CacheConfig(cache_size=32, num_layers=2, num_kv_heads=2, head_dim=8)
    texts = [" ".join(str(int(i)) for i in row) for row in IDS]  # no padding: tunix pads by the pad id
    model = adapted(METHODS["lora"](), base)
    with jax.numpy_rank_promotion("allow"):
        out = sampler.Sampler(model, _Tokenizer(), config)(texts, max_generation_steps=NEW, eos_tokens=[VOCAB])
        want = np.asarray(jpeft.generate(model, IDS, NEW))[:, T:]
    np.testing.assert_array_equal(np.stack([np.asarray(t) for t in out.tokens]), want)
    prompt = adapted(METHODS["prompt"](), base)
    with jax.numpy_rank_promotion("allow"), pytest.raises(jpeft.JpeftError, match=r"Decode with jpeft\.generate"):
        sampler.Sampler(prompt, _Tokenizer(), config)(texts, max_generation_steps=NEW, eos_tokens=[VOCAB])


# --- refusals, before tracing ----------------------------------------------------------------------
def test_refuses_a_sliding_window(family):
    model = jpeft.apply(METHODS["prompt"](), family[1], key=jax.random.key(1))
    model.config = types.SimpleNamespace(sliding_window_size=4)
    with pytest.raises(jpeft.JpeftError, match="sliding-window attention"):
        jpeft.generate(model, IDS, 2)


def test_refuses_delta_dropout_left_on(family):
    model = jpeft.apply(jpeft.LoRA(targets=r".*/q_proj", rank=2, dropout=0.1), family[1], key=jax.random.key(1))
    with pytest.raises(jpeft.JpeftError, match=r"delta dropout on .*Call model.eval\(\)"):
        jpeft.generate(model, IDS, 2)


def test_refuses_unipelts_sequence_gates(family):
    method = jpeft.UniPELT(lora_targets=("up_proj",), rank=2, prefix_tokens=2, reduction_factor=4)
    model = jpeft.apply(method, family[1], key=jax.random.key(1))
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.generate\(UniPELT\): its gates average over the whole sequence"):
        jpeft.generate(model, IDS, 2)


def test_refuses_several_adapters_with_a_prompt(family):
    model = jpeft.apply(METHODS["prompt"](), family[1], key=jax.random.key(1))
    model = jpeft.apply(jpeft.LoRA(targets=r".*/q_proj", rank=2), model, key=jax.random.key(2), name="lora")
    with pytest.raises(jpeft.JpeftError, match="runs one adapter at a time"):
        jpeft.generate(model, IDS, 2, name=("default", "lora"))


def test_refuses_other_call_conventions_and_linen_arguments(family):
    model = jpeft.apply(jpeft.LoRA(targets=".*", rank=2), nnx.Linear(3, 3, rngs=nnx.Rngs(0)), key=jax.random.key(1))
    with pytest.raises(jpeft.JpeftError, match=r"decodes tunix's decoders.*its own KV cache"):
        jpeft.generate(model, IDS, 2)
    tuned = jpeft.apply(METHODS["lora"](), family[1], key=jax.random.key(1))
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.generate\(model, input_ids, max_new_tokens"):
        jpeft.generate(tuned, METHODS["lora"](), {}, IDS, 2)
    with pytest.raises(jpeft.JpeftError, match="attention_mask has shape"):
        jpeft.generate(tuned, IDS, 2, attention_mask=jnp.ones((2, 3)))
    with pytest.raises(jpeft.JpeftError, match="must be a positive int"):
        jpeft.generate(tuned, IDS, 0)
