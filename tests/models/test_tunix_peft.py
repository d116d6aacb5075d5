"""HF PEFT DoRA, (IA)^3 and prompt tuning on tunix's Qwen 3 and Llama 3, against torch + peft.

For each method, an adapter with random non-zero parameters made by ``peft`` on the torch twin and
saved by ``save_pretrained`` imports with ``jpeft.import_hf`` and gives torch's logits, and jpeft's
``export_hf`` output loads in ``peft.PeftModel.from_pretrained`` and gives them again. Prefix tuning
and the LoRA options jpeft lacks are refused. One build per family (Qwen 3 untied, Llama 3 tied).
"""

import copy
import json

import numpy as np
import pytest

pytest.importorskip("tunix")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402

import jpeft  # noqa: E402
from tests.models.test_tunix import PROJ, _build, _logits, _torch_logits  # noqa: E402

P = 3  # virtual tokens
FAMILIES = {"qwen3": False, "llama3": True}  # family: tied embeddings


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def built(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    print(f"building {family}")
    tm, model = _build(family, FAMILIES[family], tmp)
    return family, tm, model, tmp


def _randomize(pm, seed=1):
    """Random non-zero adapter parameters: LoRA factors and prompts N(0, 0.3^2); DoRA magnitudes and
    IA3 vectors multiplied by 1 + N(0, 0.3^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "magnitude" in n or "ia3_l" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "lora_" in n or "prompt_encoder" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


CONFIGS = {
    "dora": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=PROJ, use_dora=True),
    "ia3": lambda: peft.IA3Config(),  # HF's defaults: llama k, v, down (ff); qwen3 q, v, down (ff)
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_import_export_equals_torch(kind, built):
    family, tm, model, tmp = built
    base = _torch_logits(tm)
    pm = peft.get_peft_model(copy.deepcopy(tm), CONFIGS[kind]()).eval()
    _randomize(pm)
    want = _torch_logits(pm)[:, P:] if kind == "prompt" else _torch_logits(pm)  # peft returns the virtual ones too
    assert np.abs(want - base).max() > 1e-2  # the adapter changes the logits
    pm.save_pretrained(tmp / kind)

    method, ours = jpeft.import_hf(str(tmp / kind), model)
    if kind == "dora":
        assert (type(method), method.rank, method.alpha, method.use_dora) == (jpeft.LoRA, 2, 4, True)
        store = ours.layers[0].attn.k_proj.__jpeft__["default"]
        assert tuple(store["magnitude"].shape) == (2, 8)  # (K, H): torch's (K·H,) per output row
    elif kind == "ia3":
        assert type(method) is jpeft.IA3 and method.feedforward == ("down_proj",)
        assert tuple(ours.layers[0].attn.v_proj.__jpeft__["default"]["ia3_out"].shape) == (2, 8)
        assert tuple(ours.layers[1].mlp.down_proj.__jpeft__["default"]["ia3_in"].shape) == (48,)
    else:
        assert type(method) is jpeft.PromptTuning and method.num_virtual_tokens == P
        assert tuple(ours.embedder.__jpeft__["default"]["prompt"].shape) == (P, 32)
    got = _logits(ours)
    print(f"{family} {kind} import max |jpeft - torch| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(_logits(model), base, atol=1e-4)  # the base model is unchanged

    jpeft.export_hf(str(tmp / f"{kind}_export"), method, ours, task_type="CAUSAL_LM")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(tmp / f"{kind}_export")).eval()
    again = _torch_logits(back)[:, P:] if kind == "prompt" else _torch_logits(back)
    print(f"{family} {kind} export max |torch(jpeft's file) - torch| = {np.abs(again - want).max():.2e}")
    np.testing.assert_allclose(again, want, atol=1e-4)


def test_prefix_tuning_refused(built):
    family, tm, model, tmp = built
    pm = peft.get_peft_model(copy.deepcopy(tm), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    pm.save_pretrained(tmp / "prefix")
    with pytest.raises(jpeft.JpeftError, match=r"PrefixTuning on the rotary \(RoPE\) profile 'tunix'.*after RoPE"):
        jpeft.import_hf(str(tmp / "prefix"), model)
    method = jpeft.PrefixTuning(num_virtual_tokens=P, prefix_projection=False)
    with pytest.raises(jpeft.JpeftError, match=r"PrefixTuning on the rotary \(RoPE\) profile 'tunix'"):
        jpeft.export_hf(str(tmp / "prefix_export"), method, jpeft.apply(method, model, key=jax.random.key(0)))


@pytest.mark.parametrize("built", ["qwen3"], indirect=True)  # one family; Qwen 3's is untied (it has lm_head)
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rank_pattern", {"q_proj": 4}, "rank_pattern"),
        ("alpha_pattern", {"q_proj": 8}, "alpha_pattern"),
        ("modules_to_save", ["lm_head"], "modules_to_save.*writes no base weights"),
    ],
)
def test_lora_options_refused(field, value, match, built, tmp_path):
    family, tm, model, tmp = built
    pm = peft.get_peft_model(copy.deepcopy(tm), peft.LoraConfig(r=2, target_modules=["q_proj"], **{field: value}))
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())[field]
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.import_hf(str(tmp_path), model)


@pytest.mark.parametrize("built", ["qwen3"], indirect=True)
def test_export_refusals(built, tmp_path):
    family, tm, model, tmp = built
    method = jpeft.LoRA(targets=("q_proj",), rank=2, extra_trainable=r"lm_head/.*")
    with pytest.raises(jpeft.JpeftError, match="modules_to_save, not written on NNX"):
        jpeft.export_hf(str(tmp_path), method, jpeft.apply(method, model, key=jax.random.key(0)))
    ada = jpeft.AdaLoRA(targets=("q_proj",), init_r=2, target_r=1, total_step=10)
    with pytest.raises(jpeft.JpeftError, match="export_hf writes jpeft.LoRA"):
        jpeft.export_hf(str(tmp_path), ada, jpeft.apply(ada, model, key=jax.random.key(0)))


def _doctored(src, dst, config=None, rename=None):
    """A copy of the HF PEFT files in ``src`` with config fields replaced and keys renamed."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({(rename or {}).get(k, k): v for k, v in tensors.items()}, str(dst / "adapter_model.safetensors"))
    saved = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**saved, **(config or {})}))


@pytest.mark.parametrize("built", ["qwen3"], indirect=True)
def test_import_errors(built, tmp_path):
    family, tm, model, tmp = built
    dora = jpeft.DoRA(targets=("q_proj",), rank=2)
    jpeft.export_hf(str(tmp_path / "dora"), dora, jpeft.apply(dora, model, key=jax.random.key(0)))
    _doctored(tmp_path / "dora", tmp_path / "no_dora", {"use_dora": False})
    with pytest.raises(
        jpeft.JpeftError, match=r"with use_dora=False every target needs exactly \['lora_a', 'lora_b'\]"
    ):
        jpeft.import_hf(str(tmp_path / "no_dora"), model)
    _doctored(tmp_path / "dora", tmp_path / "rank", {"r": 4})
    with pytest.raises(jpeft.JpeftError, match=r"has shape \(2, 32\), but layers/0/attn/q_proj's lora_a"):
        jpeft.import_hf(str(tmp_path / "rank"), model)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _doctored(tmp_path / "dora", tmp_path / "other", rename={key: key.replace("layers.0", "layers.7")})
    with pytest.raises(jpeft.JpeftError, match=r"maps to 'layers/7/attn/q_proj'.*the model has no such module"):
        jpeft.import_hf(str(tmp_path / "other"), model)

    ia3 = jpeft.IA3()
    jpeft.export_hf(str(tmp_path / "ia3"), ia3, jpeft.apply(ia3, model, key=jax.random.key(0)))
    _doctored(tmp_path / "ia3", tmp_path / "no_ff", {"feedforward_modules": []})
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.IA3\(feedforward=None\) scales the profile's FFN output"):
        jpeft.import_hf(str(tmp_path / "no_ff"), model)
