"""The HF PEFT oracle: adapters made by PyTorch + HF PEFT import into jpeft, and jpeft's exports load in
HF PEFT, with the same logits (1e-4) on tiny GPT-2, BERT and Llama with identical weights.

Needs the ``interop`` extra (torch CPU, peft); ``.ci/run`` installs it when the local torch wheel
exists, and these tests skip without it.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402

import jpeft  # noqa: E402

SMALL = dict(vocab_size=97, max_position_embeddings=32)
FAMILIES = {
    "gpt2": (
        lambda: transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4),
        transformers.GPT2LMHeadModel,
        ["c_attn", "c_proj", "c_fc"],
    ),
    "bert": (
        lambda: transformers.BertConfig(
            **SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        ),
        transformers.BertModel,
        ["query", "value", "dense"],
    ),
    "llama": (
        lambda: transformers.LlamaConfig(
            **SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64,
        ),
        transformers.LlamaForCausalLM,
        ["q_proj", "v_proj", "down_proj"],
    ),
}
IDS = np.array([[5, 17, 3, 42, 8, 61, 2, 33], [9, 1, 77, 4, 25, 13, 50, 7]])


def torch_model(family: str, directory) -> torch.nn.Module:
    make_config, cls, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(make_config()).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def torch_out(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(IDS), attention_mask=torch.ones(IDS.shape, dtype=torch.long))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def run_flax(flax_model, method, params) -> np.ndarray:
    """The HF Flax model's own __call__ (it builds positions and masks), with or without the adapter."""

    def apply_fn(variables, ids):
        out = flax_model(ids, attention_mask=jnp.ones_like(ids), params=variables["params"])
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    fn = apply_fn if method is None else jpeft.wrap(apply_fn, method)
    with jax.numpy_rank_promotion("allow"):  # HF's Flax GPT-2/Llama broadcast biases implicitly
        return np.asarray(fn({"params": params}, jnp.asarray(IDS)))


def peft_model(family: str, base: torch.nn.Module, **extra) -> torch.nn.Module:
    targets = FAMILIES[family][2]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=family == "gpt2", **extra
    )
    torch.manual_seed(1)
    return peft.get_peft_model(base, config).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_hf_peft_adapter_imports_into_jpeft(family, variant, tmp_path):
    base = torch_model(family, tmp_path / "base")
    extra = {"use_rslora": variant == "rslora", "use_dora": variant == "dora"}
    model = peft_model(family, base, **extra)
    want = torch_out(model)
    model.save_pretrained(tmp_path / "adapter")
    flax_model, params = jpeft.models.load_hf_safetensors(str(tmp_path / "base"))
    method, tree = jpeft.import_hf(str(tmp_path / "adapter"), params)
    assert method.use_rslora == (variant == "rslora") and method.use_dora == (variant == "dora")
    got = run_flax(flax_model, method, tree)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    base_out = run_flax(flax_model, None, params)
    assert np.abs(base_out - want).max() > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("family", list(FAMILIES))
def test_jpeft_export_loads_in_hf_peft(family, tmp_path):
    base = torch_model(family, tmp_path / "base")
    flax_model, params = jpeft.models.load_hf_safetensors(str(tmp_path / "base"))
    method = jpeft.LoRA(targets=tuple(FAMILIES[family][2]), rank=4, alpha=8.0)
    tree = jpeft.apply(method, params, key=jax.random.key(0))
    rng = np.random.RandomState(2)
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype)
        if any(getattr(k, "key", None) == jpeft.RESERVED for k in p)
        else x,
        tree,
    )
    want = run_flax(flax_model, method, tree)
    jpeft.export_hf(str(tmp_path / "adapter"), method, tree)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(torch_out(loaded), want, rtol=1e-4, atol=1e-4)


# --- IA3, prompt tuning, prefix tuning --------------------------------------------------------------------------------
# HF PEFT's IA3 targets per family: (target_modules, feedforward_modules); a regex for BERT, whose FFN output
# ``layer.N.output.dense`` and attention output ``attention.output.dense`` share their last two names.
IA3_TARGETS = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (r".*\.(key|value|\d+\.output\.dense)", r".*\.\d+\.output\.dense"),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}
TASK = {"gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION", "llama": "CAUSAL_LM"}
P = 3


def randomize_deltas(tree, seed, loc=0.0):
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(loc + rng.normal(0, 0.5, x.shape), x.dtype)
        if any(getattr(k, "key", None) == jpeft.RESERVED for k in p)
        else x,
        tree,
    )


def prompt_config(kind: str, family: str):
    common = dict(task_type=TASK[family], num_virtual_tokens=P)
    if kind == "ia3":
        targets, feedforward = IA3_TARGETS[family]
        return peft.IA3Config(
            target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=family == "gpt2",
            init_ia3_weights=False,
        )
    return peft.PromptTuningConfig(**common) if kind == "prompt" else peft.PrefixTuningConfig(**common)


def caller_positions(kind: str, logits: np.ndarray) -> np.ndarray:
    """HF PEFT's prompt tuning returns the virtual positions too; prefix tuning and IA3 do not."""
    return logits[:, P:] if kind == "prompt" else logits


ORACLE = [("ia3", f) for f in FAMILIES] + [("prompt", f) for f in FAMILIES] + [("prefix", "gpt2"), ("prefix", "bert")]


@pytest.mark.parametrize(("kind", "family"), ORACLE)
def test_hf_peft_ia3_prompt_prefix_import_into_jpeft(kind, family, tmp_path):
    base = torch_model(family, tmp_path / "base")
    torch.manual_seed(1)  # IA3 vectors ~ N(0, 1) with init_ia3_weights=False; prompts and prefixes ~ N(0, 1)
    model = peft.get_peft_model(base, prompt_config(kind, family)).eval()
    want = caller_positions(kind, torch_out(model))
    model.save_pretrained(tmp_path / "adapter")
    flax_model, params = jpeft.models.load_hf_safetensors(str(tmp_path / "base"))
    method, tree = jpeft.import_hf(str(tmp_path / "adapter"), params)
    assert type(method) is {"ia3": jpeft.IA3, "prompt": jpeft.PromptTuning, "prefix": jpeft.PTuningV2}[kind]
    got = run_flax(flax_model, method, tree)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(run_flax(flax_model, None, params) - want).max() > 1e-3  # the adapter changes the output


def jpeft_method(kind: str, family: str):
    if kind == "ia3":
        return jpeft.IA3()  # the profile's key, value and FFN output projections
    if kind == "prompt":
        return jpeft.PromptTuning(num_virtual_tokens=P)
    return jpeft.PrefixTuning(num_virtual_tokens=P, projection_hidden_size=8)  # exported with its MLP folded


@pytest.mark.parametrize(("kind", "family"), ORACLE)
def test_jpeft_ia3_prompt_prefix_export_loads_in_hf_peft(kind, family, tmp_path):
    base = torch_model(family, tmp_path / "base")
    flax_model, params = jpeft.models.load_hf_safetensors(str(tmp_path / "base"))
    method = jpeft_method(kind, family)
    tree = randomize_deltas(jpeft.apply(method, params, key=jax.random.key(0)), seed=2, loc=1.0 if kind == "ia3" else 0.0)
    want = run_flax(flax_model, method, tree)
    jpeft.export_hf(str(tmp_path / "adapter"), method, tree, task_type=None if kind == "ia3" else TASK[family])
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(caller_positions(kind, torch_out(loaded)), want, rtol=1e-4, atol=1e-4)
