"""``python -m experiments.bench nnx``: jpeft LoRA's training step on an NNX model vs the same model in linen.

One GPT-2-small-shaped decoder (d=768, 12 heads, FFN 3072, vocab 50257, 1024 positions, pre-LN,
tied LM head; ``--layers`` blocks, 2 by default because 12 are slow on a small CPU) is written twice
here, in ``flax.nnx`` and in ``flax.linen``, with the same parameter paths; the linen model gets
the NNX model's weights, and both get the same LoRA factors (r=8 on ``qkv``, both ``out`` and
``up``: GPT-2's ``c_attn``, ``c_proj`` and ``c_fc``, as ``bench lora``; renamed so that jpeft's GPT-2
profile, whose Conv1D kernels are stored (out, in), does not claim these ``Dense`` kernels). One random batch (4 x 128), causal LM loss, ``optax.adam``. Programs:

* ``linen_forward`` / ``nnx_forward``: the base model's loss;
* ``linen_lora``: the linen lean step (``jpeft.split``, ``jax.grad`` over the factors, ``jpeft.wrap``);
* ``nnx_lora``: the NNX lean step (``jpeft.split(method, model)`` = ``nnx.split(model,
  jpeft.trainable(method, model), ...)``, ``jax.grad`` over the factors of ``jpeft.combine(graphdef,
  deltas, rest)``), ``jpeft.optimizer`` on the delta ``State``;
* ``nnx_optimizer``: the NNX-idiomatic step, ``nnx.grad(wrt=jpeft.trainable(...))`` and
  ``nnx.Optimizer.update`` on the merged (model, optimizer) state.

For each: ``compiled.cost_analysis()`` FLOPs, ``compiled.memory_analysis()`` bytes, wall and process
CPU time of interleaved steps; the ratios NNX/linen come from the same run. Time ratios are medians
of per-round ratios (each round runs every program once, back to back), which a shared machine's
load drifts disturb less than a ratio of medians (also reported). The optimised HLO of the two LoRA
steps is compared as a multiset of (shape, opcode): where the time differs, this says whether the
programs do.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jpeft
from experiments import bench

D, HEADS, FF, VOCAB, POS, EPS = 768, 12, 3072, 50257, 1024, 1e-5
TARGETS = ("qkv", "out", "up")
ACCEPT = {"nnx_lora_flops_over_2fwd": 1.05, "nnx_over_linen_wall": 1.05}


# --- the model, twice ----------------------------------------------------------------------------
def _attend(qkv: jax.Array) -> jax.Array:
    b, t, _ = qkv.shape
    q, k, v = (x.reshape(b, t, HEADS, D // HEADS) for x in jnp.split(qkv, 3, axis=-1))
    causal = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.dot_product_attention(q, k, v, mask=causal[None, None])
    return att.reshape(b, t, D)


class NnxAttn(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.qkv = nnx.Linear(D, 3 * D, rngs=rngs)
        self.out = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(_attend(self.qkv(x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D, FF, rngs=rngs)
        self.out = nnx.Linear(FF, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.up(x), approximate=True))


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln_attn, self.ln_mlp = nnx.LayerNorm(D, epsilon=EPS, rngs=rngs), nnx.LayerNorm(D, epsilon=EPS, rngs=rngs)
        self.attn, self.mlp = NnxAttn(rngs), NnxMLP(rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + self.attn(self.ln_attn(h))
        return h + self.mlp(self.ln_mlp(h))


class NnxGPT(nnx.Module):
    def __init__(self, layers: int, rngs: nnx.Rngs):
        self.tok, self.pos = nnx.Embed(VOCAB, D, rngs=rngs), nnx.Embed(POS, D, rngs=rngs)
        self.layers = nnx.List([NnxBlock(rngs) for _ in range(layers)])
        self.ln_final = nnx.LayerNorm(D, epsilon=EPS, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        h = self.tok(ids) + self.pos(jnp.arange(ids.shape[1]))[None]
        for block in self.layers:
            h = block(h)
        return self.tok.attend(self.ln_final(h))


class LinenAttn(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(D, name="out")(_attend(nn.Dense(3 * D, name="qkv")(x)))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(D, name="out")(jax.nn.gelu(nn.Dense(FF, name="up")(x), approximate=True))


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + LinenAttn(name="attn")(nn.LayerNorm(epsilon=EPS, name="ln_attn")(h))
        return h + LinenMLP(name="mlp")(nn.LayerNorm(epsilon=EPS, name="ln_mlp")(h))


class LinenStack(nn.Module):
    layers: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        for i in range(self.layers):
            h = LinenBlock(name=str(i))(h)
        return h


class LinenGPT(nn.Module):
    layers: int

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        tok = nn.Embed(VOCAB, D, name="tok")
        h = tok(ids) + nn.Embed(POS, D, name="pos")(jnp.arange(ids.shape[1]))[None]
        h = LinenStack(self.layers, name="layers")(h)
        return tok.attend(nn.LayerNorm(epsilon=EPS, name="ln_final")(h))


def _as_tree(state: nnx.State) -> dict[str, Any]:
    """An NNX state as the nested dict of arrays a linen model takes (``nnx.List`` indices as str)."""
    out: dict[str, Any] = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for k in path[:-1]:
            node = node.setdefault(str(k), {})
        node[str(path[-1])] = var[...]
    return out


def _load(model: nnx.Module, tree: dict[str, Any]) -> None:
    """Writes every same-path array of ``tree`` into the model's variables (in place)."""
    for path, var in nnx.to_flat_state(nnx.state(model)):
        node = tree
        for k in path:
            node = node[str(k)]
        var[...] = node


def hlo_ops(compiled: Any) -> collections.Counter:
    """The multiset of (result shape, opcode) of a compiled program's optimised HLO, names stripped."""
    text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
    return collections.Counter(f"{m.group(1)} {m.group(2)}" for m in re.finditer(r"= (\S+) ([a-z\-]+)\(", text))


def _hlo_diff(a: collections.Counter, b: collections.Counter) -> dict[str, int]:
    """``op -> count in b minus count in a`` for the ops whose counts differ."""
    return {k: b[k] - a[k] for k in sorted(set(a) | set(b)) if a[k] != b[k]}


def _loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


# --- the run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    base = NnxGPT(args.layers, nnx.Rngs(0))
    params = _as_tree(nnx.state(base, nnx.Param))
    shapes = jax.eval_shape(LinenGPT(args.layers).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    if jax.tree.structure(shapes) != jax.tree.structure(params):
        raise SystemExit("bench nnx: the linen and NNX twins have different parameter trees")
    if jpeft.profiles.matching(params):
        raise SystemExit("bench nnx: a jpeft profile claims the twin's paths; rename its modules")
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, VOCAB, dtype=jnp.int32)

    method = jpeft.LoRA(targets=TARGETS, rank=args.rank, alpha=16.0)
    peft_l = jpeft.apply(method, params, key=jax.random.key(2))
    peft_n = jpeft.apply(method, base, key=jax.random.key(2))
    _load(peft_n, peft_l)  # the same factors on both sides (and the same weights: params came from base)
    trainable, frozen = jpeft.split(method, peft_l)
    graphdef, deltas, rest = jpeft.split(method, peft_n)
    tx_l = jpeft.optimizer(optax.adam(1e-4), method, peft_l)
    tx_n = jpeft.optimizer(optax.adam(1e-4), method, peft_n)
    wrt = jpeft.trainable(method, peft_n)
    apply_l, wrapped = LinenGPT(args.layers).apply, jpeft.wrap(LinenGPT(args.layers).apply, method)
    base_def, base_state = nnx.split(base)

    def linen_forward(p, ids):
        return _loss(apply_l({"params": p}, ids), ids)

    def nnx_forward(state, ids):
        return _loss(nnx.merge(base_def, state, copy=True)(ids), ids)

    def linen_lora(t, opt_state, frozen, ids):
        loss, g = jax.value_and_grad(lambda t: _loss(wrapped({"params": jpeft.combine(t, frozen)}, ids), ids))(t)
        updates, opt_state = tx_l.update(g, opt_state, t)
        return optax.apply_updates(t, updates), opt_state, loss

    def nnx_lora(d, opt_state, rest, ids):
        loss, g = jax.value_and_grad(lambda d: _loss(jpeft.combine(graphdef, d, rest)(ids), ids))(d)
        updates, opt_state = tx_n.update(g, opt_state, d)
        return optax.apply_updates(d, updates), opt_state, loss

    opt = nnx.Optimizer(nnx.clone(peft_n), tx_n, wrt=wrt)
    model_def, opt_def = nnx.graphdef(peft_n), nnx.graphdef(opt)

    def nnx_optimizer(model_state, opt_state, ids):  # what nnx.jit runs for an nnx.Optimizer step
        model = nnx.merge(model_def, model_state, copy=True)
        optimizer = nnx.merge(opt_def, opt_state, copy=True)
        loss, g = nnx.value_and_grad(lambda m: _loss(m(ids), ids), argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, g)
        return nnx.state(model), nnx.state(optimizer), loss

    def copy(tree: Any) -> Any:
        return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)

    programs = {
        "linen_forward": bench.Program("forward", linen_forward, [params, ids], ()),
        "nnx_forward": bench.Program("forward", nnx_forward, [base_state, ids], ()),
        "linen_lora": bench.Program(
            "linen_lora", linen_lora, [copy(trainable), tx_l.init(trainable), frozen, ids], (0, 1)
        ),
        "nnx_lora": bench.Program("nnx_lora", nnx_lora, [copy(deltas), tx_n.init(deltas), rest, ids], (0, 1)),
        "nnx_optimizer": bench.Program(
            "nnx_optimizer", nnx_optimizer, [copy(nnx.state(peft_n)), copy(nnx.state(opt)), ids], (0, 1)
        ),
    }
    for name, prog in programs.items():
        print(f"  {name:14s} compiled in {prog.compile_s:.1f}s", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    bench.time_interleaved(programs, args.steps, None)
    load_after = os.getloadavg()
    print(f"  timed {args.steps} interleaved rounds in {time.perf_counter() - t0:.1f}s", flush=True)
    res = {name: prog.result() for name, prog in programs.items()}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or not b else a / b

    def wall(name: str) -> float:
        return res[name]["wall_s_median"]

    def paired(a: str, b: str, key: str = "wall_s_all") -> float:
        """The median over rounds of ``a``'s time over ``b``'s in the same round (robust to load drifts)."""
        return statistics.median(x / y for x, y in zip(res[a][key], res[b][key], strict=True))

    ratios = {
        "nnx_lora_flops_over_2fwd": ratio(res["nnx_lora"]["flops"], 2 * res["nnx_forward"]["flops"]),
        "linen_lora_flops_over_2fwd": ratio(res["linen_lora"]["flops"], 2 * res["linen_forward"]["flops"]),
        "nnx_optimizer_flops_over_2fwd": ratio(res["nnx_optimizer"]["flops"], 2 * res["nnx_forward"]["flops"]),
        "nnx_over_linen_flops": ratio(res["nnx_lora"]["flops"], res["linen_lora"]["flops"]),
        "nnx_over_linen_bytes": ratio(res["nnx_lora"]["bytes"]["total"], res["linen_lora"]["bytes"]["total"]),
        "nnx_over_linen_temp_bytes": ratio(res["nnx_lora"]["bytes"]["temp"], res["linen_lora"]["bytes"]["temp"]),
        "nnx_over_linen_wall": paired("nnx_lora", "linen_lora"),
        "nnx_over_linen_wall_of_medians": ratio(wall("nnx_lora"), wall("linen_lora")),
        "nnx_over_linen_wall_of_minima": ratio(
            min(res["nnx_lora"]["wall_s_all"]), min(res["linen_lora"]["wall_s_all"])
        ),
        "nnx_over_linen_cpu": paired("nnx_lora", "linen_lora", "cpu_s_all"),
        "nnx_optimizer_over_linen_wall": paired("nnx_optimizer", "linen_lora"),
        "nnx_optimizer_over_linen_cpu": paired("nnx_optimizer", "linen_lora", "cpu_s_all"),
        "nnx_over_linen_forward_wall": paired("nnx_forward", "linen_forward"),
    }
    ops = {name: hlo_ops(programs[name].compiled) for name in ("linen_lora", "nnx_lora", "nnx_optimizer")}
    hlo = {
        "nnx_lora_minus_linen_lora": _hlo_diff(ops["linen_lora"], ops["nnx_lora"]),
        "nnx_optimizer_minus_nnx_lora": _hlo_diff(ops["nnx_lora"], ops["nnx_optimizer"]),
    }
    loss_gap = float(np.max(np.abs(np.array(res["nnx_lora"]["losses"]) - np.array(res["linen_lora"]["losses"]))))
    opt_gap = float(np.max(np.abs(np.array(res["nnx_optimizer"]["losses"]) - np.array(res["nnx_lora"]["losses"]))))

    rows = [["program", "GFLOPs", "args MiB", "temp MiB", "out MiB", "wall ms (median)", "cpu ms"]]
    for name, r in res.items():
        b = r["bytes"] or {}
        rows.append(
            [
                name,
                "-" if r["flops"] is None else f"{r['flops'] / 1e9:.2f}",
                bench._mb(b.get("argument")),
                bench._mb(b.get("temp")),
                bench._mb(b.get("output")),
                f"{1e3 * r['wall_s_median']:.1f}",
                f"{1e3 * r['cpu_s_median']:.1f}",
            ]
        )
    print()
    print(bench._table(rows))
    print("\nratios (acceptance in brackets):")
    for k, val in ratios.items():
        bound = (
            f"  [<= {ACCEPT[k]}: {'PASS' if val is not None and val <= ACCEPT[k] else 'FAIL'}]" if k in ACCEPT else ""
        )
        print(f"  {k:32s} {'-' if val is None else f'{val:.3f}'}{bound}")
    print(f"  load average {load_before[0]:.2f} before timing, {load_after[0]:.2f} after ({os.cpu_count()} CPUs)")
    print(
        f"  loss trajectories: |nnx_lora - linen_lora| <= {loss_gap:.2e}, |nnx_optimizer - nnx_lora| <= {opt_gap:.2e}"
    )
    for k, diff in hlo.items():
        print(f"  optimised HLO, (shape, op) counts, {k}: {diff or 'identical'}")
    elapsed = time.perf_counter() - started
    return {
        "command": " ".join(
            shlex.quote(a) for a in [sys.executable.split("/")[-1], "-m", "experiments.bench", *sys.argv[1:]]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
        "platform": {
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "loadavg_before_timing": list(load_before),
            "loadavg_after_timing": list(load_after),
        },
        "jpeft_git": bench._git_state(),
        "config": {
            "model": f"GPT-2-small widths (d={D}, {HEADS} heads, ffn {FF}, vocab {VOCAB}, {POS} positions, tied head), "
            f"{args.layers} layers (GPT-2-small has 12), written in flax.nnx and flax.linen with identical weights",
            "layers": args.layers,
            "batch": args.batch,
            "seq": args.seq,
            "rank": args.rank,
            "targets": list(TARGETS),
            "optimizer": "jpeft.optimizer(optax.adam(1e-4), ...)",
            "timed_steps": args.steps,
            "timing": "1 warm-up step per program, then --steps rounds running each once in turn; time ratios are "
            "medians of per-round ratios; wall = perf_counter, cpu = process_time (all threads)",
        },
        "results": res,
        "ratios": ratios,
        "acceptance": {
            k: {"bound": b, "value": ratios[k], "pass": ratios[k] is not None and ratios[k] <= b}
            for k, b in ACCEPT.items()
        },
        "hlo_op_count_differences": hlo,
        "max_loss_diff_nnx_vs_linen": loss_gap,
        "max_loss_diff_nnx_optimizer_vs_lean": opt_gap,
        "elapsed_s": elapsed,
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("nnx", help="jpeft LoRA's step on an NNX GPT-2-small-shaped model vs the same model in linen")
    p.add_argument("--steps", type=bench._steps_arg, default=10, help="timed interleaved rounds (>= 5)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=2, help="blocks (GPT-2-small has 12; 2 keeps a small CPU quick)")
    p.add_argument("--out", default="experiments/results/bench_nnx.json")
