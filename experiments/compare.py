"""Every jpeft method on three tasks, with a learning-rate sweep and repeated seeds: mean ± std of held-out scores.

``python -m experiments.compare`` fine-tunes the pretrained sentence encoder *all-MiniLM-L6-v2* (a
6-layer, width-384 BERT, mean pooling, a zero-init linear head) with every method of
``experiments/_compare_specs.py`` on the tasks of ``experiments/_compare_tasks.py`` (Rotten Tomatoes
sentiment, tweet sentiment, BBC topic from the article body), offline.

**Protocol**, per (task, method): seed 0 at each learning rate of the method's grid (its
``LEARNING_RATES`` entry × 1/3, 1, 3); the rate with the best *validation* accuracy (ties: lower
validation loss) is chosen; seeds 1 .. ``--seeds``-1 then run at that rate. A seed sets the
training batches' order and the method's initialisation; the data cut (train / validation / test,
by ``train_test_split``) is the same for all. The test split is only reported, never used to choose.
Everything else is the same for every method: steps, batch, sequence length, AdamW (weight decay
0.01) with warm-up + cosine, and the head's learning rate (``--head-lr``). The linear probe (frozen
encoder, head only) is the ``probe`` row.

**Cells.** Each (task, method, lr, seed) is one unit, appended as one JSON line to ``--cells``
(``experiments/results/compare/cells.jsonl``) under a hash of its full configuration (budget,
sizes, the method's repr), so a grid accumulates across runs: a run computes only the cells that
are missing, in the order of ``_compare_specs.ORDER``, and stops starting new ones after
``--max-minutes``. ``--report`` only aggregates. The tables report a (task, method) only when all
its seeds are done at the chosen rate, and list what is missing.

Measured per cell: validation and test accuracy and loss, trainable parameters (head excluded),
XLA ``memory_analysis`` bytes of the jitted, donated train step (argument + temp + output − alias),
and the **CPU time** of a training step (``time.process_time`` around a step blocked until ready,
the median over the steps after the first; summed over the process's threads, so it measures the
work done and is far less affected than wall time by other jobs on the machine; the wall median
is kept in the cells too). Writes ``compare.md``, ``compare.json`` and ``compare.png`` (accuracy
± std against trainable %, one panel per task) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import fractions
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from experiments import _compare_tasks, quickstart
from experiments._compare_report import (  # noqa: F401 (re-exported)
    PROBE,
    aggregate,
    append_cell,
    cell_config,
    cell_key,
    choose,
    grid,
    read_cells,
    save_plot,
    tables,
)
from experiments._compare_run import (  # noqa: F401 (re-exported: the run's pieces, used by experiments.search)
    HEAD,
    HEAD_RE,
    Trainer,
    batches,
    classify,
    count,
    embed,
    embed_all,
    evaluate,
    init_head,
    make_method,
    make_step,
    prepare,
    probe_cell,
    take,
    train_probe,
    truncate_layers,
    with_head,
    xent,
)
from experiments._compare_specs import LEARNING_RATES, LR_FACTORS, ORDER, QUANTIZED_BASES, SPECS  # noqa: F401


# --- the grid ------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(_compare_tasks.TASKS), help=f"from: {', '.join(_compare_tasks.TASKS)}")
    p.add_argument("--methods", default="all", help=f"comma-separated (default all, in this order): {', '.join(ORDER)}")
    p.add_argument("--no-probe", action="store_true", help="leave out the linear-probe row")
    p.add_argument("--seeds", type=int, default=None, help="seeds per (task, method) (default 3, --quick 2)")
    p.add_argument("--lr-factors", default=None, help="the grid: LEARNING_RATES x these (default 1/3,1,3; --quick 1,3)")
    p.add_argument("--steps", type=int, default=None, help="training steps per cell (default 50, --quick 3)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=None, help="tokens per text (default 32, --quick 16)")
    p.add_argument("--n-train", type=int, default=None, help="training rows (default 800, --quick 48)")
    p.add_argument("--n-val", type=int, default=None, help="validation rows (default 200, --quick 24)")
    p.add_argument("--n-test", type=int, default=None, help="test rows (default 300, --quick 24)")
    p.add_argument("--data-seed", type=int, default=0, help="the seed of the train / validation / test cut")
    p.add_argument("--head-lr", type=float, default=1e-2, help="peak learning rate of the head")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--layers", type=int, default=None, help="keep the first N encoder layers (0: all; --quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test, not a result)")
    p.add_argument("--max-minutes", type=float, default=0, help="start no new cell after this long (0: no limit)")
    p.add_argument("--report", action="store_true", help="only aggregate the cells file, train nothing")
    p.add_argument("--cells", default=None, help="the JSONL cells file (default <out>/cells.jsonl)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "jpeft-compare"))
    p.add_argument("--out", default="experiments/results/compare")
    args = p.parse_args(argv)
    q = args.quick
    for k, full, quick in [("seeds", 3, 2), ("steps", 50, 3), ("seq", 32, 16), ("n_train", 800, 48),
                           ("n_val", 200, 24), ("n_test", 300, 24), ("layers", 0, 1)]:  # fmt: skip
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    args.lr_factors = [
        float(fractions.Fraction(f.strip())) for f in (args.lr_factors or ("1,3" if q else "1/3,1,3")).split(",")
    ]
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if bad := [t for t in args.tasks if t not in _compare_tasks.TASKS]:
        p.error(f"unknown --tasks {bad}; choose from {', '.join(_compare_tasks.TASKS)}")
    names = (
        list(ORDER) if args.methods == "all" else [m.strip().replace("-", "_").lower() for m in args.methods.split(",")]
    )
    if bad := [m for m in names if m not in SPECS]:
        p.error(f"unknown --methods {bad}; choose from {', '.join(ORDER)}")
    args.methods = ([] if args.no_probe else [PROBE]) + names
    for k in ("seeds", "steps", "batch", "seq", "n_train", "n_val", "n_test", "eval_batch"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    args.cells = args.cells or os.path.join(args.out, "cells.jsonl")
    return args


def run_grid(args: Any, cells: dict[str, dict[str, Any]]) -> int:
    """Computes the missing cells in priority order (method, then task); returns how many it added.

    The model, the tokenised tasks and each (task, method)'s compiled step are built only when a cell
    needs them, so a run over a complete grid trains and loads nothing.
    """
    t0, added, ctx = time.perf_counter(), 0, {}

    def model() -> tuple[Any, Any]:
        if "model" not in ctx:
            m, base, ctx["tokenizer"] = quickstart.load_model(quickstart.model_dir())
            ctx["model"] = truncate_layers(m, base, args.layers) if args.layers else (m, base)
        return ctx["model"]

    def data(task: str) -> dict[str, Any]:
        if task not in ctx:
            base = model()[1]
            sizes = dict(seq=args.seq, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.data_seed)
            ctx[task] = _compare_tasks.load(task, ctx["tokenizer"], cache_dir=args.cache, **sizes)
            ctx[task]["n_encoder"] = count(base)
        return ctx[task]

    def run_cell(name: str, task: str, lr: float, seed: int, trainer: Any) -> tuple[dict[str, Any], Any]:
        (m, base), d = model(), data(task)
        if name == PROBE:  # the pooled features of the frozen encoder, once per task
            if trainer is None:
                fwd = jax.jit(lambda p, b: embed(m.module.apply, p, b))
                trainer = {s: embed_all(None, base, d[s], args.eval_batch, fn=fwd) for s in ("train", "val", "test")}
            return {"result": probe_cell(trainer, d, seed, args), "trainable": 0, "trainable_pct": 0.0}, trainer
        trainer = trainer or Trainer(name, m, base, d, args)
        pct = 100.0 * trainer.trainable / d["n_encoder"]
        return {"result": trainer.run(lr, seed), "trainable": trainer.trainable, "trainable_pct": pct,
                "bytes": trainer.bytes}, trainer  # fmt: skip

    for name in args.methods:
        for task in args.tasks:
            trainer: Any = None
            for phase in ("sweep", "seeds"):
                if phase == "sweep":
                    todo = [(lr, 0) for lr in grid(name, args)]
                else:
                    lr = choose([cells.get(cell_key(cell_config(args, task, name, x, 0))) for x in grid(name, args)])
                    todo = [] if lr is None else [(lr, s) for s in range(1, args.seeds)]
                for lr, seed in todo:
                    config = cell_config(args, task, name, lr, seed)
                    key = cell_key(config)
                    if key in cells:
                        continue
                    if args.max_minutes and time.perf_counter() - t0 > 60 * args.max_minutes:
                        return added
                    c0, w0 = time.process_time(), time.perf_counter()
                    try:
                        out, trainer = run_cell(name, task, lr, seed, trainer)
                    except Exception as e:  # a failing cell is recorded with its error, not hidden
                        out = {"result": {"status": f"error: {type(e).__name__}: {e}"[:2000]}}
                    cell = {"key": key, "config": config, **out, "cell_cpu_s": time.process_time() - c0,
                            "cell_wall_s": time.perf_counter() - w0, "load": os.getloadavg(),
                            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                            "jax": jax.__version__, "backend": jax.default_backend()}  # fmt: skip
                    append_cell(args.cells, cell)
                    cells[key] = cell
                    added += 1
                    r = out["result"]
                    msg = (
                        f"val {r['val']['accuracy']:.3f} test {r['test']['accuracy']:.3f}"
                        if "val" in r
                        else r["status"]
                    )
                    tqdm.write(
                        f"{task:>6} {name:>16} lr {lr:<8g} seed {seed}: {msg[:300]} ({cell['cell_wall_s']:.0f} s)"
                    )
    return added


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the missing cells (unless ``--report``), then writes the tables; returns ``compare.json``'s content."""
    args = parse_args(argv)
    cells = read_cells(args.cells)
    added = 0 if args.report else run_grid(args, cells)
    aggs = [aggregate(cells, args, t, n) for n in args.methods for t in args.tasks]
    missing = [f"{a['task']} / {a['method']}: {a['missing']}" for a in aggs if "missing" in a]
    os.makedirs(args.out, exist_ok=True)
    head = (
        f"all-MiniLM-L6-v2{f' (first {args.layers} layers)' if args.layers else ''}; per task {args.n_train} train / "
        f"{args.n_val} validation / {args.n_test} test rows (stratified train_test_split, seed {args.data_seed}); "
        f"{args.steps} steps of batch {args.batch} × {args.seq} tokens; AdamW, warm-up + cosine; head lr {args.head_lr:g}. "
        f"Learning rate chosen per (task, method) on validation accuracy of seed 0 (grid: the method's rate × "
        f"{', '.join(f'{f:.3g}' for f in args.lr_factors)}); then seeds 1..{args.seeds - 1} at that rate. Test "
        f"accuracy and loss: mean ± sample std over the {args.seeds} seeds. Peak MiB: XLA memory_analysis of the "
        "jitted step (argument + temp + output − alias). **CPU ms/step: `time.process_time` around one step "
        "blocked until ready** (all threads; the median over steps 2..N and over seeds): robust to other jobs' "
        "load, which wall time (also shown) is not. The machine was shared (2 cores, other jobs running)."
    )
    md = ["# jpeft: every method, three tasks, a validation-chosen learning rate, repeated seeds", "", head, ""]
    md += [tables(aggs, args.tasks, args.methods, args)]
    md += ["", f"## Missing ({len(missing)} of {len(aggs)} task × method pairs)", ""]
    md += [f"- {m}" for m in missing] or ["none"]
    paths = {k: os.path.join(args.out, f"compare.{k}") for k in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write("\n".join(md) + "\n")
    save_plot(aggs, args.tasks, paths["png"])
    results = {
        "command": "python -m experiments.compare " + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": {"jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
                     "machine": platform.machine()},
        "args": vars(args), "cells_file": args.cells, "cells_added": added,
        "cells_total": sum(1 for c in cells.values() if c["config"]["task"] in args.tasks),
        "aggregates": aggs, "missing": missing, "files": list(paths.values()),
    }  # fmt: skip
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2, default=str)
        f.write("\n")
    print("\n".join(md))
    return results


if __name__ == "__main__":
    main()
