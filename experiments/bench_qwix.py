"""``python -m experiments.bench vs-qwix``: jpeft LoRA and QLoRA against qwix's on the same tunix Llama 3.

One ``tunix.models.llama3.model.Llama3`` with random weights (12 layers x 768 by default: 12 query
and 4 key/value heads of 64, MLP 2048, vocab 32000; tunix initialises the MLP kernels to zero, so
they get ``N(0, 0.02)``), one random batch (4 x 128, causal mask), the shifted causal LM loss and
``optax.adamw(1e-4)``. r = 8, alpha = 16 on ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``gate_proj``, ``up_proj``, ``down_proj``:

* ``jpeft_lora``: ``jpeft.apply(jpeft.LoRA(...), model)``, ``jpeft.split`` / ``jpeft.combine``;
* ``qwix_lora``: ``qwix.apply_lora_to_model(model, qwix.LoraProvider(...))``, ``nnx.split(model,
  nnx.LoRAParam, ...)`` / ``nnx.merge``;
* ``jpeft_qlora`` / ``qwix_qlora``: the same on NF4 kernels (jpeft: ``jpeft.quantize`` with
  ``NF4(block_size)``, double-quantised scales, ``compute_dtype=float32``; qwix:
  ``weight_qtype='nf4'``, ``tile_size=block_size``);
* ``forward``: the base model's loss, for FLOPs over two forwards.

jpeft's ``lora_a`` factors are set to qwix's (both start ``B = 0``), so the two LoRA steps compute
the same function: their loss trajectories must agree, which checks that the programs do the same
work. Each step is a ``jax.jit`` with the factors and optimizer state donated; the time ratios are
medians over rounds of per-round ratios (every round runs each program once), as in ``bench nnx``.
The optimised HLO (``compiled.as_text()``) of every step is written to ``--hlo-dir`` and compared by
opcode and by (shape, opcode).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jpeft
from experiments import bench
from experiments.bench_nnx import _hlo_diff, hlo_ops

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ACCEPT = {"lora_wall_jpeft_over_qwix": 0.9, "lora_bytes_jpeft_over_qwix": 1.0}


def build(args: argparse.Namespace) -> nnx.Module:
    """tunix's Llama 3 with random weights (its zero-initialised MLP kernels drawn from N(0, 0.02))."""
    from tunix.models.llama3 import model as lib

    cfg = lib.ModelConfig(
        num_layers=args.layers, vocab_size=args.vocab, embed_dim=args.embed, hidden_dim=args.hidden,
        num_heads=args.heads, head_dim=args.head_dim, num_kv_heads=args.kv_heads, rope_theta=1_000_000,
        norm_eps=1e-5,
    )  # fmt: skip
    model = lib.Llama3(cfg, rngs=nnx.Rngs(0))
    key = jax.random.key(7)
    for i, layer in enumerate(model.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            kernel = getattr(layer.mlp, name).kernel
            kernel.set_value(0.02 * jax.random.normal(jax.random.fold_in(key, 3 * i + len(name)), kernel.shape))
    return model


def _loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits, _ = model(batch["ids"], batch["pos"], None, batch["mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:]).mean()


def _factor_pairs(jpeft_state: nnx.State, qwix_state: nnx.State) -> list[tuple[Any, Any]]:
    """(jpeft variable, qwix variable) for each LoRA factor: ``.../__jpeft__/default/lora_a`` <-> ``.../w_lora_a``."""
    qwix_vars = {}
    for path, var in nnx.to_flat_state(qwix_state):
        site, leaf = tuple(str(k) for k in path[:-1]), str(path[-1])
        qwix_vars[site + ("lora_" + leaf.rsplit("_", 1)[-1],)] = var
    pairs = []
    for path, var in nnx.to_flat_state(jpeft_state):
        names = tuple(str(k) for k in path)
        site = names[: names.index(jpeft.RESERVED)]
        other = qwix_vars.get(site + (names[-1],))
        if other is None or tuple(other.shape) != tuple(var.shape):
            raise SystemExit(f"bench vs-qwix: no qwix factor of shape {var.shape} for jpeft's {'/'.join(names)}")
        pairs.append((var, other))
    if len(pairs) != len(qwix_vars):
        raise SystemExit(f"bench vs-qwix: jpeft has {len(pairs)} LoRA factors, qwix {len(qwix_vars)}")
    return pairs


def _pair(name: str, base: nnx.Module, args: argparse.Namespace, nf4: bool) -> dict[str, Any]:
    """jpeft's and qwix's (Q)LoRA of ``base``: step functions, initial arguments, factor counts."""
    import qwix

    regex = r".*/(" + "|".join(PROJ) + ")"
    extra = {"weight_qtype": "nf4", "tile_size": args.block_size} if nf4 else {}
    provider = qwix.LoraProvider(module_path=regex, rank=args.rank, alpha=args.alpha, **extra)
    qmodel = qwix.apply_lora_to_model(base, provider, **base.get_model_input(), rngs=nnx.Rngs(3))
    q_def, q_lora, q_rest = nnx.split(qmodel, nnx.LoRAParam, ...)
    if nf4:
        quant = jpeft.NF4(block_size=args.block_size, dq_block_size=args.dq_block_size)
        method = jpeft.QLoRA(targets=PROJ, rank=args.rank, alpha=args.alpha, quant=quant, compute_dtype="float32")
        jmodel = jpeft.apply(method, jpeft.quantize(base, method), key=jax.random.key(2))
    else:
        method = jpeft.LoRA(targets=PROJ, rank=args.rank, alpha=args.alpha)
        jmodel = jpeft.apply(method, base, key=jax.random.key(2))
    j_def, j_lora, j_rest = jpeft.split(method, jmodel)
    for ours, theirs in _factor_pairs(j_lora, q_lora):
        ours.set_value(jnp.array(theirs.get_value(), copy=True))  # the same A (and B = 0) on both sides
    tx = optax.adamw(1e-4)

    def step(graphdef: nnx.GraphDef, combine: Any) -> Any:
        def fn(lora, opt_state, rest, batch):
            loss, g = jax.value_and_grad(lambda t: _loss(combine(graphdef, t, rest), batch))(lora)
            updates, opt_state = tx.update(g, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state, loss

        return fn

    def merge(graphdef: nnx.GraphDef, *states: nnx.State) -> nnx.Module:
        return nnx.merge(graphdef, *states, copy=True)

    fns = {f"jpeft_{name}": step(j_def, jpeft.combine), f"qwix_{name}": step(q_def, merge)}
    states = {f"jpeft_{name}": (j_lora, j_rest), f"qwix_{name}": (q_lora, q_rest)}
    for k, f in fns.items():
        f.__name__ = f"{k}_step"
    return {
        "fns": fns,
        "states": states,
        "trainable": {k: sum(int(x.size) for x in jax.tree.leaves(s[0])) for k, s in states.items()},
    }


def _counts(ops: collections.Counter) -> dict[str, int]:
    """Instructions per opcode (fused computations included)."""
    out: collections.Counter = collections.Counter()
    for key, n in ops.items():
        out[key.rsplit(" ", 1)[-1]] += n
    return dict(sorted(out.items()))


_SIZES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "u8": 1, "s8": 1, "pred": 1, "f16": 2, "u4": 1, "s4": 1}


def _layout_bytes(ops: collections.Counter, opcode: str, min_elements: int = 0) -> tuple[int, int]:
    """(instructions, bytes of their results) of ``opcode`` with at least ``min_elements`` elements."""
    count = total = 0
    for key, n in ops.items():
        shape, op = key.rsplit(" ", 1)
        m = re.match(r"(\w+)\[([\d,]*)\]", shape)
        if op != opcode or not m:
            continue
        elements = math.prod(int(d) for d in m.group(2).split(",") if d)
        if elements >= min_elements:
            count, total = count + n, total + n * elements * _SIZES.get(m.group(1), 4)
    return count, total


def _kind(op: str) -> str:
    if op.startswith(("dot", "ynn_fusion", "onednn", "custom-call")):
        return "matmul (dot / ynn_fusion)"
    if "copy" in op or "transpose" in op:
        return "layout change (copy / transpose fusions)"
    return "other (elementwise, reductions, ...)"


def profile_breakdown(trace_dir: str, names: list[str], top: int = 8) -> dict[str, Any]:
    """Per program: XLA:CPU thunk time (ms per step, summed over threads) by kind and its costliest instructions.

    Reads the ``jax.profiler`` trace of the timed rounds; every thunk event on an XLA thread is
    assigned to the ``<program>_step`` annotation that encloses it (``bench.Program.step``).
    """
    import glob

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return {}
    windows, thunks = [], []
    for plane in jax.profiler.ProfileData.from_file(files[-1]).planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in {f"{n}_step" for n in names}:
                    windows.append((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name[: -len("_step")]))
                elif line.name.startswith("tf_XLA") and not ev.name.startswith(("end: ", "Thread", "Thunk", "Slinky")):
                    thunks.append((ev.start_ns, ev.duration_ns, ev.name))
    steps = collections.Counter(w[2] for w in windows)
    per_op: dict[str, collections.Counter] = {n: collections.Counter() for n in names}
    for start, dur, op in thunks:
        for a, b, name in windows:
            if a <= start <= b:
                per_op[name][op] += dur / 1e6 / steps[name]
                break
    out = {}
    for name, ops in per_op.items():
        kinds: collections.Counter = collections.Counter()
        for op, ms in ops.items():
            kinds[_kind(op)] += ms
        out[name] = {
            "steps": steps[name],
            "ms_per_step_by_kind": dict(kinds.most_common()),
            "top_instructions_ms": dict((op, round(ms, 1)) for op, ms in ops.most_common(top)),
        }
    return out


KEY_OPS = ("dot", "fusion", "copy", "transpose", "reduce", "broadcast", "convert", "custom-call", "add", "multiply")


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    hlo_dir = args.hlo_dir or tempfile.mkdtemp(prefix="jpeft_vs_qwix_hlo_")
    os.makedirs(hlo_dir, exist_ok=True)
    with jax.numpy_rank_promotion("allow"):  # tunix's RMSNorm broadcasts (D,) against (B, T, D)
        base = build(args)
        ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab, dtype=jnp.int32)
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((args.seq, args.seq), bool)), (args.batch, args.seq, args.seq))
        batch = {"ids": ids, "pos": jnp.broadcast_to(jnp.arange(args.seq), ids.shape), "mask": mask}
        base_def, base_state = nnx.split(base)
        n_params = sum(int(x.size) for x in jax.tree.leaves(base_state))
        print(
            f"tunix Llama3: {args.layers} layers x {args.embed}, {args.heads}/{args.kv_heads} heads of "
            f"{args.head_dim}, MLP {args.hidden}, vocab {args.vocab}: {n_params:,} params; batch {args.batch} x "
            f"seq {args.seq}; r={args.rank}, alpha={args.alpha} on {', '.join(PROJ)}; {jax.devices()[0].platform}",
            flush=True,
        )

        def forward(state, batch):
            return _loss(nnx.merge(base_def, state, copy=True), batch)

        programs = {"forward": bench.Program("forward", forward, [base_state, batch], ())}
        print(f"  {'forward':12s} compiled in {programs['forward'].compile_s:.1f}s", flush=True)
        trainable, failures = {}, {}
        for name, nf4 in (("lora", False), ("qlora", True)):
            if nf4 and args.no_qlora:
                continue
            try:
                pair = _pair(name, base, args, nf4)
            except Exception as e:  # qwix refuses a model (e.g. QLoRA on tunix Qwen 3): report it, go on
                failures[name] = f"{type(e).__name__}: {e}"
                print(f"  {name}: setting up failed: {failures[name]}", flush=True)
                traceback.print_exc()
                continue
            trainable.update(pair["trainable"])
            for key, fn in pair["fns"].items():
                lora, rest = pair["states"][key]
                lora = bench._copy(lora)  # donated
                try:
                    prog = bench.Program(key, fn, [lora, optax.adamw(1e-4).init(lora), rest, batch], (0, 1))
                except Exception as e:
                    failures[key] = f"{type(e).__name__}: {e}"
                    print(f"  {key}: compiling failed: {failures[key]}", flush=True)
                    continue
                programs[key] = prog
                print(f"  {key:12s} compiled in {prog.compile_s:.1f}s", flush=True)
                with open(os.path.join(hlo_dir, f"{key}.hlo.txt"), "w") as f:
                    f.write(prog.compiled.as_text())

        for prog in programs.values():  # warm-up
            prog.step(record=False)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        with jax.profiler.trace(args.profile) if args.profile else contextlib.nullcontext():
            for _ in tqdm(range(args.steps), desc="interleaved rounds", unit="round", file=sys.stderr, leave=False):
                for prog in programs.values():
                    prog.step()
        load_after = os.getloadavg()
    print(f"  timed {args.steps} interleaved rounds in {time.perf_counter() - t0:.1f}s", flush=True)
    res = {name: prog.result() for name, prog in programs.items()}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or not b else a / b

    def paired(a: str, b: str, key: str = "wall_s_all") -> float:
        return statistics.median(x / y for x, y in zip(res[a][key], res[b][key], strict=True))

    ratios: dict[str, float | None] = {}
    ops = {name: hlo_ops(prog.compiled) for name, prog in programs.items() if name != "forward"}
    hlo: dict[str, Any] = {}
    for name in ("lora", "qlora"):
        j, q = f"jpeft_{name}", f"qwix_{name}"
        if j not in res or q not in res:
            continue
        bj, bq = res[j]["bytes"] or {}, res[q]["bytes"] or {}
        ratios.update(
            {
                f"{name}_wall_jpeft_over_qwix": paired(j, q),
                f"{name}_wall_jpeft_over_qwix_of_medians": ratio(res[j]["wall_s_median"], res[q]["wall_s_median"]),
                f"{name}_wall_jpeft_over_qwix_of_minima": ratio(min(res[j]["wall_s_all"]), min(res[q]["wall_s_all"])),
                f"{name}_cpu_jpeft_over_qwix": paired(j, q, "cpu_s_all"),
                f"{name}_flops_jpeft_over_qwix": ratio(res[j]["flops"], res[q]["flops"]),
                f"{name}_bytes_jpeft_over_qwix": ratio(bj.get("total"), bq.get("total")),
                f"{name}_temp_bytes_jpeft_over_qwix": ratio(bj.get("temp"), bq.get("temp")),
                f"{name}_argument_bytes_jpeft_over_qwix": ratio(bj.get("argument"), bq.get("argument")),
                f"jpeft_{name}_flops_over_2fwd": ratio(res[j]["flops"], 2 * (res["forward"]["flops"] or 0)),
                f"qwix_{name}_flops_over_2fwd": ratio(res[q]["flops"], 2 * (res["forward"]["flops"] or 0)),
            }
        )
        cj, cq = _counts(ops[j]), _counts(ops[q])
        hlo[name] = {
            "opcodes_jpeft": cj,
            "opcodes_qwix": cq,
            "opcodes_jpeft_minus_qwix": {k: cj.get(k, 0) - cq.get(k, 0) for k in sorted(set(cj) | set(cq))
                                         if cj.get(k, 0) != cq.get(k, 0)},
            "shape_op_jpeft_minus_qwix": _hlo_diff(ops[q], ops[j]),
            # copies/transposes of activation-sized arrays (>= one (tokens, d_model) array): layout changes
            "big_copies_jpeft": _layout_bytes(ops[j], "copy", args.batch * args.seq * args.embed),
            "big_copies_qwix": _layout_bytes(ops[q], "copy", args.batch * args.seq * args.embed),
            "big_transposes_jpeft": _layout_bytes(ops[j], "transpose", args.batch * args.seq * args.embed),
            "big_transposes_qwix": _layout_bytes(ops[q], "transpose", args.batch * args.seq * args.embed),
        }  # fmt: skip
    gaps = {}
    for name in ("lora", "qlora"):
        j, q = f"jpeft_{name}", f"qwix_{name}"
        if j in res and q in res:
            gaps[name] = float(np.max(np.abs(np.array(res[j]["losses"]) - np.array(res[q]["losses"]))))

    rows = [["program", "GFLOP", "arg MiB", "temp MiB", "out MiB", "alias MiB", "total MiB", "wall ms", "cpu ms"]]
    for name, r in res.items():
        b = r["bytes"] or {}
        rows.append(
            [
                name,
                "-" if r["flops"] is None else f"{r['flops'] / 1e9:,.2f}",
                *(bench._mb(b.get(k)) for k in ("argument", "temp", "output", "alias", "total")),
                f"{1e3 * r['wall_s_median']:,.1f}",
                f"{1e3 * r['cpu_s_median']:,.1f}",
            ]
        )
    print()
    print(bench._table(rows))
    print("\nratios, jpeft over qwix (acceptance in brackets):")
    for k, val in ratios.items():
        ok = val is not None and k in ACCEPT and val <= ACCEPT[k]
        bound = f"  [<= {ACCEPT[k]}: {'PASS' if ok else 'FAIL'}]" if k in ACCEPT else ""
        print(f"  {k:42s} {'-' if val is None else f'{val:.3f}'}{bound}")
    print(f"  load average {load_before[0]:.2f} before timing, {load_after[0]:.2f} after ({os.cpu_count()} CPUs)")
    for name, gap in gaps.items():
        print(f"  {name}: max |loss jpeft - loss qwix| over the {args.steps + 1} steps = {gap:.2e}")
    for name, h in hlo.items():
        shown = {k: (h["opcodes_jpeft"].get(k, 0), h["opcodes_qwix"].get(k, 0)) for k in KEY_OPS}
        print(f"  {name} HLO instructions (jpeft, qwix): {shown}")
        print(f"  {name} HLO opcode counts, jpeft minus qwix: {h['opcodes_jpeft_minus_qwix'] or 'identical'}")
        for what in ("copies", "transposes"):
            (nj, bj), (nq, bq) = h[f"big_{what}_jpeft"], h[f"big_{what}_qwix"]
            print(
                f"  {name} {what} of arrays >= tokens x d_model: jpeft {nj} ({bench._mb(bj)} MiB written), "
                f"qwix {nq} ({bench._mb(bq)} MiB)"
            )
    for name, msg in failures.items():
        print(f"  {name}: FAILED: {msg}")
    prof = profile_breakdown(args.profile, list(programs)) if args.profile else {}
    for name, pr in prof.items():
        kinds = ", ".join(f"{k} {v:,.0f}" for k, v in pr["ms_per_step_by_kind"].items())
        print(f"  profile {name}: thunk ms/step (all threads): {kinds}")
        print(f"    costliest: {pr['top_instructions_ms']}")
    probe = qwen3_probe(args.block_size)
    print(f"  qwix on a tiny tunix Qwen3 (apply_lora_to_model, then one call): {probe}")
    print(f"  optimised HLO of each step: {hlo_dir}/<program>.hlo.txt")
    return {
        "command": " ".join(
            shlex.quote(a) for a in [sys.executable.split("/")[-1], "-m", "experiments.bench", *sys.argv[1:]]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            **{m: _version(m) for m in ("qwix", "google-tunix")},
        },
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
            "model": "tunix.models.llama3.model.Llama3, random weights (MLP kernels N(0, 0.02)), float32",
            **{k: getattr(args, k) for k in ("layers", "embed", "hidden", "heads", "kv_heads", "head_dim", "vocab")},
            "params": n_params,
            "batch": args.batch,
            "seq": args.seq,
            "rank": args.rank,
            "alpha": args.alpha,
            "targets": list(PROJ),
            "trainable": trainable,
            "nf4": {"block_size": args.block_size, "jpeft_dq_block_size": args.dq_block_size},
            "optimizer": "optax.adamw(1e-4) on the trainable state, both sides",
            "timed_steps": args.steps,
            "timing": "1 warm-up step per program, then --steps rounds running each once in turn; time ratios are "
            "medians of per-round ratios; wall = perf_counter, cpu = process_time (all threads)",
        },
        "results": res,
        "ratios": ratios,
        "acceptance": {
            k: {"bound": b, "value": ratios.get(k), "pass": ratios.get(k) is not None and ratios[k] <= b}
            for k, b in ACCEPT.items()
        },
        "hlo": hlo,
        "hlo_dir": hlo_dir,
        "max_loss_diff_jpeft_vs_qwix": gaps,
        "failures": failures,
        "qwix_on_tunix_qwen3": probe,
        "profile": prof,
        "elapsed_s": time.perf_counter() - started,
    }


def qwen3_probe(block_size: int) -> dict[str, str]:
    """Whether qwix (Q)LoRA runs on a tiny tunix Qwen 3 (its ``Einsum`` casts ``w`` with ``jnp.astype``).

    ``apply_lora_to_model`` runs the model once, quantising each weight as it meets it; the probe
    then calls the adapted model again, when the weights are already qwix ``WithAux`` values.
    """
    import qwix
    from tunix.models.qwen3 import model as lib

    cfg = lib.ModelConfig(
        num_layers=1, vocab_size=256, embed_dim=block_size, hidden_dim=2 * block_size, num_heads=2,
        head_dim=block_size, num_kv_heads=1, rope_theta=1_000_000, norm_eps=1e-6,
    )  # fmt: skip
    out = {}
    for name, extra in (("lora", {}), ("qlora", {"weight_qtype": "nf4", "tile_size": block_size})):
        model = lib.Qwen3(cfg, rngs=nnx.Rngs(0))
        provider = qwix.LoraProvider(module_path=r".*/(" + "|".join(PROJ) + ")", rank=2, alpha=4.0, **extra)
        try:
            with jax.numpy_rank_promotion("allow"):
                adapted = qwix.apply_lora_to_model(model, provider, **model.get_model_input(), rngs=nnx.Rngs(3))
                jax.block_until_ready(adapted(**model.get_model_input())[0])  # a call after apply's own
            out[name] = "ok"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return out


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def add_parser(sub: Any) -> None:
    p = sub.add_parser("vs-qwix", help="jpeft LoRA/QLoRA vs qwix LoRA/QLoRA training steps on a tunix Llama 3")
    p.add_argument("--steps", type=bench._steps_arg, default=10, help="timed interleaved rounds (>= 5)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embed", type=int, default=768)
    p.add_argument("--hidden", type=int, default=2048, help="MLP width")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--block-size", type=int, default=64, help="NF4 block (jpeft) / tile (qwix) size")
    p.add_argument("--dq-block-size", type=int, default=256, help="jpeft's double-quantisation block")
    p.add_argument("--no-qlora", action="store_true", help="LoRA only")
    p.add_argument("--hlo-dir", default=None, help="where to write each step's optimised HLO (default: a temp dir)")
    p.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="trace the timed rounds with jax.profiler into DIR and report XLA:CPU thunk time per instruction kind",
    )
    p.add_argument("--out", default="experiments/results/bench_vs_qwix.json")
