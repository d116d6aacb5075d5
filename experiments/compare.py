"""Every jpeft method on one task and one budget: accuracy, trainable share, step time and XLA bytes.

``python -m experiments.compare`` fine-tunes the pretrained sentence encoder *all-MiniLM-L6-v2*
(a 6-layer, width-384 BERT) on the quickstart's task, the topic of a *BBC News* headline (five
topics, 1,583 training and 384 held-out headlines; see ``experiments/quickstart.py`` and
``experiments/data/README.md``), once per method, offline. Data loading and tokenisation are
imported from the quickstart; mean pooling, the head, the loss, the batches and the schedule restate
its.

**Same for every method:** the training batches (``--batch`` headlines of ``--seq`` tokens, the same
shuffled order), the number of steps, the schedule's shape (linear warm-up over 10% of the steps
then cosine decay to a tenth), AdamW (weight decay 0.01) and the classifier head (384 -> 5, zero
init). The head sits in the parameter tree at ``classifier/`` and trains through every method's
``extra_trainable=r"classifier/.*"``; it follows the method's optimizer, with its updates scaled to
the head learning rate ``--head-lr`` (Adam is invariant to gradient scale, so this is Adam at the
head's rate). **Per method:** only the peak learning rate of the encoder's trainable leaves, in
:data:`LEARNING_RATES`, picked per method family from the papers' ranges (full fine-tuning small,
prompt tuning large). The method table (``SPECS``, ``LEARNING_RATES``, ``MEMORY_METHODS``, ``QUANTIZED_BASES``)
lives in ``experiments/_compare_specs.py``. Rows in ``QUANTIZED_BASES`` quantise the encoder's 36 linear
kernels (``jpeft.quantize``, INT8 / INT4) and run their method through ``jpeft.on_quantized``. A
method whose outputs carry a leading member axis (a prompt ensemble's ``(k, B, ...)``) trains on the
mean loss over its members and is evaluated by the members' majority vote (``jpeft.PromptEnsemble.vote``),
with each member's accuracy reported too.

Measured, all in one process so the ratios compare like with like:

* held-out accuracy and loss after training; the "before" baseline is the quickstart's linear probe
  (the frozen pretrained encoder, with the same head trained for the same steps);
* trainable parameters of the encoder (the head's 1,925 are not counted) and their share of the
  encoder's 22.7 M;
* the median wall time of a training step (compiled ahead of time; the first step left out), and
  its ratio to ``Full``'s in the same run;
* the jitted train step's peak bytes by XLA's ``compiled.memory_analysis()``: argument + temp +
  output - alias (the state is donated);
* a memory table: a few methods x batch sizes x base dtype (fp32, bf16, NF4, INT8, INT4), bytes by
  ``memory_analysis`` and the median of a few timed steps.

Writes ``compare.md`` (both tables), ``compare.png`` (trainable %, log scale, against held-out
accuracy, as figure 2 of He et al., *Towards a Unified View of Parameter-Efficient Transfer
Learning*, ICLR 2022) and ``compare.json`` (everything, with the exact command) to ``--out``.

The default (80 steps of batch 32, all 384 held-out headlines, memory table at batch 8 and 32)
takes about 15-25 minutes on two idle CPU cores; ``--quick`` (25 steps, 128 held-out headlines,
batch 8 only) about a third of that. ``--methods`` picks methods, ``--steps`` the budget.

A method whose class this jpeft lacks is listed as "not available"; one that raises is listed
with its error. Neither is faked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jpeft
from experiments import quickstart as qs
from experiments._compare_specs import (  # noqa: F401 (re-exported: the method table)
    ALL_LINEAR,
    DIFF_PRUNING_LAMBDA,
    LEARNING_RATES,
    MEMORY_METHODS,
    MINILM_HEADS,
    QUANTIZED_BASES,
    QV,
    SPECS,
)

HEAD = "classifier"
HEAD_RE = rf"{HEAD}/.*"


# --- the task's pieces (the quickstart's, restated here so that its edits cannot change this run) ---
def schedule(lr: float, steps: int) -> optax.Schedule:
    """Linear warm-up over 10% of the steps (at most 30), then cosine decay to ``lr / 10``."""
    warmup = max(1, min(30, steps // 10))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr / 10)


def classify(head: Mapping[str, jax.Array], emb: jax.Array) -> jax.Array:
    """``(..., B, d)`` embeddings -> ``(..., B, C)`` logits (leading axes: an ensemble's members)."""
    return emb @ head["kernel"] + head["bias"].reshape((1,) * (emb.ndim - 1) + head["bias"].shape)


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    """The mean cross-entropy over every row; ``(k, B, C)`` logits average the ``k`` members' losses."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(y, logits.shape[:-1])).mean()


def init_head(dim: int, n_labels: int) -> dict[str, jax.Array]:
    """A zero linear head: every class starts equally likely."""
    return {"kernel": jnp.zeros((dim, n_labels), jnp.float32), "bias": jnp.zeros((n_labels,), jnp.float32)}


def batches(n: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` index batches from shuffled epochs; the same for every method."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order.extend(rng.permutation(n).tolist())
    return [np.asarray(order[i * batch : (i + 1) * batch]) for i in range(steps)]


def take(data: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v[idx]) for k, v in data.items()}


def embed_all(apply_fn: Callable[..., Any], params: Any, data: Mapping[str, np.ndarray], batch: int) -> jax.Array:
    """Embeddings ``(..., N, d)`` of every row of ``data``, in chunks of ``batch`` rows (the last padded by wrapping)."""
    fn = jax.jit(lambda p, b: embed(apply_fn, p, b))
    n = len(data["input_ids"])
    out = []
    for i in range(0, n, batch):
        out.append(fn(params, take(data, np.arange(i, i + batch) % n))[..., : min(batch, n - i), :])
    return jnp.concatenate(out, axis=-2).astype(jnp.float32)


def evaluate(head: Mapping[str, jax.Array], emb: jax.Array, y: np.ndarray) -> dict[str, Any]:
    """Held-out accuracy and loss. Embeddings ``(k, N, d)`` with a member axis (a prompt ensemble) are
    combined by ``jpeft.PromptEnsemble.vote`` (majority of the members' arg-max); the loss is then the
    members' mean and ``member_accuracy`` lists each member's accuracy."""
    logits, labels = classify(head, emb), jnp.asarray(y)
    out: dict[str, Any] = {"loss": float(xent(logits, labels))}
    if logits.ndim == 2:
        out["accuracy"] = float(jnp.mean(jnp.argmax(logits, -1) == labels))
        return out
    out["accuracy"] = float(jnp.mean(jpeft.PromptEnsemble.vote(logits) == labels))
    out["member_accuracy"] = [float(a) for a in jnp.mean(jnp.argmax(logits, -1) == labels[None], axis=-1)]
    return out


def train_probe(
    features: jax.Array, y: np.ndarray, feed: Sequence[np.ndarray], n_labels: int, args: Any
) -> dict[str, jax.Array]:
    """The "before" baseline: the head alone on frozen-encoder features, same batches, steps and head lr."""
    tx = optax.adamw(schedule(args.head_lr, args.steps), weight_decay=0.01)
    labels = jnp.asarray(y)

    @jax.jit
    def step(state, idx):
        head, opt = state
        grad = jax.grad(lambda h: xent(classify(h, features[idx]), labels[idx]))(head)
        updates, opt = tx.update(grad, opt, head)
        return optax.apply_updates(head, updates), opt

    head = init_head(features.shape[1], n_labels)
    state = (head, tx.init(head))
    for idx in tqdm(feed, desc="frozen encoder + head", unit="step", dynamic_ncols=True, file=sys.stderr, leave=False):
        state = step(state, jnp.asarray(idx))
    return state[0]


# --- methods -------------------------------------------------------------------------------------
def make_method(name: str, steps: int) -> jpeft.Method | str:
    """The method ``name`` with the head trainable, or a string saying why it is not available.

    A :data:`QUANTIZED_BASES` row's method runs through ``jpeft.on_quantized``."""
    _, cls_name, kwargs = SPECS[name]
    needed = [cls_name] + ([QUANTIZED_BASES[name], "on_quantized"] if name in QUANTIZED_BASES else [])
    missing = [n for n in needed if getattr(jpeft, n, None) is None]
    if missing:
        return f"not available: jpeft {jpeft.__version__} has no {', '.join(missing)}"
    method = getattr(jpeft, cls_name)(**kwargs(steps), extra_trainable=HEAD_RE)
    return jpeft.on_quantized(method) if name in QUANTIZED_BASES else method


def prepare(method: jpeft.Method, params: dict[str, Any], key: jax.Array, name: str = "") -> Any:
    """``jpeft.apply`` on the encoder and head, after quantising the encoder's linear kernels for QLoRA
    (NF4) and the :data:`QUANTIZED_BASES` rows (their format)."""
    if hasattr(jpeft, "QLoRA") and isinstance(method, jpeft.QLoRA):
        params = jpeft.quantize(params, method.quant, targets=ALL_LINEAR)
    elif name in QUANTIZED_BASES:
        params = jpeft.quantize(params, getattr(jpeft, QUANTIZED_BASES[name])(), targets=ALL_LINEAR)
    return jpeft.apply(method, params, key=key)


def count(tree: Any) -> int:
    """Elements of the float and integer leaves of a tree (a quantised kernel counts its logical size)."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=jpeft.quant.is_quantized):
        total += math.prod(leaf.shape)
    return total


def with_head(params: Mapping[str, Any], n_labels: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    head = init_head(params["embeddings"]["word_embeddings"]["embedding"].shape[1], n_labels)
    return {**params, HEAD: jax.tree.map(lambda x: x.astype(dtype), head)}


# --- the train step ------------------------------------------------------------------------------
def make_step(
    model: Any, method: jpeft.Method, trainable: Any, lr: float, head_lr: float, steps: int
) -> Callable[..., tuple[Any, jax.Array]]:
    """A jitted ``step((trainable, opt_state), frozen, batch, labels, key) -> (state, loss)``.

    The lean path: gradients with respect to the trainable half of ``jpeft.split`` only. The
    state is donated.
    """
    tx = jpeft.optimizer(optax.adamw(schedule(lr, steps), weight_decay=0.01), method, trainable)

    def head_mask(tree: Any) -> Any:  # True on the head's leaves (None holes stay holes)
        return {k: jax.tree.map(lambda _, is_head=(k == HEAD): is_head, v) for k, v in tree.items()}

    tx = optax.chain(tx, optax.masked(optax.scale(head_lr / lr), head_mask))
    wrapped = jpeft.wrap(model.module.apply, method)
    lam = DIFF_PRUNING_LAMBDA if type(method).__name__ == "DiffPruning" else 1.0

    def loss_fn(t, frozen, batch, labels, key):
        params = jpeft.combine(t, frozen)
        encoder = {k: v for k, v in params.items() if k != HEAD}
        emb = embed(wrapped, encoder, batch, rngs={"dropout": key})
        logits = classify(params[HEAD], emb.astype(jnp.float32))
        return xent(logits, labels) + lam * jpeft.regularizer(method, params)

    def step(state, frozen, batch, labels, key):
        t, opt = state
        loss, g = jax.value_and_grad(loss_fn)(t, frozen, batch, labels, key)
        updates, opt = tx.update(g, opt, t)
        return (optax.apply_updates(t, updates), opt), loss

    step.tx = tx  # type: ignore[attr-defined]
    return step


def embed(apply_fn: Callable[..., Any], params: Any, batch: Mapping[str, jax.Array], **kw: Any) -> jax.Array:
    """The quickstart's mean pooling, with keyword arguments (``rngs``) passed to ``apply_fn``."""
    ids = batch["input_ids"]
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden = apply_fn(
        {"params": params}, ids, batch["attention_mask"], batch["token_type_ids"], pos, return_dict=False, **kw
    )[0]
    # Outputs may carry leading member axes (a prompt ensemble's (k, B, T, d)): pool over T, keep them.
    mask = batch["attention_mask"][..., None].astype(hidden.dtype)
    mask = mask.reshape((1,) * (hidden.ndim - mask.ndim) + mask.shape)
    return (hidden * mask).sum(-2) / jnp.maximum(mask.sum(-2), 1.0)


def peak_bytes(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    parts = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }
    parts["total"] = parts["argument"] + parts["temp"] + parts["output"] - parts["alias"]
    return parts


def compile_step(step: Callable[..., Any], state: Any, frozen: Any, batch: Any, labels: Any) -> Any:
    jitted = jax.jit(step, donate_argnums=0)
    return jitted.lower(state, frozen, batch, labels, jax.random.key(0)).compile()


# --- one method ----------------------------------------------------------------------------------
def run_method(
    name: str, model: Any, params: dict[str, Any], data: Mapping[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Trains and evaluates one method; returns its row (or ``status`` saying why there is none)."""
    label = SPECS[name][0]
    row: dict[str, Any] = {"name": name, "label": label, "lr": LEARNING_RATES[name]}
    method = make_method(name, args.steps)
    if isinstance(method, str):
        return {**row, "status": method}
    row["method"] = repr(method)
    peft = prepare(method, params, jax.random.key(args.seed + 1), name)
    trainable, frozen = jpeft.split(method, peft)
    n_head = count(trainable[HEAD])
    row["trainable"] = count(trainable) - n_head
    row["trainable_pct"] = 100.0 * row["trainable"] / data["n_encoder"]
    step = make_step(model, method, trainable, LEARNING_RATES[name], args.head_lr, args.steps)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; the base leaves must survive
    state = (trainable, step.tx.init(trainable))
    train, y, feed = data["train"], data["train_y"], data["feed"]
    first = (take(train, feed[0]), jnp.asarray(y[feed[0]]))
    compiled = compile_step(step, state, frozen, *first)
    row["bytes"] = peak_bytes(compiled)
    losses, times = [], []
    key = jax.random.key(args.seed + 2)
    for i, idx in enumerate(
        tqdm(feed, desc=f"{name:>15}", unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)
    ):
        batch, labels = take(train, idx), jnp.asarray(y[idx])
        t0 = time.perf_counter()
        state, loss = compiled(state, frozen, batch, labels, jax.random.fold_in(key, i))
        losses.append(float(loss))  # waits for the step
        times.append(time.perf_counter() - t0)
    row["loss_first"], row["loss_last"] = losses[0], float(np.mean(losses[-10:]))
    row["step_ms"] = 1e3 * statistics.median(times[1:] if len(times) > 1 else times)
    peft = jpeft.combine(state[0], frozen)
    if "AdaLoRA" in type(method).__name__:
        row["adalora_ranks"] = {k: int(v) for k, v in jpeft.adalora_ranks(state[1]).items()}
    wrapped = jpeft.wrap(model.module.apply, method)
    encoder = {k: v for k, v in peft.items() if k != HEAD}
    emb = embed_all(wrapped, encoder, data["eval"], args.batch)
    row["after"] = evaluate(peft[HEAD], emb, data["eval_y"])
    row["finite"] = all(math.isfinite(v) for v in losses) and math.isfinite(row["after"]["loss"])
    row["status"] = "ok" if row["finite"] else "non-finite"
    return row


# --- the memory table ----------------------------------------------------------------------------
def memory_row(
    name: str, dtype: str, batch_size: int, model: Any, params: dict[str, Any], data: Mapping[str, Any], args: Any
) -> dict[str, Any]:
    """XLA bytes of one train step and the median of ``args.mem_steps`` timed steps."""
    row: dict[str, Any] = {"name": name, "label": SPECS[name][0], "dtype": dtype, "batch": batch_size}
    method = make_method(name, args.steps)
    if isinstance(method, str):
        return {**row, "status": method}
    base = params if dtype != "bf16" else jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    peft = prepare(method, base, jax.random.key(0), name)
    trainable, frozen = jpeft.split(method, peft)
    step = make_step(model, method, trainable, LEARNING_RATES[name], args.head_lr, args.steps)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it
    state = (trainable, step.tx.init(trainable))
    idx = np.arange(batch_size) % len(data["train_y"])
    batch, labels = take(data["train"], idx), jnp.asarray(data["train_y"][idx])
    compiled = compile_step(step, state, frozen, batch, labels)
    row["bytes"] = peak_bytes(compiled)
    times = []
    for i in range(args.mem_steps + 1):
        t0 = time.perf_counter()
        state, loss = compiled(state, frozen, batch, labels, jax.random.key(i))
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    row["step_ms"] = 1e3 * statistics.median(times[1:])
    row["status"] = "ok" if math.isfinite(float(loss)) else "non-finite"
    return row


# --- outputs -------------------------------------------------------------------------------------
def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def results_table(rows: Sequence[Mapping[str, Any]], probe: Mapping[str, float]) -> str:
    full = next((r for r in rows if r["name"] == "full" and r.get("status") == "ok"), None)
    lines = [
        "| method | lr | trainable | trainable % | acc before → after | Δ acc | held-out loss | step ms | × Full | peak MiB |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "after" not in r:
            lines.append(f"| {r['label']} | | | | {r['status']} | | | | | |")
            continue
        ratio = f"{r['step_ms'] / full['step_ms']:.2f}" if full else "n/a"
        acc = r["after"]["accuracy"]
        mark = "" if r["status"] == "ok" else f" ({r['status']})"
        lines.append(
            f"| {r['label']}{mark} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_pct']:.3g} | "
            f"{probe['accuracy']:.1%} → {acc:.1%} | {100 * (acc - probe['accuracy']):+.1f} | "
            f"{r['after']['loss']:.3f} | {r['step_ms']:.0f} | {ratio} | {mib(r['bytes']['total'])} |"
        )
    return "\n".join(lines)


def memory_table(rows: Sequence[Mapping[str, Any]]) -> str:
    batches = sorted({r["batch"] for r in rows})
    head = "| method | base dtype | " + " | ".join(f"B={b} MiB (args) | B={b} step ms" for b in batches) + " |"
    lines = [head, "|---|---|" + "---:|---:|" * len(batches)]
    keys = list(dict.fromkeys((r["name"], r["dtype"]) for r in rows))
    for name, dtype in keys:
        cells = []
        for b in batches:
            r = next(x for x in rows if (x["name"], x["dtype"], x["batch"]) == (name, dtype, b))
            if "bytes" in r:
                cells += [f"{mib(r['bytes']['total'])} ({mib(r['bytes']['argument'])})", f"{r['step_ms']:.0f}"]
            else:
                cells += [r["status"], ""]
        label = next(x["label"] for x in rows if x["name"] == name)
        lines.append(f"| {label} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(rows: Sequence[Mapping[str, Any]], probe: Mapping[str, float], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "after" in r]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    markers = "osD^v<>pP*Xh"
    for i, r in enumerate(done):
        x = max(r["trainable_pct"], 1e-4)
        ax.scatter(x, 100 * r["after"]["accuracy"], s=50, marker=markers[i % len(markers)], label=r["label"], zorder=3)
        ax.annotate(r["name"], (x, 100 * r["after"]["accuracy"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axhline(100 * probe["accuracy"], ls="--", c="gray", lw=1, label="frozen encoder + head (linear probe)")
    ax.set_xscale("log")
    ax.set(xlabel="fine-tuned parameters (% of the encoder, log scale)", ylabel="held-out accuracy (%)")
    ax.set_title("jpeft methods, all-MiniLM-L6-v2 on BBC News headline topics")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- main ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="all", help=f"comma-separated, from: {', '.join(SPECS)}")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default 80, --quick 25)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=16, help="tokens per headline")
    p.add_argument("--head-lr", type=float, default=1e-2, help="peak learning rate of the head")
    p.add_argument(
        "--eval-size",
        type=int,
        default=None,
        help="a fixed random subset of N held-out headlines (default all 384, --quick 128)",
    )
    p.add_argument(
        "--memory-batches", default=None, help="batch sizes of the memory table (default 8,32; 'none': skip)"
    )
    p.add_argument("--mem-steps", type=int, default=None, help="timed steps per memory-table cell (default 3)")
    p.add_argument(
        "--memory-methods", default=",".join(n for n, _ in MEMORY_METHODS), help="methods of the memory table"
    )
    p.add_argument(
        "--train-size", type=int, default=0, help="use a fixed random subset of N training headlines (0: all)"
    )
    p.add_argument("--layers", type=int, default=0, help="keep only the first N encoder layers (0: all; for tests)")
    p.add_argument(
        "--quick", action="store_true", help="fewer steps, a smaller held-out set, batch 8 in the memory table"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results/compare")
    args = p.parse_args(argv)
    q = args.quick
    args.steps = args.steps if args.steps is not None else (25 if q else 80)
    args.eval_size = args.eval_size if args.eval_size is not None else (128 if q else 0)
    args.memory_batches = args.memory_batches or ("8" if q else "8,32")
    args.mem_steps = args.mem_steps if args.mem_steps is not None else (2 if q else 3)
    names = (
        list(SPECS) if args.methods == "all" else [m.strip().replace("-", "_").lower() for m in args.methods.split(",")]
    )
    unknown = [m for m in names if m not in SPECS]
    if unknown:
        p.error(f"unknown --methods {unknown}; choose from {', '.join(SPECS)}")
    args.methods = names
    mem = [m.strip().replace("-", "_").lower() for m in args.memory_methods.split(",") if m.strip()]
    known = dict(MEMORY_METHODS)
    if any(m not in known for m in mem):
        p.error(f"unknown --memory-methods {[m for m in mem if m not in known]}; choose from {', '.join(known)}")
    args.memory_methods = mem
    for name in ("steps", "batch", "seq", "mem_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def truncate_layers(model: Any, params: dict[str, Any], n: int) -> tuple[Any, dict[str, Any]]:
    """A copy of the encoder with its first ``n`` layers (a smaller model for tests)."""
    import transformers

    config = model.config
    config.num_hidden_layers = n
    small = transformers.FlaxBertModel(config, _do_init=False)
    layers = {str(i): params["encoder"]["layer"][str(i)] for i in range(n)}
    return small, {**params, "encoder": {**params["encoder"], "layer": layers}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the comparison and returns everything written to ``compare.json``."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    labels, splits = qs.load_headlines(qs.data_dir())
    (train_x, train_y), (eval_x, eval_y) = splits["train"], splits["eval"]
    # Subsets are fixed random draws (the splits are sorted by topic, so a prefix would be one topic).
    if args.eval_size:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(eval_x))[: args.eval_size])
        eval_x, eval_y = [eval_x[i] for i in keep], eval_y[keep]
    if args.train_size:
        keep = np.sort(np.random.default_rng(args.seed + 1).permutation(len(train_x))[: args.train_size])
        train_x, train_y = [train_x[i] for i in keep], train_y[keep]
    model, base, tokenizer = qs.load_model(qs.model_dir())
    if args.layers:
        model, base = truncate_layers(model, base, args.layers)
    train, held = qs.tokenize(tokenizer, train_x, args.seq), qs.tokenize(tokenizer, eval_x, args.seq)
    feed = batches(len(train_x), args.batch, args.steps, args.seed)
    data = {
        "train": train, "train_y": train_y, "eval": held, "eval_y": eval_y, "feed": feed, "n_encoder": count(base)
    }  # fmt: skip
    print(
        f"task: BBC News headline topic ({len(labels)} topics), {len(train_x)} train / {len(eval_x)} held out; "
        f"all-MiniLM-L6-v2 ({data['n_encoder']:,} parameters{f', first {args.layers} layers' if args.layers else ''}); "
        f"{args.steps} steps of batch {args.batch} x {args.seq} tokens"
    )

    # Before: the quickstart's linear probe of the frozen encoder.
    frozen_train = embed_all(model.module.apply, base, train, args.batch)
    frozen_eval = embed_all(model.module.apply, base, held, args.batch)
    probe_head = train_probe(frozen_train, train_y, feed, len(labels), args)
    probe = evaluate(probe_head, frozen_eval, eval_y)
    print(f"before (frozen encoder + head): accuracy {probe['accuracy']:.1%}, loss {probe['loss']:.3f}")

    params = with_head(base, len(labels))
    rows = []
    for name in tqdm(args.methods, desc="methods", unit="method", dynamic_ncols=True, file=sys.stderr):
        try:
            row = run_method(name, model, params, data, args)
        except Exception as e:  # a method that fails is reported, not hidden and not fatal
            row = {
                "name": name,
                "label": SPECS[name][0],
                "lr": LEARNING_RATES[name],
                "status": f"error: {type(e).__name__}: {e}",
            }
        rows.append(row)
        acc = (
            f"acc {row['after']['accuracy']:.1%}, {row['step_ms']:.0f} ms/step"
            if "after" in row
            else row["status"][:200]
        )
        tqdm.write(f"{row['label']:>30}: {acc}", file=sys.stderr)

    memory = []
    mem_batches = [] if args.memory_batches == "none" else [int(b) for b in args.memory_batches.split(",")]
    cells = [(n, d, b) for n, dts in MEMORY_METHODS if n in args.memory_methods for d in dts for b in mem_batches]
    for name, dtype, b in tqdm(cells, desc="memory table", unit="cell", dynamic_ncols=True, file=sys.stderr):
        try:
            memory.append(memory_row(name, dtype, b, model, with_head(base, len(labels)), data, args))
        except Exception as e:
            memory.append(
                {
                    "name": name,
                    "label": SPECS[name][0],
                    "dtype": dtype,
                    "batch": b,
                    "status": f"error: {type(e).__name__}: {e}",
                }
            )

    os.makedirs(args.out, exist_ok=True)
    table = results_table(rows, probe)
    md = [
        "# jpeft: every method on one task and budget",
        "",
        f"all-MiniLM-L6-v2 on BBC News headline topics: {len(train_x)} train / {len(eval_x)} held-out headlines, "
        f"{args.steps} steps of batch {args.batch} × {args.seq} tokens, AdamW with warm-up + cosine, head lr "
        f"{args.head_lr:g}. 'before' is the frozen encoder with the same head trained the same steps. "
        "Step ms: median wall time of a training step; × Full: its ratio to Full's, same run. "
        "Peak MiB: XLA memory_analysis of the jitted step (argument + temp + output − alias).",
        "",
        table,
    ]
    if memory:
        md += ["", "## Memory: method × batch × base dtype", "", memory_table(memory)]
    md_path = os.path.join(args.out, "compare.md")
    png_path = save_plot(rows, probe, os.path.join(args.out, "compare.png"))
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    results = {
        "command": "python -m experiments.compare " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": {"jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
                     "machine": platform.machine(), "load_average": os.getloadavg()},
        "args": {k: v for k, v in vars(args).items()},
        "task": {"labels": labels, "n_train": len(train_x), "n_eval": len(eval_x), "n_encoder": data["n_encoder"]},
        "before": probe,
        "methods": rows,
        "memory": memory,
        "wall_s": time.perf_counter() - t_start,
        "files": [md_path, png_path, os.path.join(args.out, "compare.json")],
    }  # fmt: skip
    with open(results["files"][-1], "w") as f:
        json.dump(results, f, indent=2, default=str)
        f.write("\n")
    print()
    print("\n".join(md[4:]))
    print(f"\nwrote {', '.join(results['files'])} in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
