"""One training run of ``python -m experiments.compare``: a method, a learning rate and a seed on one task.

The pieces (re-exported by ``experiments.compare``, and used by ``experiments.search``): mean pooling
of the encoder's last hidden states, a zero-init linear head at ``classifier/`` that trains through
every method's ``extra_trainable``, AdamW (weight decay 0.01) with linear warm-up over 10% of the
steps then cosine decay to a tenth, and the lean train step (gradients for the trainable half of
``jpeft.split`` only, the state donated).

The peak learning rate is an *argument* of the compiled step (:func:`make_lr_step`), so one
compilation serves every learning rate and seed of a (task, method): :class:`Trainer` keeps it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from experiments import bench
from experiments._compare_specs import ALL_LINEAR, BASE_DTYPES, DIFF_PRUNING_LAMBDA, QUANTIZED_BASES, SPECS
from experiments.quickstart import batches, init_head, take

HEAD = "classifier"
HEAD_RE = rf"{HEAD}/.*"


# --- the task's pieces ---------------------------------------------------------------------------
def schedule_shape(steps: int) -> optax.Schedule:
    """The schedule at peak 1: linear warm-up over 10% of the steps (at most 30), cosine decay to 0.1."""
    warmup = max(1, min(30, steps // 10))
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(steps, warmup + 1), end_value=0.1)


def schedule(lr: Any, steps: int) -> optax.Schedule:
    """:func:`schedule_shape` scaled to the peak ``lr`` (a float or a traced scalar)."""
    shape = schedule_shape(steps)
    return lambda count: lr * shape(count)


def classify(head: Mapping[str, jax.Array], emb: jax.Array) -> jax.Array:
    """``(..., B, d)`` embeddings -> ``(..., B, C)`` logits (leading axes: an ensemble's members)."""
    return emb @ head["kernel"] + head["bias"].reshape((1,) * (emb.ndim - 1) + head["bias"].shape)


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    """The mean cross-entropy over every row; ``(k, B, C)`` logits average the ``k`` members' losses."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(y, logits.shape[:-1])).mean()


def embed(apply_fn: Callable[..., Any], params: Any, batch: Mapping[str, jax.Array], **kw: Any) -> jax.Array:
    """Mean pooling over the real tokens, with keyword arguments (``rngs``) passed to ``apply_fn``."""
    ids = batch["input_ids"]
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden = apply_fn(
        {"params": params}, ids, batch["attention_mask"], batch["token_type_ids"], pos, return_dict=False, **kw
    )[0]
    # Outputs may carry leading member axes (a prompt ensemble's (k, B, T, d)): pool over T, keep them.
    mask = batch["attention_mask"][..., None].astype(hidden.dtype)
    mask = mask.reshape((1,) * (hidden.ndim - mask.ndim) + mask.shape)
    return (hidden * mask).sum(-2) / jnp.maximum(mask.sum(-2), 1.0)


def embed_all(
    apply_fn: Callable[..., Any], params: Any, data: Mapping[str, np.ndarray], batch: int, fn: Any = None
) -> jax.Array:
    """Embeddings ``(..., N, d)`` of every row of ``data`` in chunks of ``batch`` (the last padded by wrapping)."""
    fn = fn or jax.jit(lambda p, b: embed(apply_fn, p, b))
    n = len(data["input_ids"])
    out = [fn(params, take(data, np.arange(i, i + batch) % n))[..., : min(batch, n - i), :] for i in range(0, n, batch)]
    return jnp.concatenate(out, axis=-2).astype(jnp.float32)


def evaluate(head: Mapping[str, jax.Array], emb: jax.Array, y: np.ndarray) -> dict[str, Any]:
    """Accuracy and loss. Embeddings ``(k, N, d)`` with a member axis (a prompt ensemble) are combined by
    ``jpeft.PromptEnsemble.vote``; the loss is the members' mean and ``member_accuracy`` lists each member's."""
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
    """The linear probe: the head alone on frozen-encoder features, same batches, steps and head lr."""
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
    for idx in feed:
        state = step(state, jnp.asarray(idx))
    return state[0]


# --- methods -------------------------------------------------------------------------------------
def make_method(name: str, steps: int) -> jpeft.Method | str:
    """The method ``name`` with the head trainable, or a string saying why it is not available."""
    _, cls_name, kwargs = SPECS[name]
    needed = [cls_name] + ([QUANTIZED_BASES[name], "on_quantized"] if name in QUANTIZED_BASES else [])
    missing = [n for n in needed if getattr(jpeft, n, None) is None]
    if missing:
        return f"not available: jpeft {jpeft.__version__} has no {', '.join(missing)}"
    method = getattr(jpeft, cls_name)(**kwargs(steps), extra_trainable=HEAD_RE)
    return jpeft.on_quantized(method) if name in QUANTIZED_BASES else method


def prepare(method: jpeft.Method, params: dict[str, Any], key: jax.Array, name: str = "") -> Any:
    """``jpeft.apply`` on the encoder and head, after quantising the encoder's linear kernels for QLoRA
    (NF4) and the :data:`QUANTIZED_BASES` rows, or casting the encoder for the :data:`BASE_DTYPES` rows."""
    if hasattr(jpeft, "QLoRA") and isinstance(method, jpeft.QLoRA):
        params = jpeft.quantize(params, method.quant, targets=ALL_LINEAR)
    elif name in QUANTIZED_BASES:
        params = jpeft.quantize(params, getattr(jpeft, QUANTIZED_BASES[name])(), targets=ALL_LINEAR)
    elif name in BASE_DTYPES:
        dtype = jnp.dtype(BASE_DTYPES[name])
        params = {k: v if k == HEAD else jax.tree.map(lambda x: x.astype(dtype), v) for k, v in params.items()}
    return jpeft.apply(method, params, key=key)


def count(tree: Any) -> int:
    """Elements of the float and integer leaves of a tree (a quantised kernel counts its logical size)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree, is_leaf=jpeft.quant.is_quantized))


def with_head(params: Mapping[str, Any], n_labels: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    head = init_head(params["embeddings"]["word_embeddings"]["embedding"].shape[1], n_labels)
    return {**params, HEAD: jax.tree.map(lambda x: x.astype(dtype), head)}


def truncate_layers(model: Any, params: dict[str, Any], n: int) -> tuple[Any, dict[str, Any]]:
    """A copy of the encoder with its first ``n`` layers (a smaller model for tests)."""
    import transformers

    config = model.config
    config.num_hidden_layers = n
    small = transformers.FlaxBertModel(config, _do_init=False)
    layers = {str(i): params["encoder"]["layer"][str(i)] for i in range(n)}
    return small, {**params, "encoder": {**params["encoder"], "layer": layers}}


# --- the train step ------------------------------------------------------------------------------
def make_lr_step(
    model: Any, method: jpeft.Method, trainable: Any, head_lr: float, steps: int
) -> Callable[..., tuple[Any, jax.Array]]:
    """``step((trainable, opt_state), frozen, batch, labels, key, lr) -> (state, loss)``, ``lr`` traced.

    The optimizer is built inside the step from the traced peak ``lr`` (its state does not depend on
    it); ``step.tx`` (built at lr 1) initialises the state. The head's updates are scaled to
    ``head_lr`` (Adam is invariant to gradient scale: this is Adam at the head's rate).
    """

    def make_tx(lr: Any) -> optax.GradientTransformation:
        tx = jpeft.optimizer(optax.adamw(schedule(lr, steps), weight_decay=0.01), method, trainable)

        def head_mask(tree: Any) -> Any:  # True on the head's leaves (None holes stay holes)
            return {k: jax.tree.map(lambda _, is_head=(k == HEAD): is_head, v) for k, v in tree.items()}

        return optax.chain(tx, optax.masked(optax.scale(head_lr / lr), head_mask))

    wrapped = jpeft.wrap(model.module.apply, method)
    lam = DIFF_PRUNING_LAMBDA if type(method).__name__ == "DiffPruning" else 1.0

    def loss_fn(t, frozen, batch, labels, key):
        params = jpeft.combine(t, frozen)
        encoder = {k: v for k, v in params.items() if k != HEAD}
        emb = embed(wrapped, encoder, batch, rngs={"dropout": key})
        logits = classify(params[HEAD], emb.astype(jnp.float32))
        return xent(logits, labels) + lam * jpeft.regularizer(method, params)

    def step(state, frozen, batch, labels, key, lr):
        t, opt = state
        loss, g = jax.value_and_grad(loss_fn)(t, frozen, batch, labels, key)
        updates, opt = make_tx(lr).update(g, opt, t)
        return (optax.apply_updates(t, updates), opt), loss

    step.tx = make_tx(1.0)  # type: ignore[attr-defined]
    return step


def make_step(
    model: Any, method: jpeft.Method, trainable: Any, lr: float, head_lr: float, steps: int
) -> Callable[..., tuple[Any, jax.Array]]:
    """:func:`make_lr_step` at a fixed ``lr``: ``step((trainable, opt_state), frozen, batch, labels, key)``."""
    inner = make_lr_step(model, method, trainable, head_lr, steps)

    def step(state, frozen, batch, labels, key):
        return inner(state, frozen, batch, labels, key, jnp.float32(lr))

    step.tx = inner.tx  # type: ignore[attr-defined]
    return step


# --- one (task, method), compiled once; one cell per (lr, seed) -----------------------------------
class Trainer:
    """Compiles the train step and the pooled forward of one method on one task, then runs cells.

    ``data`` holds ``train``/``val``/``test`` token dicts and ``*_y`` labels, ``labels`` and
    ``n_encoder``; ``args`` gives ``steps``, ``batch``, ``head_lr`` and ``eval_batch``.
    """

    def __init__(self, name: str, model: Any, base: dict[str, Any], data: Mapping[str, Any], args: Any):
        self.name, self.model, self.data, self.args = name, model, data, args
        self.params = with_head(base, len(data["labels"]))
        method = make_method(name, args.steps)
        if isinstance(method, str):
            raise RuntimeError(method)
        self.method = method
        peft = prepare(method, self.params, jax.random.key(0), name)
        trainable, frozen = jpeft.split(method, peft)
        self.trainable = count(trainable) - count(trainable[HEAD])
        self.step = make_lr_step(model, method, trainable, args.head_lr, args.steps)
        state = (trainable, self.step.tx.init(trainable))
        idx = np.arange(args.batch)
        example = (take(data["train"], idx), jnp.asarray(data["train_y"][idx]), jax.random.key(0), jnp.float32(1e-3))
        self.compiled = jax.jit(self.step, donate_argnums=0).lower(state, frozen, *example).compile()
        self.bytes = bench.memory_of(self.compiled)  # argument + temp + output - alias
        wrapped = jpeft.wrap(model.module.apply, method)
        self.forward = jax.jit(lambda p, b: embed(wrapped, p, b))

    def score(self, peft: Mapping[str, Any], split: str) -> dict[str, Any]:
        encoder = {k: v for k, v in peft.items() if k != HEAD}
        emb = embed_all(None, encoder, self.data[split], self.args.eval_batch, fn=self.forward)
        return evaluate(peft[HEAD], emb, self.data[f"{split}_y"])

    def run(self, lr: float, seed: int) -> dict[str, Any]:
        """One cell: trains from the seed's init and data order; validation and test scores, timings."""
        data, args = self.data, self.args
        peft = prepare(self.method, self.params, jax.random.key(seed + 1), self.name)
        trainable, frozen = jpeft.split(self.method, peft)
        state = (jax.tree.map(jnp.copy, trainable), self.step.tx.init(trainable))  # the step donates it
        feed = batches(len(data["train_y"]), args.batch, args.steps, seed)
        key, peak = jax.random.key(seed + 2), jnp.float32(lr)
        losses, cpu, wall = [], [], []
        for i, idx in enumerate(feed):
            batch, labels = take(data["train"], idx), jnp.asarray(data["train_y"][idx])
            c0, w0 = time.process_time(), time.perf_counter()
            state, loss = self.compiled(state, frozen, batch, labels, jax.random.fold_in(key, i), peak)
            loss = float(jax.block_until_ready(loss))
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            losses.append(loss)
        peft = jpeft.combine(state[0], frozen)
        row: dict[str, Any] = {"val": self.score(peft, "val"), "test": self.score(peft, "test")}
        row["loss_first"], row["loss_last"] = losses[0], float(np.mean(losses[-10:]))
        timed = slice(1, None) if len(cpu) > 1 else slice(None)
        row["cpu_ms"] = 1e3 * statistics.median(cpu[timed])
        row["wall_ms"] = 1e3 * statistics.median(wall[timed])
        if "AdaLoRA" in type(self.method).__name__:
            row["adalora_ranks"] = {k: np.asarray(v).tolist() for k, v in jpeft.adalora_ranks(state[1]).items()}
        finite = all(map(math.isfinite, losses)) and math.isfinite(row["val"]["loss"] + row["test"]["loss"])
        row["status"] = "ok" if finite else "non-finite"
        return row


def probe_cell(features: Mapping[str, jax.Array], data: Mapping[str, Any], seed: int, args: Any) -> dict[str, Any]:
    """The linear-probe cell (frozen encoder, head only) of one seed, from precomputed pooled features."""
    feed = batches(len(data["train_y"]), args.batch, args.steps, seed)
    head = train_probe(features["train"], data["train_y"], feed, len(data["labels"]), args)
    row = {s: evaluate(head, features[s], data[f"{s}_y"]) for s in ("val", "test")}
    return {**row, "status": "ok"}
