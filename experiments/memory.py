"""``python -m experiments.memory``: the seed's memory table (ChatGLM-6B), reproduced in shape on SmolLM2-135M.

The seed lists the GPU memory of fine-tuning ChatGLM-6B (FP16, INT8 and INT4 bases) with LoRA
(r = 8), P-tuning (p = 16) and Freeze (l = 3) at several batch sizes. This experiment compiles the
same grid of training steps on SmolLM2-135M's shapes and reads XLA's plan for each:

* **Model:** HF ``FlaxLlamaForCausalLM`` (linen) with SmolLM2-135M's config (30 layers, width 576,
  9 query / 3 key-value heads, FFN 1536, vocab 49,152, rope base 1e5; HF's Flax Llama has no tied
  embeddings, so its LM head is a separate 49,152 x 576 matrix: 162.6 M parameters), random
  weights (memory and speed do not depend on their values), computing in ``--dtype`` with
  ``--dtype`` parameters. The default is float32: on CPU, XLA has no bf16 matmul and converts every
  bf16 weight to a float32 copy that the plan keeps (``--dtype bfloat16`` shows it: the temp bytes
  then hold a float32 copy of the weights), so bf16 plans on CPU do not show what a bf16 base
  costs on an accelerator. The seed's FP16 rows are the "float" rows here. (``jpeft.models.smollm2()``
  loads the real weights as an NNX model; random weights of the same shapes save the load.)
* **INT8 / INT4 bases:** ``jpeft.quantize(params, jpeft.Int8() | jpeft.Int4(), targets=...)`` on the
  seven projection kernels of every decoder layer (what bitsandbytes quantises: every linear layer
  except the LM head; the tied embedding stays float), then ``jpeft.on_quantized(method,
  compute_dtype=--dtype)``. For Freeze only the frozen layers are quantised; the last ``l`` train
  in float.
* **Step:** causal LM loss over the ``T`` text positions, ``jax.value_and_grad`` over the trainable
  leaves only (``jpeft.split``), ``optax.adam`` (state in the trainable leaves' dtype), trainable
  leaves and optimizer state donated.
* **Peak bytes:** ``compiled.memory_analysis()`` of the jitted step (``bench.memory_of``): argument +
  output + temp − alias (donated outputs reuse their inputs' buffers), the buffers XLA plans to hold
  for one step. Nothing has to run for this figure.
* **examples/s:** the same compiled step run ``--steps`` times after one warm-up step on this
  machine (wall clock, batch / median step time), with the load average before and after: the CPU
  is shared, so treat the speed as rough.

Figures are reported as ratios to the float LoRA batch-4 row, next to the seed's ratios (its GB
figures over LoRA batch 4 FP16's 20 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jpeft
from experiments import bench

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
"""SmolLM2-135M's ``LlamaConfig`` fields (as in ``jpeft.models.smollm2()``'s GGUF file)."""

SEED_GB = {
    ("lora", 16, "float"): 28,
    ("lora", 8, "float"): 24,
    ("lora", 4, "float"): 20,
    ("lora", 4, "int8"): 10,
    ("lora", 4, "int4"): 8,
    ("ptuning", 4, "float"): 20,
    ("ptuning", 4, "int8"): 16,
    ("ptuning", 4, "int4"): 12,
    ("freeze", 4, "float"): 24,
    ("freeze", 4, "int8"): 12,
}
"""The seed's table: ChatGLM-6B GPU memory in GB for (method, batch, base precision); FP16 is "float" here (the float base, ``--dtype``)."""

REFERENCE = ("lora", 4, "float")
PROJ = r"model/layers/{layers}/(self_attn|mlp)/(q|k|v|o|gate|up|down)_proj"


@dataclasses.dataclass(frozen=True)
class Row:
    method: str
    batch: int
    precision: str

    @property
    def key(self) -> str:
        return f"{self.method}/b{self.batch}/{self.precision}"


ROWS = tuple(Row(*k) for k in SEED_GB)


def build_model(
    layers: int, vocab: int | None = None, dtype: str = "float32", seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """``(model, params)``: a SmolLM2-135M-shaped HF Flax Llama computing in ``dtype``, random ``dtype`` weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    cfg = dict(SMOLLM2, num_hidden_layers=layers)
    if vocab is not None:
        cfg["vocab_size"] = vocab
    ids = jnp.zeros((1, 8), jnp.int32)

    def init(key: jax.Array) -> Any:
        p = model.module.init(key, ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(8), ids.shape))["params"]
        return jax.tree.map(lambda x: x.astype(dtype), p)

    with jax.numpy_rank_promotion("allow"):  # HF's Flax code relies on implicit rank promotion
        model = transformers.FlaxLlamaForCausalLM(
            transformers.LlamaConfig(**cfg), dtype=jnp.dtype(dtype), _do_init=False
        )
        params = jax.jit(init)(jax.random.key(seed))
    return model, jax.tree.map(np.asarray, params)


def make_method(row: Row, layers: int, args: argparse.Namespace) -> tuple[jpeft.Method, str | None]:
    """``(method, quantize targets)`` for a row; targets is None on a float base."""
    if row.method == "lora":
        inner: jpeft.Method = jpeft.LoRA(targets=("q_proj", "k_proj", "v_proj"), rank=args.rank, alpha=2.0 * args.rank)
        quantised = r"\d+"
    elif row.method == "ptuning":
        inner = jpeft.PTuning(num_virtual_tokens=args.virtual_tokens)
        quantised = r"\d+"
    elif row.method == "freeze":
        if not 0 < args.freeze_layers < layers:
            raise SystemExit(f"--freeze-layers must be in 1..{layers - 1} (got {args.freeze_layers})")
        inner = jpeft.Freeze(trainable_layers=args.freeze_layers)
        quantised = "(" + "|".join(str(i) for i in range(layers - args.freeze_layers)) + ")"
    else:
        raise SystemExit(f"unknown method {row.method!r}")
    if row.precision == "float":
        return inner, None
    return jpeft.on_quantized(inner, compute_dtype=args.dtype, remat=args.remat), PROJ.format(layers=quantised)


def quant_config(precision: str, args: argparse.Namespace) -> Any:
    if precision == "int8":
        return jpeft.Int8()
    if precision == "int4":
        return jpeft.Int4(block_size=args.int4_block)
    raise SystemExit(f"unknown precision {precision!r}")


def make_step(model: Any, method: jpeft.Method, tx: Any, seq: int) -> Any:
    """The lean PEFT training step: ``(trainable, opt_state, frozen, ids) -> (trainable, opt_state, loss)``."""
    apply = jpeft.wrap(model.module.apply, method)

    def loss_fn(trainable: Any, frozen: Any, ids: jax.Array) -> jax.Array:
        mask = jnp.ones_like(ids)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        logits = apply({"params": jpeft.combine(trainable, frozen)}, ids, mask, pos).logits[:, -seq:]
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    def step(trainable: Any, opt_state: Any, frozen: Any, ids: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def _nbytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]


def measure(row: Row, model: Any, params: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Compiles one row's step, reads its memory plan and times ``args.steps`` steps."""
    layers = model.config.num_hidden_layers
    method, targets = make_method(row, layers, args)
    base = params if targets is None else jpeft.quantize(params, quant_config(row.precision, args), targets=targets)
    tree = jpeft.apply(method, base, key=jax.random.key(1))
    trainable, frozen = jpeft.split(method, tree)
    tx = optax.adam(1e-4)
    ids = jax.random.randint(jax.random.key(2), (row.batch, args.seq), 0, model.config.vocab_size, dtype=jnp.int32)
    opt_state = tx.init(trainable)
    t0 = time.perf_counter()
    with jax.numpy_rank_promotion("allow"):
        compiled = jax.jit(make_step(model, method, tx, args.seq), donate_argnums=(0, 1)).lower(
            trainable, opt_state, frozen, ids
        )
        compiled = compiled.compile()
    out: dict[str, Any] = {
        "row": dataclasses.asdict(row),
        "method_repr": repr(method)[:300],
        "compile_s": time.perf_counter() - t0,
        "memory": bench.memory_of(compiled),
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainable))),
        "trainable_bytes": _nbytes(trainable),
        "frozen_bytes": _nbytes(frozen),
        "opt_state_bytes": _nbytes(opt_state),
        "batch_bytes": int(ids.nbytes),
    }
    if args.steps:
        walls, losses = [], []
        load_before = os.getloadavg()
        state = [trainable, opt_state]
        for i in range(args.steps + 1):
            w = time.perf_counter()
            state[0], state[1], loss = jax.block_until_ready(compiled(state[0], state[1], frozen, ids))
            if i:
                walls.append(time.perf_counter() - w)
            losses.append(float(loss))
        if not all(np.isfinite(losses)):
            raise FloatingPointError(f"{row.key}: non-finite loss {losses}")
        out["time"] = {
            "steps": args.steps,
            "wall_s_all": walls,
            "wall_s_median": statistics.median(walls),
            "examples_per_s": row.batch / statistics.median(walls),
            "losses": losses,
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
        }
    return out


def _row(r: dict[str, Any]) -> Row:
    return Row(r["row"]["method"], r["row"]["batch"], r["row"]["precision"])


def add_ratios(results: dict[str, Any]) -> None:
    """Each run row's peak bytes over the reference row's, next to the seed's GB ratio."""
    ref = results.get(Row(*REFERENCE).key, {})
    ref_bytes = (ref.get("memory") or {}).get("total")
    ref_speed = (ref.get("time") or {}).get("examples_per_s")
    for r in results.values():
        row = _row(r)
        r["seed_gb"] = SEED_GB.get((row.method, row.batch, row.precision))
        r["seed_ratio"] = None if r["seed_gb"] is None else r["seed_gb"] / SEED_GB[REFERENCE]
        total = (r.get("memory") or {}).get("total")
        r["ratio"] = None if total is None or not ref_bytes else total / ref_bytes
        speed = (r.get("time") or {}).get("examples_per_s")
        r["speed_ratio"] = None if speed is None or not ref_speed else speed / ref_speed


def table(results: dict[str, Any]) -> str:
    head = ["method", "batch", "base", "peak MiB", "args MiB", "temp MiB", "x ref", "seed GB", "seed x ref", "ex/s"]
    rows = [head]
    for r in results.values():
        row = _row(r)
        mem = r.get("memory")
        if mem is None:
            rows.append([row.method, str(row.batch), row.precision, "not run: " + r.get("error", "?")[:70]])
            continue
        t = r.get("time")
        rows.append(
            [
                row.method,
                str(row.batch),
                row.precision,
                f"{mem['total'] / 2**20:,.1f}",
                f"{mem['argument'] / 2**20:,.1f}",
                f"{mem['temp'] / 2**20:,.1f}",
                "-" if r.get("ratio") is None else f"{r['ratio']:.2f}",
                "-" if r.get("seed_gb") is None else str(r["seed_gb"]),
                "-" if r.get("seed_ratio") is None else f"{r['seed_ratio']:.2f}",
                "-" if t is None else f"{t['examples_per_s']:.2f}",
            ]
        )
    width = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(head))]
    lines = ["  ".join(c.rjust(width[i]) if i else c.ljust(width[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def save_plot(results: dict[str, Any], path: str, dtype: str = "float32") -> str | None:
    """Bars: this run's ratio to the reference row next to the seed's, per row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k, r in results.items() if r.get("ratio") is not None]
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys) + 2), 4))
    ax.bar(x - 0.2, [results[k]["seed_ratio"] or 0 for k in keys], 0.4, label="seed: ChatGLM-6B (GB ratio)")
    ax.bar(x + 0.2, [results[k]["ratio"] for k in keys], 0.4, label="jpeft: SmolLM2-135M shapes (XLA peak ratio)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(x, [k.replace("/", "\n") for k in keys], fontsize=8)
    ax.set_ylabel(f"memory / LoRA b4 {dtype}")
    ax.set_title(f"Training-step peak memory relative to LoRA, batch 4, {dtype} base (seed: FP16)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.memory", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"], help="decoder layers (30 = SmolLM2)")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (tests use a small one)")
    p.add_argument("--seq", type=int, default=256, help="tokens per example")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row after one warm-up (0: memory only)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--virtual-tokens", type=int, default=16, help="P-tuning's p")
    p.add_argument("--freeze-layers", type=int, default=3, help="Freeze's l")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the float base's dtype")
    p.add_argument("--int4-block", type=int, default=64, help="jpeft.Int4 block size")
    p.add_argument(
        "--no-remat",
        dest="remat",
        action="store_false",
        help="on_quantized(remat=False): keep every dequantised kernel for the backward pass (the plan before the fix)",
    )
    p.add_argument("--batch-scale", type=int, default=1, help="divide every batch by this (quick checks)")
    p.add_argument(
        "--only", nargs="*", default=None, help="row keys to run, e.g. lora/b4/float freeze/b4/int8 (default: all)"
    )
    p.add_argument("--out", default="experiments/results/memory/memory.json")
    p.add_argument("--plot", default=None, help="plot path (default: next to --out, .png)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [r for r in ROWS if args.only is None or r.key in args.only]
    model, params = build_model(args.layers, args.vocab, args.dtype)
    report: dict[str, Any] = {
        "command": " ".join(["python", "-m", "experiments.memory", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git": bench._git_state(),
        "model": dict(SMOLLM2, num_hidden_layers=args.layers, vocab_size=model.config.vocab_size),
        "param_bytes": _nbytes(params),
        "args": vars(args),
        "peak": "memory_analysis(): argument + output + temp - alias bytes of the jitted step (bench.memory_of)",
        "reference": Row(*REFERENCE).key,
        "seed_gb": {Row(*k).key: v for k, v in SEED_GB.items()},
        "results": {},
    }
    results = report["results"]
    for row in tqdm(rows, desc="rows"):
        run = dataclasses.replace(row, batch=max(1, row.batch // args.batch_scale))
        try:
            results[row.key] = measure(run, model, params, args)
        except Exception as e:  # a combination that does not run is reported with its reason, not hidden
            results[row.key] = {"row": dataclasses.asdict(run), "error": _why(e)}
        results[row.key]["row"] = dataclasses.asdict(row) | {"run_batch": run.batch}
        add_ratios(results)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(table(results))
    plot = save_plot(results, args.plot or os.path.splitext(args.out)[0] + ".png", args.dtype)
    print(f"wrote {args.out}" + (f" and {plot}" if plot else ""))
    return report


if __name__ == "__main__":
    main()
