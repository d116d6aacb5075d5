"""``python -m experiments.bench adapterdrop``: AdapterDrop's inference speed-up on GPT-2-small.

Houlsby adapters (reduction factor 16) on a GPT-2-small-shaped model (``GPT2Config()``, random
weights, float32), batch 4 x 128, jitted forward passes: the base model, all 12 layers with
adapters, and adapters dropped from the lowest ``--drop`` layers (``jpeft.wrap(...,
drop_layers=range(n))``), and the gradient of the LM loss for the adapters with and without the
drop: with no adapter in the lowest layers, no gradient flows below them, the training saving the
AdapterDrop paper reports. FLOPs come from ``compiled.cost_analysis()``; wall times are medians of
interleaved calls, read as ratios from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from experiments import bench


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, params = bench.build_model(args.layers)
    method = jpeft.HoulsbyAdapter(reduction_factor=16)
    peft = jpeft.apply(method, params, key=jax.random.key(2))
    rng = np.random.RandomState(0)  # non-zero up-projections, so dropping changes the output
    peft = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype) if "up_kernel" in jax.tree_util.keystr(p) else x,
        peft,
    )
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, model.config.vocab_size, dtype=jnp.int32)
    mask, pos = jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), ids.shape)

    def forward(apply_fn):
        return jax.jit(lambda p: apply_fn({"params": p}, ids, mask, pos, return_dict=False)[0])

    trainable, frozen = jpeft.split(method, peft)
    batch = {"ids": ids, "mask": mask, "pos": pos}

    def grad_step(apply_fn):  # the gradient of the LM loss for the adapters only (the lean path)
        return jax.jit(lambda t: jax.grad(lambda t: bench.lm_loss(apply_fn, jpeft.combine(t, frozen), batch))(t))

    dropped = jpeft.wrap(model.module.apply, method, drop_layers=range(args.drop))
    variants = {
        "base": (forward(model.module.apply), params),
        "adapters": (forward(jpeft.wrap(model.module.apply, method)), peft),
        f"drop_{args.drop}": (forward(dropped), peft),
        "train_adapters": (grad_step(jpeft.wrap(model.module.apply, method)), trainable),
        f"train_drop_{args.drop}": (grad_step(dropped), trainable),
    }
    compiled, flops, walls = {}, {}, {}
    for name, (fn, p) in variants.items():
        compiled[name] = fn.lower(p).compile()
        cost = compiled[name].cost_analysis()
        flops[name] = float((cost[0] if isinstance(cost, list) else cost)["flops"])
        jax.block_until_ready(compiled[name](p))
        walls[name] = []
    for _ in range(args.steps):
        for name, (_, p) in variants.items():
            t = time.perf_counter()
            jax.block_until_ready(compiled[name](p))
            walls[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in walls.items()}
    drop = f"drop_{args.drop}"
    ratios = {
        "adapter_flops_over_base": flops["adapters"] / flops["base"],
        "drop_flops_over_adapters": flops[drop] / flops["adapters"],
        "drop_wall_over_adapters": med[drop] / med["adapters"],
        "adapters_wall_over_base": med["adapters"] / med["base"],
        "speedup_from_drop": med["adapters"] / med[drop],
        "train_drop_flops_over_train": flops[f"train_{drop}"] / flops["train_adapters"],
        "train_speedup_from_drop": med["train_adapters"] / med[f"train_{drop}"],
    }
    print(f"GPT-2 ({args.layers} layers), batch {args.batch} x {args.seq}, Houlsby rf 16; drop layers 0..{args.drop - 1}")
    for k in variants:
        print(f"  {k:10s} {flops[k] / 1e9:8.2f} GFLOP   median {1000 * med[k]:7.1f} ms")
    for k, v in ratios.items():
        print(f"  {k:28s} {v:.3f}")
    return {
        "command": "python -m experiments.bench adapterdrop",
        "config": {k: v for k, v in vars(args).items() if k != "bench"},
        "flops": flops,
        "wall_s": walls,
        "wall_s_median": med,
        "ratios": ratios,
        "loadavg": os.getloadavg(),
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("adapterdrop", help="AdapterDrop inference speed-up on GPT-2-small (Houlsby adapters)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--drop", type=int, default=5)
    p.add_argument("--out", default="experiments/results/bench_adapterdrop.json")
