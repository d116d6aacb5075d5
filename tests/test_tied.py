"""Tied embeddings (issue 10, finding 5).

An output head tied to the token embedding reads the embedding *leaf*; it never calls the embedding
module. jpeft's semantics are HF PEFT's: a delta at a tied embedding adapts only the input lookup
(``jpeft.wrap``), the head keeps the base embedding, and ``jpeft.merge`` refuses to fold into the
tied leaf (HF PEFT warns there), naming the leaf and the fix. Untied trees merge as usual.

Oracles: NumPy builds the adapted table, the base model runs with it for the lookup only (its last
hidden state), and the head multiplies by the *base* table in NumPy; and torch + HF PEFT.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jpeft
from jpeft import profiles
from tests import _hf_models
from tests._models import random_deltas

E = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
         max_position_embeddings=32)
G = dict(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
B = dict(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)

# (Flax class, config, the tied embedding leaves); shapes only (jax.eval_shape), nothing compiles.
TREES = {
    "gpt2_lm": (transformers.FlaxGPT2LMHeadModel, transformers.GPT2Config(**G), ("transformer/wte/embedding",)),
    "gpt2_lm_untied": (
        transformers.FlaxGPT2LMHeadModel, transformers.GPT2Config(**G, tie_word_embeddings=False), ()
    ),
    "gpt2_bare": (transformers.FlaxGPT2Model, transformers.GPT2Config(**G), ()),
    "llama_lm_tie_config": (  # Flax Llama applies its own lm_head kernel even with tie_word_embeddings
        transformers.FlaxLlamaForCausalLM, transformers.LlamaConfig(**E, tie_word_embeddings=True), ()
    ),
    "bart_generation": (
        transformers.FlaxBartForConditionalGeneration, transformers.BartConfig(**B), ("model/shared/embedding",)
    ),
    "bart_generation_untied": (
        transformers.FlaxBartForConditionalGeneration, transformers.BartConfig(**B, tie_word_embeddings=False), ()
    ),
    "bart_causal_lm": (
        transformers.FlaxBartForCausalLM, transformers.BartConfig(**B), ("model/decoder/embed_tokens/embedding",)
    ),
    "bart_classifier": (transformers.FlaxBartForSequenceClassification, transformers.BartConfig(**B), ()),
    "bert_mlm": (
        transformers.FlaxBertForMaskedLM, transformers.BertConfig(**E), ("bert/embeddings/word_embeddings/embedding",)
    ),
    "bert_mlm_untied": (
        transformers.FlaxBertForMaskedLM, transformers.BertConfig(**E, tie_word_embeddings=False), ()
    ),
    "bert_classifier": (transformers.FlaxBertForSequenceClassification, transformers.BertConfig(**E), ()),
    "roberta_mlm": (
        transformers.FlaxRobertaForMaskedLM,
        transformers.RobertaConfig(**E),
        ("roberta/embeddings/word_embeddings/embedding",),
    ),
    "roberta_mlm_untied": (
        transformers.FlaxRobertaForMaskedLM, transformers.RobertaConfig(**E, tie_word_embeddings=False), ()
    ),
}


def shapes(cls, config):
    with jax.numpy_rank_promotion("allow"):
        model = cls(config, _do_init=False)
        return flax.core.unfreeze(jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 4))))


@pytest.mark.parametrize("case", list(TREES))
def test_tied_embeddings_detects_the_heads_that_read_the_embedding(case):
    cls, config, want = TREES[case]
    params = shapes(cls, config)
    assert profiles.tied_embeddings(params) == want
    assert profiles.tied_embeddings({"outer": params}) == tuple(f"outer/{p}" for p in want)


def test_a_custom_model_nesting_gpt2_as_transformer_is_not_tied():
    params = shapes(*TREES["gpt2_lm"][:2])
    assert profiles.tied_embeddings({**params, "score": {"kernel": jnp.zeros((16, 2))}}) == ()


def test_tied_head_validates_its_regex():
    with pytest.raises(profiles.ProfileError, match="group named 'root'"):
        profiles.TiedHead(embedding=r"transformer/wte/embedding", head="lm_head/kernel")


# --- wrap adapts only the lookup (NumPy oracle); merge refuses ----------------------------------------------------------
def lookup_oracle(m, emb_path, adapted):
    """Runs the base model with the adapted table; returns its logits and its last hidden state in float64."""
    params = jax.tree.map(lambda x: x, m.params)
    node = params
    for k in emb_path[:-1]:
        node = node[k]
    node[emb_path[-1]] = jnp.asarray(adapted, node[emb_path[-1]].dtype)
    with jax.numpy_rank_promotion("allow"):
        out = m.model.module.apply({"params": params}, **m.inputs, deterministic=True, output_hidden_states=True)
    hidden = out.decoder_hidden_states if hasattr(out, "decoder_hidden_states") else out.hidden_states
    return np.asarray(out.logits), np.asarray(hidden[-1], np.float64)


def embedding_lora(m, path, seed=3):
    method = jpeft.LoRA(targets=(path[-2],), rank=2, alpha=4.0)
    tree = random_deltas(jpeft.apply(method, m.params, key=jax.random.key(0)), seed=seed, scale=0.5)
    node = tree
    for k in path[:-1]:
        node = node[k]
    d = node[jpeft.RESERVED]["default"]
    base = np.asarray(node["embedding"], np.float64)
    adapted = base + method.scale * np.asarray(d["lora_a"], np.float64) @ np.asarray(d["lora_b"], np.float64)
    return method, tree, base, adapted


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_lora_on_a_tied_embedding_adapts_only_the_input_lookup(family):
    m = _hf_models.make(family)
    path = ("transformer", "wte", "embedding") if family == "gpt2" else ("model", "shared", "embedding")
    method, tree, base, adapted = embedding_lora(m, path)
    bias = np.asarray(m.params.get("final_logits_bias", np.zeros((1, base.shape[0]))), np.float64)
    tied_logits, hidden = lookup_oracle(m, path, adapted)
    # The head reads the last hidden state: with the table adapted everywhere, as merge would do it.
    np.testing.assert_allclose(hidden @ adapted.T + bias, tied_logits, atol=2e-4, rtol=1e-4)
    got = np.asarray(m.logits(jpeft.wrap(m.apply, method)({"params": tree}, **m.inputs)))
    np.testing.assert_allclose(got, hidden @ base.T + bias, atol=2e-4, rtol=1e-4)  # the lookup only
    assert np.abs(tied_logits - got).max() > 1.0  # merge's answer would have differed
    with pytest.raises(jpeft.JpeftError, match=rf"'{'/'.join(path)}' is a tied embedding.*Keep jpeft.wrap.*lm_head/kernel"):
        jpeft.merge(method, tree)


def test_untied_gpt2_merges_and_wrap_equals_merge():
    m = _hf_models.make("gpt2")
    config = transformers.GPT2Config(**{**m.model.config.to_dict(), "tie_word_embeddings": False})
    with jax.numpy_rank_promotion("allow"):
        untied = transformers.FlaxGPT2LMHeadModel(config, _do_init=False)
    params = {**m.params, "lm_head": {"kernel": m.params["transformer"]["wte"]["embedding"].T}}

    def apply(variables, **inputs):
        with jax.numpy_rank_promotion("allow"):
            return untied.module.apply(variables, **inputs, deterministic=True).logits

    base = np.asarray(apply({"params": params}, **m.inputs))
    np.testing.assert_allclose(base, m.logits(m.apply({"params": m.params}, **m.inputs)), atol=1e-5)
    path = ("transformer", "wte", "embedding")
    method = jpeft.LoRA(targets=("wte",), rank=2, alpha=4.0)
    tree = random_deltas(jpeft.apply(method, params, key=jax.random.key(0)), seed=3, scale=0.5)
    wrapped = np.asarray(jpeft.wrap(apply, method)({"params": tree}, **m.inputs))
    merged = np.asarray(apply({"params": jpeft.merge(method, tree)}, **m.inputs))
    np.testing.assert_allclose(wrapped, merged, atol=2e-4, rtol=1e-4)
    assert np.abs(wrapped - base).max() > 1e-2
    assert profiles.tied_embeddings(params) == () and "/".join(path) in profiles.tied_embeddings(m.params)


def test_llama_keeps_its_own_lm_head_so_embedding_lora_merges():
    m = _hf_models.make("llama")
    method = jpeft.LoRA(targets=("embed_tokens",), rank=2, alpha=4.0)
    tree = random_deltas(jpeft.apply(method, m.params, key=jax.random.key(0)), seed=3, scale=0.5)
    wrapped = m.logits(jpeft.wrap(m.apply, method)({"params": tree}, **m.inputs))
    merged = m.logits(m.apply({"params": jpeft.merge(method, tree)}, **m.inputs))
    np.testing.assert_allclose(wrapped, merged, atol=2e-4, rtol=1e-4)


# Every mergeable method that can put a delta on an embedding leaf refuses the same way.
EMBEDDING_METHODS = {
    "lora": lambda: jpeft.LoRA(targets=("wte",), rank=2),
    "rslora": lambda: jpeft.LoRA(targets=("wte",), rank=2, use_rslora=True),
    "lora_fa": lambda: jpeft.LoRAFA(targets=("wte",), rank=2),
    "lora_plus": lambda: jpeft.LoRAPlus(targets=("wte",), rank=2),
    "adalora": lambda: jpeft.AdaLoRA(targets=("wte",), init_r=2, target_r=1, total_step=10, tinit=1, tfinal=1),
    "diff_pruning": lambda: jpeft.DiffPruning(targets=r".*/wte"),
    "ia3": lambda: jpeft.IA3(targets=("wte",)),
    "compose": lambda: jpeft.compose(jpeft.LoRA(targets=("wte",), rank=2), jpeft.LoRA(targets=("c_attn",), rank=2)),
}


@pytest.mark.parametrize("name", list(EMBEDDING_METHODS))
def test_every_method_refuses_to_merge_into_a_tied_embedding(name):
    m = _hf_models.make("gpt2")
    method = EMBEDDING_METHODS[name]()
    tree = random_deltas(jpeft.apply(method, m.params, key=jax.random.key(0)), seed=1)
    with pytest.raises(jpeft.JpeftError, match=r"'transformer/wte/embedding' is a tied embedding"):
        jpeft.merge(method, tree)


# --- torch + HF PEFT oracle --------------------------------------------------------------------------------------------
def test_hf_peft_lora_on_tied_gpt2_wte_matches_wrap(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(**G)).float().eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["wte"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    ids = np.array([[5, 17, 3, 42, 8, 1], [9, 1, 7, 4, 25, 13]])
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    model.save_pretrained(tmp_path / "adapter")
    flax_model, params = jpeft.models.load_hf_safetensors(str(tmp_path / "base"))
    method, tree = jpeft.import_hf(str(tmp_path / "adapter"), params)

    def apply_fn(variables, x):
        return flax_model(x, params=variables["params"]).logits

    with jax.numpy_rank_promotion("allow"):
        got = np.asarray(jpeft.wrap(apply_fn, method)({"params": tree}, jnp.asarray(ids)))
        plain = np.asarray(apply_fn({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(plain - want).max() > 1e-3
    with pytest.raises(jpeft.JpeftError, match="tied embedding"):
        jpeft.merge(method, tree)
