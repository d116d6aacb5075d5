"""``python -m experiments.bench vs-torch``: a jpeft LoRA step against PyTorch + HF PEFT, one run.

Both sides train the same GPT-2-small-shaped model (``GPT2Config()``, random weights, float32,
nothing downloaded) on the same random token batch (4 x 128 by default) with the causal LM loss,
LoRA r = 8 (alpha 16) on ``c_attn``, ``c_proj`` and ``c_fc`` and Adam. The JAX side is jpeft's lean
path (``jpeft.split``, jitted, buffers donated); the torch side is ``peft.get_peft_model`` with
``loss.backward(); opt.step()`` in eager mode, the way HF PEFT users train. Full fine-tuning steps
of both run too, so each side's LoRA/full ratio is in the same table. Steps interleave (one of each
per round) on the same threads: torch uses ``torch.set_num_threads(os.cpu_count())`` and XLA:CPU
its default pool over the same cores. Needs the ``interop`` extra (torch, peft).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from experiments import _timing, bench


def torch_steps(args: argparse.Namespace, ids: np.ndarray) -> dict[str, Any]:
    import peft
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    batch = torch.from_numpy(ids.astype(np.int64))
    config = GPT2Config(n_layer=args.layers)
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.0  # dropout off, as on the JAX side

    def make(lora: bool):
        model = GPT2LMHeadModel(config).float().train()
        if lora:
            cfg = peft.LoraConfig(
                r=args.rank, lora_alpha=16, lora_dropout=0.0, target_modules=list(bench.TARGETS), fan_in_fan_out=True
            )
            model = peft.get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-4)

        def step() -> float:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        return step, sum(p.numel() for p in params)

    out = {}
    for name, lora in (("torch_full", False), ("torch_lora", True)):
        step, n = make(lora)
        out[name] = (step, n)
    return out, torch.__version__, peft.__version__


def jax_steps(args: argparse.Namespace, ids: np.ndarray) -> dict[str, Any]:
    model, params = bench.build_model(args.layers)
    batch = {
        "ids": jnp.asarray(ids, jnp.int32),
        "mask": jnp.ones(ids.shape, jnp.int32),
        "pos": jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape),
    }
    method = jpeft.LoRA(targets=bench.TARGETS, rank=args.rank, alpha=16.0)
    peft_params = jpeft.apply(method, params, key=jax.random.key(2))
    trainable, frozen = jpeft.split(method, peft_params)
    tx_full = optax.adam(1e-4)
    tx_lora = jpeft.optimizer(optax.adam(1e-4), method, trainable)
    steps = bench.make_steps(model, method, tx_full, tx_lora)
    p = bench._copy(params)
    full = bench.Program("jax_full", steps["full"], [p, tx_full.init(p), batch], (0, 1))
    t = bench._copy(trainable)
    lora = bench.Program("jax_lora", steps["lora"], [t, tx_lora.init(t), frozen, batch], (0, 1))
    n = sum(x.size for x in jax.tree.leaves(trainable))
    return {"jax_full": (full, sum(x.size for x in jax.tree.leaves(params))), "jax_lora": (lora, n)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"vs-torch needs torch and peft ({e}). Install the interop extra: pip install '.[interop]'"
        ) from None
    ids = np.asarray(jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, 50257))
    jx = jax_steps(args, ids)
    th, torch_version, peft_version = torch_steps(args, ids)
    runners = {
        "jax_full": lambda: jx["jax_full"][0].step(record=False),
        "jax_lora": lambda: jx["jax_lora"][0].step(record=False),
        "torch_full": th["torch_full"][0],
        "torch_lora": th["torch_lora"][0],
    }
    counts = {"jax_full": jx["jax_full"][1], "jax_lora": jx["jax_lora"][1], **{k: v[1] for k, v in th.items()}}
    timed = _timing.interleaved(runners, args.steps)
    med, walls, load_before, load_after = (timed[k] for k in ("median", "walls", "load_before", "load_after"))
    cpu = timed["cpu_median"]
    ratios = {
        "jax_lora_over_torch_lora": med["jax_lora"] / med["torch_lora"],
        "jax_full_over_torch_full": med["jax_full"] / med["torch_full"],
        "jax_lora_over_jax_full": med["jax_lora"] / med["jax_full"],
        "torch_lora_over_torch_full": med["torch_lora"] / med["torch_full"],
        "cpu_jax_lora_over_torch_lora": cpu["jax_lora"] / cpu["torch_lora"],
        "cpu_jax_full_over_torch_full": cpu["jax_full"] / cpu["torch_full"],
    }
    print(f"GPT-2 ({args.layers} layers) batch {args.batch} x {args.seq}, LoRA r={args.rank} on {bench.TARGETS}")
    print(f"torch {torch_version}, peft {peft_version}, jax {jax.__version__}; {os.cpu_count()} CPU threads")
    print(f"load average {load_before} -> {load_after}")
    print(f"{'variant':12s} {'trainable':>12s} {'median ms':>10s} {'CPU ms':>8s}")
    for k in runners:
        print(f"{k:12s} {counts[k]:>12,} {1000 * med[k]:>10.0f} {1000 * cpu[k]:>8.0f}")
    for k, v in ratios.items():
        print(f"{k:28s} {v:.3f}")
    verdict = "faster" if ratios["jax_lora_over_torch_lora"] < 1.0 else "NOT faster"
    print(f"jpeft LoRA step is {verdict} than torch + HF PEFT (ratio {ratios['jax_lora_over_torch_lora']:.3f})")
    result = {
        "command": "python -m experiments.bench vs-torch " + " ".join(sys.argv[2:]),
        "versions": {"torch": torch_version, "peft": peft_version, "jax": jax.__version__, "jpeft": jpeft.__version__},
        "config": {k: v for k, v in vars(args).items() if k != "bench"}
        | {"targets": list(bench.TARGETS), "threads": os.cpu_count()},
        "trainable": counts,
        "wall_s": walls,
        "wall_s_median": med,
        "cpu_s": timed["cpus"],
        "cpu_s_median": cpu,
        "ratios": ratios,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    return result


def add_parser(sub: Any) -> None:
    p = sub.add_parser("vs-torch", help="jpeft LoRA step vs PyTorch + HF PEFT on GPT-2-small (needs .[interop])")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--out", default="experiments/results/bench_vs_torch.json")
