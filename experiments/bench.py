"""Benchmarks of jpeft training steps: XLA FLOPs, XLA bytes and wall time, in one run.

``python -m experiments.bench lora`` builds HF ``FlaxGPT2LMHeadModel`` from ``GPT2Config()``
(GPT-2-small, random weights, never downloaded) and compares four jitted programs on one random
token batch with the causal LM loss:

* ``forward``: the loss alone;
* ``full``: a full fine-tuning step with ``optax.adam`` (params and optimizer state donated);
* ``lora``: jpeft LoRA on ``c_attn``, ``c_proj`` and ``c_fc``, the lean path (``jpeft.split``,
  gradients for the trainable factors only, ``jpeft.wrap`` runs the unmerged forward);
* ``merged``: the same factors, but the step merges ``W + s (A B)^T`` into every kernel and runs
  the plain model (the baseline DESIGN.md section 2 argues against).

For each one it reports ``compiled.cost_analysis()`` FLOPs, ``compiled.memory_analysis()`` bytes
and the median wall time; for the LoRA step it also reads XLA's buffer assignment (dumped with
``--xla_dump_to``) to show where the temporary bytes go.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import jpeft

VARIANTS = ("forward", "full", "lora", "merged")
FN_NAMES = {"forward": "forward_loss", "full": "full_step", "lora": "lora_step", "merged": "merged_step"}
TARGETS = ("c_attn", "c_proj", "c_fc")
ACCEPT = {"lora_flops_over_2fwd": 1.05, "lora_wall_over_full": 0.75, "lora_bytes_over_full": 0.65}


# --- XLA dump ------------------------------------------------------------------------------------
def enable_dump(directory: str) -> None:
    """Asks XLA to dump the optimised HLO and buffer assignment of the benchmarked programs.

    XLA reads ``XLA_FLAGS`` once, when the backend starts; this must run before the first jax
    computation of the process.
    """
    names = "|".join(FN_NAMES.values())
    flags = f"--xla_dump_to={directory} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_({names})"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def dump_file(directory: str, fn_name: str, suffix: str) -> str | None:
    hits = sorted(glob.glob(os.path.join(directory, f"module_*.jit_{fn_name}.*{suffix}")))
    return hits[-1] if hits else None


_ALLOC = re.compile(r"^allocation (\d+): size (\d+), (.*):$")
_VALUE = re.compile(r"^ value: <(\d+) (\S+) @(\S+)> \(size=(\d+),offset=(\d+)\): (.*)$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^(\w+)\[([\d,]*)\]")
_PEAK = re.compile(r"^\s*Live ranges at (\d+) \(peak\):")
_LIVE = re.compile(r"^\s+(\S+?)(\{[\d,]*\})?: (\d+) bytes")


def _base(name: str) -> str:
    return name.split("{")[0]


def parse_buffer_assignment(text: str) -> dict[str, dict[str, Any]]:
    """Parses XLA's ``*-buffer-assignment.txt``: for each HLO value, its allocation kind and shape.

    Kinds: ``parameter`` (entry arguments, donated ones included), ``output``, ``constant``,
    ``thread-local`` and ``temp``. On CPU, XLA packs all temps into one ``preallocated-temp``
    allocation, so the allocation alone says little; :func:`temp_breakdown` reads the peak.
    """
    values: dict[str, dict[str, Any]] = {}
    kind = "temp"
    for line in text.splitlines():
        m = _ALLOC.match(line)
        if m:
            flags = m.group(3)
            kind = "temp"
            for key, name in (
                ("parameter", "parameter"),
                ("maybe-live-out", "output"),
                ("output shape", "output"),
                ("constant", "constant"),
                ("thread-local", "thread-local"),
            ):
                if key in flags:
                    kind = name
                    break
            continue
        m = _VALUE.match(line)
        if m:
            values.setdefault(
                _base(m.group(2)), {"kind": kind, "shape": m.group(6).split("{")[0], "bytes": int(m.group(4))}
            )
    return values


def parse_hlo_ops(text: str) -> dict[str, dict[str, str]]:
    """Maps each instruction of an optimised HLO module to its shape, opcode, fusion kind and op_name."""
    ops: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        kind = re.search(r'"fusion_config":\{"kind":"(\w+)"', rest) or re.search(r"kind=(\w+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        ops.setdefault(
            name,
            {
                "shape": shape.split("{")[0],
                "opcode": opcode,
                "kind": kind.group(1) if kind else "",
                "op_name": op_name.group(1) if op_name else "",
            },
        )
    return ops


def parse_peak(text: str) -> tuple[int | None, list[tuple[str, int]]]:
    """Reads the ``Live ranges at T (peak):`` section of XLA's ``*-live-range.txt``."""
    at, live = None, []
    for line in text.splitlines():
        m = _PEAK.match(line)
        if m:
            at = int(m.group(1))
            continue
        if at is None:
            continue
        m = _LIVE.match(line)
        if not m:
            if live:
                break
            continue
        live.append((m.group(1), int(m.group(3))))
    return at, live


def shape_dims(shape: str) -> tuple[str, tuple[int, ...]]:
    m = _SHAPE.match(shape)
    if not m:
        return shape, ()
    return m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)


def categorize(shape: str, op_name: str, dims_of: Mapping[str, int]) -> str:
    """Puts a buffer in a category from its shape (the model's dimensions) and its JAX op_name."""
    _, dims = shape_dims(shape)
    v, d, ff, t, r, b = (dims_of[k] for k in ("vocab", "d", "ff", "seq", "rank", "batch"))
    n = math.prod(dims) if dims else 0
    if v in dims:
        return "vocab x d weight (wte / LM head)" if n == v * d else "logits / softmax / d_logits (B,T,V)"
    if "jpeft" in op_name or (dims and (dims[-1] == r or (len(dims) >= 2 and dims[-2] == r))):
        return "LoRA factors, x@A, grads, Adam"
    if dims.count(t) >= 2:
        return "attention scores/probs (B,H,T,T)"
    if n == b * t * ff:
        return "MLP activations (B,T,4d)"
    if n == b * t * 3 * d:
        return "QKV (B,T,3d)"
    if n == b * t * d:
        return "hidden states (B,T,d)"
    if n in (d * d, 3 * d * d, 4 * d * d):
        return "d x kd weights / weight grads"
    if n == dims_of["max_pos"] * d:
        return "position embedding (wpe)"
    return "other (small)"


def temp_breakdown(dump_dir: str, fn_name: str, dims_of: Mapping[str, int], top: int = 10) -> dict[str, Any] | None:
    """Where one dumped program's temp bytes go, from XLA's buffer assignment.

    XLA's live-range dump names the values live at the program's memory peak; the ones that live in
    temp allocations are what ``memory_analysis().temp_size_in_bytes`` pays for. Each is listed
    with its shape, the HLO op that produces it and that op's JAX ``op_name``, and the bytes are
    summed by category. The largest temp values overall (live at any time) are listed too.
    """
    files = {}
    for key, suffix in (
        ("ba", "buffer-assignment.txt"),
        ("live", "live-range.txt"),
        ("hlo", "after_optimizations.txt"),
    ):
        path = dump_file(dump_dir, fn_name, "after_optimizations-" + suffix if key != "hlo" else suffix)
        if path is None:
            return None
        with open(path) as f:
            files[key] = f.read()
    values = parse_buffer_assignment(files["ba"])
    ops = parse_hlo_ops(files["hlo"])
    at, live = parse_peak(files["live"])

    def describe(name: str, nbytes: int) -> dict[str, Any]:
        op = ops.get(name, {})
        shape = values.get(name, {}).get("shape") or op.get("shape", "?")
        return {
            "instr": name,
            "bytes": nbytes,
            "shape": shape,
            "dtype": shape_dims(shape)[0],
            "opcode": op.get("opcode", "?"),
            "fusion_kind": op.get("kind", ""),
            "op_name": op.get("op_name", ""),
            "category": categorize(shape, op.get("op_name", ""), dims_of),
        }

    peak_temp = [describe(n, b) for n, b in live if values.get(n, {}).get("kind") == "temp"]
    peak_temp.sort(key=lambda x: -x["bytes"])
    by_category: dict[str, int] = {}
    for x in peak_temp:
        by_category[x["category"]] = by_category.get(x["category"], 0) + x["bytes"]
    by_kind: dict[str, int] = {}
    for n, b in live:
        k = values.get(n, {}).get("kind", "?")
        by_kind[k] = by_kind.get(k, 0) + b
    largest = sorted(
        (describe(n, v["bytes"]) for n, v in values.items() if v["kind"] == "temp"), key=lambda x: -x["bytes"]
    )[:top]
    return {
        "peak_time": at,
        "peak_live_bytes_by_kind": by_kind,
        "peak_temp_bytes": sum(x["bytes"] for x in peak_temp),
        "by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_at_peak": peak_temp[:top],
        "largest_temp_values": largest,
    }


# --- model and steps -----------------------------------------------------------------------------
def build_model(layers: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Builds FlaxGPT2LMHeadModel from GPT2Config() alone (random weights, float32, no download)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(n_layer=layers)
    model = FlaxGPT2LMHeadModel(config, dtype=jnp.float32, _do_init=False)
    ids = jnp.zeros((1, 8), jnp.int32)
    pos = jnp.arange(8, dtype=jnp.int32)[None]

    @jax.jit
    def init(key):
        return model.module.init(key, ids, jnp.ones_like(ids), pos, return_dict=False)["params"]

    params = flax.core.unfreeze(init(jax.random.key(seed)))
    return model, params


def lm_loss(apply_fn: Callable[..., Any], params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Shifted causal LM cross-entropy, dropout off (``deterministic=True``)."""
    logits = apply_fn(
        {"params": params}, batch["ids"], batch["mask"], batch["pos"], deterministic=True, return_dict=False
    )[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:]).mean()


def merge_gpt2(method: jpeft.LoRA, tree: Any) -> Any:
    """The in-step merge baseline: ``W + s (A B)^T`` for GPT-2's Conv1D kernels stored (out, in).

    Written here on purpose (not ``jpeft.merge``), so the baseline is independent of the library.
    """
    if not isinstance(tree, Mapping):
        return tree
    out = {k: merge_gpt2(method, v) for k, v in tree.items() if k != jpeft.RESERVED}
    if jpeft.RESERVED in tree:
        d = tree[jpeft.RESERVED]["default"]
        a, b = d["lora_a"], d["lora_b"]  # a: (in, r), b: (r, out)
        out["kernel"] = tree["kernel"] + method.scale * (a @ b).T
    return out


def make_steps(
    model: Any, method: jpeft.LoRA, tx_full: Any, tx_lora: Any, remat: bool = False
) -> dict[str, Callable[..., Any]]:
    plain = model.module.apply
    wrapped = jpeft.wrap(model.module.apply, method, remat=remat)

    def forward_loss(params, batch):
        return lm_loss(plain, params, batch)

    def full_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(plain, p, batch))(params)
        updates, opt_state = tx_full.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def lora_step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(lambda t: lm_loss(wrapped, jpeft.combine(t, frozen), batch))(trainable)
        updates, opt_state = tx_lora.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def merged_step(trainable, opt_state, frozen, batch):
        def loss_fn(t):
            return lm_loss(plain, merge_gpt2(method, jpeft.combine(t, frozen)), batch)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx_lora.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return {"forward": forward_loss, "full": full_step, "lora": lora_step, "merged": merged_step}


# --- measurement ---------------------------------------------------------------------------------
def flops_of(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    if cost is None:
        return None
    if isinstance(cost, Mapping):
        cost = [cost]
    vals = [c.get("flops") for c in cost if c and c.get("flops") is not None]
    return float(sum(vals)) if vals else None


def memory_of(compiled: Any) -> dict[str, int] | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    out = {
        "argument": int(mem.argument_size_in_bytes),
        "output": int(mem.output_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes),
        "alias": int(mem.alias_size_in_bytes),
        "generated_code": int(mem.generated_code_size_in_bytes),
    }
    out["total"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
    return out


def _ready(x: Any) -> Any:
    return jax.block_until_ready(x)


class Program:
    """One benchmarked program: compiled once, XLA's analyses read, then stepped on its own state."""

    def __init__(self, name: str, fn: Callable[..., Any], args: list[Any], donate: tuple[int, ...]):
        self.name, self.args = name, list(args)
        t0 = time.perf_counter()
        self.compiled = jax.jit(fn, donate_argnums=donate).lower(*self.args).compile()
        self.compile_s = time.perf_counter() - t0
        self.flops = flops_of(self.compiled)
        self.bytes = memory_of(self.compiled)
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.losses: list[float] = []

    def step(self, record: bool = True) -> None:
        """Runs one step to completion; records its wall and process CPU time when ``record``."""
        w, c = time.perf_counter(), time.process_time()
        with jax.profiler.TraceAnnotation(f"{self.name}_step"):
            out = jax.block_until_ready(self.compiled(*self.args))
        w, c = time.perf_counter() - w, time.process_time() - c
        if self.name == "forward":
            loss = out
        else:  # (state, opt_state, loss): the donated inputs are dead, carry the outputs
            self.args[0], self.args[1], loss = out
        self.losses.append(float(loss))
        if record:
            self.walls.append(w)
            self.cpus.append(c)

    def result(self) -> dict[str, Any]:
        return {
            "compile_s": self.compile_s,
            "flops": self.flops,
            "bytes": self.bytes,
            "wall_s_median": statistics.median(self.walls),
            "cpu_s_median": statistics.median(self.cpus),
            "wall_s_all": self.walls,
            "cpu_s_all": self.cpus,
            "losses": self.losses,
        }


def time_interleaved(programs: Mapping[str, Program], steps: int, profile_dir: str | None) -> None:
    """One warm-up step each, then ``steps`` rounds that run every program once, in turn.

    Interleaving spreads slow drifts of a shared machine's load over all variants alike, so the
    ratios stay fair even when the absolute times move. With ``profile_dir`` the timed rounds run
    inside ``jax.profiler.trace``; each step is annotated ``<variant>_step`` (``lora_step`` for
    the LoRA steps).
    """
    for prog in programs.values():
        prog.step(record=False)
    ctx = jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext()
    with ctx:
        for _ in range(steps):
            for prog in programs.values():
                prog.step()


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# --- reporting -----------------------------------------------------------------------------------
def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_table(res: Mapping[str, Mapping[str, Any]]) -> str:
    head = [
        "variant",
        "GFLOP",
        "arg MiB",
        "out MiB",
        "temp MiB",
        "alias MiB",
        "code MiB",
        "total MiB",
        "wall ms",
        "CPU ms",
    ]
    rows = [head]
    for v in VARIANTS:
        r = res[v]
        b = r["bytes"] or {}
        rows.append(
            [
                v,
                "-" if r["flops"] is None else f"{r['flops'] / 1e9:,.2f}",
                *(_mb(b.get(k)) for k in ("argument", "output", "temp", "alias", "generated_code", "total")),
                f"{1e3 * r['wall_s_median']:,.1f}",
                f"{1e3 * r['cpu_s_median']:,.1f}",
            ]
        )
    return _table(rows)


def ratios_of(res: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    fwd2 = None if res["forward"]["flops"] is None else 2 * res["forward"]["flops"]

    def total(v: str) -> float | None:
        return (res[v]["bytes"] or {}).get("total")

    return {
        "lora_flops_over_2fwd": div(res["lora"]["flops"], fwd2),
        "merged_flops_over_2fwd": div(res["merged"]["flops"], fwd2),
        "full_flops_over_2fwd": div(res["full"]["flops"], fwd2),
        "lora_wall_over_full": div(res["lora"]["wall_s_median"], res["full"]["wall_s_median"]),
        "merged_wall_over_full": div(res["merged"]["wall_s_median"], res["full"]["wall_s_median"]),
        "lora_cpu_over_full": div(res["lora"]["cpu_s_median"], res["full"]["cpu_s_median"]),
        "merged_cpu_over_full": div(res["merged"]["cpu_s_median"], res["full"]["cpu_s_median"]),
        "lora_bytes_over_full": div(total("lora"), total("full")),
        "merged_bytes_over_full": div(total("merged"), total("full")),
    }


def _op_label(b: Mapping[str, Any]) -> str:
    return b["opcode"] + (f"/{b['fusion_kind']}" if b["fusion_kind"] else "") + f" {b['instr']}"


def _short_op_name(op_name: str) -> str:
    return re.sub(r"^jit\(\w+\)/", "", op_name).replace("FlaxGPT2LMHeadModule", "GPT2")[-90:]


def breakdown_text(bd: Mapping[str, Any]) -> str:
    rows = [["category (live at the temp peak)", "MiB", "share"]]
    temp = bd["peak_temp_bytes"] or 1
    for cat, n in bd["by_category"].items():
        rows.append([cat, _mb(n), f"{100 * n / temp:.1f}%"])
    rows.append(["total", _mb(bd["peak_temp_bytes"]), "100.0%"])
    out = [_table(rows), ""]
    rows = [["#", "MiB", "shape", "HLO op", "JAX op_name"]]
    for i, b in enumerate(bd["top_at_peak"], 1):
        rows.append([str(i), _mb(b["bytes"]), b["shape"], _op_label(b), _short_op_name(b["op_name"])])
    out.append(_table(rows))
    return "\n".join(out)


# --- the lora subcommand -------------------------------------------------------------------------
def run_lora(args: argparse.Namespace) -> dict[str, Any]:
    dump_dir = args.dump_dir or tempfile.mkdtemp(prefix="jpeft_bench_xla_")
    enable_dump(dump_dir)
    started = time.perf_counter()
    model, params = build_model(args.layers)
    cfg = model.config
    dims_of = {
        "vocab": cfg.vocab_size,
        "d": cfg.n_embd,
        "ff": 4 * cfg.n_embd,
        "seq": args.seq,
        "rank": args.rank,
        "batch": args.batch,
        "max_pos": cfg.n_positions,
    }
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size, dtype=jnp.int32)
    batch = {
        "ids": ids,
        "mask": jnp.ones_like(ids),
        "pos": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), ids.shape),
    }
    method = jpeft.LoRA(targets=TARGETS, rank=args.rank, alpha=16.0)
    peft = jpeft.apply(method, params, key=jax.random.key(2))
    trainable, frozen = jpeft.split(method, peft)
    tx_full = optax.adam(1e-4)
    tx_lora = jpeft.optimizer(optax.adam(1e-4), method, trainable)
    steps = make_steps(model, method, tx_full, tx_lora)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    print(
        f"GPT-2 ({cfg.n_layer} layers, d={cfg.n_embd}, vocab={cfg.vocab_size}): {n_params:,} params; "
        f"LoRA r={args.rank} on {TARGETS}: {n_train:,} trainable; batch {args.batch} x seq {args.seq}; "
        f"{jax.devices()[0].platform}",
        flush=True,
    )

    programs: dict[str, Program] = {}
    for v in VARIANTS:
        if v == "forward":
            programs[v] = Program(v, steps[v], [params, batch], ())
        elif v == "full":
            p = _copy(params)  # donated: the other variants keep the original
            programs[v] = Program(v, steps[v], [p, tx_full.init(p), batch], (0, 1))
            del p
        else:
            t = _copy(trainable)
            programs[v] = Program(v, steps[v], [t, tx_lora.init(t), frozen, batch], (0, 1))
            del t
        print(f"  {v:8s} compiled in {programs[v].compile_s:.1f}s", flush=True)
    load_before = os.getloadavg()
    t = time.perf_counter()
    time_interleaved(programs, args.steps, args.profile)
    load_after = os.getloadavg()
    print(f"  timed {args.steps} interleaved rounds in {time.perf_counter() - t:.1f}s", flush=True)
    res = {v: prog.result() for v, prog in programs.items()}
    del programs

    ratios = ratios_of(res)
    loss_gap = float(np.max(np.abs(np.array(res["lora"]["losses"]) - np.array(res["merged"]["losses"]))))
    breakdowns = {v: temp_breakdown(dump_dir, FN_NAMES[v], dims_of) for v in VARIANTS}
    elapsed = time.perf_counter() - started

    print()
    print(results_table(res))
    print()
    print("ratios (acceptance in brackets):")
    for k, val in ratios.items():
        bound = (
            f"  [<= {ACCEPT[k]}: {'PASS' if val is not None and val <= ACCEPT[k] else 'FAIL'}]" if k in ACCEPT else ""
        )
        print(f"  {k:24s} {'-' if val is None else f'{val:.3f}'}{bound}")
    print(
        "  (wall: median of interleaved steps; CPU: process CPU time per step, all threads; load average "
        f"{load_before[0]:.2f} before timing, {load_after[0]:.2f} after)"
    )
    if load_before[0] > 1.5 or load_after[0] > 3.0:
        print(
            "  WARNING: other processes were using the CPU while timing (load average above); the wall and CPU "
            "figures are unreliable, rerun on an idle machine."
        )
    print(f"  lora vs merged loss trajectories: max |diff| = {loss_gap:.2e} (same function, different program)")
    bd = breakdowns["lora"]
    if bd is None:
        print(f"\nno XLA buffer assignment found in {dump_dir}; was the backend started before enable_dump?")
    else:
        print(
            f"\nwhere LoRA's temp bytes go: the temp values live at XLA's memory peak (program point {bd['peak_time']}):"
        )
        print(breakdown_text(bd))
        print("\ntemp bytes by category, all variants (MiB):")
        cats = sorted({c for b in breakdowns.values() if b for c in b["by_category"]})
        rows = [["category", *VARIANTS]]
        for c in cats:
            rows.append([c, *(_mb((breakdowns[v] or {}).get("by_category", {}).get(c, 0)) for v in VARIANTS)])
        print(_table(rows))
    print(f"\nwall clock of the whole run: {elapsed:.1f}s")

    return {
        "command": " ".join(
            shlex.quote(a) for a in [sys.executable.split("/")[-1], "-m", "experiments.bench", *sys.argv[1:]]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "jpeft": jpeft.__version__,
            "python": platform.python_version(),
        },
        "platform": {
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind,
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "loadavg_before_timing": list(load_before),
            "loadavg_after_timing": list(load_after),
        },
        "jpeft_git": _git_state(),
        "config": {
            "model": "FlaxGPT2LMHeadModel(GPT2Config(n_layer=layers)), random init, float32",
            "layers": cfg.n_layer,
            "d_model": cfg.n_embd,
            "vocab": cfg.vocab_size,
            "params": int(n_params),
            "lora_trainable": int(n_train),
            "batch": args.batch,
            "seq": args.seq,
            "rank": args.rank,
            "alpha": method.alpha,
            "targets": list(TARGETS),
            "optimizer": "optax.adam(1e-4)",
            "timed_steps": args.steps,
            "warmup_steps": 1,
            "timing": "1 warm-up step per variant, then --steps rounds running each variant once in turn; "
            "median per variant; wall = perf_counter, cpu = process_time (all threads); block_until_ready",
        },
        "results": res,
        "ratios": ratios,
        "acceptance": {
            k: {"bound": b, "value": ratios[k], "pass": ratios[k] is not None and ratios[k] <= b}
            for k, b in ACCEPT.items()
        },
        "lora_vs_merged_max_loss_diff": loss_gap,
        "temp_breakdown": breakdowns,
        "xla_dump_dir": dump_dir,
        "elapsed_s": elapsed,
    }


# --- the qlora subcommand ------------------------------------------------------------------------
def build_model_bf16(layers: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """FlaxGPT2LMHeadModel from GPT2Config() computing in bf16, with bf16 parameters (random, no download)."""
    model, params = build_model(layers, seed)
    model = type(model)(model.config, dtype=jnp.bfloat16, _do_init=False)
    return model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


def _nbytes(tree: Any) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def run_qlora(args: argparse.Namespace) -> dict[str, Any]:
    """bf16 LoRA against QLoRA (NF4 + double quantisation) training steps on GPT-2-small shapes.

    Both run the bf16 model (``dtype=bfloat16``, bf16 parameters) with the same LoRA factors
    (float32, r on ``c_attn``, ``c_proj``, ``c_fc``), the lean ``jpeft.split`` step and Adam. QLoRA
    stores every targeted kernel (all four linears of each block) as NF4 and dequantises it to bf16
    inside the step. Reports the stored kernel bytes, XLA's ``memory_analysis()`` argument bytes
    (the frozen base dominates them) and ``cost_analysis()`` FLOPs, and the wall-time ratio of
    interleaved steps.
    """
    started = time.perf_counter()
    model, params = build_model_bf16(args.layers)
    cfg = model.config
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size, dtype=jnp.int32)
    batch = {
        "ids": ids,
        "mask": jnp.ones_like(ids),
        "pos": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), ids.shape),
    }
    quant = jpeft.NF4(block_size=args.block_size, dq_block_size=args.dq_block_size)
    methods = {
        "lora_bf16": jpeft.LoRA(targets=TARGETS, rank=args.rank, alpha=16.0),
        "qlora": jpeft.QLoRA(targets=TARGETS, rank=args.rank, alpha=16.0, quant=quant, compute_dtype="bfloat16"),
    }
    t = time.perf_counter()
    qparams = jpeft.quantize(params, methods["qlora"])
    jax.block_until_ready(qparams)
    quantize_s = time.perf_counter() - t
    pairs = _kernel_pairs(params, qparams).values()
    kernel_bytes = {"lora_bf16": sum(p.nbytes for p, _ in pairs), "qlora": sum(q.nbytes for _, q in pairs)}
    n_kernel = sum(p.size for p, _ in pairs)
    bases = {"lora_bf16": params, "qlora": qparams}
    tx = optax.adam(1e-4)
    programs: dict[str, Program] = {}
    splits = {}
    for name, method in methods.items():
        peft = jpeft.apply(method, bases[name], key=jax.random.key(2))
        trainable, frozen = jpeft.split(method, peft)
        splits[name] = (trainable, frozen)
        tx_m = jpeft.optimizer(tx, method, trainable)
        wrapped = jpeft.wrap(model.module.apply, method)

        def step(trainable, opt_state, frozen, batch, wrapped=wrapped, tx_m=tx_m):
            loss, grads = jax.value_and_grad(lambda t: lm_loss(wrapped, jpeft.combine(t, frozen), batch))(trainable)
            updates, opt_state = tx_m.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss

        step.__name__ = f"{name}_step"
        tr = _copy(trainable)
        programs[name] = Program(name, step, [tr, tx_m.init(tr), frozen, batch], (0, 1))
        print(f"  {name:9s} compiled in {programs[name].compile_s:.1f}s", flush=True)
    n_train = sum(x.size for x in jax.tree.leaves(splits["qlora"][0]))
    print(
        f"GPT-2 ({cfg.n_layer} layers, d={cfg.n_embd}): bf16 model; LoRA r={args.rank} on {TARGETS}: {n_train:,} "
        f"trainable; NF4(block_size={quant.block_size}, dq_block_size={quant.dq_block_size}) on the same "
        f"{n_kernel:,} kernel weights (quantised in {quantize_s:.1f}s); batch {args.batch} x seq {args.seq}; "
        f"{jax.devices()[0].platform}",
        flush=True,
    )
    load_before = os.getloadavg()
    time_interleaved(programs, args.steps, None)
    load_after = os.getloadavg()
    res = {name: prog.result() for name, prog in programs.items()}
    frozen_bytes = {name: _nbytes(splits[name][1]) for name in methods}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    def mem(name: str, key: str) -> int | None:
        return (res[name]["bytes"] or {}).get(key)

    ratios = {
        "kernel_bytes_qlora_over_bf16": ratio(kernel_bytes["qlora"], kernel_bytes["lora_bf16"]),
        "kernel_bits_per_weight": 8 * kernel_bytes["qlora"] / n_kernel,
        "frozen_tree_bytes_qlora_over_bf16": ratio(frozen_bytes["qlora"], frozen_bytes["lora_bf16"]),
        "argument_bytes_qlora_over_bf16": ratio(mem("qlora", "argument"), mem("lora_bf16", "argument")),
        "temp_bytes_qlora_over_bf16": ratio(mem("qlora", "temp"), mem("lora_bf16", "temp")),
        "total_bytes_qlora_over_bf16": ratio(mem("qlora", "total"), mem("lora_bf16", "total")),
        "flops_qlora_over_bf16": ratio(res["qlora"]["flops"], res["lora_bf16"]["flops"]),
        "wall_qlora_over_bf16": ratio(res["qlora"]["wall_s_median"], res["lora_bf16"]["wall_s_median"]),
        "cpu_qlora_over_bf16": ratio(res["qlora"]["cpu_s_median"], res["lora_bf16"]["cpu_s_median"]),
    }
    first_loss_gap = abs(res["qlora"]["losses"][0] - res["lora_bf16"]["losses"][0]) / abs(res["lora_bf16"]["losses"][0])
    elapsed = time.perf_counter() - started

    rows = [["variant", "GFLOP", "arg MiB", "out MiB", "temp MiB", "alias MiB", "total MiB", "wall ms", "CPU ms"]]
    for name in methods:
        r, b = res[name], res[name]["bytes"] or {}
        rows.append(
            [
                name,
                "-" if r["flops"] is None else f"{r['flops'] / 1e9:,.2f}",
                *(_mb(b.get(k)) for k in ("argument", "output", "temp", "alias", "total")),
                f"{1e3 * r['wall_s_median']:,.1f}",
                f"{1e3 * r['cpu_s_median']:,.1f}",
            ]
        )
    print()
    print(_table(rows))
    print()
    print(
        f"stored kernels: bf16 {_mb(kernel_bytes['lora_bf16'])} MiB, NF4 {_mb(kernel_bytes['qlora'])} MiB; "
        f"frozen trees (embeddings, norms, biases included): {_mb(frozen_bytes['lora_bf16'])} vs "
        f"{_mb(frozen_bytes['qlora'])} MiB"
    )
    print("ratios, QLoRA over bf16 LoRA:")
    for k, val in ratios.items():
        bound = ""
        if k == "kernel_bytes_qlora_over_bf16":
            bound = f"  [<= 0.27: {'PASS' if val is not None and val <= 0.27 else 'FAIL'}]"
        print(f"  {k:36s} {'-' if val is None else f'{val:.4f}'}{bound}")
    print(
        f"  first-step loss: LoRA {res['lora_bf16']['losses'][0]:.4f}, QLoRA {res['qlora']['losses'][0]:.4f} "
        f"(relative gap {first_loss_gap:.2e}; a bf16 loss of a random-init model near log V, so a coarse check)"
    )
    print(
        f"  (wall: median of {args.steps} interleaved steps; load average {load_before[0]:.2f} before timing, "
        f"{load_after[0]:.2f} after)"
    )
    print(f"\nwall clock of the whole run: {elapsed:.1f}s")
    return {
        "command": " ".join(
            shlex.quote(a) for a in [sys.executable.split("/")[-1], "-m", "experiments.bench", *sys.argv[1:]]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__},
        "platform": {
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(),
            "loadavg_before_timing": list(load_before),
            "loadavg_after_timing": list(load_after),
        },
        "jpeft_git": _git_state(),
        "config": {
            "model": "FlaxGPT2LMHeadModel(GPT2Config(n_layer=layers), dtype=bfloat16), random init, bf16 params",
            "layers": cfg.n_layer,
            "batch": args.batch,
            "seq": args.seq,
            "rank": args.rank,
            "targets": list(TARGETS),
            "nf4": dataclasses.asdict(quant),
            "kernel_weights": n_kernel,
            "lora_trainable": int(n_train),
            "timed_steps": args.steps,
        },
        "quantize_s": quantize_s,
        "kernel_bytes": kernel_bytes,
        "frozen_tree_bytes": frozen_bytes,
        "results": res,
        "ratios": ratios,
        "first_step_loss_rel_gap": first_loss_gap,
        "elapsed_s": elapsed,
    }


def _kernel_pairs(params: Any, qparams: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[Any, Any]]:
    """Path -> (bf16 kernel, NF4Array) for every kernel that ``jpeft.quantize`` replaced."""
    if isinstance(qparams, jpeft.NF4Array):
        return {path: (params, qparams)}
    if not isinstance(qparams, Mapping):
        return {}
    out = {}
    for k in qparams:
        out.update(_kernel_pairs(params[k], qparams[k], path + (k,)))
    return out


def _git_state() -> dict[str, Any]:
    """The commit of the checkout and the files that differ from it: figures depend on both."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(jpeft.__file__)))

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "modified": git("status", "--porcelain", "--", "jpeft").splitlines()}


def _steps_arg(s: str) -> int:
    n = int(s)
    if n < 5:
        raise argparse.ArgumentTypeError(f"--steps must be >= 5 (got {n}); the median needs several timed steps.")
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("lora", help="forward vs full fine-tuning vs jpeft LoRA vs merge-in-step LoRA on GPT-2-small")
    p.add_argument("--steps", type=_steps_arg, default=5, help="timed steps after one warm-up step (>= 5)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12 = GPT-2-small; 2 for a quick check)")
    p.add_argument("--out", default="experiments/results/bench_lora.json")
    p.add_argument(
        "--profile", metavar="DIR", default=None, help="wrap the timed LoRA steps in jax.profiler.trace(DIR)"
    )
    p.add_argument("--dump-dir", default=None, help="where XLA dumps HLO and buffer assignments (default: a temp dir)")
    q = sub.add_parser("qlora", help="bf16 LoRA vs QLoRA (NF4, double quantisation) training steps on GPT-2-small")
    q.add_argument("--steps", type=_steps_arg, default=5, help="timed steps after one warm-up step (>= 5)")
    q.add_argument("--batch", type=int, default=4)
    q.add_argument("--seq", type=int, default=128)
    q.add_argument("--rank", type=int, default=8)
    q.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12 = GPT-2-small; 2 for a quick check)")
    q.add_argument("--block-size", type=int, default=64)
    q.add_argument("--dq-block-size", type=int, default=256)
    q.add_argument("--out", default="experiments/results/bench_qlora.json")
    from experiments import bench_adapterdrop, bench_nnx, bench_qwix, bench_torch

    bench_torch.add_parser(sub)
    bench_adapterdrop.add_parser(sub)
    bench_nnx.add_parser(sub)
    bench_qwix.add_parser(sub)
    from experiments import bench_lst

    bench_lst.add_parser(sub)
    from experiments import bench_multi_adapter

    bench_multi_adapter.add_parser(sub)
    from experiments import bench_scaling

    bench_scaling.add_parser(sub)
    from experiments import bench_dora

    bench_dora.add_parser(sub)
    args = parser.parse_args(argv)
    runs = {
        "lora": run_lora,
        "qlora": run_qlora,
        "vs-torch": bench_torch.run,
        "adapterdrop": bench_adapterdrop.run,
        "nnx": bench_nnx.run,
        "vs-qwix": bench_qwix.run,
    }
    runs["lst"] = bench_lst.run
    runs["multi-adapter"] = bench_multi_adapter.run
    runs["scaling"] = bench_scaling.run
    runs["dora"] = bench_dora.run
    report = runs[args.bench](args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
