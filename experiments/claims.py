"""Paper claims, checked at small scale: each with its numbers, a verdict and a figure.

``python -m experiments.claims`` reads ``experiments.compare``'s cells (read-only) for the claims its
grid answers (LoRA vs Full, BitFit, prefix tuning vs LoRA, MAM vs its parts, DoRA, AdaLoRA, QLoRA, the
seed's advice), and runs, through compare's own runner, the cells that need their own configurations
(``experiments/_claims_runs.py``: rsLoRA vs LoRA over rank, LoRA+ vs LoRA loss curves, prompt tuning
vs full fine-tuning by model size) into its own resumable cells file. Verdicts come from
``experiments/_claims_verdicts.py``'s rules. Writes ``claims.json``, ``claims.md`` and one figure per
claim to ``--out`` (``experiments/results/claims``). ``--report`` trains nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Sequence
from typing import Any

from experiments import _claims_plots as P
from experiments import _claims_runs as R
from experiments import _claims_verdicts as V
from experiments import _compare_tasks, compare

COMPARE_ROWS = ("probe", "full", "lora", "bitfit", "prefix", "lora_r15", "mam", "mam_prefix", "mam_adapter", "dora", "adalora",
                "qlora", "lora_bf16", "prompt", "ptuning")  # fmt: skip
MIN_SEEDS = 2  # an extra group's row needs this many seeds for a verdict


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.claims", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="rt", help=f"the extra groups' task, from: {', '.join(_compare_tasks.TASKS)}")
    p.add_argument("--groups", default="lora_plus,rank,size", help=f"extra groups to run: {', '.join(R.GROUPS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds per extra row (two of every row run first)")
    p.add_argument("--max-minutes", type=float, default=0, help="start no new cell after this long (0: no limit)")
    p.add_argument("--report", action="store_true", help="only read the cells and write the report")
    p.add_argument("--base", default="", help="compare options for the extra groups' budget, e.g. '--quick'")
    p.add_argument("--compare-cells", default="experiments/results/compare/cells.jsonl")
    p.add_argument("--out", default="experiments/results/claims")
    args = p.parse_args(argv)
    args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if bad := [g for g in args.groups if g not in R.GROUPS]:
        p.error(f"unknown --groups {bad}; choose from {', '.join(R.GROUPS)}")
    if args.task not in _compare_tasks.TASKS:
        p.error(f"unknown --task {args.task!r}; choose from {', '.join(_compare_tasks.TASKS)}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    args.base = args.base.split()
    args.cells = os.path.join(args.out, "cells.jsonl")
    return args


def compare_rows(cells: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """compare's aggregates (its default protocol and budget) of the rows the claims read, by (task, method)."""
    cargs = compare.parse_args(["--methods", ",".join(n for n in COMPARE_ROWS if n != "probe")])
    return {(t, n): V.row(compare.aggregate(cells, cargs, t, n)) for t in cargs.tasks for n in COMPARE_ROWS}


def extra_row(cells: dict[str, Any], args: Any, name: str, layers: int) -> dict[str, Any]:
    """One extra row's seeds at its fixed rate: test accuracy, final training loss, loss curves, or what is missing."""
    R.register()
    gargs = R.group_args(args.cells, args.task, layers, args.seeds, args.base)
    lr = compare.grid(name, gargs)[0]
    got = [cells.get(compare.cell_key(compare.cell_config(gargs, args.task, name, lr, s))) for s in range(args.seeds)]
    ok = [c for c in got if c and c["result"]["status"] == "ok"]
    errors = [c["result"]["status"] for c in got if c and c["result"]["status"] != "ok"]
    out: dict[str, Any] = {"name": name, "label": compare.SPECS[name][0], "layers": layers or 6, "lr": lr}
    out["seeds"] = [c["config"]["seed"] for c in ok]
    if ok:
        out["trainable"] = ok[0].get("trainable")
        out["bytes"] = ok[0].get("bytes", {}).get("total")
    if len(ok) >= MIN_SEEDS:
        out["acc"] = V.summary([c["result"]["test"]["accuracy"] for c in ok])
        out["loss"] = V.summary([c["result"]["loss_last"] for c in ok], 1.0)
        out["acc_by_seed"] = {c["config"]["seed"]: c["result"]["test"]["accuracy"] for c in ok}
        out["curves"] = [c["result"]["losses"] for c in ok if "losses" in c["result"]]
    else:
        out["missing"] = f"{len(ok)}/{args.seeds} seeds at lr {lr:g} ({len(ok)} < {MIN_SEEDS} needed)" + (
            f"; {errors[0][:120]}" if errors else ""
        )
    return out


def preview_task(args: Any) -> str:
    return f"{args.task}, {R.SMALL_LAYERS} layers, fixed lr"


def small_rows(cells: dict[str, Any], args: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """compare's rows at the small budget (the extra groups' cells), by (preview task, compare's name)."""
    names = [n for n in COMPARE_ROWS if n != "probe"]
    return {(preview_task(args), n): extra_row(cells, args, R.ALIAS.get(n, n), R.SMALL_LAYERS) for n in names}


def extra_claims(cells: dict[str, Any], args: Any) -> list[dict[str, Any]]:
    rows = {(n, layers): extra_row(cells, args, n, layers) for g in R.GROUPS.values() for n, layers in g}

    def missing(g: str) -> list[str]:
        return [f"{n} ({k or 6} layers): {rows[n, k]['missing']}" for n, k in R.GROUPS[g] if "missing" in rows[n, k]]

    small = R.SMALL_LAYERS
    by_rank = {k: {r: rows[f"claims_{k}_r{r}", small] for r in R.RANKS if "acc" in rows[f"claims_{k}_r{r}", small]}
               for k in ("lora", "rslora")}  # fmt: skip
    rank = {"id": "rslora_rank", "rows": [rows[k] for k in R.GROUPS["rank"]], "missing": missing("rank"),
            "statement": "rsLoRA (α/√r) keeps improving with rank where LoRA's α/r scaling stalls, at one learning rate "
            f"(Kalajdzievski, 2023); r ∈ {list(R.RANKS)}", **V.rank_trend(by_rank, R.RANKS[0], R.RANKS[-1])}  # fmt: skip
    lo, plus = rows["claims_lora_r8", small], rows["claims_lora_plus_r8", small]
    pairs = sorted(set(lo.get("seeds", [])) & set(plus.get("seeds", [])))
    curves = [
        [c for c, s in zip(r.get("curves", []), r.get("seeds", []), strict=False) if s in pairs] for r in (lo, plus)
    ]
    sp = V.speedup(*curves) if len(pairs) >= MIN_SEEDS else {"verdict": V.PENDING}
    lplus = {"id": "lora_plus_speed", "rows": [lo, plus], "missing": missing("lora_plus"), **sp,
             "statement": "LoRA+ reaches a given training loss in fewer steps than LoRA, up to about 2× (Hayou et al., "
             "2024)"}  # fmt: skip
    gaps: list[tuple[str, Any]] = []
    full6 = extra_row(cells, args, "full", 0)
    for size, f, p in [(f"MiniLM, first {small} layers", rows["full", small], rows["prompt", small]),
                       ("MiniLM (22 M, 6 layers)", full6, rows["prompt", 0])]:  # fmt: skip
        seeds = sorted(set(f.get("acc_by_seed", {})) & set(p.get("acc_by_seed", {})))
        d = [f["acc_by_seed"][s] - p["acc_by_seed"][s] for s in seeds]
        gaps.append((size, V.summary(d) if len(d) >= MIN_SEEDS else None))
    gaps.append(("SmolLM2-135M", None))
    size = {"id": "prompt_gap_size", "rows": [rows["full", small], rows["prompt", small], full6,
            rows["prompt", 0]], "gaps": gaps, **V.gap_trend(gaps),
            "missing": missing("size") + ([f"full (6 layers): {full6['missing']}"] if "missing" in full6 else [])
            + ["SmolLM2-135M: full fine-tuning and prompt tuning not run (did not fit the session's CPU time)"],
            "statement": "Prompt tuning is clearly below full fine-tuning at small model sizes, the gap shrinking "
            "with size (Lester et al., 2021)"}  # fmt: skip
    return [rank, lplus, size]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the missing extra cells (unless ``--report``), then writes claims.json, claims.md and the figures."""
    args = parse_args(argv)
    mine = compare.read_cells(args.cells)
    added = 0
    if not args.report:
        added = R.run_groups(mine, args.cells, args.task, args.groups, args.seeds, args.max_minutes, args.base)
    theirs = compare.read_cells(args.compare_cells)
    cells = {**theirs, **mine}
    rows = compare_rows(theirs)
    small = small_rows(cells, args)
    claims = []
    for cid, st, names, checks in V.PAIR_CLAIMS:
        claims.append(
            {**V.pair_claim(cid, st, names, checks, rows), "preview": V.pair_claim(cid, st, names, checks, small)}
        )
    claims.append({**V.advice_claim(rows), "preview": V.advice_claim(small, simple=preview_task(args))})
    claims += extra_claims(cells, args)
    os.makedirs(args.out, exist_ok=True)
    for c in claims:
        c["figure"] = P.plot(c, {**rows, **small}, os.path.join(args.out, f"{c['id']}.png"))
    md = P.markdown(claims, args)
    with open(os.path.join(args.out, "claims.md"), "w") as f:
        f.write(md + "\n")
    out = {"command": "python -m experiments.claims " + " ".join(argv or []), "cells_added": added,
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "cells_file": args.cells,
           "compare_cells_file": args.compare_cells, "claims": claims,
           "rows": [{"task": t, "method": n, **r} for (t, n), r in rows.items()]}  # fmt: skip
    with open(os.path.join(args.out, "claims.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
        f.write("\n")
    print(md)
    return out


if __name__ == "__main__":
    main()
