"""tunix's Gemma 3 (text only) against torch transformers and HF PEFT, on tiny random configs.

A torch ``Gemma3ForCausalLM`` saved by ``save_pretrained`` and loaded with tunix's
``gemma3.params_safetensors.create_model_from_safe_tensors``. The configs are chosen where the two
implementations agree: tunix scales queries by ``head_dim ** -0.5`` (so ``query_pre_attn_scalar =
head_dim``), cycles 5 sliding-window layers and 1 global layer (torch's default ``layer_types``; 6
layers exercise both, and a window of 4 under 10 tokens exercises the window), uses rope bases
1e4 (local) and 1e6 (global) as torch's defaults do, fixes the RMSNorm epsilon at 1e-6, has no
logit softcapping and always ties the embeddings; its parameters default to bfloat16, so the
configs ask for float32. The norms get random weights so that tunix's ``(1 + w)`` scale is tested.

jpeft adapts the output projection ``attn_vec_einsum`` and the MLP; tunix's q/kv/qkv einsums are
refused (see ``jpeft.profiles.TUNIX_GEMMA3``). Skips without tunix, torch or peft.
"""

import numpy as np
import pytest

pytest.importorskip("tunix")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jpeft  # noqa: E402
from jpeft import _nnx, profiles  # noqa: E402

OURS = ("attn_vec_einsum", "gate_proj", "up_proj", "down_proj")
THEIRS = ["o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = np.array([[1, 5, 9, 3, 7, 2, 11, 4, 6, 8], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]])
LAYERS, WINDOW = 6, 4


def _build(kv_heads, path):
    from tunix.models.gemma3 import model as lib
    from tunix.models.gemma3 import params_safetensors

    torch.manual_seed(0)
    hf = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
        max_position_embeddings=64,
    )  # fmt: skip
    tm = transformers.Gemma3ForCausalLM(hf).eval()
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn(p.shape) * 0.3)
    tm.save_pretrained(path)
    cfg = lib.ModelConfig(
        num_layers=LAYERS, num_embed=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8, num_kv_heads=kv_heads,
        sliding_window_size=WINDOW, local_base_frequency=10_000, global_base_frequency=1_000_000,
        param_dtype=jnp.float32,
    )  # fmt: skip
    return tm, params_safetensors.create_model_from_safe_tensors(str(path), cfg, mesh=None)


def _call(model, tokens):
    L = tokens.shape[1]
    mask = jnp.asarray(np.broadcast_to(np.tril(np.ones((L, L), bool)), (tokens.shape[0], L, L)))
    return model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(L), tokens.shape), None, mask)[0]


def _logits(model):
    return np.asarray(_call(model, TOKENS))


def _torch_logits(tm):
    with torch.no_grad():
        return tm(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """Grouped-query attention (4 query, 2 key-value heads): tunix's ``q_einsum`` and ``kv_einsum``."""
    path = tmp_path_factory.mktemp("gemma3") / "base"
    tm, model = _build(2, path)
    return tm, model, path


def _state(model):
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_base_logits_and_profile(gqa, tmp_path):
    tm, model, _ = gqa
    np.testing.assert_allclose(_logits(model), _torch_logits(tm), atol=1e-5)
    assert profiles.detect(_nnx.tree(model)) is profiles.TUNIX_GEMMA3
    profiles.check(profiles.TUNIX_GEMMA3, _nnx.tree(model))
    # As many key-value heads as query heads: one fused qkv_einsum; the same profile holds.
    tm, mha = _build(4, tmp_path / "mha")
    assert "qkv_einsum" in vars(mha.layers[0].attn)
    np.testing.assert_allclose(_logits(mha), _torch_logits(tm), atol=1e-5)
    assert profiles.detect(_nnx.tree(mha)) is profiles.TUNIX_GEMMA3
    profiles.check(profiles.TUNIX_GEMMA3, _nnx.tree(mha))


def test_lora_equals_merged_torch_weights(gqa):
    tm, model, path = gqa
    ours = jpeft.apply(
        jpeft.LoRA(targets=profiles.TUNIX_GEMMA3.lora_default, rank=2, alpha=4), model, key=jax.random.key(0)
    )
    np.testing.assert_array_equal(_logits(ours), _logits(model))  # B = 0: the identity at init
    rng = np.random.default_rng(0)
    merged = transformers.Gemma3ForCausalLM.from_pretrained(path).eval()
    sd = merged.state_dict()
    count = 0
    for p, module in _nnx.modules(ours).items():
        store = vars(module).get("__jpeft__")
        if store is None:
            continue
        a, b = (rng.normal(size=store["default"][k].shape).astype(np.float32) * 0.3 for k in ("lora_a", "lora_b"))
        store["default"]["lora_a"][...], store["default"]["lora_b"][...] = a, b
        delta = 2.0 * a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)  # (in, out), alpha / r = 2
        name = "self_attn.o_proj" if p[3] == "attn_vec_einsum" else f"mlp.{p[3]}"
        key = f"model.layers.{p[1]}.{name}.weight"
        sd[key] = sd[key] + torch.tensor(delta.T)
        count += 1
    assert count == 4 * LAYERS
    merged.load_state_dict(sd)
    want = _torch_logits(merged)
    assert np.abs(want - _torch_logits(tm)).max() > 1e-2
    np.testing.assert_allclose(_logits(ours), want, atol=1e-4)


def test_lora_trains_deltas_only(gqa):
    _, model, _ = gqa
    method = jpeft.LoRA(targets=OURS, rank=2, alpha=4)
    ours = jpeft.apply(method, model, key=jax.random.key(0))
    tokens = jnp.asarray(TOKENS)
    before = _state(ours)
    opt = nnx.Optimizer(ours, jpeft.optimizer(optax.adam(3e-2), method, ours), wrt=jpeft.trainable(method, ours))

    def loss_fn(m):
        logits = _call(m, tokens)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jpeft.Delta))(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(ours, opt)) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1, losses
    after = _state(ours)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed and all("__jpeft__" in p for p in changed), sorted(changed)[:5]
    assert {p.split("/")[3] for p in changed} == set(OURS)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_hf_peft_lora_import_export(gqa, tmp_path, rslora):
    tm, model, path = gqa
    base = _torch_logits(tm)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=THEIRS, use_rslora=rslora)
    pm = peft.get_peft_model(transformers.Gemma3ForCausalLM.from_pretrained(path).eval(), config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    want = _torch_logits(pm)
    assert np.abs(want - base).max() > 1e-2  # the adapter changes the logits
    pm.save_pretrained(tmp_path / "adapter")

    method, ours = jpeft.import_hf(str(tmp_path / "adapter"), model)
    assert (method.rank, method.alpha, method.use_rslora) == (2, 4, rslora)
    assert tuple(ours.layers[0].attn.attn_vec_einsum.__jpeft__["default"]["lora_a"].shape) == (4, 8, 2)
    np.testing.assert_allclose(_logits(ours), want, atol=1e-4)
    np.testing.assert_allclose(_logits(model), base, atol=1e-5)  # the base model is unchanged

    jpeft.export_hf(str(tmp_path / "export"), method, ours)
    back = peft.PeftModel.from_pretrained(
        transformers.Gemma3ForCausalLM.from_pretrained(path), str(tmp_path / "export")
    )
    np.testing.assert_allclose(_torch_logits(back.eval()), want, atol=1e-4)


def test_refusals(gqa, tmp_path):
    tm, model, path = gqa
    for target in ("q_einsum", "kv_einsum"):
        with pytest.raises(jpeft.JpeftError, match=f"{target}.*not a linear map jpeft can factor"):
            jpeft.apply(jpeft.LoRA(targets=(target,), rank=2), model, key=jax.random.key(0))
    pm = peft.get_peft_model(
        transformers.Gemma3ForCausalLM.from_pretrained(path), peft.LoraConfig(r=2, target_modules=["k_proj"])
    )
    pm.save_pretrained(tmp_path / "k")
    with pytest.raises(jpeft.JpeftError, match="k_proj.*tunix_gemma3"):
        jpeft.import_hf(str(tmp_path / "k"), model)
