"""Writes the comparison rows quoted in docs/*.md from the committed results of ``python -m experiments.compare``.

Each page holds blocks ``<!-- compare: name name ... -->`` ... ``<!-- /compare -->`` (names are the keys of
``experiments/_compare_specs.SPECS``; ``all`` stands for every row of the main run). This script rewrites what is
between the markers from the committed results, so no number in the docs is typed by hand::

    python docs/compare_rows.py          # rewrite the blocks
    python docs/compare_rows.py --check  # exit 1 if a block differs from the results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: The default-configuration runs (same data, batches, seed and probe): the main table and issue 13's added rows,
#: each read as committed at the given commit, so the quoted numbers stay tied to the run they come from when a
#: later run (several seeds and tasks, issue 15) replaces the file.
RESULTS = {
    "experiments/results/compare/compare.json": "c431866",
    "experiments/results/compare_issue13/default/compare.json": "f3716ed",
}
BLOCK = re.compile(r"(<!-- compare: (?P<names>[^>]*?) -->\n)(?P<body>.*?)(<!-- /compare -->)", re.DOTALL)


def table(runs: dict[str, dict], names: list[str]) -> str:
    """The markdown table of the named rows (``all``: every row of the first run), with the setting and sources."""
    rows = {m["name"]: (m, path) for path, run in reversed(runs.items()) for m in run["methods"]}
    first = next(iter(runs.values()))
    if names[:1] == ["all"]:
        names = [m["name"] for m in first["methods"]] + names[1:]
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise SystemExit(f"{list(runs)} have no row {unknown}; they have {sorted(rows)}")
    sources = sorted({rows[n][1] for n in names}, key=list(runs).index)
    results = runs[sources[0]]
    if any(
        runs[p]["before"]["accuracy"] != results["before"]["accuracy"]
        or runs[p]["args"]["seed"] != results["args"]["seed"]
        for p in sources
    ):
        raise SystemExit(f"{sources} are not runs of one configuration: quote them in separate blocks")
    before = results["before"]["accuracy"] * 100
    args, task = results["args"], results["task"]
    lines = [
        "| method | lr | trainable | trainable % | held-out acc | Δ acc (points) | held-out loss | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        m = rows[n][0]
        acc = m["after"]["accuracy"] * 100
        lines.append(
            f"| {m['label']} | {m['lr']:g} | {m['trainable']:,} | {m['trainable_pct']:.3g} | {acc:.1f}% "
            f"| {acc - before:+.1f} | {m['after']['loss']:.3f} | {m['bytes']['total'] / 2**20:.1f} |"
        )
    return (
        "\n".join(lines) + f"\n\n*One seed* (seed {args['seed']}), so differences of a point or two are within noise: "
        f"all-MiniLM-L6-v2 on BBC News headline topics ({task['n_train']} train / {task['n_eval']} held-out), "
        f"{args['steps']} steps of batch {args['batch']} × {args['seq']} tokens; the frozen encoder with the "
        f"same head trained the same steps scores {before:.1f}%. Peak MiB: XLA's memory analysis of the jitted "
        f"step. Source: {', '.join(f'`{p}` at commit {RESULTS[p]}' for p in sources)} (`python -m experiments.compare`).\n"
    )


def git_show(commit: str, path: str) -> str:
    """The file at ``path`` as committed in ``commit``."""
    return subprocess.run(
        ["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report pages whose blocks are out of date")
    args = parser.parse_args()
    runs = {path: json.loads(git_show(commit, path)) for path, commit in RESULTS.items()}
    stale = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        text = page.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + table(runs, m.group("names").split()) + m.group(4), text)
        if new != text:
            stale.append(page.relative_to(ROOT).as_posix())
            if not args.check:
                page.write_text(new)
    print(("out of date: " if args.check else "rewrote: ") + (", ".join(stale) or "nothing"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
