"""The figures and the markdown of ``python -m experiments.claims``: one figure per claim, one paragraph per claim."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from experiments import _claims_verdicts as V
from experiments import _compare_tasks
from experiments._compare_report import label


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _points(ax: Any, groups: list[str], series: Mapping[str, list[Any]]) -> None:
    """Means with std error bars, side by side per group: ``series[label][i]`` is a summary (or None) for
    ``groups[i]``; a missing one is marked on the axis."""
    w = 0.6 / max(1, len(series))
    for j, (lab, vals) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * w for i in range(len(groups))]
        got = [(x, v) for x, v in zip(xs, vals, strict=True) if v]
        ax.errorbar([x for x, _ in got], [v["mean"] for _, v in got], yerr=[v["std"] for _, v in got], fmt="os^Dv"[j % 5],
                    capsize=4, label=lab, ls="none")  # fmt: skip
        for x, v in zip(xs, vals, strict=True):
            note = "missing" if v is None else f"n {v['n']}"
            ax.annotate(note, (x, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=6,
                        rotation=90, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.grid(True, axis="y", alpha=0.3)


def plot(claim: Mapping[str, Any], rows: Mapping[tuple[str, str], Mapping[str, Any]], path: str) -> str:
    """The claim's figure at ``path``; returns ``path``."""
    plt = _plt()
    tasks = list(claim.get("tasks", _compare_tasks.TASKS)) + list(claim.get("preview", {}).get("tasks", {}))
    ncols = {"rslora_rank": 2, "advice": len(tasks)}.get(claim["id"], 1)
    fig, axes = plt.subplots(1, ncols, figsize=(max(11, 4.5 * ncols), 4.5), squeeze=False)
    ax = axes[0][0]
    if "tasks" in claim:  # a pair claim over compare's rows
        names = next(ns for cid, _, ns, _ in V.PAIR_CLAIMS if cid == claim["id"])
        _points(ax, tasks, {label(n): [rows.get((t, n), {}).get("acc") for t in tasks] for n in names})
        ax.set(ylabel="test accuracy (%, mean ± std over seeds)")
    elif claim["id"] == "advice":
        names = ("full", "lora", "lora_bf16", "qlora", "bitfit", "prompt", "ptuning")
        for t, a in zip(tasks, axes[0], strict=True):
            for n in names:
                r = rows.get((t, n), {})
                if "acc" in r and r.get("bytes"):
                    a.errorbar(r["bytes"] / 2**20, r["acc"]["mean"], yerr=r["acc"]["std"], fmt="o", capsize=3)
                    a.annotate(n, (r["bytes"] / 2**20, r["acc"]["mean"]), fontsize=7, xytext=(3, 3),
                               textcoords="offset points")  # fmt: skip
            a.set(xscale="log", xlabel="peak MiB of the train step", ylabel="test accuracy (%)", title=t)
            a.grid(True, which="both", alpha=0.3)
    elif claim["id"] == "rslora_rank":
        for k, mark in (("lora", "o-"), ("rslora", "s-")):
            rs = [r for r in claim["rows"] if r["name"].startswith(f"claims_{k}_r") and "acc" in r]
            ranks = [int(r["name"].rsplit("r", 1)[1]) for r in rs]
            for a, key in ((ax, "acc"), (axes[0][1], "loss")):
                a.errorbar(ranks, [r[key]["mean"] for r in rs], yerr=[r[key]["std"] for r in rs], fmt=mark,
                           capsize=3, label="LoRA α/r" if k == "lora" else "rsLoRA α/√r")  # fmt: skip
        ax.set(xscale="log", xlabel="rank r", ylabel="test accuracy (%)")
        axes[0][1].set(xscale="log", xlabel="rank r", ylabel="training loss (mean of the last 10 steps)")
        for a in axes[0]:
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=8)
    elif claim["id"] == "lora_plus_speed":
        for r in claim["rows"]:
            cs = [V.smooth(c) for c in r.get("curves", [])]
            if not cs:
                continue
            mean = [statistics.fmean(x) for x in zip(*cs, strict=True)]
            std = [statistics.stdev(x) if len(x) > 1 else 0.0 for x in zip(*cs, strict=True)]
            steps = range(1, len(mean) + 1)
            ax.plot(steps, mean, label=f"{r['label']} (lr {r['lr']:g}, n {len(cs)})")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2)  # fmt: skip
        for i, t in enumerate(claim.get("targets", [])):
            ax.axhline(t, ls=":", c="gray", lw=1, label="per-seed target losses" if i == 0 else None)
        ax.set(xlabel="step", ylabel=f"training loss ({V.SMOOTH}-step moving average, mean ± std)")
        ax.grid(True, alpha=0.3)
    elif claim["id"] == "prompt_gap_size":
        sizes = [s for s, _ in claim["gaps"]]
        _points(ax, sizes, {"full − prompt tuning (points)": [g for _, g in claim["gaps"]]})
        ax.set(ylabel="test-accuracy gap (points, mean ± std over seeds)")
        ax.axhline(0, c="gray", lw=1)
    if ax.get_legend_handles_labels()[0] and claim["id"] not in ("rslora_rank",):
        ax.legend(fontsize=7)
    fig.suptitle(f"{claim['statement'][:110]}\nverdict: {claim['verdict']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _unequal(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """A note when two rows' trainable counts differ by more than 10 %."""
    ta, tb = a.get("trainable"), b.get("trainable")
    if not ta or not tb or abs(ta / tb - 1) <= 0.1:
        return ""
    return f", trainable counts unequal: {ta:,} vs {tb:,} ({ta / tb:.2g}×)"


def _pair_text(c: Mapping[str, Any]) -> str:
    parts = []
    for t, d in c["tasks"].items():
        nums = "; ".join(
            f"{r.get('label', n)} {V.fmt(r.get('acc'))}"
            + (f", {r['trainable']:,} trainable" if r.get("trainable") is not None else "")
            for n, r in d["rows"].items()
        )
        checks = "; ".join(
            f"{ch['a']} − {ch['b']} = {ch['diff']:+.1f} ± {ch['se']:.1f} (se) → {ch['verdict']}"
            + (
                _unequal(d["rows"].get(ch["a"], {}), d["rows"].get(ch["b"], {}))
                if "equal trainable" in c["statement"]
                else ""
            )
            for ch in d["checks"]
            if "diff" in ch
        )
        parts.append(f"*{t}*: {nums}" + (f" ({checks})" if checks else ""))
    return " ".join(parts)


def _advice_text(c: Mapping[str, Any]) -> str:
    return " ".join(
        f"[{p['part']}, {p['task']}]"
        + (f" {p.get('best') or ''} Δ {p['diff']:+.1f} ± {p['se']:.1f}" if "diff" in p else "")
        + (
            f", QLoRA {p['qlora_bytes'] / 2**20:.0f} MiB vs LoRA {p['lora_bytes'] / 2**20:.0f} MiB"
            if p.get("qlora_bytes") and p.get("lora_bytes")
            else ""
        )
        + f" → {p['verdict']}."
        for p in c["parts"]
    )


def _preview(c: Mapping[str, Any]) -> str:
    if "preview" not in c:
        return ""
    p = c["preview"]
    text = _pair_text(p) if "tasks" in p else _advice_text(p)
    return f" **Preview** at the small budget (fixed central lr, not validation-chosen): {text} Preview verdict: **{p['verdict']}**."


def markdown(claims: list[Mapping[str, Any]], args: Any) -> str:
    """One paragraph per claim: the statement, its numbers, the verdict and what is missing."""
    out = ["## Paper claims, checked at small scale", ""]
    out += [
        f"Generated by `python -m experiments.claims --seeds {args.seeds}` (extra rows read up to {args.seeds} seeds; "
        "results in `experiments/results/claims/`: `claims.json`, "
        "`claims.md` and one figure per claim). Accuracy: test accuracy in %, mean ± sample std over n seeds. "
        f"Rules (`experiments/_claims_verdicts.py`): *within* |Δ| ≤ {V.TIE}; *at least as good* Δ ≥ −{V.TIE}; "
        f"*a little below* −{V.LITTLE} ≤ Δ < 0 (points); a claim holds when every measured check holds on every "
        "task; a missing cell leaves it *not yet measured*. Rows from `experiments.compare` "
        "(validation-chosen LR, 3 seeds, MiniLM, 800 training rows, 50 steps); the extra groups run through "
        f"compare's runner on {args.task}, at one fixed LR per row, on the first 2 MiniLM layers unless stated.",
        "",
    ]
    out += ["| claim | verdict (compare's grid, or the extra group) | preview (2 layers, fixed lr) |", "|---|---|---|"]
    out += [f"| {c['id']} | {c['verdict']} | {c.get('preview', {}).get('verdict', '')} |" for c in claims]
    out += [""]
    for c in claims:
        body = ""
        if "tasks" in c:
            body = _pair_text(c)
        elif c["id"] == "advice":
            body = _advice_text(c)
        else:
            body = "; ".join(
                f"{r['label']} ({r['layers']} layers, lr {r['lr']:g}): {V.fmt(r.get('acc'))}"
                + (f", final train loss {r['loss']['mean']:.3f} ± {r['loss']['std']:.3f}" if "loss" in r else "")
                + (f", {r['trainable']:,} trainable" if r.get("trainable") else "")
                for r in c["rows"]
            )
            if c["id"] == "lora_plus_speed" and "ratio" in c:
                body += (f". Steps to the loss both runs of a seed reach ({', '.join(f'{t:.3f}' for t in c['targets'])}),"
                         f" (LoRA, LoRA+) per seed: {c['steps']}; "
                         f"ratio {c['ratio']['mean']:.2f} ± {c['ratio']['std']:.2f}")  # fmt: skip
            if c["id"] == "rslora_rank" and "lora" in c:
                body += "".join(f". {k}: loss drop r {R0}→{R1} {c[k]['loss_drop']:+.3f}, accuracy gain "
                                f"{c[k]['acc_gain']:+.1f}" for k in ("lora", "rslora")
                                for R0, R1 in [(4, 256)])  # fmt: skip
            if c["id"] == "prompt_gap_size":
                body += ". Gap full − prompt by size: " + "; ".join(f"{s}: {V.fmt(g)}" for s, g in c["gaps"])
        miss = f" Missing: {'; '.join(c['missing'])}." if c.get("missing") else ""
        out += [
            f"**{c['statement']}.** Verdict: **{c['verdict']}**. {body}.{miss}{_preview(c)} Figure: `{c['figure']}`.",
            "",
        ]
    return "\n".join(out)
