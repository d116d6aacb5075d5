"""Prefix methods on pooled heads: the virtual positions are never query positions any head reads.

jpeft runs a prefix method by extending the inputs with ``P`` placeholder positions whose keys and
values are overwritten in every layer. A pooled head (BERT's pooler, RoBERTa's classification
head: ``hidden[:, 0]``) used to read a placeholder instead of the real ``[CLS]``. Now a single
stack's output drops the placeholders before any head, so the result is the base model with prefix
keys and values on the caller's sequence, as HF PEFT's ``past_key_values`` give.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft._tree import RESERVED
from tests import _hf_models as H
from tests._models import random_deltas
from tests.methods.test_prompt import TOKENS, TOL

P = len(TOKENS)

METHODS = {
    "ptuning_v2": lambda: jpeft.PTuningV2(num_virtual_tokens=P),
    "prefix_mlp": lambda: jpeft.PrefixTuning(num_virtual_tokens=P, projection_hidden_size=8),
    "mam": lambda: jpeft.MAM(prefix_tokens=P, adapter_bottleneck=4),
    "unipelt": lambda: jpeft.UniPELT(rank=2, prefix_tokens=P, reduction_factor=8),
}


def with_row(params: dict[str, Any], family: str, row: int, value: jax.Array) -> dict[str, Any]:
    """``params`` with the word-embedding table's row ``row`` set to ``value`` (other leaves shared)."""
    out = dict(params)
    out[family] = dict(params[family])
    out[family]["embeddings"] = dict(params[family]["embeddings"])
    table = params[family]["embeddings"]["word_embeddings"]
    out[family]["embeddings"]["word_embeddings"] = {**table, "embedding": table["embedding"].at[row].set(value)}
    return out


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("name", list(METHODS))
def test_placeholder_embedding_row_changes_nothing(family: str, name: str) -> None:
    """The placeholder id is 0: its embedding row must not reach the logits (it did: 0.31 on BERT)."""
    m = H.make(family)
    method = METHODS[name]()
    peft = random_deltas(jpeft.apply(method, m.params, key=jax.random.key(0)), seed=1, scale=0.3)
    wrapped = jpeft.wrap(m.apply, method)
    a = wrapped({"params": peft}, **m.inputs).logits
    row = 3 * jax.random.normal(jax.random.key(9), (H.HIDDEN,))
    b = wrapped({"params": with_row(peft, family, 0, row)}, **m.inputs).logits
    assert a.shape == (H.BATCH, 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def extend_encoder(inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The base model's inputs for ``[TOKENS] + x``, with the positions the wrapper gives (x's shifted by P)."""
    batch, _ = inputs["input_ids"].shape
    t = jnp.broadcast_to(jnp.asarray(TOKENS, jnp.int32), (batch, P))
    pos = inputs["position_ids"]
    return {
        "input_ids": jnp.concatenate([t, inputs["input_ids"]], 1),
        "attention_mask": jnp.concatenate([jnp.ones((batch, P), jnp.int32), inputs["attention_mask"]], 1),
        "token_type_ids": jnp.zeros((batch, P + inputs["input_ids"].shape[1]), jnp.int32),
        "position_ids": jnp.concatenate([pos[:, :1] + jnp.arange(P, dtype=pos.dtype)[None], pos + P], 1),
    }


def numpy_head(family: str, params: dict[str, Any], cls: np.ndarray) -> np.ndarray:
    """The sequence-classification head on the ``[CLS]`` hidden state, in NumPy float64."""
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    if family == "bert":
        pool = params["bert"]["pooler"]["dense"]
        pooled = np.tanh(f(cls) @ f(pool["kernel"]) + f(pool["bias"]))
        return pooled @ f(params["classifier"]["kernel"]) + f(params["classifier"]["bias"])
    head = params["classifier"]
    h = np.tanh(f(cls) @ f(head["dense"]["kernel"]) + f(head["dense"]["bias"]))
    return h @ f(head["out_proj"]["kernel"]) + f(head["out_proj"]["bias"])


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("name", ["ptuning_v2", "mam"])
def test_pooled_logits_equal_base_model_with_real_token_keys_and_values(family: str, name: str) -> None:
    """Per example: prefixes = the base model's own k/v of TOKENS on [TOKENS] + x (bidirectional, so they
    depend on x). Then every hidden state at x's positions equals the base run's, so token-level heads
    are unchanged, and the pooled logits are the NumPy head on the base run's real [CLS] (position P),
    not on a virtual position. MAM's parallel adapter is zero at init, so MAM runs its prefixes alone.
    """
    m = H.make(family)
    method = METHODS[name]()
    for b in range(H.BATCH):  # row 1 has a padded last position
        row = {k: v[b : b + 1] for k, v in m.inputs.items()}
        ext = extend_encoder(row)
        ref, state = m.apply(
            {"params": m.params}, **ext, output_hidden_states=True,
            capture_intermediates=lambda mdl, _: mdl.name in ("key", "value"), mutable=["intermediates"],
        )
        peft = jpeft.apply(method, m.params, key=jax.random.key(0))
        for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
            node = peft
            for k in tuple(k.key for k in path if hasattr(k, "key"))[:-1]:
                node = node[k]
            store = node[RESERVED]["default"]
            if name == "mam":
                store["prefix"] = {"prefix": value[0, :P]}
            else:
                node[RESERVED]["default"] = {"prefix": value[0, :P]}
        out = jpeft.wrap(m.apply, method)({"params": peft}, **row, output_hidden_states=True)
        for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):
            np.testing.assert_allclose(got, want[:, P:], **TOL)
        oracle = numpy_head(family, m.params, np.asarray(ref.hidden_states[-1][:, P]))
        np.testing.assert_allclose(out.logits, oracle, rtol=1e-5, atol=1e-6)
        wrong = numpy_head(family, m.params, np.asarray(ref.hidden_states[-1][:, 0]))  # the first virtual one
        assert np.abs(wrong - oracle).max() > 1e-4


def test_bart_classification_pools_real_eos_positions() -> None:
    """BART's head pools the decoder state at the encoder input's last EOS; with prefixes both sides
    grow by P in front, so it reads the same real position, and the placeholder row changes nothing."""
    import transformers
    from transformers.models.bart.modeling_flax_bart import shift_tokens_right

    base = H.make("bart")
    config = transformers.BartConfig(**{**base.model.config.to_dict(), "num_labels": 3})
    with jax.numpy_rank_promotion("allow"):
        model = transformers.FlaxBartForSequenceClassification(config, seed=0)
    params = jax.tree.map(jnp.asarray, dict(model.params))
    ids = np.array(base.inputs["input_ids"])
    ids[:, -1] = config.eos_token_id
    inputs = {
        "input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids),
        "decoder_input_ids": jnp.asarray(shift_tokens_right(ids, config.pad_token_id, config.decoder_start_token_id)),
        "decoder_attention_mask": jnp.ones_like(ids),
        "position_ids": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
        "decoder_position_ids": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
    }

    def apply(variables: Any, **kw: Any) -> Any:
        with jax.numpy_rank_promotion("allow"):
            return model.module.apply(variables, **{"deterministic": True, **kw})

    method = jpeft.PTuningV2(num_virtual_tokens=P)
    peft = random_deltas(jpeft.apply(method, params, key=jax.random.key(0)), seed=1, scale=0.3)
    wrapped = jpeft.wrap(apply, method)
    a = wrapped({"params": peft}, **inputs).logits
    shared = peft["model"]["shared"]
    changed = dict(peft, model=dict(peft["model"], shared={**shared, "embedding": shared["embedding"].at[0].set(
        3 * jax.random.normal(jax.random.key(9), (H.HIDDEN,)))}))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(wrapped({"params": changed}, **inputs).logits))
    assert a.shape == (H.BATCH, 3)
    assert np.abs(np.asarray(a - apply({"params": params}, **inputs).logits)).max() > 1e-4


def test_hf_peft_prefix_on_bert_sequence_classification(tmp_path: Any) -> None:
    """torch + HF PEFT: PrefixTuningConfig(task_type='SEQ_CLS') on BertForSequenceClassification (its
    pooler reads the real [CLS]; positions shifted by past_key_values_length = P) imports into jpeft
    with the same pooled logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    from tests.io.test_hf_peft_torch import FAMILIES, IDS, run_flax

    config = FAMILIES["bert"][0]()
    config.num_labels = 3
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).float().eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P)).eval()
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(IDS), attention_mask=torch.ones(IDS.shape, dtype=torch.long)).logits.numpy()
    model.save_pretrained(tmp_path / "adapter")
    # SEQ_CLS saves the head as modules_to_save; it is the base's, untrained: keep the prefixes only
    from safetensors.numpy import load_file, save_file

    file = str(tmp_path / "adapter" / "adapter_model.safetensors")
    tensors = load_file(file)
    np.testing.assert_array_equal(tensors.pop("base_model.classifier.weight"), base.classifier.weight.detach().numpy())
    tensors.pop("base_model.classifier.bias")
    save_file(tensors, file)
    flax_model, params = jpeft.models.load_hf_safetensors(str(tmp_path / "base"))
    assert type(flax_model).__name__ == "FlaxBertForSequenceClassification"
    method, tree = jpeft.import_hf(str(tmp_path / "adapter"), params)
    got = run_flax(flax_model, method, tree)
    assert got.shape == want.shape == (2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(run_flax(flax_model, None, params) - want).max() > 1e-4  # the prefixes change the logits
