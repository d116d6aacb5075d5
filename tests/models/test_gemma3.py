"""tunix's Gemma 3 (text only) against torch transformers and HF PEFT, on tiny random configs.

A torch ``Gemma3ForCausalLM`` saved by ``save_pretrained`` and loaded with tunix's
``gemma3.params_safetensors.create_model_from_safe_tensors``. The configs are chosen where the two
implementations agree: tunix scales queries by ``head_dim ** -0.5`` (so ``query_pre_attn_scalar =
head_dim``), cycles 5 sliding-window layers and 1 global layer (torch's default ``layer_types``; 6
layers exercise both, and a window of 4 under 10 tokens exercises the window), uses rope bases
1e4 (local) and 1e6 (global) as torch's defaults do, fixes the RMSNorm epsilon at 1e-6, has no
logit softcapping and always ties the embeddings; its parameters default to bfloat16, so the
configs ask for float32. The norms get random weights so that tunix's ``(1 + w)`` scale is tested.

jpeft adapts every projection: tunix's ``q_einsum`` ``(N, D, H)``, the stacked ``kv_einsum``
``(2, K, D, H)`` (grouped-query attention) or ``qkv_einsum`` ``(3, N, D, H)`` (as many key-value heads
as query heads), ``attn_vec_einsum`` and the MLP (see ``jpeft.profiles.TUNIX_GEMMA3``). The oracles
are torch models with merged weights ``W + s A B`` written by hand, and peft's own adapters. Skips
without tunix, torch or peft.
"""

import dataclasses

import numpy as np
import pytest
import safetensors.numpy

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

OURS = ("q_einsum", "kv_einsum", "qkv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj")
THEIRS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STACKED = {"q_einsum": ("q_proj",), "kv_einsum": ("k_proj", "v_proj"), "qkv_einsum": ("q_proj", "k_proj", "v_proj")}
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


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    """As many key-value heads as query heads: tunix's fused ``qkv_einsum``."""
    path = tmp_path_factory.mktemp("gemma3") / "mha"
    tm, model = _build(4, path)
    return tm, model, path


def _torch_weights(p, delta):
    """``{torch weight name: update (out, in)}`` for a jpeft module path and its update laid out
    ``(*in, *out)`` (the einsum's contracted axes, then its other axes in the weight's order)."""
    i, name = p[1], p[3]
    if name in STACKED:  # (D, [parts,] N or K, H)
        parts = STACKED[name]
        d = delta.reshape(delta.shape[0], *(() if len(parts) == 1 else (len(parts),)), -1)
        slices = [d] if len(parts) == 1 else [d[:, j] for j in range(len(parts))]
        return {f"model.layers.{i}.self_attn.{t}.weight": u.T for t, u in zip(parts, slices, strict=True)}
    torch_name = "self_attn.o_proj" if name == "attn_vec_einsum" else f"mlp.{name}"
    return {f"model.layers.{i}.{torch_name}.weight": delta.reshape(-1, delta.shape[-1]).T}


def _state(model):
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_base_logits_and_profile(gqa, mha):
    tm, model, _ = gqa
    np.testing.assert_allclose(_logits(model), _torch_logits(tm), atol=1e-5)
    assert profiles.detect(_nnx.tree(model)) is profiles.TUNIX_GEMMA3
    profiles.check(profiles.TUNIX_GEMMA3, _nnx.tree(model))
    # As many key-value heads as query heads: one fused qkv_einsum; the same profile holds.
    tm, model, _ = mha
    assert "qkv_einsum" in vars(model.layers[0].attn)
    np.testing.assert_allclose(_logits(model), _torch_logits(tm), atol=1e-5)
    assert profiles.detect(_nnx.tree(model)) is profiles.TUNIX_GEMMA3
    with pytest.raises(profiles.ProfileError, match="lora_default.*q_einsum"):  # it names GQA's einsums
        profiles.check(profiles.TUNIX_GEMMA3, _nnx.tree(model))
    profiles.check(dataclasses.replace(profiles.TUNIX_GEMMA3, lora_default=("qkv_einsum",)), _nnx.tree(model))


def _randomize(model, seed):
    """Random LoRA factors on every adapted module; returns ``{path: (a, b)}``."""
    rng = np.random.default_rng(seed)
    out = {}
    for p, module in _nnx.modules(model).items():
        store = vars(module).get("__jpeft__")
        if store is not None:
            for k in ("lora_a", "lora_b"):
                store["default"][k][...] = rng.normal(size=store["default"][k].shape).astype(np.float32) * 0.3
            out[p] = tuple(np.asarray(store["default"][k][...]) for k in ("lora_a", "lora_b"))
    return out


@pytest.mark.parametrize("attention", ["gqa", "mha"])
def test_lora_equals_merged_torch_weights(request, attention):
    tm, model, path = request.getfixturevalue(attention)
    ours = jpeft.apply(jpeft.LoRA(targets=OURS, rank=2, alpha=4), model, key=jax.random.key(0))
    np.testing.assert_array_equal(_logits(ours), _logits(model))  # B = 0: the identity at init
    shapes = {
        p[3]: tuple(m.__jpeft__["default"]["lora_b"].shape)
        for p, m in _nnx.modules(ours).items()
        if "__jpeft__" in vars(m)
    }
    if attention == "gqa":
        assert shapes["q_einsum"] == (2, 4, 8) and shapes["kv_einsum"] == (2, 2, 2, 8)
    else:
        assert shapes["qkv_einsum"] == (2, 3, 4, 8)
    merged = transformers.Gemma3ForCausalLM.from_pretrained(path).eval()
    sd = merged.state_dict()
    factors = _randomize(ours, 0)
    for p, (a, b) in factors.items():
        delta = 2.0 * a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)  # (in, out), alpha / r = 2
        for key, u in _torch_weights(p, delta.reshape(a.shape[:-1] + b.shape[1:])).items():
            sd[key] = sd[key] + torch.tensor(u)
    assert len(factors) == (6 if attention == "gqa" else 5) * LAYERS
    merged.load_state_dict(sd)
    want = _torch_logits(merged)
    assert np.abs(want - _torch_logits(tm)).max() > 1e-2
    got = _logits(ours)
    print(f"{attention} LoRA on all projections: max |jpeft - torch merged| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-4)
    # jpeft's merge folds the same update into the weights
    np.testing.assert_allclose(_logits(jpeft.merge(jpeft.LoRA(targets=OURS, rank=2, alpha=4), ours)), want, atol=1e-4)


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
    assert {p.split("/")[3] for p in changed} == set(OURS) - {"qkv_einsum"}


def _peft_adapter(path, out, config, seed=1):
    """A peft adapter with random non-zero LoRA factors (and DoRA magnitudes) saved to ``out``; its logits."""
    pm = peft.get_peft_model(transformers.Gemma3ForCausalLM.from_pretrained(path).eval(), config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.save_pretrained(out)
    return _torch_logits(pm)


@pytest.mark.parametrize(("attention", "kind"), [("gqa", "lora"), ("gqa", "dora"), ("mha", "rslora"), ("mha", "dora")])
def test_hf_peft_lora_import_export(request, tmp_path, attention, kind):
    """peft LoRA on all seven torch projections: k_proj and v_proj (and q_proj) are slices of one
    stacked tunix weight, so the import has rank n r (n = 2 or 3 slices) and alpha n alpha (rsLoRA:
    sqrt(n) alpha); the export writes one torch LoRA per slice and loads back in peft."""
    tm, model, path = request.getfixturevalue(attention)
    base = _torch_logits(tm)
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=THEIRS, use_rslora=kind == "rslora", use_dora=kind == "dora"
    )
    want = _peft_adapter(path, tmp_path / "adapter", config)
    assert np.abs(want - base).max() > 1e-2  # the adapter changes the logits

    method, ours = jpeft.import_hf(str(tmp_path / "adapter"), model)
    n = 2 if attention == "gqa" else 3
    alpha = 4 * (np.sqrt(n) if kind == "rslora" else n)
    assert (method.rank, method.use_rslora, method.use_dora) == (2 * n, kind == "rslora", kind == "dora")
    np.testing.assert_allclose(method.alpha, alpha)
    attn = ours.layers[0].attn
    stacked = attn.kv_einsum if attention == "gqa" else attn.qkv_einsum
    assert tuple(stacked.__jpeft__["default"]["lora_b"].shape) == (2 * n, n, 2 if attention == "gqa" else 4, 8)
    assert tuple(attn.attn_vec_einsum.__jpeft__["default"]["lora_a"].shape) == (4, 8, 2 * n)
    got = _logits(ours)
    print(f"{attention} {kind} import max |jpeft - peft| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(_logits(model), base, atol=1e-5)  # the base model is unchanged

    jpeft.export_hf(str(tmp_path / "export"), method, ours)
    back = peft.PeftModel.from_pretrained(
        transformers.Gemma3ForCausalLM.from_pretrained(path), str(tmp_path / "export")
    )
    again = _torch_logits(back.eval())
    print(f"{attention} {kind} export max |peft(jpeft's file) - peft| = {np.abs(again - want).max():.2e}")
    np.testing.assert_allclose(again, want, atol=1e-4)


def test_hf_peft_default_targets_keep_the_rank(gqa, tmp_path):
    """HF PEFT's default targets for Gemma, q_proj and v_proj: one slice of kv_einsum, rank r (k's block of B is 0)."""
    tm, model, path = gqa
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    want = _peft_adapter(path, tmp_path / "adapter", config)
    method, ours = jpeft.import_hf(str(tmp_path / "adapter"), model)
    assert (method.rank, method.alpha) == (2, 4)
    assert not np.any(np.asarray(ours.layers[0].attn.kv_einsum.__jpeft__["default"]["lora_b"][...])[:, 0])
    np.testing.assert_allclose(_logits(ours), want, atol=1e-4)


def test_export_of_a_jpeft_lora_on_stacked_weights(gqa, tmp_path):
    """A LoRA trained in jpeft on kv_einsum (one A for key and value) exports exactly as k_proj and v_proj."""
    tm, model, path = gqa
    method = jpeft.LoRA(targets=profiles.TUNIX_GEMMA3.lora_default, rank=2, alpha=4)
    ours = jpeft.apply(method, model, key=jax.random.key(0))
    _randomize(ours, 3)
    jpeft.export_hf(str(tmp_path / "export"), method, ours)
    back = peft.PeftModel.from_pretrained(
        transformers.Gemma3ForCausalLM.from_pretrained(path), str(tmp_path / "export")
    )
    assert sorted(back.peft_config["default"].target_modules) == ["k_proj", "q_proj", "v_proj"]
    got = _logits(ours)
    assert np.abs(got - _torch_logits(tm)).max() > 1e-2
    np.testing.assert_allclose(_torch_logits(back.eval()), got, atol=1e-4)


def test_dora_and_ia3_on_stacked_weights(gqa, tmp_path):
    """DoRA and (IA)^3 on q_einsum and kv_einsum applied in jpeft, against torch weights written by hand."""
    tm, model, path = gqa
    rng = np.random.default_rng(5)
    dora = jpeft.apply(jpeft.DoRA(targets=("q_einsum", "kv_einsum"), rank=2, alpha=4), model, key=jax.random.key(0))
    factors = _randomize(dora, 4)
    sd = transformers.Gemma3ForCausalLM.from_pretrained(path).state_dict()
    mags = {}
    for p, (a, b) in factors.items():
        store = _nnx.modules(dora)[p].__jpeft__["default"]
        m = np.asarray(store["magnitude"][...]) * (1 + 0.2 * rng.random(store["magnitude"].shape, np.float32))
        store["magnitude"][...] = m
        mags[p] = m
        delta = 2.0 * (a @ b.reshape(2, -1)).reshape(a.shape[:-1] + b.shape[1:])
        m_parts = [m] if p[3] == "q_einsum" else [m[0], m[1]]
        for (key, u), mp in zip(_torch_weights(p, delta).items(), m_parts, strict=True):
            w = sd[key].numpy() + u  # (out, in): the norm per row
            sd[key] = torch.tensor(mp.reshape(-1, 1) * w / np.linalg.norm(w, axis=1, keepdims=True))
    merged = transformers.Gemma3ForCausalLM.from_pretrained(path).eval()
    merged.load_state_dict(sd)
    np.testing.assert_allclose(_logits(dora), _torch_logits(merged), atol=1e-4)

    ia3 = jpeft.apply(jpeft.IA3(targets=("q_einsum", "kv_einsum")), model, key=jax.random.key(0))
    sd = transformers.Gemma3ForCausalLM.from_pretrained(path).state_dict()
    for p, module in _nnx.modules(ia3).items():
        store = vars(module).get("__jpeft__")
        if store is None:
            continue
        v = rng.normal(size=store["default"]["ia3_out"].shape).astype(np.float32)
        store["default"]["ia3_out"][...] = v
        for key, s in _torch_weights(p, v.reshape(1, *v.shape)).items():  # one row of scales per slice
            sd[key] = sd[key] * torch.tensor(s.reshape(-1, 1))
    merged.load_state_dict(sd)
    np.testing.assert_allclose(_logits(ia3), _torch_logits(merged), atol=1e-4)


def test_qlora_on_stacked_weights(gqa):
    """QLoRA on NF4 q_einsum and kv_einsum (computed by jpeft, not tunix's Einsum) equals its merged
    float model (the merge of these layouts equals torch's merged weights, above)."""
    _, model, _ = gqa
    method = jpeft.QLoRA(targets=("q_einsum", "kv_einsum"), rank=2, alpha=4, compute_dtype="float32")
    ours = jpeft.apply(method, jpeft.quantize(model, method), key=jax.random.key(0))
    _randomize(ours, 6)
    got = _logits(ours)
    assert np.abs(got - _logits(model)).max() > 1e-2
    np.testing.assert_allclose(_logits(jpeft.merge(method, ours)), got, atol=1e-4)


def test_prompt_tuning_against_peft(gqa, tmp_path):
    """Prompt tuning on Gemma 3 (tunix calls its token input ``last_tokens``): a peft prompt-tuning
    adapter imports to peft's logits on the real positions (uncached), and exports back."""
    tm, model, path = gqa
    n = 3
    pm = peft.get_peft_model(
        transformers.Gemma3ForCausalLM.from_pretrained(path).eval(),
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n),
    ).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "prompt_encoder" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    want = _torch_logits(pm)[:, n:]  # peft returns the virtual positions too
    pm.save_pretrained(tmp_path / "prompt")
    method, ours = jpeft.import_hf(str(tmp_path / "prompt"), model)
    assert type(method) is jpeft.PromptTuning and method.num_virtual_tokens == n
    assert np.abs(want - _torch_logits(tm)).max() > 1e-2
    np.testing.assert_allclose(_logits(ours), want, atol=1e-4)
    jpeft.export_hf(str(tmp_path / "export"), method, ours, task_type="CAUSAL_LM")
    back = peft.PeftModel.from_pretrained(
        transformers.Gemma3ForCausalLM.from_pretrained(path), str(tmp_path / "export")
    )
    np.testing.assert_allclose(_torch_logits(back.eval())[:, n:], want, atol=1e-4)


def test_refusals(gqa, tmp_path):
    tm, model, path = gqa
    with pytest.raises(jpeft.JpeftError, match="kv_einsum is both the key and the value projection"):
        jpeft.apply(jpeft.PrefixTuning(num_virtual_tokens=2), model, key=jax.random.key(0))
    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    pm = peft.get_peft_model(transformers.Gemma3ForCausalLM.from_pretrained(path), config)
    pm.save_pretrained(tmp_path / "ia3")
    with pytest.raises(jpeft.JpeftError, match="k_proj.*part 0 of the stacked weight of 'layers/0/attn/kv_einsum'"):
        jpeft.import_hf(str(tmp_path / "ia3"), model)
    pm = peft.get_peft_model(
        transformers.Gemma3ForCausalLM.from_pretrained(path), peft.LoraConfig(r=2, target_modules=["lm_head"])
    )
    pm.save_pretrained(tmp_path / "head")
    file = tmp_path / "head" / "adapter_model.safetensors"  # keep the LoRA factors, drop the saved head weight
    safetensors.numpy.save_file({k: v for k, v in safetensors.numpy.load_file(file).items() if "lora_" in k}, file)
    with pytest.raises(jpeft.JpeftError, match="lm_head.*tunix_gemma3.*maps no module"):  # tied: no lm_head
        jpeft.import_hf(str(tmp_path / "head"), model)
    method = jpeft.IA3(targets=("kv_einsum",))
    with pytest.raises(jpeft.JpeftError, match="kv_einsum' stacks torch modules"):
        jpeft.export_hf(str(tmp_path / "out"), method, jpeft.apply(method, model, key=jax.random.key(0)))
