"""``jpeft.export_hf`` / ``jpeft.import_hf``: the HF PEFT adapter format.

torch is not available here, so the format is checked three ways: the exported tensors, read back
with safetensors alone, give the *torch-format* forward ``x W^T + b + s (x A^T) B^T`` (and DoRA's,
and the embedding's) in NumPy equal to jpeft's wrapped forward; export then import is exact on the
tiny HF families; and adapter files written here by hand from the PEFT spec import to the expected
leaves.
"""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers.models.gpt2.modeling_flax_gpt2 import FlaxConv1D

import jpeft
from jpeft import profiles
from tests import _hf_models

VOCAB, D_IN, D_OUT, DIM, RANK = 11, 5, 6, 4, 3


class Tiny(nn.Module):
    """One torch-Linear-like ``query``, one GPT-2 ``Conv1D`` ``c_attn`` and an embedding ``wte``."""

    @nn.compact
    def __call__(self, ids, x):
        with jax.numpy_rank_promotion("allow"):  # FlaxConv1D adds its bias by rank promotion
            conv = FlaxConv1D(D_OUT, name="c_attn")(x)
        return nn.Embed(VOCAB, DIM, name="wte")(ids), nn.Dense(D_OUT, name="query")(x), conv


def randomize(tree, seed, scale=0.5):
    """Random non-zero values for every leaf, deltas and base alike; DoRA's magnitude stays positive."""
    rng = np.random.RandomState(seed)

    def noise(path, x):
        y = rng.standard_normal(x.shape)
        y = np.abs(y) + 0.5 if path[-1].key == "magnitude" else scale * y
        return jnp.asarray(y, x.dtype)

    return jax.tree_util.tree_map_with_path(noise, tree)


def tiny_case(use_dora=False, use_rslora=False):
    ids = jnp.asarray([[1, 4, 10], [0, 3, 3]], jnp.int32)
    x = jnp.asarray(np.random.RandomState(0).standard_normal((2, 3, D_IN)), jnp.float32)
    params = randomize(Tiny().init(jax.random.key(0), ids, x)["params"], seed=1)
    targets = ("query", "c_attn") if use_dora else ("wte", "query", "c_attn")
    method = jpeft.LoRA(
        targets=targets, rank=RANK, alpha=5.0, use_rslora=use_rslora, use_dora=use_dora,
        layouts=((".*c_attn", "transposed"),),
    )
    peft = jpeft.apply(method, params, key=jax.random.key(2))
    peft = {k: {**v, jpeft.RESERVED: randomize(v[jpeft.RESERVED], seed=3)} if jpeft.RESERVED in v else v
            for k, v in peft.items()}
    return method, params, peft, ids, x


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_numpy_torch_forward_matches_wrapped(tmp_path, variant):
    method, params, peft, ids, x = tiny_case(use_dora=variant == "dora", use_rslora=variant == "rslora")
    jpeft.export_hf(str(tmp_path), method, peft)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    st = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert config["peft_type"] == "LORA" and config["r"] == RANK and config["lora_alpha"] == 5
    assert config["fan_in_fan_out"] is True and config["bias"] == "none"
    assert (config["use_dora"], config["use_rslora"]) == (variant == "dora", variant == "rslora")
    assert sorted(config["target_modules"]) == sorted(method.targets)
    s = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])

    xn, p = np.asarray(x, np.float64), {k: {n: np.asarray(v, np.float64) for n, v in m.items()} for k, m in params.items()}
    # torch Linear weights (out, in): nn.Linear stores W^T of Flax's Dense; GPT-2's Conv1D stores
    # (in, out) and PEFT's fan_in_fan_out reads it transposed, which is Flax's (out, in) kernel.
    linear = {"query": p["query"]["kernel"].T, "c_attn": p["c_attn"]["kernel"]}
    want = {}
    for m, w in linear.items():
        a, b = (st[f"base_model.model.{m}.lora_{f}.weight"].astype(np.float64) for f in "AB")
        assert a.shape == (RANK, D_IN) and b.shape == (D_OUT, RANK)
        if variant == "dora":
            mag = st[f"base_model.model.{m}.lora_magnitude_vector.weight"].astype(np.float64)
            assert mag.shape == (D_OUT,)
            w_eff = w + s * b @ a
            w_eff = (mag / np.linalg.norm(w_eff, axis=1))[:, None] * w_eff
            want[m] = xn @ w_eff.T + p[m]["bias"]
        else:
            want[m] = xn @ w.T + p[m]["bias"] + s * (xn @ a.T) @ b.T
    if variant != "dora":
        a, b = st["base_model.model.wte.lora_embedding_A"], st["base_model.model.wte.lora_embedding_B"]
        assert a.shape == (RANK, VOCAB) and b.shape == (DIM, RANK)
        idx = np.asarray(ids)
        want["wte"] = p["wte"]["embedding"][idx] + s * a.T.astype(np.float64)[idx] @ b.T.astype(np.float64)
    assert len(st) == 3 * 2 if variant != "dora" else 2 * 3

    wte, query, c_attn = jpeft.wrap(Tiny().apply, method)({"params": peft}, ids, x)
    got = {"wte": wte, "query": query, "c_attn": c_attn}
    for m in want:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-5, err_msg=m)


def roundtrip_case(family):
    hf = _hf_models.make(family)
    profile = {"bert": profiles.BERT, "gpt2": profiles.GPT2, "llama": profiles.LLAMA, "bart": profiles.BART}[family]
    extra = {"bert": ("word_embeddings",), "bart": ("fc1",)}.get(family, ())
    method = jpeft.LoRA(targets=profile.lora_default + extra, rank=2, alpha=7.0, dropout=0.1,
                        use_dora=family == "llama", use_rslora=family == "bart")
    peft = jpeft.apply(method, hf.params, key=jax.random.key(0))
    return hf, method, randomize_deltas(peft)


def randomize_deltas(peft, seed=5):
    rng = np.random.RandomState(seed)

    def visit(node):
        if not isinstance(node, dict):
            return node
        out = {k: visit(v) for k, v in node.items() if k != jpeft.RESERVED}
        if jpeft.RESERVED in node:
            out[jpeft.RESERVED] = randomize(node[jpeft.RESERVED], seed=rng.randint(1 << 30), scale=0.1)
        return out

    return visit(peft)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "bart"])
def test_export_import_roundtrip_is_exact(tmp_path, family):
    hf, method, peft = roundtrip_case(family)
    jpeft.export_hf(str(tmp_path), method, peft, base_model_name_or_path=family, task_type="CAUSAL_LM")
    got_method, got = jpeft.import_hf(str(tmp_path), hf.params)
    for field in ("rank", "alpha", "dropout", "use_rslora", "use_dora", "targets", "scale"):
        assert getattr(got_method, field) == getattr(method, field), field
    assert jax.tree.structure(got) == jax.tree.structure(peft)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(peft), strict=True):
        if jpeft.RESERVED in jax.tree_util.keystr(path):
            assert x.dtype == y.dtype and np.array_equal(x, y), path
        else:
            assert x is y, path  # base leaves are the very same arrays
    want = hf.logits(jpeft.wrap(hf.apply, method)({"params": peft}, **hf.inputs))
    np.testing.assert_array_equal(hf.logits(jpeft.wrap(hf.apply, got_method)({"params": got}, **hf.inputs)), want)


def test_gpt2_keys_follow_peft_layout(tmp_path):
    hf, method, peft = roundtrip_case("gpt2")
    jpeft.export_hf(str(tmp_path), method, peft)
    st = load_file(str(tmp_path / "adapter_model.safetensors"))
    h = _hf_models.HIDDEN
    assert sorted(st) == [f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{f}.weight"
                          for i in range(_hf_models.LAYERS) for f in "AB"]
    a, b = st["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"], st[
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (2, h) and b.shape == (3 * h, 2)  # (r, in) and (out, r) for Conv1D too
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"] and config["fan_in_fan_out"] is True
    # merge agrees with HF PEFT's merge of a fan_in_fan_out layer: W_conv + s (B A)^T, i.e. Flax's
    # (out, in) kernel + s B A.
    merged = jpeft.merge(method, peft)["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    kernel = np.asarray(hf.params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"], np.float64)
    np.testing.assert_allclose(merged, kernel + method.scale * b.astype(np.float64) @ a, rtol=1e-5, atol=1e-6)


def hand_written(tmp_path, *, bare, dora_key="lora_magnitude_vector.weight", **config):
    """A BERT adapter written from the PEFT spec: query/value LoRA, DoRA magnitudes, embedding LoRA."""
    rng = np.random.RandomState(7)
    h, r, prefix = _hf_models.HIDDEN, 2, "base_model.model." + ("" if bare else "bert.")
    tensors = {}
    for i in range(_hf_models.LAYERS):
        for m in ("query", "value"):
            key = f"{prefix}encoder.layer.{i}.attention.self.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, h)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((h, r)).astype(np.float32)
            if config.get("use_dora"):
                tensors[f"{key}.{dora_key}"] = rng.uniform(0.5, 1.5, h).astype(np.float32)
    if not config.get("use_dora"):
        tensors[f"{prefix}embeddings.word_embeddings.lora_embedding_A"] = rng.standard_normal((r, _hf_models.VOCAB))
        tensors[f"{prefix}embeddings.word_embeddings.lora_embedding_B"] = rng.standard_normal((h, r))
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["query", "value"], **config}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return tensors, prefix


@pytest.mark.parametrize("bare", [False, True], ids=["head-model-keys", "bare-model-keys"])
def test_hand_written_adapter_imports(tmp_path, bare):
    hf = _hf_models.make("bert")
    tensors, prefix = hand_written(tmp_path, bare=bare, use_rslora=True,
                                   target_modules=["query", "value", "word_embeddings"])
    method, peft = jpeft.import_hf(str(tmp_path), hf.params)
    assert (method.rank, method.alpha, method.use_rslora, method.use_dora) == (2, 16, True, False)
    assert method.targets == ("query", "value", "word_embeddings") and method.scale == 16 / math.sqrt(2)
    layer = peft["bert"]["encoder"]["layer"]["1"]["attention"]["self"]["value"]
    deltas = layer[jpeft.RESERVED]["default"]
    key = f"{prefix}encoder.layer.1.attention.self.value"
    np.testing.assert_array_equal(deltas["lora_a"], tensors[f"{key}.lora_A.weight"].T)
    np.testing.assert_array_equal(deltas["lora_b"], tensors[f"{key}.lora_B.weight"].T)
    emb = peft["bert"]["embeddings"]["word_embeddings"][jpeft.RESERVED]["default"]
    np.testing.assert_array_equal(emb["lora_a"], tensors[f"{prefix}embeddings.word_embeddings.lora_embedding_A"].T)
    # HF PEFT's merge of a Linear: W_torch + s B A, i.e. Flax's (in, out) kernel + s (B A)^T.
    merged = jpeft.merge(method, peft)["bert"]["encoder"]["layer"]["1"]["attention"]["self"]["value"]["kernel"]
    a, b = tensors[f"{key}.lora_A.weight"].astype(np.float64), tensors[f"{key}.lora_B.weight"].astype(np.float64)
    np.testing.assert_allclose(merged, np.asarray(layer["kernel"], np.float64) + method.scale * (b @ a).T,
                               rtol=1e-5, atol=1e-5)
    fresh = jpeft.apply(method, hf.params, key=jax.random.key(0))  # same structure and dtypes as apply's
    assert jax.tree.map(lambda v: (v.shape, v.dtype), peft) == jax.tree.map(lambda v: (v.shape, v.dtype), fresh)


@pytest.mark.parametrize("dora_key", ["lora_magnitude_vector.weight", "lora_magnitude_vector"])
def test_hand_written_dora_imports(tmp_path, dora_key):
    hf = _hf_models.make("bert")
    tensors, prefix = hand_written(tmp_path, bare=False, dora_key=dora_key, use_dora=True)
    method, peft = jpeft.import_hf(str(tmp_path), hf.params, name="mine")
    assert method.use_dora and method.targets == ("query", "value")
    key = f"{prefix}encoder.layer.0.attention.self.query"
    got = peft["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"][jpeft.RESERVED]["mine"]["magnitude"]
    np.testing.assert_array_equal(got, tensors[f"{key}.{dora_key}"])


def test_regex_targets_export_exact_paths(tmp_path):
    hf = _hf_models.make("bert")
    method = jpeft.LoRA(targets=r".*/layer/0/attention/output/dense", rank=2)
    peft = jpeft.apply(method, hf.params, key=jax.random.key(0))
    jpeft.export_hf(str(tmp_path), method, peft)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # 'dense' alone would also select the other dense layers in PEFT; the suffix must be longer.
    assert config["target_modules"] == ["0.attention.output.dense"]
    got, _ = jpeft.import_hf(str(tmp_path), hf.params)
    assert got.select(hf.params) == method.select(hf.params)


def test_modules_to_save_roundtrip(tmp_path):
    hf = _hf_models.make("bert")
    method = jpeft.LoRA(targets=("query", "value"), rank=2, extra_trainable=r"classifier/.*")
    peft = randomize_deltas(jpeft.apply(method, hf.params, key=jax.random.key(0)))
    head = randomize(peft["classifier"], seed=9)  # a trained head: new arrays, not the base ones
    peft = {**peft, "classifier": head}
    jpeft.export_hf(str(tmp_path), method, peft, task_type="SEQ_CLS")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    st = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert config["modules_to_save"] == ["classifier"]
    np.testing.assert_array_equal(st["base_model.model.classifier.weight"], np.asarray(head["kernel"]).T)  # (out, in)
    np.testing.assert_array_equal(st["base_model.model.classifier.bias"], head["bias"])
    got_method, got = jpeft.import_hf(str(tmp_path), hf.params)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(peft), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), path
    assert got["bert"]["pooler"]["dense"]["kernel"] is hf.params["bert"]["pooler"]["dense"]["kernel"]
    assert hf.params["classifier"]["kernel"] is not got["classifier"]["kernel"]  # params itself is unchanged
    assert jpeft.labels(got_method, got) == jpeft.labels(method, peft)
    want = hf.logits(jpeft.wrap(hf.apply, method)({"params": peft}, **hf.inputs))
    np.testing.assert_array_equal(hf.logits(jpeft.wrap(hf.apply, got_method)({"params": got}, **hf.inputs)), want)


def test_hand_written_modules_to_save_inside_named_module(tmp_path):
    hf = _hf_models.make("bert")
    tensors, _ = hand_written(tmp_path, bare=False, modules_to_save=["pooler"])  # PEFT names the parent module
    h = _hf_models.HIDDEN
    tensors["base_model.model.bert.pooler.dense.weight"] = np.arange(h * h, dtype=np.float32).reshape(h, h)
    tensors["base_model.model.bert.pooler.dense.bias"] = np.ones(h, np.float32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    method, peft = jpeft.import_hf(str(tmp_path), hf.params)
    dense = peft["bert"]["pooler"]["dense"]
    np.testing.assert_array_equal(dense["kernel"], tensors["base_model.model.bert.pooler.dense.weight"].T)
    np.testing.assert_array_equal(dense["bias"], np.ones(h))
    labels = jpeft.labels(method, peft)
    assert labels["bert"]["pooler"]["dense"] == {"kernel": "trainable", "bias": "trainable"}
    assert labels["classifier"] == {"kernel": "frozen", "bias": "frozen"}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({"base_model.model.classifier.weight": np.ones((3, 31), np.float32)}),
         r"'base_model.model.classifier.weight' has shape \(3, 31\) float32; as classifier/kernel it needs \(32, 3\)"),
        (lambda t: t.pop("base_model.model.classifier.bias"),
         r"holds \['kernel'\] of saved module 'classifier', which has \['bias', 'kernel'\]"),
    ],
    ids=["shape", "partial"],
)
def test_modules_to_save_errors(tmp_path, edit, message):
    hf = _hf_models.make("bert")
    tensors, _ = hand_written(tmp_path, bare=False, modules_to_save=["classifier"])
    tensors["base_model.model.classifier.weight"] = np.ones((3, _hf_models.HIDDEN), np.float32)
    tensors["base_model.model.classifier.bias"] = np.ones(3, np.float32)
    edit(tensors)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(jpeft.JpeftError, match=message):
        jpeft.import_hf(str(tmp_path), hf.params)


# --- errors --------------------------------------------------------------------------------------


def test_export_errors(tmp_path):
    method, _, peft, _, _ = tiny_case()
    with pytest.raises(jpeft.JpeftError, match=r"holds jpeft.LoRA and its variants .*; got Method"):
        jpeft.export_hf(str(tmp_path), jpeft.Method(), peft)
    with pytest.raises(jpeft.JpeftError, match=r"selects \['kernel'\] of module 'c_attn', which has \['bias', 'kernel'\]\. "
                       r"HF PEFT's modules_to_save holds whole"):
        jpeft.export_hf(str(tmp_path), jpeft.LoRA(targets=("query",), extra_trainable="c_attn/kernel"), peft)
    with pytest.raises(jpeft.JpeftError, match=r"module 'query', which has \['bias', 'kernel'\] and is a LoRA target"):
        jpeft.export_hf(str(tmp_path), jpeft.LoRA(targets=("query",), extra_trainable="query/.*"), peft)
    with pytest.raises(jpeft.JpeftError, match=r"'c_attn' has no adapter 'other' \(it has \['default'\]\)"):
        jpeft.export_hf(str(tmp_path), method, peft, name="other")
    with pytest.raises(jpeft.JpeftError, match=r"profile must be a jpeft.profiles.Profile"):
        jpeft.export_hf(str(tmp_path), method, peft, profile="gpt2")
    stacked = {"layers": {"query": {"kernel": jnp.ones((2, D_IN, D_OUT))}}}
    lora = jpeft.LoRA(targets=("query",), rank=2)
    stacked = jpeft.apply(lora, stacked, key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"layers/query/kernel has shape \(2, 5, 6\) .* Stacked \(nn.scan\)"):
        jpeft.export_hf(str(tmp_path), lora, stacked)
    odd = {"query": {"kernel": jnp.ones((D_IN, D_OUT))}, "head": {"kernel": jnp.ones((2, 3, 4))}, "root": jnp.ones(3)}
    odd = jpeft.apply(lora, odd, key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"head/kernel has shape \(2, 3, 4\); modules_to_save holds 2-D Linear"):
        jpeft.export_hf(str(tmp_path), jpeft.LoRA(targets=("query",), rank=2, extra_trainable="head/.*"), odd)
    with pytest.raises(jpeft.JpeftError, match=r"selects \['root'\] at the root of the tree, outside any module"):
        jpeft.export_hf(str(tmp_path), jpeft.LoRA(targets=("query",), rank=2, extra_trainable="root"), odd)
    with pytest.raises(jpeft.JpeftError, match=r"export_hf expects the params collection as a nested mapping; got list"):
        jpeft.export_hf(str(tmp_path), method, [])
    assert not os.path.exists(tmp_path / "adapter_config.json")  # nothing half-written


@pytest.mark.parametrize(
    "config, message",
    [
        ({"peft_type": "ADALORA"}, r"peft_type='ADALORA'; import_hf reads \['LORA', 'IA3', 'PROMPT_TUNING', "
                                   r"'P_TUNING', 'PREFIX_TUNING'\] adapters only"),
        ({"bias": "all"}, r"bias='all'; jpeft.LoRA has no equivalent"),
        ({"rank_pattern": {"query": 4}}, r"rank_pattern=\{'query': 4\}; jpeft.LoRA has no equivalent"),
        ({"modules_to_save": ["classifier"]}, r"lists modules_to_save=\['classifier'\], but .* holds none of their"),
        ({"modules_to_save": "classifier"}, r"modules_to_save='classifier' in adapter_config.json must be a list"),
        ({"r": 0}, r"does not make a valid LoRA: LoRA\(rank=0\)"),
        ({"r": 4}, r"'base_model.model.bert.embeddings.word_embeddings.lora_embedding_A' has shape \(2, 100\) "
                   r"float32, but bert/embeddings/word_embeddings/embedding \(100, 32\) .* with r=4 needs \(4, 100\)"),
        ({"use_dora": True}, r"has \['.*lora_embedding_A', '.*lora_embedding_B'\] for module "
                             r"'bert/embeddings/word_embeddings'; with use_dora=True every target needs exactly"),
    ],
    ids=["peft-type", "bias", "rank-pattern", "modules-to-save", "modules-to-save-str", "bad-r", "wrong-r",
         "no-magnitude"],
)
def test_import_config_errors(tmp_path, config, message):
    hf = _hf_models.make("bert")
    hand_written(tmp_path, bare=False)
    base = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**base, **config}))
    with pytest.raises(jpeft.JpeftError, match=message):
        jpeft.import_hf(str(tmp_path), hf.params)


def test_import_file_errors(tmp_path):
    hf = _hf_models.make("bert")
    with pytest.raises(jpeft.JpeftError, match=r"adapter_config.json' does not exist"):
        jpeft.import_hf(str(tmp_path), hf.params)
    tensors, _ = hand_written(tmp_path, bare=False)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-7])
    with pytest.raises(jpeft.JpeftError, match=r"is not a readable safetensors file: .*truncated or corrupted"):
        jpeft.import_hf(str(tmp_path), hf.params)
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage}")
    with pytest.raises(jpeft.JpeftError, match=r"is not a readable safetensors file"):
        jpeft.import_hf(str(tmp_path), hf.params)
    file.write_bytes(data)
    (tmp_path / "adapter_config.json").write_text("{")
    with pytest.raises(jpeft.JpeftError, match=r"adapter_config.json' is not valid JSON"):
        jpeft.import_hf(str(tmp_path), hf.params)
    (tmp_path / "adapter_config.json").write_text("[]")
    with pytest.raises(jpeft.JpeftError, match=r"adapter_config.json' holds a list, expected a JSON object"):
        jpeft.import_hf(str(tmp_path), hf.params)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({"base_model.model.bert.pooler.dense.weight": np.ones((2, 2), np.float32)}),
         r"has key 'base_model.model.bert.pooler.dense.weight', which is not a LoRA key"),
        (lambda t: t.update({"base_model.model.decoder.layers.0.fc1.lora_A.weight": np.ones((2, 2), np.float32)}),
         r"is for another model: 1 keys name modules that params lacks, such as "
         r"'base_model.model.decoder.layers.0.fc1.lora_A.weight'"),
        (lambda t: t.pop("base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"),
         r"has \['.*query.lora_A.weight'\] for module 'bert/encoder/layer/0/attention/self/query'"),
        (lambda t: t.update({"base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight":
                             np.ones((31, 2), np.float32)}),
         r"'base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight' has shape \(31, 2\) float32, "
         r"but bert/encoder/layer/0/attention/self/query/kernel \(32, 32\) \(layout 'dense'\) with r=2 needs \(32, 2\)"),
        (lambda t: t.clear(), r"holds no LoRA factors"),
    ],
    ids=["not-lora", "other-model", "half-pair", "shape", "empty"],
)
def test_import_checkpoint_for_another_model(tmp_path, edit, message):
    hf = _hf_models.make("bert")
    tensors, _ = hand_written(tmp_path, bare=False)
    edit(tensors)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(jpeft.JpeftError, match=message):
        jpeft.import_hf(str(tmp_path), hf.params)


def test_import_argument_errors(tmp_path):
    hf = _hf_models.make("bert")
    hand_written(tmp_path, bare=False)
    _, peft = jpeft.import_hf(str(tmp_path), hf.params)
    with pytest.raises(jpeft.JpeftError, match=r"adapter 'default' already exists at 'bert/embeddings/word_embeddings'"):
        jpeft.import_hf(str(tmp_path), peft)
    with pytest.raises(jpeft.JpeftError, match=r"adapter name must be a non-empty str without '/'; got 'a/b'"):
        jpeft.import_hf(str(tmp_path), hf.params, name="a/b")
    with pytest.raises(jpeft.JpeftError, match=r"expects the params collection as a nested mapping; got list"):
        jpeft.import_hf(str(tmp_path), [])
    with pytest.raises(jpeft.JpeftError, match=r"profile must be a jpeft.profiles.Profile"):
        jpeft.import_hf(str(tmp_path), hf.params, profile="bert")


# --- IA3, prompt tuning, prefix tuning -----------------------------------------------------------
P = 3


def other_case(kind, family):
    """A tiny HF model, a jpeft IA3 / prompt / prefix method on it, and a tree with random deltas."""
    hf = _hf_models.make(family)
    method = {
        "ia3": jpeft.IA3(),
        "prompt": jpeft.PromptTuning(num_virtual_tokens=P),
        "ptuning": jpeft.PTuning(num_virtual_tokens=P, encoder_hidden_size=8),
        "prefix": jpeft.PrefixTuning(num_virtual_tokens=P, projection_hidden_size=8),
        "ptuningv2": jpeft.PTuningV2(num_virtual_tokens=P),
    }[kind]
    peft = jpeft.apply(method, hf.params, key=jax.random.key(0))
    rng = np.random.RandomState(5)
    peft = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(1 + 0.3 * rng.standard_normal(x.shape), x.dtype)
        if jpeft.RESERVED in jax.tree_util.keystr(p) else x,
        peft,
    )
    return hf, method, peft


OTHER = [("ia3", f) for f in ("bert", "gpt2", "llama", "bart")] + [("prompt", f) for f in ("bert", "gpt2", "llama")] + [
    ("ptuning", "gpt2"), ("prefix", "bert"), ("prefix", "gpt2"), ("ptuningv2", "gpt2")
]


@pytest.mark.parametrize(("kind", "family"), OTHER)
def test_ia3_prompt_prefix_roundtrip(tmp_path, kind, family):
    """export then import gives the same outputs; for IA3, P-tuning v2 and prompt tuning the same leaves."""
    hf, method, peft = other_case(kind, family)
    jpeft.export_hf(str(tmp_path), method, peft)
    got_method, got = jpeft.import_hf(str(tmp_path), hf.params)
    want_type = {"ptuning": jpeft.PromptTuning, "prefix": jpeft.PTuningV2}.get(kind, type(method))
    assert type(got_method) is want_type
    if want_type is type(method):
        if kind == "ia3":  # the targets are spelled as in the file, the sites are the same
            assert got_method._sites(hf.params) == method._sites(hf.params)
        else:
            assert got_method == method
        assert jax.tree.structure(got) == jax.tree.structure(peft)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(peft), strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    want = hf.logits(jpeft.wrap(hf.apply, method)({"params": peft}, **hf.inputs))
    out = hf.logits(jpeft.wrap(hf.apply, got_method)({"params": got}, **hf.inputs))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    base = hf.logits(hf.apply({"params": hf.params}, **hf.inputs))
    assert np.abs(np.asarray(base) - np.asarray(want)).max() > 1e-5  # the adapter changes the output


def test_ia3_keys_follow_peft_layout(tmp_path):
    """GPT-2: ia3_l is (out, 1) on c_attn (output-scaled) and (1, in) on mlp.c_proj (feedforward), from the spec."""
    hf, method, peft = other_case("ia3", "gpt2")
    jpeft.export_hf(str(tmp_path), method, peft)
    st = load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["attn.c_attn", "mlp.c_proj"] and config["feedforward_modules"] == ["mlp.c_proj"]
    h, ffn = _hf_models.HIDDEN, _hf_models.FFN
    assert sorted(st) == [f"base_model.model.transformer.h.{i}.{m}.ia3_l"
                          for i in range(_hf_models.LAYERS) for m in ("attn.c_attn", "mlp.c_proj")]
    layer = peft["transformer"]["h"]["1"]
    out_v = st["base_model.model.transformer.h.1.attn.c_attn.ia3_l"]
    in_v = st["base_model.model.transformer.h.1.mlp.c_proj.ia3_l"]
    assert out_v.shape == (3 * h, 1) and in_v.shape == (1, ffn)
    np.testing.assert_array_equal(out_v[:, 0], layer["attn"]["c_attn"][jpeft.RESERVED]["default"]["ia3_out"])
    np.testing.assert_array_equal(in_v[0], layer["mlp"]["c_proj"][jpeft.RESERVED]["default"]["ia3_in"])


def test_hand_written_prefix_follows_peft_layout(tmp_path):
    """Column (2 l + s) d + j of prompt_embeddings is feature j of layer l's key (s = 0) or value (s = 1)."""
    hf = _hf_models.make("bert")
    h, layers = _hf_models.HIDDEN, _hf_models.LAYERS
    flat = np.random.RandomState(3).standard_normal((P, 2 * layers * h)).astype(np.float32)
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P, "num_layers": layers, "token_dim": h,
              "num_attention_heads": _hf_models.HEADS, "num_transformer_submodules": 1, "task_type": "SEQ_CLS"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": flat}, str(tmp_path / "adapter_model.safetensors"))
    method, tree = jpeft.import_hf(str(tmp_path), hf.params)
    assert method == jpeft.PTuningV2(num_virtual_tokens=P)
    attention = tree["bert"]["encoder"]["layer"]
    for layer in range(layers):
        for s, m in enumerate(("key", "value")):
            got = attention[str(layer)]["attention"]["self"][m][jpeft.RESERVED]["default"]["prefix"]
            np.testing.assert_array_equal(got, flat[:, (2 * layer + s) * h : (2 * layer + s + 1) * h])


def test_prompt_config_fields(tmp_path):
    hf, method, peft = other_case("prefix", "gpt2")
    jpeft.export_hf(str(tmp_path), method, peft, task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    h, layers = _hf_models.HIDDEN, _hf_models.LAYERS
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["num_layers"], config["token_dim"]) == (P, layers, h)
    assert config["prefix_projection"] is False and config["num_transformer_submodules"] == 1
    st = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(st) == ["prompt_embeddings"] and st["prompt_embeddings"].shape == (P, 2 * layers * h)
    hf, method, peft = other_case("ptuning", "gpt2")
    jpeft.export_hf(str(tmp_path), method, peft)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["token_dim"] == h  # the encoder's cached output
    prompt = method.prompt(peft["transformer"]["wte"][jpeft.RESERVED]["default"])
    np.testing.assert_array_equal(load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"], prompt)


def test_ia3_prompt_export_errors(tmp_path):
    hf, ia3, peft = other_case("ia3", "gpt2")
    with pytest.raises(jpeft.JpeftError, match=r"IA3\(extra_trainable='lm_head/.\*'\) has base leaves that train"):
        jpeft.export_hf(str(tmp_path), jpeft.IA3(extra_trainable="lm_head/.*"), peft)
    emb = jpeft.IA3(targets=("wte",))
    with pytest.raises(jpeft.JpeftError, match=r"IA3 target 'transformer/wte' is an embedding; HF PEFT's IA3 has"):
        jpeft.export_hf(str(tmp_path), emb, jpeft.apply(emb, hf.params, key=jax.random.key(0)))
    _, prompt, peft = other_case("prompt", "gpt2")
    with pytest.raises(jpeft.JpeftError, match=r"PromptTuning\(extra_trainable='lm_head/.\*'\) has base leaves"):
        jpeft.export_hf(str(tmp_path), jpeft.PromptTuning(num_virtual_tokens=P, extra_trainable="lm_head/.*"), peft)
    _, prefix, peft = other_case("prefix", "llama")
    with pytest.raises(jpeft.JpeftError, match=r"PrefixTuning on the rotary \(RoPE\) profile 'llama'; HF PEFT's prefixes"):
        jpeft.export_hf(str(tmp_path), prefix, peft)
    _, prompt, peft = other_case("prompt", "bart")
    with pytest.raises(jpeft.JpeftError, match=r"PromptTuning on the encoder-decoder profile 'bart'; the export"):
        jpeft.export_hf(str(tmp_path), prompt, peft)
    # a model whose key and value prefixes differ in width has no HF PEFT layout
    uneven = {"wte": {"embedding": jnp.ones((7, 4))},
              "h": {"0": {"k": {"kernel": jnp.ones((4, 4))}, "v": {"kernel": jnp.ones((4, 6))}}}}
    profile = profiles.Profile(name="mine", detect="h/0/k/kernel", embedding="wte", query="h/\\d+/k", key="h/\\d+/k",
                               value="h/\\d+/v", attn_out="h/\\d+/v", ffn_in="h/\\d+/v", ffn_out="h/\\d+/v",
                               layer_pattern="h/(\\d+)")
    v2 = jpeft.PTuningV2(num_virtual_tokens=P, profile=profile)
    with pytest.raises(jpeft.JpeftError, match=r"per layer, one key and one value prefix of the same width.*"
                                               r"\('h/0/k', 'prefix', \(4,\)\), \('h/0/v', 'prefix', \(6,\)\)"):
        jpeft.export_hf(str(tmp_path), v2, jpeft.apply(v2, uneven, key=jax.random.key(0)))
    assert not os.path.exists(tmp_path / "adapter_config.json")  # nothing half-written


def written(tmp_path, config, tensors):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return str(tmp_path)


H, L = _hf_models.HIDDEN, _hf_models.LAYERS
IA3_KEY = "base_model.model.transformer.h.0.attn.c_attn.ia3_l"
IA3_OK = {"peft_type": "IA3", "target_modules": ["c_attn"], "feedforward_modules": []}
PREFIX_OK = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P, "num_layers": L, "token_dim": H}


@pytest.mark.parametrize(
    "config, tensors, message",
    [
        (IA3_OK, {IA3_KEY: np.ones((3 * H, 1), np.float32), "x.lora_A.weight": np.ones((1, 1), np.float32)},
         r"has key 'x.lora_A.weight', which is not an IA3 key 'base_model.model.<module>.ia3_l'"),
        (IA3_OK, {"base_model.model.transformer.h.9.attn.c_attn.ia3_l": np.ones((1, 1), np.float32)},
         r"is for another model: .* names module 'transformer.h.9.attn.c_attn', which params lacks"),
        (IA3_OK, {}, r"holds no IA3 vectors"),
        (IA3_OK, {IA3_KEY: np.ones((1, 3 * H), np.float32)},
         rf"{IA3_KEY}' has shape \(1, {3 * H}\) float32, but .*c_attn/kernel \({3 * H}, {H}\) .* scaled on its output "
         rf"needs \({3 * H}, 1\)"),
        ({**IA3_OK, "target_modules": ["mlp.c_proj"]}, {IA3_KEY.replace("attn.c_attn", "mlp.c_proj"): np.ones((H, 1))},
         r"has no feedforward_modules among its targets, but jpeft.IA3\(feedforward=None\) scales the profile's FFN"),
        ({**IA3_OK, "feedforward_modules": 3}, {IA3_KEY: np.ones((3 * H, 1), np.float32)},
         r"adapter_config.json' has feedforward_modules=3 \(int\); expected a regex str or a list of module names"),
        ({**IA3_OK, "modules_to_save": ["lm_head"]}, {IA3_KEY: np.ones((3 * H, 1), np.float32)},
         r"modules_to_save=\['lm_head'\]; the IA3 import reads ia3_l vectors only"),
        (PREFIX_OK, {"prompt_embeddings": np.ones((P, 2 * L * H + 1), np.float32)},
         rf"'prompt_embeddings' in .* has shape \({P}, {2 * L * H + 1}\) float32, but PREFIX_TUNING with "
         rf"num_virtual_tokens={P} on this model needs \({P}, {2 * L * H}\) \(P, num_layers \* 2 \* token_dim\) with "
         rf"{L} layers of width {H}"),
        ({**PREFIX_OK, "num_layers": L + 1}, {"prompt_embeddings": np.ones((P, 2 * (L + 1) * H), np.float32)},
         rf"has num_layers={L + 1}, but params has {L} attention layers \('transformer/h/0/attn/c_attn' \.\.\.\)"),
        ({**PREFIX_OK, "peft_type": "PROMPT_TUNING"}, {"prompt_embeddings": np.ones((P + 1, H), np.float32)},
         rf"has shape \({P + 1}, {H}\) float32, but PROMPT_TUNING with num_virtual_tokens={P} on this model needs "
         rf"\({P}, {H}\)\."),
        ({**PREFIX_OK, "peft_type": "P_TUNING"}, {"prompt_embeddings": np.ones((P, H)), "other": np.ones(1)},
         r"holds \['other', 'prompt_embeddings'\]; a P_TUNING adapter holds exactly one tensor, 'prompt_embeddings'"),
        ({**PREFIX_OK, "num_virtual_tokens": 0}, {"prompt_embeddings": np.ones((P, H))},
         r"has num_virtual_tokens=0, expected a positive int"),
        ({**PREFIX_OK, "num_transformer_submodules": 2}, {"prompt_embeddings": np.ones((P, H))},
         r"has num_transformer_submodules=2, an encoder-decoder adapter"),
    ],
    ids=["ia3-key", "ia3-module", "ia3-empty", "ia3-shape", "ia3-feedforward", "ia3-ff-type", "ia3-to-save",
         "prefix-shape", "prefix-layers", "prompt-shape", "prompt-keys", "prompt-p", "prompt-seq2seq"],
)
def test_ia3_prompt_import_errors(tmp_path, config, tensors, message):
    hf = _hf_models.make("gpt2")
    with pytest.raises(jpeft.JpeftError, match=message):
        jpeft.import_hf(written(tmp_path, config, tensors), hf.params)


@pytest.mark.parametrize("kind", ["ia3", "prompt", "ptuningv2"])
def test_ia3_prompt_import_name_taken(tmp_path, kind):
    hf, method, peft = other_case(kind, "gpt2")
    jpeft.export_hf(str(tmp_path), method, peft)
    with pytest.raises(jpeft.JpeftError, match=r"adapter 'default' already exists at 'transformer/"):
        jpeft.import_hf(str(tmp_path), peft)
    _, got = jpeft.import_hf(str(tmp_path), peft, name="second")  # another name is fine
    stores = [node[jpeft.RESERVED] for _, node in _walk(got) if jpeft.RESERVED in node]
    assert stores and all(sorted(store) == ["default", "second"] for store in stores)


def _walk(tree, path=()):
    yield path, tree
    for k, v in tree.items():
        if isinstance(v, dict) and k != jpeft.RESERVED:
            yield from _walk(v, path + (k,))


def test_qlora_exports_its_targets_not_the_modules_it_only_quantised(tmp_path, key):
    # QLoRA selects every quantised module; the untargeted ones hold empty adapter nodes, on which
    # export_hf raised a bare KeyError. They are not HF PEFT targets: neither tensors nor target_modules.
    rng = np.random.RandomState(0)
    params = {m: {"kernel": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)} for m in ("q", "o")}
    method = jpeft.QLoRA(targets=r"q", rank=2)
    peft = jpeft.apply(method, jpeft.quantize(params, method.quant, targets=("q", "o")), key=key)
    jpeft.export_hf(str(tmp_path), method, peft)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == ["base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"]
    a = peft["q"][jpeft.RESERVED]["default"]["lora_a"]
    np.testing.assert_array_equal(tensors["base_model.model.q.lora_A.weight"], np.asarray(a).T)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q"]
