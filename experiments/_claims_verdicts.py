"""The verdicts of ``python -m experiments.claims``: each claim's numbers, and whether it held, from the cells alone.

A claim is *held*, *did not hold* or *not yet measured* (and then which cells are missing). Every
threshold is a named constant here, stated in the report; no verdict is written by hand.
Accuracies are in points (percent), mean ± sample std over the seeds done.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

HELD, NOT_HELD, PENDING = "held", "did not hold", "not yet measured"
TIE = 1.0  # points: "about as good" / "within about 1 point"
LITTLE = 3.0  # points: "a little below"
SIMPLE_TOL = 2.0  # points: prompt-style methods "good enough" against LoRA on the simplest task
SMOOTH = 10  # steps: the moving average of a training-loss curve

#: Claims read from compare's cells: (id, statement, rows shown, checks (a, b, relation, tolerance)).
PAIR_CLAIMS: list[tuple[str, str, list[str], list[tuple[str, str, str, float]]]] = [
    ("lora_vs_full", "LoRA is within about 1 point of full fine-tuning (Hu et al., 2021)",
     ["full", "lora"], [("lora", "full", "within", TIE)]),
    ("bitfit_vs_full", "BitFit is a little below full fine-tuning (Ben Zaken et al., 2022)",
     ["full", "bitfit"], [("bitfit", "full", "a_little_below", LITTLE)]),
    ("prefix_vs_lora", "Prefix tuning is about as good as LoRA at equal trainable parameters (He et al., 2022)",
     ["lora", "prefix", "lora_r15", "mam_prefix"], [("mam_prefix", "lora_r15", "geq", TIE)]),
    ("mam_vs_parts", "MAM is at least as good as its parts, prefixes and the scaled parallel adapter (He et al., 2022)",
     ["mam_prefix", "mam_adapter", "mam"], [("mam", "mam_prefix", "geq", TIE), ("mam", "mam_adapter", "geq", TIE)]),
    ("dora_vs_lora", "DoRA is at least as good as LoRA at low rank (r = 8) (Liu et al., 2024)",
     ["lora", "dora"], [("dora", "lora", "geq", TIE)]),
    ("adalora_vs_lora", "AdaLoRA is at least as good as LoRA at the same final budget (r 12 → 8 vs r = 8) "
     "(Zhang et al., 2023)", ["lora", "adalora"], [("adalora", "lora", "geq", TIE)]),
    ("qlora_vs_lora", "QLoRA (NF4 base) matches LoRA on a bf16 base and on the f32 base (Dettmers et al., 2023)",
     ["lora", "lora_bf16", "qlora"], [("qlora", "lora_bf16", "within", TIE), ("qlora", "lora", "within", TIE)]),
]  # fmt: skip


def summary(xs: Sequence[float], scale: float = 100.0) -> dict[str, Any]:
    """Mean, sample std (0 for one value) and n of ``xs`` times ``scale``.

    >>> summary([0.5, 0.7])["mean"]
    60.0
    """
    ys = [scale * x for x in xs]
    return {"mean": statistics.fmean(ys), "std": statistics.stdev(ys) if len(ys) > 1 else 0.0, "n": len(ys)}


def fmt(s: Mapping[str, Any] | None, unit: str = "") -> str:
    """``"81.2 ± 1.3 (n 3)"``, or ``"—"`` for a summary not measured."""
    return "—" if not s else f"{s['mean']:.1f} ± {s['std']:.1f}{unit} (n {s['n']})"


def row(agg: Mapping[str, Any]) -> dict[str, Any]:
    """One of compare's aggregates (``experiments.compare.aggregate``) as a claims row: test accuracy, bytes,
    trainable count, or what is missing."""
    out: dict[str, Any] = {k: agg[k] for k in ("label", "trainable", "lr") if k in agg}
    if agg.get("bytes"):
        out["bytes"] = agg["bytes"]["total"]
    if "test_accuracy" in agg:
        out["acc"] = summary(agg["test_accuracy"]["all"])
    else:
        out["missing"] = agg.get("missing", "no cell")
    return out


def check(a: Mapping[str, Any], b: Mapping[str, Any], relation: str, tol: float) -> dict[str, Any]:
    """``a`` against ``b`` (rows with ``acc``): the difference of means in points and the verdict of ``relation``.

    ``within``: |d| <= tol; ``geq``: d >= -tol; ``a_little_below``: -tol <= d <= :data:`TIE` (not far below,
    and not clearly above).

    >>> check({"acc": {"mean": 80.0, "std": 1, "n": 3}}, {"acc": {"mean": 80.5, "std": 1, "n": 3}}, "within", 1.0)["verdict"]
    'held'
    """
    if "acc" not in a or "acc" not in b:
        return {"verdict": PENDING}
    d = a["acc"]["mean"] - b["acc"]["mean"]
    se = (a["acc"]["std"] ** 2 / a["acc"]["n"] + b["acc"]["std"] ** 2 / b["acc"]["n"]) ** 0.5
    ok = {"within": abs(d) <= tol, "geq": d >= -tol, "a_little_below": -tol <= d <= TIE}[relation]
    return {"diff": d, "se": se, "verdict": HELD if ok else NOT_HELD}


def combine(verdicts: Sequence[str]) -> str:
    """All held: held; any did not hold: did not hold; else (something missing, nothing failed): not yet measured."""
    if verdicts and all(v == HELD for v in verdicts):
        return HELD
    return NOT_HELD if NOT_HELD in verdicts else PENDING


def pair_claim(
    cid: str, statement: str, names: Sequence[str], checks: Sequence[tuple[str, str, str, float]], rows: Mapping
) -> dict[str, Any]:
    """A claim over compare's rows ``rows[(task, method)]``: per task, each check; the verdict over all tasks."""
    tasks = sorted({t for t, _ in rows})
    per: dict[str, Any] = {}
    for t in tasks:
        per[t] = {"rows": {n: rows[t, n] for n in names if (t, n) in rows}, "checks": []}
        for a, b, rel, tol in checks:
            c = check(rows.get((t, a), {}), rows.get((t, b), {}), rel, tol)
            per[t]["checks"].append({"a": a, "b": b, "relation": rel, "tol": tol, **c})
    verdicts = [c["verdict"] for t in tasks for c in per[t]["checks"]]
    missing = [f"{t} / {n}: {rows[t, n]['missing']}" for t in tasks for n in names if "missing" in rows.get((t, n), {})]
    return {"id": cid, "statement": statement, "tasks": per, "verdict": combine(verdicts), "missing": missing}


def advice_claim(rows: Mapping[tuple[str, str], Mapping[str, Any]], simple: str | None = None) -> dict[str, Any]:
    """The seed's advice, "QLoRA when memory is short; P-tuning or prompt tuning for simple tasks", on the numbers.

    QLoRA: its step's peak bytes below LoRA's and its accuracy not more than :data:`TIE` below LoRA's, on every
    task (the advice is to take QLoRA when memory is short: scoring above LoRA does not contradict it).
    Prompt-style: on the simplest task (the highest linear-probe accuracy), the better of prompt tuning and
    P-tuning within :data:`SIMPLE_TOL` of LoRA; ``simple`` names that task instead (a one-task preview).
    """
    tasks = sorted({t for t, _ in rows})
    parts: list[dict[str, Any]] = []
    for t in tasks:
        q, lo = rows.get((t, "qlora"), {}), rows.get((t, "lora"), {})
        c = check(q, lo, "geq", TIE)
        if c["verdict"] != PENDING and not (q.get("bytes") and lo.get("bytes") and q["bytes"] < lo["bytes"]):
            c["verdict"] = NOT_HELD
        parts.append({"part": "qlora_memory", "task": t, "qlora_bytes": q.get("bytes"), "lora_bytes": lo.get("bytes"),
                      "full_bytes": rows.get((t, "full"), {}).get("bytes"), **c})  # fmt: skip
    probes = {t: rows[t, "probe"]["acc"]["mean"] for t in tasks if "acc" in rows.get((t, "probe"), {})}
    if simple is None:
        simple = max(probes, key=probes.get) if len(probes) == len(tasks) and tasks else None
    if simple is None:
        parts.append({"part": "prompt_simple", "task": None, "verdict": PENDING})
    else:
        cands = [rows.get((simple, n), {}) for n in ("prompt", "ptuning")]
        best = max((c for c in cands if "acc" in c), key=lambda c: c["acc"]["mean"], default={})
        c = check(best, rows.get((simple, "lora"), {}), "geq", SIMPLE_TOL)
        if any("acc" not in x for x in cands) and c["verdict"] == NOT_HELD:
            c["verdict"] = PENDING  # the missing one might still be within reach
        parts.append({"part": "prompt_simple", "task": simple, "best": best.get("label"), **c})
    missing = [
        f"{t} / {n}: {rows[t, n]['missing']}"
        for t in tasks
        for n in ("qlora", "lora", "prompt", "ptuning", "probe")
        if "missing" in rows.get((t, n), {})
    ]
    statement = 'The seed\'s advice: "QLoRA when memory is short; P-tuning or prompt tuning for simple tasks"'
    verdict = combine([p["verdict"] for p in parts])
    return {"id": "advice", "statement": statement, "parts": parts, "verdict": verdict, "missing": missing}


# --- the extra groups' claims (their own cells) --------------------------------------------------
def smooth(xs: Sequence[float], k: int = SMOOTH) -> list[float]:
    """Trailing moving average over up to ``k`` steps.

    >>> smooth([4.0, 2.0, 0.0], 2)
    [4.0, 3.0, 1.0]
    """
    return [statistics.fmean(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def steps_to(curve: Sequence[float], target: float) -> int | None:
    """The first step (1-based) whose smoothed loss is at or below ``target``; None if never."""
    return next((i + 1 for i, x in enumerate(smooth(curve)) if x <= target), None)


def speedup(base: Sequence[Sequence[float]], fast: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Steps to a training loss both runs of a seed reach (paired by seed), and their ratio ``base / fast``.

    Per seed the target is the higher of the two runs' final smoothed losses, so both curves reach it.
    Held when ``fast`` needs strictly fewer steps than ``base`` on every seed.
    """
    if not base or not fast:
        return {"verdict": PENDING}
    targets = [max(smooth(b)[-1], smooth(f)[-1]) for b, f in zip(base, fast, strict=False)]
    pairs = [(steps_to(b, t), steps_to(f, t)) for b, f, t in zip(base, fast, targets, strict=False)]
    ratios = [b / f for b, f in pairs]  # type: ignore[operator] (each curve reaches its seed's target)
    s = summary(ratios, 1.0)
    final = [statistics.fmean(smooth(c)[-1] for c in runs) for runs in (base, fast)]
    out = {"targets": targets, "steps": pairs, "ratio": s, "final_loss": final}
    out["verdict"] = HELD if all(r > 1.0 for r in ratios) else NOT_HELD  # fewer steps on every seed
    return out


def rank_trend(by_rank: Mapping[str, Mapping[int, Mapping[str, Any]]], lo: int, hi: int) -> dict[str, Any]:
    """rsLoRA against LoRA from rank ``lo`` to ``hi``: the drop of the final training loss and the test-accuracy
    gain of each. Held when rsLoRA's loss falls with rank (beyond one std) and by more than LoRA's does."""
    out: dict[str, Any] = {}
    for k in ("lora", "rslora"):
        a, b = by_rank.get(k, {}).get(lo), by_rank.get(k, {}).get(hi)
        if not a or not b:
            return {"verdict": PENDING}
        out[k] = {"loss_drop": a["loss"]["mean"] - b["loss"]["mean"], "acc_gain": b["acc"]["mean"] - a["acc"]["mean"],
                  "noise": max(a["loss"]["std"], b["loss"]["std"])}  # fmt: skip
    rs, lo_ = out["rslora"], out["lora"]
    out["verdict"] = HELD if rs["loss_drop"] > rs["noise"] and rs["loss_drop"] > lo_["loss_drop"] else NOT_HELD
    return out


def gap_trend(gaps: Sequence[tuple[str, Mapping[str, Any] | None]]) -> dict[str, Any]:
    """Lester et al.: full fine-tuning minus prompt tuning, by model size (smallest first). Held when the gap at
    the smallest size is above :data:`TIE` and every larger size's gap is smaller."""
    measured = [(s, g) for s, g in gaps if g]
    if len(measured) < 2:
        return {"verdict": PENDING, "measured": [s for s, _ in measured]}
    ds = [g["mean"] for _, g in measured]
    ok = ds[0] > TIE and all(later < ds[0] for later in ds[1:])
    return {"verdict": HELD if ok else NOT_HELD, "measured": [s for s, _ in measured]}
