"""``python -m experiments.bench multi-adapter``: mixed batches of N LoRA adapters, gathered vs looped.

One batch mixes N distinct LoRA adapters (r = 8 on GPT-2-small's ``c_attn``, ``c_proj`` and ``c_fc``),
one adapter per group of ``batch / N`` consecutive rows (``adapter_index=``). Two paths:

* ``looped`` (``jpeft._gather.looped()``, jpeft's path before the gathered one): every adapter runs
  on the whole batch and rows are selected, so the adapter work grows N times;
* ``gathered`` (the default): each row gathers its adapter's factors (Punica BGMV / S-LoRA) and one
  batched down- and up-projection applies them, one adapter's work whatever N.

For N in ``--adapters`` it compiles the forward (a loss on the final hidden state: XLA drops the
unused LM head, so the blocks' cost is not diluted by the 50,257-way logits) and a training step
(gradients of every adapter's factors, Adam), reads XLA's ``cost_analysis`` FLOPs and
``memory_analysis`` bytes at ``--batch x --seq``, and times the programs interleaved (median of
``--steps``) at ``--batch x --time-seq`` (shorter sequences keep wall-time runs short on a small CPU).
Every figure is reported relative to N = 1 of the same path.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jpeft
from experiments import bench
from jpeft import _gather

GOAL = {"flops_64_over_1": 1.15, "wall_64_over_1": 1.3}


def _setup(args: argparse.Namespace, n: int) -> tuple[Any, Any, Any, Any]:
    """``(model, method, trainable, frozen)`` with ``n`` adapters ``a0..`` whose factors are all non-zero."""
    model, params = bench.build_model(args.layers)
    method = jpeft.LoRA(targets=bench.TARGETS, rank=args.rank, alpha=16.0)
    rng = np.random.RandomState(0)
    for i in range(n):
        params = jpeft.apply(method, params, key=jax.random.key(i), name=f"a{i}")
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype)
            if jpeft.RESERVED in [getattr(k, "key", None) for k in p]
            else x
        ),
        params,
    )
    trainable, frozen = jpeft.split(method, tree)
    return model, method, trainable, frozen


def _programs(args: argparse.Namespace, n: int, seq: int) -> dict[str, Any]:
    model, method, trainable, frozen = _setup(args, n)
    names = tuple(f"a{i}" for i in range(n))
    wrapped = jpeft.wrap(model.module.apply, method, active=names)
    ids = jax.random.randint(jax.random.key(1), (args.batch, seq), 0, 50257, dtype=jnp.int32)
    batch = {"ids": ids, "mask": jnp.ones_like(ids), "pos": jnp.broadcast_to(jnp.arange(seq), ids.shape)}
    index = jnp.repeat(jnp.arange(n, dtype=jnp.int32), args.batch // n)
    tx = optax.adam(1e-4)

    def loss(t, batch, index):
        h = wrapped(
            {"params": jpeft.combine(t, frozen)},
            batch["ids"],
            batch["mask"],
            batch["pos"],
            deterministic=True,
            output_hidden_states=True,
            return_dict=False,
            adapter_index=index,
        )[1][-1]
        return jnp.mean(h * h)

    def forward(t, batch, index):
        return loss(t, batch, index)

    def step(t, opt, batch, index):
        value, grads = jax.value_and_grad(loss)(t, batch, index)
        updates, opt = tx.update(grads, opt, t)
        return optax.apply_updates(t, updates), opt, value

    out = {}
    for path in ("looped", "gathered"):
        with _gather.looped() if path == "looped" else contextlib.nullcontext():
            # Fresh callables per path: jax.jit caches traces by function, and the path is chosen at trace time.
            fwd = jax.jit(lambda *a: forward(*a)).lower(trainable, batch, index).compile()
            stp = (
                jax.jit(lambda *a: step(*a), donate_argnums=(0, 1))
                .lower(trainable, tx.init(trainable), batch, index)
                .compile()
            )
        out[path] = {
            "forward": (fwd, [trainable, batch, index]),
            "step": (stp, [bench._copy(trainable), tx.init(trainable), batch, index]),
        }
    return out


def _time(prog: tuple[Any, list[Any]], kind: str) -> float:
    compiled, a = prog
    w = time.perf_counter()
    out = jax.block_until_ready(compiled(*a))
    if kind == "step":
        a[0], a[1] = out[0], out[1]
    return time.perf_counter() - w


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch % max(args.adapters):
        raise SystemExit(f"--batch {args.batch} must be a multiple of every N in --adapters {args.adapters}")
    cost: dict[str, Any] = {}
    for n in tqdm(args.adapters, desc="compile (cost)"):
        progs = _programs(args, n, args.seq)
        for path, kinds in progs.items():
            for kind, (compiled, _) in kinds.items():
                cost[f"{path}/{kind}/{n}"] = {"flops": bench.flops_of(compiled), "bytes": bench.memory_of(compiled)}
    timed: dict[str, Any] = {}
    walls: dict[str, list[float]] = {}
    for n in tqdm(args.adapters, desc="compile (wall)"):
        for path, kinds in _programs(args, n, args.time_seq).items():
            for kind, prog in kinds.items():
                timed[f"{path}/{kind}/{n}"] = prog
                _time(prog, kind)  # warm-up
    for _ in tqdm(range(args.steps), desc="timed rounds"):
        for key, prog in timed.items():
            walls.setdefault(key, []).append(_time(prog, key.split("/")[1]))
    rows: dict[str, Any] = {}
    for key in cost:
        path, kind, n = key.split("/")
        one = f"{path}/{kind}/1"
        rows[key] = {
            **cost[key],
            "wall_s_median": statistics.median(walls[key]),
            "wall_s_all": walls[key],
            "flops_over_1": cost[key]["flops"] / cost[one]["flops"],
            "bytes_over_1": cost[key]["bytes"]["total"] / cost[one]["bytes"]["total"],
            "wall_over_1": statistics.median(walls[key]) / statistics.median(walls[one]),
        }
    top = max(args.adapters)
    met = {
        kind: {
            "flops": rows[f"gathered/{kind}/{top}"]["flops_over_1"] <= GOAL["flops_64_over_1"],
            "wall": rows[f"gathered/{kind}/{top}"]["wall_over_1"] <= GOAL["wall_64_over_1"],
        }
        for kind in ("forward", "step")
    }
    print(f"{'path/kind/N':24} {'GFLOPs':>9} {'xF':>6} {'MiB':>8} {'xB':>6} {'wall s':>8} {'xW':>6}")
    for key, r in rows.items():
        print(
            f"{key:24} {r['flops'] / 1e9:9.2f} {r['flops_over_1']:6.3f} {r['bytes']['total'] / 2**20:8.1f} "
            f"{r['bytes_over_1']:6.3f} {r['wall_s_median']:8.3f} {r['wall_over_1']:6.3f}"
        )
    print(f"goal (N={top}, gathered): {GOAL}; met: {met}")
    return {
        "bench": "multi-adapter",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args),
        "setup": {
            "model": f"FlaxGPT2LMHeadModel(GPT2Config(n_layer={args.layers})), random init, float32; loss mean(h^2) "
            "on the final hidden state",
            "lora": f"r={args.rank} on {bench.TARGETS}, one adapter per {args.batch}/N consecutive rows, factors N(0, 0.02)",
            "cost_shape": [args.batch, args.seq],
            "wall_shape": [args.batch, args.time_seq],
        },
        "goal": GOAL,
        "met": met,
        "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "versions": {"jax": jax.__version__},
        "git": bench._git_state(),
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("multi-adapter", help="mixed batches of 1..64 LoRA adapters: gathered vs looped path")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128, help="sequence length of the FLOPs/bytes programs")
    p.add_argument("--time-seq", type=int, default=32, help="sequence length of the timed programs")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=1, help="GPT-2-small blocks (the ratios are per block)")
    p.add_argument("--steps", type=int, default=5, help="timed rounds after one warm-up")
    p.add_argument("--out", default="experiments/results/bench_multi_adapter.json")
