"""``python -m experiments.llm``'s whole code path, on a tiny random Llama written as a GGUF file.

The file's tokenizer is byte-level BPE with SmolLM2's chat tokens (``<|im_start|>``, ``<|im_end|>``,
``<|endoftext|>``), the 256 byte symbols and two merges; the model has 2 layers of width 32, so the run (NumPy check, ``datasets`` pipeline, LoRA / QLoRA / prompt tuning steps, greedy decoding,
metrics and plot) takes seconds. The real model's run is the experiment itself (experiments/README.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("datasets")

from experiments import llm  # noqa: E402
from jpeft.models import _smollm  # noqa: E402

D, LAYERS, HEADS, KV, FF = 32, 2, 4, 2, 64


def byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 characters that stand for the bytes 0..255."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b if b in keep else next(extra)) for b in range(256)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama GGUF (F32, rope base 1e5, tied embeddings) whose tokenizer has SmolLM2's chat tokens."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_symbols(), "po", "ne"]
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_embedding_length(D)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_feed_forward_length(FF)
    w.add_context_length(256)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(1e5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * 258)  # 3: control (the chat tokens), 1: normal
    w.add_token_merges(["p o", "n e"])
    rng = np.random.RandomState(0)
    mat = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", mat(len(tokens), D))
    w.add_tensor("output_norm.weight", 1 + mat(D))
    hd = D // HEADS
    for i in range(LAYERS):
        for name, shape in {
            "attn_norm": (D,),
            "ffn_norm": (D,),
            "attn_q": (HEADS * hd, D),
            "attn_k": (KV * hd, D),
            "attn_v": (KV * hd, D),
            "attn_output": (D, HEADS * hd),
            "ffn_gate": (FF, D),
            "ffn_up": (FF, D),
            "ffn_down": (D, FF),
        }.items():
            w.add_tensor(f"blk.{i}.{name}.weight", (1 + mat(*shape)) if len(shape) == 1 else mat(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_numpy_forward_pass_matches_the_converted_model(tiny):
    model, tok = _smollm.smollm2(tiny, scan=True)
    assert llm.verify(model, tok, tiny) < 1e-5
    assert np.abs(llm.numpy_logits(tiny, tok.encode("Hi there").ids)).max() > 0.1  # not trivially zero


@pytest.mark.parametrize("method", ["lora", "qlora", "prompt"])
def test_the_experiment_runs_end_to_end(tiny, tmp_path, method):
    argv = ["--method", method, "--gguf", tiny, "--steps", "3", "--batch", "2", "--max-len", "128", "--eval", "3"]
    res = llm.main([*argv, "--eval-batch", "2", "--new-tokens", "2", "--show", "2", "--out", str(tmp_path)])
    assert len(res["losses"]) == 3 and all(np.isfinite(res["losses"]))
    assert res["eval_examples"] == 3 and res["train_examples"] == 8530 - 3
    for key in ("before", "after"):
        assert 0.0 <= res[key]["accuracy"] <= 1.0 and len(res[key]["generations"]) == 2
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["method"]["name"] == method and saved["after"] == res["after"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    hd = D // HEADS
    lora = 8 * ((D + HEADS * hd) * 2 + (D + KV * hd) * 2 + (D + FF) * 3) * LAYERS  # rank 8 on all seven
    assert res["method"]["trainable"] == {"lora": lora, "qlora": lora, "prompt": 8 * D}[method]
