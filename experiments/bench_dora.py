"""``python -m experiments.bench dora``: a jpeft DoRA step against LoRA's, and against torch + HF PEFT's DoRA.

Same setup as ``vs-torch`` (``experiments/bench_torch.py``): a GPT-2-small-shaped model (``GPT2Config()``,
random weights, float32, nothing downloaded), one random token batch (4 x 128 by default), the causal LM
loss, r = 8 (alpha 16) on ``c_attn``, ``c_proj`` and ``c_fc``, Adam. The JAX side runs jpeft's lean
path (``jpeft.split``, jitted, buffers donated) for ``jpeft.LoRA`` and ``jpeft.DoRA``, and reads XLA's
``cost_analysis()`` FLOPs and ``memory_analysis()`` bytes of each step; the torch side is
``bench_torch.torch_steps`` (``peft.get_peft_model``, eager ``loss.backward(); opt.step()``) with
``LoraConfig(use_dora=...)``. All four steps interleave, one of each per round, so the wall-time
ratios come from the same run; the load average is recorded.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from experiments import _timing, bench, bench_torch


def jax_programs(args: argparse.Namespace, ids: np.ndarray) -> dict[str, bench.Program]:
    model, params = bench.build_model(args.layers)
    batch = {
        "ids": jnp.asarray(ids, jnp.int32),
        "mask": jnp.ones(ids.shape, jnp.int32),
        "pos": jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape),
    }
    out = {}
    variants = [("jax_lora", jpeft.LoRA, False), ("jax_dora", jpeft.DoRA, False)]
    if args.remat:  # the same steps under jpeft.wrap(remat=True): each block recomputed in its backward
        variants += [("jax_lora_remat", jpeft.LoRA, True), ("jax_dora_remat", jpeft.DoRA, True)]
    for name, cls, remat in variants:
        method = cls(targets=bench.TARGETS, rank=args.rank, alpha=16.0)
        trainable, frozen = jpeft.split(method, jpeft.apply(method, params, key=jax.random.key(2)))
        tx = jpeft.optimizer(optax.adam(1e-4), method, trainable)
        step = bench.make_steps(model, method, optax.adam(1e-4), tx, remat=remat)["lora"]
        t = bench._copy(trainable)
        out[name] = bench.Program(name, step, [t, tx.init(t), frozen, batch], (0, 1))
    return out


def torch_programs(args: argparse.Namespace, ids: np.ndarray) -> tuple[dict[str, Any], str, str]:
    """``bench_torch.torch_steps``'s LoRA step, once as LoRA and once with ``LoraConfig(use_dora=True)``."""
    import peft

    plain = peft.LoraConfig
    lora, torch_version, peft_version = bench_torch.torch_steps(args, ids)
    with mock.patch.object(peft, "LoraConfig", functools.partial(plain, use_dora=True)):
        dora, _, _ = bench_torch.torch_steps(args, ids)
    return {"torch_lora": lora["torch_lora"], "torch_dora": dora["torch_lora"]}, torch_version, peft_version


def run(args: argparse.Namespace) -> dict[str, Any]:
    ids = np.asarray(jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, 50257))
    jx = jax_programs(args, ids)
    runners = {k: functools.partial(p.step, record=False) for k, p in jx.items()}
    counts = {k: sum(x.size for x in jax.tree.leaves(p.args[0])) for k, p in jx.items()}
    torch_version = peft_version = None
    if not args.no_torch:
        th, torch_version, peft_version = torch_programs(args, ids)
        runners |= {k: v[0] for k, v in th.items()}
        counts |= {k: v[1] for k, v in th.items()}
    timed = _timing.interleaved(runners, args.steps)
    med, walls, load_before, load_after = (timed[k] for k in ("median", "walls", "load_before", "load_after"))
    cpu = timed["cpu_median"]
    flops = {k: p.flops for k, p in jx.items()}
    nbytes = {k: p.bytes for k, p in jx.items()}
    ratios = {
        "dora_flops_over_lora": flops["jax_dora"] / flops["jax_lora"],
        "dora_bytes_over_lora": nbytes["jax_dora"]["total"] / nbytes["jax_lora"]["total"],
        "dora_temp_bytes_over_lora": nbytes["jax_dora"]["temp"] / nbytes["jax_lora"]["temp"],
        "dora_wall_over_lora": med["jax_dora"] / med["jax_lora"],
        "dora_cpu_over_lora": cpu["jax_dora"] / cpu["jax_lora"],
    }
    if args.remat:
        ratios |= {
            "remat_dora_bytes_over_remat_lora": nbytes["jax_dora_remat"]["total"] / nbytes["jax_lora_remat"]["total"],
            "remat_dora_flops_over_remat_lora": flops["jax_dora_remat"] / flops["jax_lora_remat"],
            "remat_dora_wall_over_remat_lora": med["jax_dora_remat"] / med["jax_lora_remat"],
        }
    if not args.no_torch:
        ratios |= {
            "torch_dora_wall_over_torch_lora": med["torch_dora"] / med["torch_lora"],
            "jax_dora_over_torch_dora": med["jax_dora"] / med["torch_dora"],
            "jax_lora_over_torch_lora": med["jax_lora"] / med["torch_lora"],
            "cpu_jax_dora_over_torch_dora": cpu["jax_dora"] / cpu["torch_dora"],
        }
    print(f"GPT-2 ({args.layers} layers) batch {args.batch} x {args.seq}, r={args.rank} on {bench.TARGETS}")
    print(f"jax {jax.__version__}, torch {torch_version}, peft {peft_version}; load {load_before} -> {load_after}")
    print(f"{'variant':14s} {'trainable':>10s} {'GFLOP':>8s} {'MiB':>8s} {'median ms':>10s} {'CPU ms':>8s}")
    for k in runners:
        fl = f"{flops[k] / 1e9:8.2f}" if k in flops else f"{'':8s}"
        mb = f"{nbytes[k]['total'] / 2**20:8.1f}" if k in nbytes else f"{'':8s}"
        print(f"{k:14s} {counts[k]:>10,} {fl} {mb} {1000 * med[k]:>10.0f} {1000 * cpu[k]:>8.0f}")
    for k, v in ratios.items():
        print(f"{k:32s} {v:.3f}")
    return {
        "command": "python -m experiments.bench dora " + " ".join(sys.argv[2:]),
        "versions": {"torch": torch_version, "peft": peft_version, "jax": jax.__version__, "jpeft": jpeft.__version__},
        "config": {k: v for k, v in vars(args).items() if k != "bench"} | {"targets": list(bench.TARGETS)},
        "trainable": counts,
        "flops": flops,
        "bytes": nbytes,
        "wall_s": walls,
        "wall_s_median": med,
        "cpu_s": timed["cpus"],
        "cpu_s_median": cpu,
        "ratios": ratios,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("dora", help="jpeft DoRA vs LoRA (FLOPs, bytes, wall) and vs torch + HF PEFT DoRA")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--no-torch", action="store_true", help="jpeft only (no torch + peft)")
    p.add_argument("--remat", action="store_true", help="also LoRA and DoRA under jpeft.wrap(remat=True)")
    p.add_argument("--out", default="experiments/results/bench_dora.json")
