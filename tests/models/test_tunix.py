"""tunix's Qwen 3 and Llama 3 against torch transformers and HF PEFT (LoRA on all seven projections).

Tiny random configs saved by torch ``save_pretrained`` and loaded with tunix's safetensors loader.
tunix ignores ``rope_theta`` (always 1e6), so the configs use 1e6. Skips without tunix or torch.
"""

import numpy as np
import pytest

pytest.importorskip("tunix")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jpeft  # noqa: E402
from jpeft import _nnx, profiles  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = np.array([[1, 5, 9, 3, 7, 2, 11, 4]])
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
SIZES.update(num_key_value_heads=2, head_dim=8, rope_theta=1e6, max_position_embeddings=64)


def _build(family, tied, tmp_path):
    torch.manual_seed(0)
    if family == "qwen3":
        from tunix.models.qwen3 import model as lib
        from tunix.models.qwen3 import params

        hf = transformers.Qwen3Config(**SIZES, tie_word_embeddings=tied)
        tm = transformers.Qwen3ForCausalLM(hf).eval()
        extra = dict(use_tied_embedding=tied)
    else:
        from tunix.models.llama3 import model as lib
        from tunix.models.llama3 import params

        hf = transformers.LlamaConfig(**SIZES, tie_word_embeddings=tied)
        tm = transformers.LlamaForCausalLM(hf).eval()
        extra = dict(weight_tying=tied)
    tm.save_pretrained(tmp_path / "base")
    cfg = lib.ModelConfig(
        num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8, num_kv_heads=2,
        rope_theta=1_000_000, norm_eps=hf.rms_norm_eps, **extra,
    )  # fmt: skip
    return tm, params.create_model_from_safe_tensors(str(tmp_path / "base"), cfg, mesh=None)


def _logits(model):
    L = TOKENS.shape[1]
    mask = jnp.asarray(np.tril(np.ones((L, L), bool))[None])
    with jax.numpy_rank_promotion("allow"):  # tunix's RMSNorm broadcasts (D,) against (B, T, D)
        out, _ = model(jnp.asarray(TOKENS), jnp.arange(L)[None], None, mask)
    return np.asarray(out)


def _torch_logits(tm):
    with torch.no_grad():
        return tm(torch.tensor(TOKENS)).logits.numpy()


CASES = [("qwen3", False), ("qwen3", True), ("llama3", False), ("llama3", True)]


@pytest.mark.parametrize("family,tied", CASES)
def test_base_logits_and_profile(family, tied, tmp_path):
    tm, model = _build(family, tied, tmp_path)
    np.testing.assert_allclose(_logits(model), _torch_logits(tm), atol=1e-4)
    assert profiles.detect(_nnx.tree(model)) is profiles.TUNIX
    profiles.check(profiles.TUNIX, _nnx.tree(model))


@pytest.mark.parametrize("family,tied", CASES)
def test_hf_peft_lora_import_export(family, tied, tmp_path):
    tm, model = _build(family, tied, tmp_path)
    base = _torch_logits(tm)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=PROJ, use_rslora=family == "llama3")
    pm = peft.get_peft_model(tm, config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    want = _torch_logits(pm)
    assert np.abs(want - base).max() > 1e-2  # the adapter changes the logits
    pm.save_pretrained(tmp_path / "adapter")

    method, ours = jpeft.import_hf(str(tmp_path / "adapter"), model)
    assert (method.rank, method.alpha, method.use_rslora) == (2, 4, family == "llama3")
    assert tuple(ours.layers[0].attn.q_proj.__jpeft__["default"]["lora_b"].shape) == (2, 4, 8)
    assert tuple(ours.layers[0].attn.o_proj.__jpeft__["default"]["lora_a"].shape) == (4, 8, 2)
    np.testing.assert_allclose(_logits(ours), want, atol=1e-4)
    np.testing.assert_allclose(_logits(model), base, atol=1e-4)  # the base model is unchanged

    jpeft.export_hf(str(tmp_path / "export"), method, ours)
    back = peft.PeftModel.from_pretrained(_build(family, tied, tmp_path)[0], str(tmp_path / "export")).eval()
    np.testing.assert_allclose(_torch_logits(back), want, atol=1e-4)


def test_jpeft_lora_equals_merged_torch_weights(tmp_path):
    tm, model = _build("qwen3", False, tmp_path)
    method = jpeft.LoRA(targets=tuple(PROJ), rank=2, alpha=4)
    ours = jpeft.apply(method, model, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    sd = tm.state_dict()
    for path, module in _nnx.modules(ours).items():
        store = vars(module).get("__jpeft__")
        if store is None:
            continue
        a, b = (rng.normal(size=store["default"][k].shape).astype(np.float32) * 0.3 for k in ("lora_a", "lora_b"))
        store["default"]["lora_a"][...], store["default"]["lora_b"][...] = a, b
        delta = 2.0 * a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)  # (in, out), alpha / r = 2
        key = "model.layers.{}.{}.{}.weight".format(path[1], "self_attn" if path[2] == "attn" else "mlp", path[3])
        sd[key] = sd[key] + torch.tensor(delta.T)
    tm.load_state_dict(sd)
    np.testing.assert_allclose(_logits(ours), _torch_logits(tm), atol=1e-4)


def test_refusals(tmp_path):
    # DoRA, IA3 and prompt tuning import and export (tests/models/test_tunix_peft.py); bias training does not
    tm, model = _build("llama3", True, tmp_path)
    biased = peft.get_peft_model(tm, peft.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    biased.save_pretrained(tmp_path / "bias")
    with pytest.raises(jpeft.JpeftError, match="bias='lora_only'"):
        jpeft.import_hf(str(tmp_path / "bias"), model)
    method = jpeft.LoRADrop(targets=("q_proj",), rank=2)
    with pytest.raises(jpeft.JpeftError, match="export_hf writes jpeft.LoRA"):
        jpeft.export_hf(str(tmp_path / "out"), method, jpeft.apply(method, model, key=jax.random.key(0)))
