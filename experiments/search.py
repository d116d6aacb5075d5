"""Method and hyper-parameter search with Optuna: which method, at which size and learning rate, for a budget.

``python -m experiments.search`` searches over the method (LoRA, rsLoRA, DoRA, (IA)³, BitFit,
Houlsby adapters, prefix tuning, prompt tuning, MAM) and, per method, its size (LoRA rank, adapter
reduction factor, prefix / prompt length, MAM's prefix length and bottleneck) and its learning rate,
on the task of ``experiments.compare``: the pretrained *all-MiniLM-L6-v2* fine-tuned, with a linear
head, to tell the topic of a *BBC News* headline (data, model, pooling, head, schedule and the lean
train step are imported from ``experiments.quickstart`` and ``experiments.compare``).

* **Splits:** ``--val`` headlines drawn at random from the training split are the search's
  validation set (what Optuna sees); the rest train. The 384 held-out headlines of the quickstart's
  split are touched only to report each finished trial's accuracy.
* **Search:** a single-objective study minimising the validation loss after ``--steps`` steps, with
  the TPE sampler (``--startup`` random trials first) and a median pruner on the intermediate
  validation loss, reported every ``--eval-every`` steps (a trial whose loss is worse than the median
  of earlier trials at the same step stops there). ``--trials`` trials in all.
* **Methods are plain dicts:** each trial's method is ``jpeft.method_from_dict`` of a dict like
  ``{"__dataclass__": "LoRA", "fields": {"targets": ["query", "value"], "rank": 8, ...}}``; the
  search space (:data:`SPACE`, or a JSON file given to ``--space``) is checked before any training,
  so an unknown method or field is a clear :class:`jpeft.JpeftError`.
* **Output** (``--out``): ``search.json`` (every trial, the Pareto front, the command),
  ``pareto.png`` (trainable % of the encoder, log scale, vs held-out accuracy, the front drawn), and
  ``best/`` (the trial with the lowest validation loss, by ``jpeft.save``; ``best.json`` holds its
  method dict and learning rate). The script reloads ``best/`` with ``jpeft.restore`` onto the
  pretrained encoder, re-evaluates it on the held-out headlines and asserts the same accuracy.

The defaults (12 trials, at most 40 steps of batch 16 x 16 tokens) took 256 s of process CPU (559 s
wall on two CPU cores shared with other jobs), so at most about 5 minutes on two idle cores.
``--reload`` re-evaluates ``best/`` in a fresh process (about 20 s). ``main(argv)`` returns what it writes to ``search.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jpeft
from experiments import compare as C
from experiments import quickstart as Q

QV = ["query", "value"]
#: name -> the method's class and fixed fields, and the searched fields: ``[lo, hi]`` of ints (log
#: scale), ``[lo, hi]`` of floats (log scale) or ``{"choices": [...]}``. ``lr`` is the encoder's peak
#: learning rate (not a method field); the ranges bracket :data:`experiments.compare.LEARNING_RATES`.
SPACE: dict[str, dict[str, Any]] = {
    "lora": {"method": "LoRA", "fields": {"targets": QV, "alpha": 16.0}, "search": {"rank": [1, 32], "lr": [1e-4, 1e-2]}},
    "rslora": {
        "method": "LoRA",
        "fields": {"targets": QV, "alpha": 16.0, "use_rslora": True},
        "search": {"rank": [1, 32], "lr": [1e-4, 1e-2]},
    },
    "dora": {"method": "DoRA", "fields": {"targets": QV, "alpha": 16.0}, "search": {"rank": [1, 32], "lr": [1e-4, 1e-2]}},
    "ia3": {"method": "IA3", "fields": {}, "search": {"lr": [1e-3, 3e-2]}},
    "bitfit": {"method": "BitFit", "fields": {}, "search": {"lr": [1e-4, 1e-2]}},
    "houlsby": {"method": "HoulsbyAdapter", "fields": {}, "search": {"reduction_factor": [4, 64], "lr": [1e-4, 1e-2]}},
    "prefix": {
        "method": "PrefixTuning",
        "fields": {"projection_hidden_size": 128},
        "search": {"num_virtual_tokens": [4, 32], "lr": [1e-4, 1e-2]},
    },
    "prompt": {
        "method": "PromptTuning",
        "fields": {"init": "vocab"},
        "search": {"num_virtual_tokens": [4, 32], "lr": [3e-3, 1e-1]},
    },
    "mam": {
        "method": "MAM",
        "fields": {},
        "search": {"prefix_tokens": [4, 32], "adapter_bottleneck": [16, 192], "lr": [1e-4, 1e-2]},
    },
}  # fmt: skip


# --- the search space ------------------------------------------------------------------------------
def method_dict(entry: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``jpeft.method_from_dict`` dict of one space entry at ``values`` (``lr`` left out), head trainable."""
    fields = {**entry.get("fields", {}), **{k: v for k, v in values.items() if k != "lr"}}
    return {"__dataclass__": entry["method"], "fields": {**fields, "extra_trainable": C.HEAD_RE}}


def _low(spec: Any) -> Any:
    return spec["choices"][0] if isinstance(spec, Mapping) else spec[0]


def check_space(space: Mapping[str, Mapping[str, Any]]) -> None:
    """Raises a :class:`jpeft.JpeftError` naming the entry for anything the search could not build."""
    if not isinstance(space, Mapping) or not space:
        raise jpeft.JpeftError(f"search space: expected a non-empty dict of name -> entry, got {space!r}.")
    for name, entry in space.items():
        where = f"search space entry {name!r}"
        if not isinstance(entry, Mapping) or "method" not in entry or set(entry) - {"method", "fields", "search"}:
            raise jpeft.JpeftError(
                f"{where}: expected {{'method': 'LoRA', 'fields': {{...}}, 'search': {{'rank': [1, 32], 'lr': "
                f"[1e-4, 1e-2]}}}}, got {entry!r}."
            )
        search = entry.get("search", {})
        if "lr" not in search:
            raise jpeft.JpeftError(f"{where}: 'search' needs 'lr': [lo, hi], the learning rate's range.")
        for field, spec in search.items():
            ok = (isinstance(spec, Mapping) and list(spec) == ["choices"] and len(spec["choices"]) > 0) or (
                isinstance(spec, (list, tuple))
                and len(spec) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in spec)
                and 0 < spec[0] <= spec[1]
            )
            if not ok:
                raise jpeft.JpeftError(
                    f"{where}: search['{field}'] = {spec!r}; expected [lo, hi] with 0 < lo <= hi (ints or floats, "
                    "sampled on a log scale) or {'choices': [...]}."
                )
        try:  # the class, the fields and their types, at the low end of every range
            jpeft.method_from_dict(method_dict(entry, {k: _low(s) for k, s in search.items()}))
        except jpeft.JpeftError as e:
            raise jpeft.JpeftError(f"{where}: {e}") from None


def suggest(trial: Any, names: Sequence[str], space: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The trial's method name and searched values (Optuna parameters ``method`` and ``<name>.<field>``)."""
    name = trial.suggest_categorical("method", list(names))
    values = {}
    for field, spec in space[name].get("search", {}).items():
        key = f"{name}.{field}"
        if isinstance(spec, Mapping):
            values[field] = trial.suggest_categorical(key, list(spec["choices"]))
        elif all(isinstance(x, int) for x in spec):
            values[field] = trial.suggest_int(key, spec[0], spec[1], log=True)
        else:
            values[field] = trial.suggest_float(key, float(spec[0]), float(spec[1]), log=True)
    return name, values


# --- one trial --------------------------------------------------------------------------------------
def scorer(model: Any, method: jpeft.Method, batch: int) -> Any:
    """``score(params, data, y) -> {accuracy, loss}``: the head on the pooled embeddings, one compiled forward."""
    wrapped = jpeft.wrap(model.module.apply, method)
    fn = jax.jit(lambda p, b: C.embed(wrapped, p, b))

    def score(params: Mapping[str, Any], data: Mapping[str, np.ndarray], y: np.ndarray) -> dict[str, float]:
        encoder = {k: v for k, v in params.items() if k != C.HEAD}
        n = len(y)
        emb = [fn(encoder, C.take(data, np.arange(i, i + batch) % n))[: min(batch, n - i)] for i in range(0, n, batch)]
        return C.evaluate(params[C.HEAD], jnp.concatenate(emb).astype(jnp.float32), y)

    return score


def train_trial(
    trial: Any, method: jpeft.Method, lr: float, model: Any, params: dict[str, Any], data: Mapping[str, Any], args: Any
) -> dict[str, Any]:
    """Trains one configuration, reporting the validation loss every ``args.eval_every`` steps; may prune."""
    import optuna

    peft = C.prepare(method, params, jax.random.key(args.seed + 1))
    trainable, frozen = jpeft.split(method, peft)
    out: dict[str, Any] = {"trainable": C.count(trainable) - C.count(trainable[C.HEAD])}
    out["trainable_pct"] = 100.0 * out["trainable"] / data["n_encoder"]
    for k in ("trainable", "trainable_pct"):
        trial.set_user_attr(k, out[k])
    fn = C.make_step(model, method, trainable, lr, args.head_lr, args.steps)
    step = jax.jit(fn, donate_argnums=0)
    state = (jax.tree.map(jnp.copy, trainable), fn.tx.init(trainable))
    score = scorer(model, method, args.batch)
    key, curve = jax.random.key(args.seed + 2), []
    for i, idx in enumerate(data["feed"]):
        state, loss = step(
            state, frozen, C.take(data["train"], idx), jnp.asarray(data["train_y"][idx]), jax.random.fold_in(key, i)
        )
        if (i + 1) % args.eval_every == 0 or i + 1 == len(data["feed"]):
            val = score(jpeft.combine(state[0], frozen), data["val"], data["val_y"])
            curve.append({"step": i + 1, "train_loss": float(loss), **{f"val_{k}": v for k, v in val.items()}})
            trial.set_user_attr("curve", curve)
            if not math.isfinite(val["loss"]):
                raise FloatingPointError(f"validation loss {val['loss']} at step {i + 1}")
            trial.report(val["loss"], i + 1)
            if i + 1 < len(data["feed"]) and trial.should_prune():
                raise optuna.TrialPruned(f"val loss {val['loss']:.3f} at step {i + 1}")
    peft = jpeft.combine(state[0], frozen)
    out["val"] = {"accuracy": curve[-1]["val_accuracy"], "loss": curve[-1]["val_loss"]}
    out["heldout"] = score(peft, data["eval"], data["eval_y"])
    out["peft"] = peft
    return out


# --- the Pareto front --------------------------------------------------------------------------------
def pareto(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The finished trials that no other beats on both fewer trainable % and higher held-out accuracy."""
    done = sorted(
        (r for r in rows if r["state"] == "COMPLETE"), key=lambda r: (r["trainable_pct"], -r["heldout"]["accuracy"])
    )
    front, best = [], -1.0
    for r in done:
        if r["heldout"]["accuracy"] > best:
            front.append(r)
            best = r["heldout"]["accuracy"]
    return front


def describe(r: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["values"].items())


def table(rows: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]]) -> str:
    on_front = {r["number"] for r in front}
    lines = [
        "| trial | method | hyper-parameters | trainable | trainable % | val loss | val acc | held-out acc | state |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["state"] != "COMPLETE", r.get("trainable_pct", 0.0))):
        last = r["curve"][-1] if r.get("curve") else {}
        acc = f"{r['heldout']['accuracy']:.1%}" if "heldout" in r else ""
        state = r["state"].lower() + (" (Pareto)" if r["number"] in on_front else "")
        if r.get("error"):
            state += f": {r['error'][:120]}"
        pct = f"{r['trainable_pct']:.3g}" if "trainable_pct" in r else ""
        n = f"{r['trainable']:,}" if "trainable" in r else ""
        val_loss = f"{last['val_loss']:.3f} @{last['step']}" if last else ""
        val_acc = f"{last['val_accuracy']:.1%}" if last else ""
        lines.append(
            f"| {r['number']} | {r['name']} | {describe(r)} | {n} | {pct} | {val_loss} | {val_acc} | {acc} | {state} |"
        )
    return "\n".join(lines)


def save_plot(rows: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]], probe: float, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    names = list(dict.fromkeys(r["name"] for r in done))
    for i, name in enumerate(names):
        pts = [r for r in done if r["name"] == name]
        ax.scatter([max(r["trainable_pct"], 1e-4) for r in pts], [100 * r["heldout"]["accuracy"] for r in pts],
                   s=40, marker="osD^v<>pP*Xh"[i % 12], label=name, zorder=3)  # fmt: skip
    if front:  # the front as a staircase to the largest trial, its points ringed
        xs = [max(r["trainable_pct"], 1e-4) for r in front]
        ys = [100 * r["heldout"]["accuracy"] for r in front]
        right = max(max(r["trainable_pct"], 1e-4) for r in done)
        ax.step(xs + [right], ys + ys[-1:], where="post", c="k", lw=1, label="Pareto front")
        ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="k", zorder=4)
    ax.axhline(100 * probe, ls="--", c="gray", lw=1, label="frozen encoder + head")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (% of the encoder, log scale)", ylabel="held-out accuracy (%)")
    ax.set_title("Optuna search (TPE + median pruning), all-MiniLM-L6-v2 on BBC News headline topics", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- main ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.search", description=__doc__.split("\n")[0])
    p.add_argument(
        "--methods", default=",".join(SPACE), help=f"comma-separated names of the space, from: {', '.join(SPACE)}"
    )
    p.add_argument("--space", default=None, help="a JSON file with a search space like SPACE (replaces it)")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--steps", type=int, default=40, help="training steps per trial (the budget)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between validation losses (pruning points)")
    p.add_argument("--startup", type=int, default=4, help="random trials before TPE models the space")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=16, help="tokens per headline")
    p.add_argument("--head-lr", type=float, default=1e-2)
    p.add_argument("--val", type=int, default=192, help="training headlines held back as the search's validation set")
    p.add_argument("--train-size", type=int, default=0, help="a random subset of N training headlines (0: all)")
    p.add_argument("--eval-size", type=int, default=0, help="a random subset of N held-out headlines (0: all 384)")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N encoder layers (0: all; for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results/search")
    p.add_argument("--reload", action="store_true", help="no search: reload --out's best/ and re-evaluate it")
    args = p.parse_args(argv)
    for name in ("trials", "steps", "eval_every", "batch", "seq", "val"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def load_space(args: argparse.Namespace) -> dict[str, Any]:
    """The space (``--space`` or :data:`SPACE`) restricted to ``--methods``, checked."""
    if args.space:
        with open(args.space) as f:
            space = json.load(f)
    else:
        space = SPACE
    names = (
        [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods != ",".join(SPACE) else list(space)
    )
    unknown = [m for m in names if m not in space]
    if unknown:
        raise jpeft.JpeftError(f"--methods {unknown} are not in the search space; it has {', '.join(space)}.")
    space = {m: space[m] for m in names}
    check_space(space)
    return space


def load_task(args: argparse.Namespace) -> tuple[list[str], Any, dict[str, Any], dict[str, Any]]:
    """Labels, model, pretrained params and the tokenised train / validation / held-out splits of ``args``."""
    labels, splits = Q.load_headlines(Q.data_dir())
    (train_x, train_y), (eval_x, eval_y) = splits["train"], splits["eval"]
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(train_x))
    if len(order) <= args.val:
        raise jpeft.JpeftError(f"--val {args.val} leaves no training headlines (there are {len(order)}).")
    val_idx, train_idx = np.sort(order[: args.val]), np.sort(order[args.val :])
    if args.train_size:
        train_idx = np.sort(rng.permutation(train_idx)[: args.train_size])
    if args.eval_size:
        keep = np.sort(rng.permutation(len(eval_x))[: args.eval_size])
        eval_x, eval_y = [eval_x[i] for i in keep], eval_y[keep]
    model, base, tokenizer = Q.load_model(Q.model_dir())
    if args.layers:
        model, base = C.truncate_layers(model, base, args.layers)
    tok = lambda idx: Q.tokenize(tokenizer, [train_x[i] for i in idx], args.seq)  # noqa: E731
    data = {
        "train": tok(train_idx), "train_y": train_y[train_idx], "val": tok(val_idx), "val_y": train_y[val_idx],
        "eval": Q.tokenize(tokenizer, eval_x, args.seq), "eval_y": eval_y, "n_encoder": C.count(base),
        "feed": C.batches(len(train_idx), args.batch, args.steps, args.seed),
        "n_train": len(train_idx), "n_val": len(val_idx),
    }  # fmt: skip
    return labels, model, base, data


def reevaluate(out: str, model: Any, base: dict[str, Any], labels: Sequence[str], data: Mapping[str, Any], batch: int):
    """Restores ``<out>/best`` onto the pretrained encoder and checks its held-out accuracy against ``best.json``."""
    with open(os.path.join(out, "best.json")) as f:
        saved = json.load(f)
    restored = jpeft.restore(os.path.join(os.path.abspath(out), "best"), C.with_head(base, len(labels)))
    if restored.method != jpeft.method_from_dict(saved["method"]):
        raise AssertionError(f"the checkpoint's method {restored.method} is not best.json's {saved['method']}")
    got = scorer(model, restored.method, batch)(restored.params, data["eval"], data["eval_y"])
    want = saved["heldout"]
    if got["accuracy"] != want["accuracy"] or abs(got["loss"] - want["loss"]) > 1e-5:
        raise AssertionError(f"{out}/best re-evaluates to {got}, not the search's {want}")
    return got


def reload(out: str) -> dict[str, Any]:
    """``--reload``: rebuilds the run's data from ``best.json``'s arguments and re-evaluates ``best/``."""
    with open(os.path.join(out, "best.json")) as f:
        saved = json.load(f)
    args = argparse.Namespace(**saved["args"])
    labels, model, base, data = load_task(args)
    got = reevaluate(out, model, base, labels, data, args.batch)
    print(
        f"{out}/best (trial {saved['trial']}, {saved['method']['__dataclass__']}): held-out accuracy "
        f"{got['accuracy']:.1%}, loss {got['loss']:.4f}; the search measured {saved['heldout']['accuracy']:.1%}, "
        f"{saved['heldout']['loss']:.4f}"
    )
    return got


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the search and returns everything written to ``search.json``."""
    import optuna

    args = parse_args(argv)
    if args.reload:
        return reload(args.out)
    space = load_space(args)  # before any loading or training: a bad space fails at once
    t_start = time.perf_counter()
    labels, model, base, data = load_task(args)
    print(
        f"task: BBC News headline topic ({len(labels)} topics): {data['n_train']} train / {data['n_val']} validation / "
        f"{len(data['eval_y'])} held-out headlines; all-MiniLM-L6-v2 ({data['n_encoder']:,} parameters"
        f"{f', first {args.layers} layers' if args.layers else ''}); {args.trials} trials of <= {args.steps} steps of "
        f"batch {args.batch} x {args.seq} tokens over {', '.join(space)}"
    )
    frozen_train = C.embed_all(model.module.apply, base, data["train"], args.batch)
    probe_head = C.train_probe(frozen_train, data["train_y"], data["feed"], len(labels), args)
    probe = C.evaluate(probe_head, C.embed_all(model.module.apply, base, data["eval"], args.batch), data["eval_y"])

    params = C.with_head(base, len(labels))
    best: dict[str, Any] = {}
    bar = tqdm(total=args.trials, desc="trials", unit="trial", dynamic_ncols=True, file=sys.stderr)

    def objective(trial: optuna.Trial) -> float:
        name, values = suggest(trial, list(space), space)
        d = method_dict(space[name], values)
        trial.set_user_attr("name", name)
        trial.set_user_attr("values", values)
        trial.set_user_attr("method", d)
        t0 = time.perf_counter()
        try:
            res = train_trial(trial, jpeft.method_from_dict(d), values["lr"], model, params, data, args)
        except optuna.TrialPruned:
            raise
        except Exception as e:  # reported in the table, never hidden; the study goes on
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            raise
        finally:
            trial.set_user_attr("wall_s", time.perf_counter() - t0)
            bar.update()
        for k in ("val", "heldout"):
            trial.set_user_attr(k, res[k])
        if not best or res["val"]["loss"] < best["val"]["loss"]:
            best.update(res, number=trial.number, method=d, lr=values["lr"])
        return res["val"]["loss"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=args.startup),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=args.startup, n_warmup_steps=args.eval_every),
    )
    study.optimize(objective, n_trials=args.trials, catch=(Exception,))
    bar.close()

    rows = []
    for t in study.trials:
        rows.append({"number": t.number, "state": t.state.name, **t.user_attrs})
    front = pareto(rows)

    os.makedirs(args.out, exist_ok=True)
    reloaded = None
    if best:
        # The best trial (lowest validation loss) as a checkpoint; reloaded onto the pretrained encoder.
        method = jpeft.method_from_dict(best["method"])
        ckpt = jpeft.save(os.path.join(os.path.abspath(args.out), "best"), method, best["peft"], step=args.steps,
                          overwrite=True)  # fmt: skip
        with open(os.path.join(args.out, "best.json"), "w") as f:
            json.dump({"trial": best["number"], "method": best["method"], "lr": best["lr"], "checkpoint": ckpt,
                       "heldout": best["heldout"], "val": best["val"], "args": vars(args)}, f, indent=2)  # fmt: skip
        reloaded = reevaluate(args.out, model, base, labels, data, args.batch)
    md = table(rows, front)
    png = save_plot(rows, front, probe["accuracy"], os.path.join(args.out, "pareto.png"))
    results = {
        "command": "python -m experiments.search " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": {"jax": jax.__version__, "optuna": optuna.__version__, "backend": jax.default_backend(),
                     "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "args": vars(args),
        "space": space,
        "task": {"labels": labels, "n_train": data["n_train"], "n_val": data["n_val"], "n_eval": len(data["eval_y"]),
                 "n_encoder": data["n_encoder"]},
        "before": probe,
        "trials": rows,
        "pareto": [r["number"] for r in front],
        "best": {k: best[k] for k in ("number", "method", "lr", "val", "heldout")} if best else None,
        "best_reloaded": reloaded,
        "wall_s": time.perf_counter() - t_start,
        "files": [png, os.path.join(args.out, "best"), os.path.join(args.out, "search.json")],
    }  # fmt: skip
    with open(results["files"][-1], "w") as f:
        json.dump(results, f, indent=2, default=str)
        f.write("\n")
    print(f"\nbefore (frozen encoder + head): held-out accuracy {probe['accuracy']:.1%}\n")
    print(md)
    if best:
        shown = {k: v for k, v in best["method"]["fields"].items() if k != "extra_trainable"}
        print(
            f"\nbest (lowest validation loss): trial {best['number']}, {best['method']['__dataclass__']} "
            f"({describe({'values': {**shown, 'lr': best['lr']}})}): held-out accuracy "
            f"{best['heldout']['accuracy']:.1%}; reloaded from {args.out}/best: {reloaded['accuracy']:.1%}"
        )
    print(f"\nwrote {', '.join(results['files'])} in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
