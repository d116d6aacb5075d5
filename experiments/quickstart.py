"""Quickstart: pretrain a tiny GPT-2 on one text, then LoRA-fine-tune it on another, on CPU.

``python -m experiments.quickstart`` runs offline and downloads nothing. It builds Hugging Face's
``FlaxGPT2LMHeadModel`` from a small config in code (4 layers, width 128, 4 heads, a byte-level
vocabulary: 256 bytes and one end-of-text id) and trains it on ``experiments/data/tiny_corpus.txt``,
three chapters of *Alice's Adventures in Wonderland* (1865, public domain):

1. **Pretraining** (full fine-tuning, in-process): Chapters I-II, the "base" domain.
2. **LoRA** (``--method``, rank 8 on ``c_attn``, ``c_proj`` and ``c_fc``): Chapter VII, the "new"
   domain, on the lean path: ``jpeft.split`` into trainable and frozen halves, ``jax.value_and_grad``
   with respect to the trainable half only, ``jpeft.optimizer`` and ``jpeft.wrap``.

Every 10th paragraph of each domain is held out. The demo prints ``jpeft.summary``, the held-out
loss and perplexity per byte before and after LoRA, a greedy sample before and after (from
``jpeft.merge``-d parameters and the plain ``model.module.apply``), and checks that the wrapped
unmerged forward and the merged forward give the same logits. It writes to ``--out``, then loads
the adapter back onto the base parameters and checks that it merges to the same weights:

* ``adapter.safetensors``: the delta leaves only, keyed by '/'-joined path
  (``transformer/h/0/attn/c_attn/__jpeft__/default/lora_a``, ...);
* ``method.json``: ``dataclasses.asdict(method)`` plus ``"class"``, enough to rebuild the method;
* ``loss.png``: the training curves, if matplotlib is installed.

The defaults take about two minutes on two CPU cores; ``--pretrain-steps`` and ``--steps`` set
the lengths of the two phases. ``main(argv)`` returns the numbers it prints, for tests.
"""

from __future__ import annotations

import argparse
import dataclasses
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

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_corpus.txt")
TARGETS = ("c_attn", "c_proj", "c_fc")
EOT = 256  # the one id past the 256 byte values; marks end of text, never produced by the corpus
MODEL = dict(vocab_size=257, n_positions=256, n_embd=128, n_layer=4, n_head=4)
METHODS: dict[str, Callable[..., jpeft.Method]] = {
    "lora": lambda **kw: jpeft.LoRA(**kw),
    "rslora": lambda **kw: jpeft.LoRA(use_rslora=True, **kw),
    "dora": lambda **kw: jpeft.DoRA(**kw),
    "lora-fa": lambda **kw: jpeft.LoRAFA(**kw),
    "lora-plus": lambda **kw: jpeft.LoRAPlus(lr_ratio=16.0, **kw),
}


# --- data ----------------------------------------------------------------------------------------
def load_corpus(path: str = CORPUS) -> bytes:
    """Reads the corpus and drops its leading '#' header lines."""
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    while lines and lines[0].startswith(b"#"):
        lines.pop(0)
    return b"".join(lines)


def encode(text: bytes | str) -> np.ndarray:
    """Bytes to token ids: each byte is its own id (0-255)."""
    return np.frombuffer(text.encode() if isinstance(text, str) else text, dtype=np.uint8).astype(np.int32)


def decode(ids: Sequence[int]) -> str:
    """Token ids back to text; the end-of-text id is dropped, invalid UTF-8 is replaced."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def split_domains(text: bytes, every: int = 10) -> dict[str, np.ndarray]:
    """Splits the text into a base domain and a new one, each with held-out paragraphs.

    The cut is at the ``CHAPTER`` heading nearest the middle of the text (or the line break nearest
    it, if there is no heading). Every ``every``-th paragraph of each domain is held out, so the
    held-out text is spread over the whole domain rather than being its last scene.
    """
    mid = len(text) // 2
    heads = [i for i in range(1, len(text)) if text.startswith(b"\nCHAPTER ", i - 1)]
    cuts = heads or [i + 1 for i in range(len(text)) if text[i : i + 1] == b"\n"] or [mid]
    cut = min(cuts, key=lambda i: abs(i - mid))
    out: dict[str, np.ndarray] = {}
    for name, part in (("base", text[:cut]), ("new", text[cut:])):
        paragraphs = part.strip().split(b"\n\n")
        held = [i % every == every // 2 for i in range(len(paragraphs))]
        out[f"{name}_train"] = encode(b"\n\n".join(p for p, h in zip(paragraphs, held, strict=True) if not h))
        out[f"{name}_eval"] = encode(b"\n\n".join(p for p, h in zip(paragraphs, held, strict=True) if h))
    return out


def sample_batch(rng: np.random.Generator, ids: np.ndarray, batch: int, seq: int) -> np.ndarray:
    """``batch`` random windows of ``seq`` consecutive ids."""
    if len(ids) <= seq:
        raise ValueError(f"a training region of {len(ids)} bytes is too short for --seq {seq}")
    starts = rng.integers(0, len(ids) - seq, size=batch)
    return ids[starts[:, None] + np.arange(seq)]


def eval_windows(ids: np.ndarray, seq: int) -> np.ndarray:
    """The held-out region as non-overlapping windows of ``seq`` ids (the ragged tail is dropped)."""
    n = len(ids) // seq
    if n == 0:
        raise ValueError(f"a held-out region of {len(ids)} bytes is shorter than --seq {seq}")
    return ids[: n * seq].reshape(n, seq)


# --- model ---------------------------------------------------------------------------------------
def build_model(seed: int) -> tuple[Any, dict[str, Any]]:
    """A randomly initialised FlaxGPT2LMHeadModel from a tiny config; nothing is downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import flax
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        **MODEL, bos_token_id=EOT, eos_token_id=EOT, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = transformers.FlaxGPT2LMHeadModel(config, dtype=jnp.float32, _do_init=False)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(lambda key: model.module.init(key, ids, jnp.ones_like(ids), jnp.arange(8)[None])["params"])(
        jax.random.key(seed)
    )
    return model, flax.core.unfreeze(params)


def logits_of(apply_fn: Callable[..., Any], params: Any, ids: jax.Array) -> jax.Array:
    """Runs a GPT-2 apply function (plain or ``jpeft.wrap``-ped) on full, unpadded windows."""
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return apply_fn({"params": params}, ids, jnp.ones_like(ids), pos, deterministic=True, return_dict=False)[0]


def lm_loss(apply_fn: Callable[..., Any], params: Any, ids: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in nats."""
    logits = logits_of(apply_fn, params, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def make_eval(apply_fn: Callable[..., Any]) -> Callable[[Any, np.ndarray], float]:
    loss = jax.jit(lambda params, ids: lm_loss(apply_fn, params, ids))
    return lambda params, windows: float(loss(params, jnp.asarray(windows)))


def greedy(apply_fn: Callable[..., Any], params: Any, prompt: str, n_new: int, window: int) -> str:
    """Greedy decoding without a KV cache: each step reruns the model on the whole context.

    The context is the last ``window`` ids (the training window, so no position is used that
    training never saw), written into a fixed ``(1, window)`` buffer so one compiled forward
    serves every step; with causal attention the padding after the context changes nothing.
    """
    forward = jax.jit(lambda p, ids: logits_of(apply_fn, p, ids)[0])
    ids = [int(i) for i in encode(prompt)]
    for _ in range(n_new):
        context = ids[-window:]
        buf = np.zeros((1, window), np.int32)
        buf[0, : len(context)] = context
        ids.append(int(jnp.argmax(forward(params, jnp.asarray(buf))[len(context) - 1])))
    return decode(ids[len(ids) - n_new :])


# --- training ------------------------------------------------------------------------------------
def schedule(lr: float, steps: int) -> optax.Schedule:
    warmup = max(1, min(50, steps // 10))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr / 10)


def train_loop(
    step: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
    state: Any,
    next_batch: Callable[[], np.ndarray],
    steps: int,
    desc: str,
) -> tuple[Any, list[float]]:
    """Runs ``state, loss = step(state, batch)`` with a tqdm bar showing loss and tokens/s.

    Tokens/s counts from the end of the first step, so it leaves out compilation.
    """
    losses: list[float] = []
    start, tokens = None, 0
    with tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        for i in range(steps):
            batch = next_batch()
            state, loss = step(state, jnp.asarray(batch))
            losses.append(float(loss))  # also waits for the step to finish
            if i == 0:
                start = time.perf_counter()
            else:
                tokens += batch.size
            rate = tokens / max(time.perf_counter() - start, 1e-9) if tokens else 0.0
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update()
    return state, losses


def pretrain(model: Any, params: Any, data: np.ndarray, args: argparse.Namespace) -> tuple[Any, list[float]]:
    """Full fine-tuning of every parameter on the base domain."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule(args.pretrain_lr, args.pretrain_steps)))
    apply_fn = model.module.apply

    @jax.jit
    def step(state, ids):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: lm_loss(apply_fn, p, ids))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    rng = np.random.default_rng(args.seed)
    state = (params, tx.init(params))
    (params, _), losses = train_loop(
        step, state, lambda: sample_batch(rng, data, args.batch, args.seq), args.pretrain_steps, "pretrain (full)"
    )
    return params, losses


def finetune(
    model: Any, method: jpeft.Method, peft: Any, data: np.ndarray, args: argparse.Namespace
) -> tuple[Any, list[float]]:
    """The lean jpeft path: gradients for the trainable leaves only, the base passed in frozen."""
    trainable, frozen = jpeft.split(method, peft)
    tx = jpeft.optimizer(optax.adamw(schedule(args.lr, args.steps)), method, trainable)
    wrapped = jpeft.wrap(model.module.apply, method)

    @jax.jit
    def step(state, frozen, ids):
        trainable, opt_state = state
        loss, grads = jax.value_and_grad(lambda t: lm_loss(wrapped, jpeft.combine(t, frozen), ids))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), loss

    rng = np.random.default_rng(args.seed + 1)
    state = (trainable, tx.init(trainable))
    (trainable, _), losses = train_loop(
        lambda s, ids: step(s, frozen, ids),
        state,
        lambda: sample_batch(rng, data, args.batch, args.seq),
        args.steps,
        f"finetune ({args.method})",
    )
    return jpeft.combine(trainable, frozen), losses


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute difference between two trees of the same structure."""
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def check_merge(model: Any, method: jpeft.Method, peft: Any, windows: np.ndarray) -> float:
    """Max abs difference between ``wrap(apply)(peft)`` and ``apply(merge(peft))`` logits."""
    ids = jnp.asarray(windows)
    unmerged = jax.jit(lambda p: logits_of(jpeft.wrap(model.module.apply, method), p, ids))(peft)
    merged = jax.jit(lambda p: logits_of(model.module.apply, p, ids))(jpeft.merge(method, peft))
    return float(jnp.max(jnp.abs(unmerged - merged)))


# --- saving --------------------------------------------------------------------------------------
def delta_leaves(tree: Any, path: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The adapter: every leaf under a ``__jpeft__`` key, by '/'-joined path.

    All delta leaves, not only those that train: LoRA-FA's frozen ``lora_a`` is a random matrix
    the adapter cannot be rebuilt without.
    """
    if isinstance(tree, Mapping):
        out: dict[str, np.ndarray] = {}
        for k, v in tree.items():
            out.update(delta_leaves(v, path + (str(k),)))
        return out
    return {"/".join(path): np.asarray(tree)} if jpeft.RESERVED in path else {}


def save_adapter(method: jpeft.Method, peft: Any, out_dir: str) -> list[str]:
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    adapter = os.path.join(out_dir, "adapter.safetensors")
    meta = {"format": "jpeft-adapter", "class": type(method).__name__, "jpeft_version": jpeft.__version__}
    save_file(delta_leaves(peft), adapter, metadata=meta)
    config = os.path.join(out_dir, "method.json")
    with open(config, "w") as f:
        json.dump({"class": type(method).__name__, **dataclasses.asdict(method)}, f, indent=2)
        f.write("\n")
    return [adapter, config]


def load_adapter(out_dir: str, params: Any) -> tuple[jpeft.Method, Any]:
    """Rebuilds the method from ``method.json`` and grafts ``adapter.safetensors`` onto base params."""
    from safetensors.numpy import load_file

    with open(os.path.join(out_dir, "method.json")) as f:
        fields = json.load(f)
    method = getattr(jpeft, fields.pop("class"))(**fields)
    tree = jax.tree.map(lambda x: x, params)  # fresh dicts; the base leaves are shared
    for key, value in load_file(os.path.join(out_dir, "adapter.safetensors")).items():
        *parents, leaf = key.split("/")
        node = tree
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = jnp.asarray(value)
    return method, tree


def save_plot(pre: list[float], fine: list[float], evals: Mapping[str, float], method: str, path: str) -> str | None:
    """Writes the two training curves to a PNG; returns None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(pre) + 1), pre, lw=1, label="pretrain, base domain (full)")
    ax.plot(range(len(pre) + 1, len(pre) + len(fine) + 1), fine, lw=1, label=f"fine-tune, new domain ({method})")
    ax.scatter(
        [len(pre), len(pre) + len(fine)],
        [evals["before"], evals["after"]],
        c="k",
        zorder=3,
        s=18,
        label="held-out loss, new domain",
    )
    ax.axvline(len(pre) + 0.5, c="grey", ls=":", lw=1)
    ax.set(xlabel="step", ylabel="loss (nats / byte)", title="jpeft quickstart: tiny GPT-2, bytes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- main ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=sorted(METHODS), default="lora")
    p.add_argument("--pretrain-steps", type=int, default=500, help="full fine-tuning steps on the base domain")
    p.add_argument("--steps", type=int, default=200, help="LoRA steps on the new domain")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=2e-3, help="peak LoRA learning rate (AdamW, cosine decay)")
    p.add_argument("--pretrain-lr", type=float, default=2e-3, help="peak pretraining learning rate")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64, help="window length in bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default='"Have some more tea," said ')
    p.add_argument("--sample-tokens", type=int, default=40)
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--out", default="experiments/out/quickstart")
    args = p.parse_args(argv)
    for name in ("pretrain_steps", "steps", "batch", "seq", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq > MODEL["n_positions"]:
        p.error(f"--seq must be <= {MODEL['n_positions']}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the demo and returns its numbers (losses, the merge check, the files written)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = split_domains(load_corpus(args.corpus))
    print(
        f"corpus: {sum(len(v) for v in data.values()):,} bytes; base domain {len(data['base_train']):,} train + "
        f"{len(data['base_eval']):,} held out; new domain {len(data['new_train']):,} + {len(data['new_eval']):,}"
    )
    model, params = build_model(args.seed)
    evaluate = make_eval(model.module.apply)
    base_eval, new_eval = eval_windows(data["base_eval"], args.seq), eval_windows(data["new_eval"], args.seq)
    print(f"model: FlaxGPT2LMHeadModel({', '.join(f'{k}={v}' for k, v in MODEL.items())}), random init")

    params, pre_losses = pretrain(model, params, data["base_train"], args)
    print(
        f"after pretraining: held-out loss base domain {evaluate(params, base_eval):.3f}, "
        f"new domain {evaluate(params, new_eval):.3f} (nats/byte)"
    )

    method = METHODS[args.method](targets=TARGETS, rank=args.rank, alpha=args.alpha)
    peft = jpeft.apply(method, params, key=jax.random.key(args.seed + 2))
    print()
    print(jpeft.summary(method, peft))
    print()
    before = {"new": evaluate(jpeft.merge(method, peft), new_eval), "base": evaluate(params, base_eval)}
    sample_before = greedy(model.module.apply, jpeft.merge(method, peft), args.prompt, args.sample_tokens, args.seq)

    peft, fine_losses = finetune(model, method, peft, data["new_train"], args)
    merged = jpeft.merge(method, peft)
    after = {"new": evaluate(merged, new_eval), "base": evaluate(merged, base_eval)}
    sample_after = greedy(model.module.apply, merged, args.prompt, args.sample_tokens, args.seq)

    print(
        f"\nheld-out loss, new domain, nats/byte: before {before['new']:.3f} "
        f"(ppl {math.exp(before['new']):.2f}) -> after {after['new']:.3f} (ppl {math.exp(after['new']):.2f})"
    )
    print(f"held-out loss, base domain, nats/byte: before {before['base']:.3f} -> after {after['base']:.3f}")
    print(f"\ngreedy sample before LoRA: {args.prompt + sample_before!r}")
    print(f"greedy sample after LoRA:  {args.prompt + sample_after!r}")

    diff = check_merge(model, method, peft, new_eval[:4])
    ok = diff < 1e-3
    print(f"\nwrap(apply)(peft) vs apply(merge(peft)) logits: max abs diff {diff:.2e} ({'OK' if ok else 'MISMATCH'})")

    files = save_adapter(method, peft, args.out)
    loaded_method, loaded = load_adapter(args.out, params)
    reload_diff = max_abs_diff(jpeft.merge(loaded_method, loaded), merged)
    ok = ok and loaded_method == method and reload_diff == 0.0
    plot = save_plot(
        pre_losses,
        fine_losses,
        {"before": before["new"], "after": after["new"]},
        args.method,
        os.path.join(args.out, "loss.png"),
    )
    files += [plot] if plot else []
    n_adapter = sum(v.size for v in delta_leaves(peft).values())
    print(
        f"\nwrote {files[0]} ({n_adapter:,} delta values), {files[1]}"
        + (f", {plot}" if plot else "; loss plot skipped (matplotlib is not installed)")
    )
    print(f"reloaded adapter: merged params max abs diff {reload_diff:.1e}")
    print(f"total wall time {time.perf_counter() - t0:.1f} s")
    return {
        "ok": ok,
        "pretrain_losses": pre_losses,
        "finetune_losses": fine_losses,
        "before": before,
        "after": after,
        "merge_diff": diff,
        "reload_diff": reload_diff,
        "samples": {"before": sample_before, "after": sample_after},
        "files": files,
    }


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
