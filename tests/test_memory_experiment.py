"""``experiments.memory`` end to end on a tiny Llama (2 layers, vocab 128, 16 tokens), so that it does not rot."""

from __future__ import annotations

import json
import re

import pytest

from experiments import memory

ROWS = ["lora/b4/float", "ptuning/b4/int4", "freeze/b4/int8"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    argv = ["--layers", "2", "--vocab", "128", "--seq", "16", "--steps", "1", "--batch-scale", "4"]
    argv += ["--freeze-layers", "1", "--int4-block", "32", "--out", str(out), "--only", *ROWS]
    rep = memory.main(argv)
    return rep, out


def test_every_row_runs_and_is_saved(report):
    rep, out = report
    saved = json.loads(out.read_text())
    assert list(saved["results"]) == ROWS and out.with_suffix(".png").exists()
    for key, r in saved["results"].items():
        assert "error" not in r, (key, r.get("error"))
        m = r["memory"]
        assert m["total"] == m["argument"] + m["output"] + m["temp"] - m["alias"] > 0
        assert r["time"]["examples_per_s"] > 0 and len(r["time"]["wall_s_all"]) == 1
        method, _, precision = key.split("/")
        assert r["seed_ratio"] == memory.SEED_GB[(method, 4, precision)] / memory.SEED_GB[memory.REFERENCE]
    assert saved["results"]["lora/b4/float"]["ratio"] == 1.0
    assert rep["results"]["lora/b4/float"]["row"]["run_batch"] == 1


def test_quantised_base_shrinks_the_arguments_and_keeps_trained_layers_float(report):
    res = report[0]["results"]
    assert res["ptuning/b4/int4"]["frozen_bytes"] < res["lora/b4/float"]["frozen_bytes"] / 4
    assert res["freeze/b4/int8"]["trainable_params"] > 10 * res["lora/b4/float"]["trainable_params"]
    args = memory.parse_args(["--freeze-layers", "1"])
    _, targets = memory.make_method(memory.Row("freeze", 4, "int8"), 2, args)
    assert re.fullmatch(targets, "model/layers/0/mlp/up_proj") and not re.fullmatch(
        targets, "model/layers/1/mlp/up_proj"
    )


def test_table_names_each_row():
    results = {
        "lora/b4/float": {"row": {"method": "lora", "batch": 4, "precision": "float"}, "memory": None, "error": "boom"}
    }
    memory.add_ratios(results)
    assert "not run: boom" in memory.table(results)
