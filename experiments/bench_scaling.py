"""``python -m experiments.bench scaling``: training-step bytes as work grows, and what PEFT remat saves.

GPT-2-small shapes (``FlaxGPT2LMHeadModel(GPT2Config())``, random float32 weights, never
downloaded), the causal LM loss, ``optax.adam``, trainable leaves and optimizer state donated.
Variants, all with r = 8 on ``c_attn``, ``c_proj`` and ``c_fc`` where they adapt:

* ``full``: every parameter trains;
* ``lora``: ``jpeft.LoRA``, the lean ``jpeft.split`` step;
* ``lora_remat``: the same, with ``jpeft.wrap(..., remat=True)``: each GPT-2 block's activations
  are recomputed in its backward pass, after its cotangent arrives (``jpeft._remat``);
* ``lora_fa``: ``jpeft.LoRAFA`` (A frozen, only B trains);
* ``qlora``: ``jpeft.QLoRA`` with an NF4 base (double quantisation), computing in float32.

For each batch x sequence in ``--shapes`` it compiles every variant's step and reads
``compiled.memory_analysis()`` (argument + temp + output - alias, the bytes XLA plans to hold) and
``cost_analysis()`` FLOPs; nothing runs for these. Wall time (median of ``--steps`` interleaved
steps after a warm-up, ``experiments.bench.time_interleaved``) is measured at the ``--wall-shapes``
only (default: the first shape; the machine is a shared 2-core CPU), with the load average. Each
variant's bytes against tokens per step are fitted by least squares: the slope is its bytes per
token (mostly activations; the intercept is parameters, gradients and optimizer state). Writes the
JSON and ``bench_scaling.png`` (one line per variant).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jpeft
from experiments import bench

VARIANTS = ("full", "lora", "lora_remat", "lora_fa", "qlora")
GOALS = {"remat_bytes_over_full": 0.45, "remat_flops_over_lora": 1.25, "remat_wall_over_lora": 1.25}


def _batch(b: int, t: int, vocab: int) -> dict[str, jax.Array]:
    ids = jax.random.randint(jax.random.key(1), (b, t), 0, vocab, dtype=jnp.int32)
    return {"ids": ids, "mask": jnp.ones_like(ids), "pos": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), ids.shape)}


def _programs(model: Any, params: Any, rank: int, batch: dict[str, jax.Array]) -> dict[str, bench.Program]:
    """Compiles one step per variant on ``batch`` (each on its own copy of the state)."""
    progs: dict[str, bench.Program] = {}
    tx = optax.adam(1e-4)
    plain = model.module.apply

    def full_step(p, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: bench.lm_loss(plain, p, batch))(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    p = bench._copy(params)
    progs["full"] = bench.Program("full", full_step, [p, tx.init(p), batch], (0, 1))
    methods = {
        "lora": (jpeft.LoRA(targets=bench.TARGETS, rank=rank, alpha=16.0), None),
        "lora_remat": (jpeft.LoRA(targets=bench.TARGETS, rank=rank, alpha=16.0), True),
        "lora_fa": (jpeft.LoRAFA(targets=bench.TARGETS, rank=rank, alpha=16.0), None),
        "qlora": (
            jpeft.QLoRA(targets=bench.TARGETS, rank=rank, alpha=16.0, quant=jpeft.NF4(), compute_dtype="float32"),
            None,
        ),
    }
    for name, (method, remat) in methods.items():
        base = jpeft.quantize(params, method) if name == "qlora" else params
        trainable, frozen = jpeft.split(method, jpeft.apply(method, base, key=jax.random.key(2)))
        tx_m = jpeft.optimizer(tx, method, trainable)
        wrapped = jpeft.wrap(plain, method, remat=remat)

        def step(t, opt_state, frozen, batch, wrapped=wrapped, tx_m=tx_m):
            loss, grads = jax.value_and_grad(lambda t: bench.lm_loss(wrapped, jpeft.combine(t, frozen), batch))(t)
            updates, opt_state = tx_m.update(grads, opt_state, t)
            return optax.apply_updates(t, updates), opt_state, loss

        step.__name__ = f"{name}_step"
        tr = bench._copy(trainable)
        progs[name] = bench.Program(name, step, [tr, tx_m.init(tr), frozen, batch], (0, 1))
    return progs


def _shape(s: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ such as 4x128, got {s!r}") from None
    return b, t


def _plot(rows: dict[str, dict[str, Any]], fits: dict[str, dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in VARIANTS:
        pts = sorted((r["tokens"], r["variants"][v]["bytes"]["total"] / 2**20) for r in rows.values())
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=f"{v}: {fits[v]['bytes_per_token'] / 2**10:.0f} KiB/token")
    ax.set_xlabel("tokens per step (batch x sequence)")
    ax.set_ylabel("XLA planned bytes (MiB)")
    ax.set_title("GPT-2-small training step: bytes vs tokens (slope = bytes per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    model, params = bench.build_model(args.layers)
    vocab = model.config.vocab_size
    rows: dict[str, dict[str, Any]] = {}
    wall_shapes = args.wall_shapes if args.wall_shapes is not None else args.shapes[:1]
    for b, t in tqdm(args.shapes, desc="shapes"):
        progs = _programs(model, params, args.rank, _batch(b, t, vocab))
        row: dict[str, Any] = {"batch": b, "seq": t, "tokens": b * t, "variants": {}}
        if (b, t) in wall_shapes:
            row["loadavg_before"] = os.getloadavg()
            bench.time_interleaved(progs, args.steps, None)
            row["loadavg_after"] = os.getloadavg()
        for name, prog in progs.items():
            res = {"flops": prog.flops, "bytes": prog.bytes, "compile_s": prog.compile_s}
            if prog.walls:
                res["wall_s_median"] = float(np.median(prog.walls))
                res["wall_s_all"] = prog.walls
                res["losses"] = prog.losses
            row["variants"][name] = res
        del progs
        rows[f"{b}x{t}"] = row
        line = "  ".join(f"{v} {row['variants'][v]['bytes']['total'] / 2**20:,.0f}" for v in VARIANTS)
        print(f"{b}x{t}: MiB {line}", flush=True)
    fits = {}
    for v in VARIANTS:
        xs = np.array([r["tokens"] for r in rows.values()], float)
        ys = np.array([r["variants"][v]["bytes"]["total"] for r in rows.values()], float)
        slope, icpt = np.polyfit(xs, ys, 1) if len(xs) > 1 else (float("nan"), float("nan"))
        temp_slope = (
            np.polyfit(xs, [r["variants"][v]["bytes"]["temp"] for r in rows.values()], 1)[0]
            if len(xs) > 1
            else float("nan")
        )
        fits[v] = {
            "bytes_per_token": float(slope),
            "intercept_bytes": float(icpt),
            "temp_bytes_per_token": float(temp_slope),
        }
    first = rows[f"{args.shapes[0][0]}x{args.shapes[0][1]}"]["variants"]

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = first[a].get(key), first[b].get(key)
        if key == "bytes":
            x, y = x["total"], y["total"]
        return None if x is None or y is None else x / y

    ratios = {
        "remat_bytes_over_full": ratio("lora_remat", "full", "bytes"),
        "lora_bytes_over_full": ratio("lora", "full", "bytes"),
        "remat_flops_over_lora": ratio("lora_remat", "lora", "flops"),
        "remat_wall_over_lora": ratio("lora_remat", "lora", "wall_s_median"),
        "lora_fa_bytes_per_token_over_lora": fits["lora_fa"]["bytes_per_token"] / fits["lora"]["bytes_per_token"],
    }
    met = {k: (ratios[k] is not None and ratios[k] <= g) for k, g in GOALS.items()}
    met["lora_fa_bytes_per_token_below_lora"] = ratios["lora_fa_bytes_per_token_over_lora"] < 1.0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot = os.path.join(os.path.dirname(args.out), "bench_scaling.png")
    _plot(rows, fits, plot)
    for v in VARIANTS:
        print(
            f"  {v:10s} {fits[v]['bytes_per_token'] / 2**10:8.1f} KiB/token  (temp {fits[v]['temp_bytes_per_token'] / 2**10:8.1f})"
        )
    print("ratios at", args.shapes[0], {k: None if r is None else round(r, 3) for k, r in ratios.items()}, "met:", met)
    return {
        "bench": "scaling",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "experiments.bench", *sys.argv[1:]]),
        "platform": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.devices()[0].platform,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "config": {
            "layers": args.layers,
            "rank": args.rank,
            "shapes": [list(s) for s in args.shapes],
            "wall_shapes": [list(s) for s in wall_shapes],
            "steps": args.steps,
        },
        "rows": rows,
        "fits": fits,
        "ratios_at_first_shape": ratios,
        "goals": GOALS,
        "met": met,
        "plot": plot,
        "elapsed_s": time.perf_counter() - started,
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("scaling", help="bytes vs tokens per step: full, LoRA, LoRA + remat, LoRA-FA, QLoRA (GPT-2)")
    p.add_argument("--shapes", type=_shape, nargs="+", default=[(4, 128), (8, 256), (16, 512)])
    p.add_argument("--wall-shapes", type=_shape, nargs="*", default=None, help="shapes to time (default: the first)")
    p.add_argument("--steps", type=bench._steps_arg, default=5, help="timed steps after one warm-up step (>= 5)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12 = GPT-2-small; 2 for a quick check)")
    p.add_argument("--out", default="experiments/results/bench_scaling.json")
