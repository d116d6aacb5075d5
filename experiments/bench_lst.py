"""``python -m experiments.bench lst``: training-step memory of ladder side tuning vs full, LoRA, adapters.

Sung et al. (2022) report that LST saves 69 % of full fine-tuning's training memory where adapters
and LoRA save about 26 % (T5-base, GLUE). This benchmark compiles one training step (``optax.adam``,
parameters and optimizer state donated) per method on the same model and batch and reads XLA's
``compiled.memory_analysis()``: argument + temporary + output bytes, less aliased (donated) bytes,
the peak XLA plans for. Nothing is executed, so it runs on CPU.

Models (random weights, float32, never downloaded):

* ``gpt2-lm``: ``FlaxGPT2LMHeadModel(GPT2Config())`` (GPT-2-small) with the causal LM loss; its
  ``(B, T, 50257)`` logits and their gradient are paid by every method, LST included;
* ``bert-cls``: ``FlaxBertForSequenceClassification(BertConfig())`` (BERT-base, 2 labels) with
  the cross-entropy on the pooled output, closer to the paper's GLUE setting; the classifier trains
  in every PEFT method (``extra_trainable``);
* ``smollm2-lm``: ``FlaxLlamaForCausalLM`` with SmolLM2-135M's shapes (``experiments.memory.SMOLLM2``:
  30 layers, width 576, 9 query / 3 key-value heads, FFN 1536, vocab 49,152) and the causal LM
  loss; HF's Flax Llama always holds its own ``lm_head`` kernel (SmolLM2 ties it to the embedding),
  so full fine-tuning trains 28 M parameters more than SmolLM2 would. LST's side blocks are Llama
  blocks (RMSNorm, rotary attention with rope base 1e5, gated SiLU MLP).

Methods: ``full`` (every parameter), ``lora`` (r = 8 on every attention and FFN projection),
``adapters`` (Houlsby, reduction factor 16) and ``lst`` (``jpeft.LadderSideTuning``, r = 8).

Objectives of the LM models (``--objectives``; every method gets the same one):

* ``lm``: the shifted causal LM cross-entropy over all positions from the model's own ``(B, T, V)``
  logits (``experiments.bench.lm_loss``);
* ``last-token``: classification by the next token (what ``experiments.llm`` evaluates): the model's
  final (post-norm) hidden state at the last position times the LM head, ``(B, V)`` logits, the
  cross-entropy against one target token per row; the model's all-position logits are unused, so
  XLA drops them;
* ``lm-chunked``: the same loss as ``lm``, with the head and the cross-entropy run over
  ``--chunk``-position slices of the final hidden state in a ``lax.scan`` under ``jax.checkpoint``,
  so at most one ``(B, chunk, V)`` slice of logits is live (recomputed in the backward pass).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

import jpeft
from experiments import bench

PAPER = {"lst": 0.69, "adapters": 0.26, "lora": 0.26}
"""The paper's memory saving vs full fine-tuning (Sung et al. 2022, Fig. 1 / Table 1, T5-base)."""
GOAL = {"lst_over_full": 0.35, "lst_over_lora": 0.7}


def _model(
    name: str, layers: int | None
) -> tuple[Any, dict[str, Any], Callable[..., jax.Array], dict[str, Any], str | None]:
    """``(model, params, loss(apply_fn, params, batch), {'lora': targets, 'lst': LST fields}, extra_trainable)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == "gpt2-lm":
        model, params = bench.build_model(layers or 12)
        return model, params, bench.lm_loss, {"lora": ("c_attn", "c_proj", "c_fc"), "lst": {"num_heads": 12}}, None
    if name == "smollm2-lm":
        from experiments import memory

        model, params = memory.build_model(layers or memory.SMOLLM2["num_hidden_layers"])
        lora = tuple(f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down"))
        lst = {"num_heads": memory.SMOLLM2["num_attention_heads"], "rope_theta": memory.SMOLLM2["rope_theta"]}
        return model, params, bench.lm_loss, {"lora": lora, "lst": lst}, None
    layers = layers or 12
    from transformers import BertConfig, FlaxBertForSequenceClassification

    model = FlaxBertForSequenceClassification(BertConfig(num_hidden_layers=layers), dtype=jnp.float32, _do_init=False)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = flax.core.unfreeze(
        jax.jit(lambda k: model.module.init(k, ids, jnp.ones_like(ids), jnp.zeros_like(ids), None, None)["params"])(
            jax.random.key(0)
        )
    )

    def loss(apply_fn, p, batch):
        ids = batch["ids"]
        logits = apply_fn({"params": p}, ids, batch["mask"], jnp.zeros_like(ids), None, None, deterministic=True)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    lora = ("query", "key", "value", "dense")
    return model, params, loss, {"lora": lora, "lst": {"num_heads": 12}}, r".*classifier/.*"


OBJECTIVES = ("lm", "last-token", "lm-chunked")


def _head(params: Any) -> jax.Array:
    """The LM head's ``(d, V)`` kernel: Llama's ``lm_head``, or GPT-2's embedding (tied), transposed."""
    if "lm_head" in params:
        return params["lm_head"]["kernel"]
    return params["transformer"]["wte"]["embedding"].T


def objective_loss(objective: str, chunk: int = 16) -> Callable[..., jax.Array]:
    """``loss(apply_fn, params, batch)`` of an HF Flax causal LM for ``objective`` (one of ``OBJECTIVES``).

    ``batch`` holds ``ids``, ``mask``, ``pos`` (``(B, T)``) and ``target`` (``(B,)``, the
    ``last-token`` label). ``lm-chunked`` needs ``T`` to be a multiple of ``chunk``.

    Example:
      >>> from experiments import memory
      >>> model, params = memory.build_model(1, vocab=64)
      >>> ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
      >>> b = {"ids": ids, "mask": jnp.ones_like(ids), "pos": jnp.broadcast_to(jnp.arange(8), ids.shape)}
      >>> lm, chunked = (objective_loss(o, chunk=4)(model.module.apply, params, b) for o in ("lm", "lm-chunked"))
      >>> bool(jnp.allclose(lm, chunked, rtol=1e-5))
      True
    """
    if objective == "lm":
        return bench.lm_loss
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: expected one of {OBJECTIVES}")

    def hidden(apply_fn: Callable[..., Any], p: Any, batch: Any) -> jax.Array:
        out = apply_fn(
            {"params": p}, batch["ids"], batch["mask"], batch["pos"], deterministic=True,
            output_hidden_states=True, return_dict=False,
        )  # fmt: skip
        return out[1][-1]  # the final hidden state, after the last norm (and LST's side output)

    def last_token(apply_fn: Callable[..., Any], p: Any, batch: Any) -> jax.Array:
        logits = hidden(apply_fn, p, batch)[:, -1] @ _head(p)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"]).mean()

    @jax.checkpoint
    def chunk_nll(w: jax.Array, h: jax.Array, labels: jax.Array, weight: jax.Array) -> jax.Array:
        return (optax.softmax_cross_entropy_with_integer_labels(h @ w, labels) * weight).sum()

    def lm_chunked(apply_fn: Callable[..., Any], p: Any, batch: Any) -> jax.Array:
        h, ids, w = hidden(apply_fn, p, batch), batch["ids"], _head(p)
        (b, t, _), n = h.shape, h.shape[1] // chunk
        if t % chunk:
            raise ValueError(f"lm-chunked: the sequence length {t} is not a multiple of chunk={chunk}")
        labels = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)  # the last position predicts nothing
        weight = jnp.ones(ids.shape, h.dtype).at[:, -1].set(0.0)

        def split(x: jax.Array) -> jax.Array:
            return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

        def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
            return total + chunk_nll(w, *xs), None

        total, _ = jax.lax.scan(body, jnp.zeros((), h.dtype), (split(h), split(labels), split(weight)))
        return total / (b * (t - 1))

    return last_token if objective == "last-token" else lm_chunked


def _step(apply_fn: Callable[..., Any], loss: Callable[..., jax.Array], tx: Any, peft: bool) -> Callable[..., Any]:
    if not peft:

        def full_step(params, opt_state, batch):
            value, grads = jax.value_and_grad(lambda p: loss(apply_fn, p, batch))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        return full_step

    def peft_step(trainable, opt_state, frozen, batch):
        value, grads = jax.value_and_grad(lambda t: loss(apply_fn, jpeft.combine(t, frozen), batch))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return peft_step


def measure(args: argparse.Namespace, model_name: str, objective: str = "lm") -> dict[str, Any]:
    model, params, loss, info, extra = _model(model_name, args.layers)
    if model_name != "bert-cls":
        loss = objective_loss(objective, args.chunk)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, model.config.vocab_size, dtype=jnp.int32)
    batch = {"ids": ids, "mask": jnp.ones_like(ids), "pos": jnp.broadcast_to(jnp.arange(args.seq), ids.shape)}
    batch["labels"] = jnp.zeros((args.batch,), jnp.int32)
    batch["target"] = ids[:, 0]
    methods = {
        "lora": jpeft.LoRA(targets=info["lora"], rank=args.rank, alpha=2.0 * args.rank, extra_trainable=extra),
        "adapters": jpeft.HoulsbyAdapter(reduction_factor=16, extra_trainable=extra),
        "lst": jpeft.LadderSideTuning(**info["lst"], reduction=args.reduction, extra_trainable=extra),
    }
    tx = optax.adam(1e-4)
    shape = jax.ShapeDtypeStruct
    out: dict[str, Any] = {}
    for name in tqdm(("full", *methods), desc=f"compile {model_name} {objective}", leave=False):
        if name == "full":
            fn = _step(model.module.apply, loss, tx, peft=False)
            args_ = (params, jax.eval_shape(tx.init, params), batch)
            trainable = sum(x.size for x in jax.tree.leaves(params))
        else:
            m = methods[name]
            tree = jpeft.apply(m, params, key=jax.random.key(2))
            tr, fr = jpeft.split(m, tree)
            fn = _step(jpeft.wrap(model.module.apply, m), loss, tx, peft=True)
            args_ = (tr, jax.eval_shape(tx.init, tr), fr, batch)
            trainable = sum(x.size for x in jax.tree.leaves(tr))
        abstract = jax.tree.map(lambda x: shape(x.shape, x.dtype), args_)
        compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(*abstract).compile()
        out[name] = {"memory": bench.memory_of(compiled), "trainable": int(trainable)}
    full = out["full"]["memory"]["total"]
    for name, r in out.items():
        r["over_full"] = r["memory"]["total"] / full
        r["saving"] = 1 - r["over_full"]
        r["paper_saving"] = PAPER.get(name)
    out["lst_over_lora"] = out["lst"]["memory"]["total"] / out["lora"]["memory"]["total"]
    out["goal_met"] = out["lst"]["over_full"] <= GOAL["lst_over_full"] and out["lst_over_lora"] < GOAL["lst_over_lora"]
    return out


def table(name: str, res: dict[str, Any]) -> str:
    rows = [f"{name}: method | total MB | temp MB | x full | saving | paper saving | trainable"]
    for m in ("full", "lora", "adapters", "lst"):
        r = res[m]
        paper = "-" if r["paper_saving"] is None else f"{r['paper_saving']:.0%}"
        rows.append(
            f"  {m:8s} | {r['memory']['total'] / 2**20:9.1f} | {r['memory']['temp'] / 2**20:8.1f} | "
            f"{r['over_full']:.3f} | {r['saving']:6.1%} | {paper:>5s} | {r['trainable']:,}"
        )
    rows.append(
        f"  LST / LoRA = {res['lst_over_lora']:.3f}; goal (<= 0.35 x full, < 0.7 x LoRA) met: {res['goal_met']}"
    )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "command": " ".join(["python", "-m", "experiments.bench", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "batch": args.batch,
        "seq": args.seq,
        "layers": args.layers,
        "rank": args.rank,
        "reduction": args.reduction,
        "chunk": args.chunk,
        "paper_saving": PAPER,
        "goal": GOAL,
        "models": {},
    }
    for name in args.models:
        objectives = ["classifier"] if name == "bert-cls" else args.objectives
        report["models"][name] = {}
        for objective in objectives:
            res = measure(args, name, objective)
            report["models"][name][objective] = res
            print(table(f"{name} ({objective})", res), flush=True)
    return report


def add_parser(sub: Any) -> None:
    p = sub.add_parser("lst", help="peak XLA bytes of a ladder side tuning step vs full, LoRA and adapters")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=None, help="layers (default: the model's, 12 or SmolLM2's 30)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--reduction", type=int, default=8, help="LST reduction factor r")
    p.add_argument(
        "--models", nargs="+", default=["gpt2-lm", "bert-cls"], choices=["gpt2-lm", "bert-cls", "smollm2-lm"]
    )
    p.add_argument(
        "--objectives", nargs="+", default=["lm"], choices=OBJECTIVES, help="the LM models' losses (see the module doc)"
    )
    p.add_argument("--chunk", type=int, default=16, help="positions per slice of the lm-chunked loss")
    p.add_argument("--out", default="experiments/results/bench_lst.json")
