"""The cells file and the tables of ``python -m experiments.compare``: keys, LR choice, mean ± std, plot.

A cell is one (task, method, lr, seed) run, one JSON line of the cells file, keyed by a hash of its
full configuration (:func:`cell_config`). :func:`aggregate` turns the cells of one (task, method) into
the chosen learning rate and, once every seed is done there, mean ± sample std of its scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import _compare_tasks
from experiments._compare_run import make_method
from experiments._compare_specs import SPECS, lr_grid

PROBE = "probe"


def label(name: str) -> str:
    return "Linear probe (frozen encoder)" if name == PROBE else SPECS[name][0]


def cell_config(args: Any, task: str, name: str, lr: float, seed: int) -> dict[str, Any]:
    """Everything that determines a cell's numbers; its hash is the cell's key."""
    spec = "head only" if name == PROBE else repr(make_method(name, args.steps))
    budget = {k: getattr(args, k) for k in ("steps", "batch", "seq", "n_train", "n_val", "n_test", "head_lr", "layers")}
    return {"task": task, "method": name, "spec": spec, "lr": lr, "seed": seed, "data_seed": args.data_seed, **budget}


def cell_key(config: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:20]


def read_cells(path: str) -> dict[str, dict[str, Any]]:
    """The cells file as ``{key: cell}`` (a truncated last line, from a killed run, is ignored)."""
    cells: dict[str, dict[str, Any]] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    cell = json.loads(line)
                except json.JSONDecodeError:
                    continue
                cells[cell["key"]] = cell
    return cells


def append_cell(path: str, cell: Mapping[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(cell, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def grid(name: str, args: Any) -> tuple[float, ...]:
    if name == PROBE:
        return (args.head_lr,)
    return lr_grid(name, args.lr_factors)


def choose(sweep: Sequence[Mapping[str, Any] | None]) -> float | None:
    """The rate of the best validation accuracy (ties: lower validation loss); None until the sweep is done.

    >>> cells = [{"config": {"lr": lr}, "result": {"status": "ok", "val": {"accuracy": a, "loss": l}}}
    ...          for lr, a, l in [(1e-4, 0.8, 0.5), (3e-4, 0.9, 0.4), (1e-3, 0.9, 0.3)]]
    >>> choose(cells)
    0.001
    """
    if any(c is None for c in sweep):
        return None
    ok = [c for c in sweep if c["result"]["status"] == "ok"]
    if not ok:
        return None
    best = max(ok, key=lambda c: (c["result"]["val"]["accuracy"], -c["result"]["val"]["loss"]))
    return best["config"]["lr"]


# --- aggregation ---------------------------------------------------------------------------------
def aggregate(cells: Mapping[str, Mapping[str, Any]], args: Any, task: str, name: str) -> dict[str, Any]:
    """One (task, method): the sweep, the chosen rate and, with all seeds done there, mean ± std."""
    get = lambda lr, seed: cells.get(cell_key(cell_config(args, task, name, lr, seed)))  # noqa: E731
    lrs = grid(name, args)
    sweep = [get(lr, 0) for lr in lrs]
    out: dict[str, Any] = {"task": task, "method": name, "label": label(name), "grid": list(lrs)}
    out["sweep"] = {str(lr): c["result"].get("val") for lr, c in zip(lrs, sweep, strict=True) if c}
    any_cell = next((c for c in sweep if c and "trainable" in c), None)
    out.update({k: any_cell[k] for k in ("trainable", "trainable_pct", "bytes") if any_cell and k in any_cell})
    lr = choose(sweep)
    errors = [c["result"]["status"] for c in sweep if c and c["result"]["status"] != "ok"]
    if lr is None:
        done = sum(c is not None for c in sweep)
        out["missing"] = f"LR sweep {done}/{len(lrs)} done" + (f"; {errors[0][:120]}" if errors else "")
        return out
    seeds = [get(lr, s) for s in range(args.seeds)]
    done = [c["result"] for c in seeds if c and c["result"]["status"] == "ok"]
    out["lr"], out["seeds_done"] = lr, len(done)
    if len(done) < args.seeds:
        out["missing"] = f"{len(done)}/{args.seeds} seeds at lr {lr:g}"
        return out
    for split in ("val", "test"):
        for m in ("accuracy", "loss"):
            xs = [r[split][m] for r in done]
            out[f"{split}_{m}"] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs), "all": xs}
    for t in ("cpu_ms", "wall_ms"):
        if all(t in r for r in done):
            out[t] = statistics.median(r[t] for r in done)
    return out


def fmt(a: Mapping[str, Any], key: str = "test_accuracy", pct: bool = True) -> str:
    if key not in a:
        return f"— ({a.get('missing', 'missing')})"
    s = 100 if pct else 1
    return (
        f"{s * a[key]['mean']:.1f} ± {s * a[key]['std']:.1f}" if pct else f"{a[key]['mean']:.3f} ± {a[key]['std']:.3f}"
    )


def tables(aggs: Sequence[Mapping[str, Any]], tasks: Sequence[str], names: Sequence[str], args: Any) -> str:
    by = {(a["task"], a["method"]): a for a in aggs}
    out = [f"## Test accuracy (%), mean ± std over {args.seeds} seeds at the validation-chosen learning rate", ""]
    out += ["| method | trainable % | " + " | ".join(_compare_tasks.TASKS[t] for t in tasks) + " |"]
    out += ["|---|---:|" + "---|" * len(tasks)]
    for n in names:
        pct = next((by[t, n]["trainable_pct"] for t in tasks if "trainable_pct" in by[t, n]), None)
        cells = " | ".join(fmt(by[t, n]) for t in tasks)
        out.append(f"| {label(n)} | {'' if pct is None else f'{pct:.3g}'} | {cells} |")
    for t in tasks:
        out += ["", f"## {_compare_tasks.TASKS[t]}", ""]
        out += [
            "| method | lr grid → chosen | val acc by lr (seed 0) | test acc % | test loss | trainable | peak MiB "
            "| CPU ms/step | wall ms/step |",
            "|---|---|---|---|---|---:|---:|---:|---:|",
        ]
        for n in names:
            a = by[t, n]
            sweep = ", ".join(f"{100 * v['accuracy']:.1f}" for v in a["sweep"].values() if v) or "—"
            lrs = "/".join(f"{x:g}" for x in a["grid"]) + (f" → {a['lr']:g}" if "lr" in a else "")
            mib = f"{a['bytes']['total'] / 2**20:,.1f}" if a.get("bytes") else ""
            cpu = f"{a['cpu_ms']:.0f}" if "cpu_ms" in a else ""
            wall = f"{a['wall_ms']:.0f}" if "wall_ms" in a else ""
            count = f"{a['trainable']:,}" if "trainable" in a else ""
            out.append(
                f"| {label(n)} | {lrs} | {sweep} | {fmt(a)} | {fmt(a, 'test_loss', False)} | "
                f"{count} | {mib} | {cpu} | {wall} |"
            )
    return "\n".join(out)


def save_plot(aggs: Sequence[Mapping[str, Any]], tasks: Sequence[str], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 5.5), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        for i, a in enumerate(x for x in aggs if x["task"] == t and "test_accuracy" in x):
            m, s = 100 * a["test_accuracy"]["mean"], 100 * a["test_accuracy"]["std"]
            if a["method"] == PROBE:
                ax.axhspan(m - s, m + s, color="gray", alpha=0.2)
                ax.axhline(m, ls="--", c="gray", lw=1, label=a["label"])
                continue
            x = max(a["trainable_pct"], 1e-4)
            ax.errorbar(x, m, yerr=s, fmt="osD^v<>pP*Xh"[i % 12], capsize=3, label=a["label"])
            ax.annotate(a["method"], (x, m), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set(xlabel="trainable parameters (% of the encoder)", ylabel="test accuracy (%, mean ± std)")
        ax.set_title(_compare_tasks.TASKS[t], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, names = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
