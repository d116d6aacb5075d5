"""Writes the comparison rows quoted in docs/*.md and experiments/README.md from the committed results of ``python -m experiments.compare``.

Each page holds blocks ``<!-- compare: name name ... -->`` ... ``<!-- /compare -->`` (names are the keys of
``experiments/_compare_specs.SPECS``; ``all`` stands for every method of the run). This script rewrites what is
between the markers from ``experiments/results/compare/compare.json`` (the seeded, three-task run), so no number
in the docs is typed by hand; ``tests/test_docs.py`` fails when a block differs from that file::

    python docs/compare_rows.py          # rewrite the blocks
    python docs/compare_rows.py --check  # exit 1 if a block differs from the results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = "experiments/results/compare/compare.json"
BLOCK = re.compile(r"(<!-- compare: (?P<names>[^>]*?) -->\n)(?P<body>.*?)(<!-- /compare -->)", re.DOTALL)
TASK_NAMES = {"rt": "Rotten Tomatoes", "tweets": "tweets (3 classes)", "bbc": "BBC bodies (5 topics)"}


def accuracy(a: Mapping[str, Any]) -> str:
    """``mean ± std`` of the test accuracy in %, or what is still missing."""
    if "test_accuracy" not in a:
        return "not run yet" if a.get("missing", "").startswith("LR sweep 0/") else f"incomplete ({a['missing']})"
    acc = a["test_accuracy"]
    return f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}"


def table(results: Mapping[str, Any], names: Sequence[str]) -> str:
    """The markdown table of the probe and the named methods, with the setting and the source."""
    args = results["args"]
    tasks, methods = args["tasks"], [m for m in args["methods"] if m != "probe"]
    if names[:1] == ["all"]:
        names = methods + [n for n in names[1:] if n not in methods]
    by = {(a["task"], a["method"]): a for a in results["aggregates"]}
    unknown = [n for n in names if (tasks[0], n) not in by]
    if unknown:
        raise SystemExit(f"{RESULTS} has no method {unknown}; it has {methods}")
    head = "| method | trainable % | " + " | ".join(TASK_NAMES.get(t, t) for t in tasks) + " | peak MiB | CPU ms/step |"
    lines = [head, "|---|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    for n in ["probe", *names]:
        rows = [by[t, n] for t in tasks]
        pct = next((f"{r['trainable_pct']:.3g}" for r in rows if "trainable_pct" in r), "")
        mib = next((f"{r['bytes']['total'] / 2**20:.0f}" for r in rows if r.get("bytes")), "")
        cpu = [r["cpu_ms"] for r in rows if "cpu_ms" in r]
        ms = f"{statistics.median(cpu):.0f}" if cpu else ""
        lines.append(f"| {rows[0]['label']} | {pct} | " + " | ".join(map(accuracy, rows)) + f" | {mib} | {ms} |")
    return "\n".join(lines) + (
        f"\n\nTest accuracy (%), mean ± std over {args['seeds']} seeds (batch order and initialisation) at the "
        f"learning rate chosen on a validation split (grid: the method's rate × "
        f"{', '.join(f'{f:.3g}' for f in args['lr_factors'])}). all-MiniLM-L6-v2 with a mean-pooled linear head; "
        f"per task {args['n_train']} train / {args['n_val']} validation / {args['n_test']} test rows, "
        f"{args['steps']} steps of batch {args['batch']} × {args['seq']} tokens. With {args['n_test']} test rows "
        "one accuracy has a binomial standard error of about 2.6 points, so most gaps below 3 points are noise. "
        "Peak MiB: XLA's memory analysis of the jitted train step; CPU ms/step: process CPU time per step, the "
        f"median over the tasks. Source: `{RESULTS}` (`python -m experiments.compare`; `experiments/README.md` has "
        "the protocol).\n"
    )


def rewrite(results: Mapping[str, Any], check: bool) -> list[str]:
    """The pages whose blocks differ from ``results`` (rewritten unless ``check``)."""
    stale = []
    for page in [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "experiments" / "README.md"]:
        text = page.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + table(results, m.group("names").split()) + m.group(4), text)
        if new != text:
            stale.append(page.relative_to(ROOT).as_posix())
            if not check:
                page.write_text(new)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report pages whose blocks are out of date")
    args = parser.parse_args(argv)
    stale = rewrite(json.loads((ROOT / RESULTS).read_text()), args.check)
    print(("out of date: " if args.check else "rewrote: ") + (", ".join(stale) or "nothing"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
