"""The program every process of tests/multihost/test_multiprocess.py runs (and experiments/multihost.md shows).

Two subcommands, each run by every process of a group (``--num-processes N``, ``--process-id i``):

* ``train``: LoRA and QLoRA on a linen model (the tiny HF GPT-2 of tests/_hf_models.py) and an NNX
  model (the tiny NNX Llama of tests/_nnx_llama.py) train STEPS Adam steps. With ``--mesh 2x4`` the
  base and the deltas are global arrays on a ('data', 'model') mesh (kernels split FSDP-style, see
  :func:`_base_specs`; deltas by ``jpeft.partition_specs``) and each process gives only its rows of
  the batch; with ``--mesh none`` everything runs on one device (the single-process oracle). Each case
  is saved with ``jpeft.save`` (step STEPS), merged with ``jpeft.merge`` and exported with
  ``jpeft.export_hf``. ``--kill-in-save all`` then starts a save of step STEPS + 1 in the middle of
  which the last process SIGKILLs every process of the group (a preempted job).
* ``restore``: restores every case's latest checkpoint (of ``--source``, the train run's ``--out``)
  onto the base laid out on ``--mesh``, then merges and exports it. With ``--oracle DIR`` the process
  then also trains as ``train --mesh none --out DIR`` would (one process start fewer in the test).
  ``--kill-in-save one`` then saves the last case as step STEPS into ``--out`` and starts a save of
  step STEPS + 1 in which the last process SIGKILLs itself: the others print the JpeftError they get.

Process 0 writes ``<out>/<case>.npz`` (the trained or restored leaves and optimizer state, gathered
to the host with ``multihost_utils.process_allgather``; the merged tree; the losses) and prints one
JSON line per case. With ``--port P`` the processes form a group on the local coordinator
``127.0.0.1:P`` (gloo collectives on CPU, ``--devices`` simulated devices each); without it, and
with ``--num-processes`` > 1, ``jax.distributed.initialize()`` detects a TPU pod or cluster itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from typing import Any

CASES = ("linen-lora", "linen-qlora", "nnx-lora", "nnx-qlora")
STEPS = 2
BATCH = 8
LR = 1e-2
# As in tests/test_sharding.py: XLA:CPU's expensive passes off, to cut compile time (results agree to 1e-5).
FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"


def _start(args: argparse.Namespace) -> None:
    """Sets JAX up before anything else touches it: CPU devices, collectives, the process group."""
    if args.devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices} {FAST}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "float32")
    if args.port is not None:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes, process_id=args.process_id
        )
    elif args.num_processes > 1:
        jax.distributed.initialize()  # a TPU pod, SLURM or Open MPI: everything is detected


# --- layout --------------------------------------------------------------------------------------
def _mesh(shape: str) -> Any:
    import jax

    if shape == "none":
        return None
    dims = tuple(int(n) for n in shape.split("x"))
    return jax.make_mesh(dims, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _base_specs(tree: Any) -> Any:
    """tests/test_sharding.fsdp_specs with a kernel's 'model' axis widened to ('data', 'model') where 8
    divides it: such kernels are split over all devices, so no process holds them whole."""
    from jax.sharding import PartitionSpec as P

    from tests.test_sharding import fsdp_specs

    def widen(spec: Any, x: Any) -> Any:
        if spec is None:
            return None
        return P(*(("data", "model") if a == "model" and x.shape[i] % 8 == 0 else a for i, a in enumerate(spec)))

    def walk(specs: Any, tree: Any) -> Any:
        return {k: walk(v, tree[k]) for k, v in specs.items()} if isinstance(specs, dict) else widen(specs, tree)

    return walk(fsdp_specs(tree), tree)


def _to_global(tree: Any, specs: Any, mesh: Any) -> Any:
    """Host-local values (the same on every process) as global arrays: each process gives its shards."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def put(x: Any, spec: Any) -> Any:
        value = np.asarray(x)
        sharding = NamedSharding(mesh, spec if spec is not None else P())
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, specs, is_leaf=lambda x: x is None or isinstance(x, P))


def _batch(data: dict[str, Any], mesh: Any) -> dict[str, Any]:
    """The global batch, split over 'data': each process gives only the rows its devices hold."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if mesh is None:
        return data
    sharding = NamedSharding(mesh, P("data"))

    def local(x: Any) -> Any:
        x = np.asarray(x)
        rows = sorted({i[0].indices(len(x)) for i in sharding.addressable_devices_indices_map(x.shape).values()})
        return jax.make_array_from_process_local_data(sharding, np.concatenate([x[slice(*r)] for r in rows]), x.shape)

    return {k: local(v) for k, v in data.items()}


def _host(tree: Any) -> dict[str, Any]:
    """Every leaf as a whole NumPy array, keyed by its path (a collective: every process calls it)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    def whole(x: Any) -> Any:  # a process-local array is whole already
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return {jax.tree_util.keystr(p): whole(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _split_counts(tree: Any) -> tuple[int, int]:
    """(leaves no process holds whole, leaves split over devices at all)."""
    import jax

    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    partial = sum(all(s.data.size < x.size for s in x.addressable_shards) and x.size > 1 for x in leaves)
    return int(partial), int(sum(not x.sharding.is_fully_replicated for x in leaves))


# --- the cases -------------------------------------------------------------------------------------
def _method(case: str) -> Any:
    import jpeft

    model, name = case.split("-")
    targets = ("c_attn", "c_fc") if model == "linen" else r".*(q|v)_proj"
    if name == "lora":
        return jpeft.LoRA(targets=targets, rank=2)
    return jpeft.QLoRA(
        targets=targets, rank=2, quant=jpeft.NF4(block_size=64, dq_block_size=8), compute_dtype="float32"
    )


def _nnx_base(method: Any) -> Any:
    """The tiny NNX Llama (unrolled layers, so that export_hf can name every module), QLoRA's quantised."""
    from flax import nnx

    import jpeft
    from tests import _nnx_llama as NL

    base = NL.LlamaForCausalLM(NL.Config(), nnx.Rngs(0), False)
    return jpeft.quantize(base, method) if isinstance(method, jpeft.QLoRA) else base


def _llama_profile() -> Any:
    import dataclasses

    import jpeft

    # The NNX Llama's module paths are HF's: the torch names are the paths with '.' for '/'.
    return dataclasses.replace(
        jpeft.profiles.LLAMA, hf_names=(("model/layers/{i}/self_attn/{m}", "model.layers.{i}.self_attn.{m}"),)
    )


def _nnx_data() -> dict[str, Any]:
    import numpy as np

    from tests import _hf_models as H

    return {"input_ids": np.random.RandomState(0).randint(0, H.VOCAB, (BATCH, H.SEQ)).astype(np.int32)}


def _randomise_nnx(model: Any) -> None:
    """Non-zero deltas (B = 0 at init would make the first step's A-gradient zero), host-local."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jpeft

    rng = np.random.RandomState(1)
    for _, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):
        var[...] = var[...] + jnp.asarray(0.1 * rng.standard_normal(var.shape), var.dtype)


def _place_nnx(method: Any, model: Any, mesh: Any) -> Any:
    """Lays a host-local NNX model (base and deltas) out on the mesh; returns its NamedShardings."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    import jpeft

    state = nnx.state(model)
    specs = jpeft.partition_specs(method, model, _base_specs(_strip(state.to_pure_dict())), mesh=mesh)
    nnx.update(model, _to_global(state, specs, mesh))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def _strip(tree: Any) -> Any:
    """A nested dict without the delta subtrees."""
    import jpeft

    if not isinstance(tree, dict):
        return tree
    return {k: _strip(v) for k, v in tree.items() if k != jpeft.RESERVED}


def _train_nnx(method: Any, model: Any, data: dict[str, Any], shardings: Any) -> tuple[Any, list[Any]]:
    import jax
    import optax
    from flax import nnx

    import jpeft

    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=jpeft.Delta)

    @nnx.jit
    def step(model, optimizer, ids):
        def loss_fn(model):
            logits = model(ids).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jpeft.Delta))(model)
        optimizer.update(model, grads)
        if shardings is not None:  # keep the deltas' layout (else XLA may split their replicated axes too)
            nnx.update(model, jax.lax.with_sharding_constraint(nnx.state(model), shardings))
        return loss

    return optimizer, [step(model, optimizer, data["input_ids"]) for _ in range(STEPS)]


def _train_linen(method: Any, peft: Any, loss_fn: Any, data: dict[str, Any], mesh: Any) -> tuple[Any, Any, list[Any]]:
    import jax
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jpeft

    tx = jpeft.optimizer(optax.adam(LR), method, peft)
    trainable, frozen = jpeft.split(method, peft)

    def step(trainable, state, frozen, data):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(jpeft.combine(t, frozen), data))(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    if mesh is None:
        step_fn, state = jax.jit(step), tx.init(trainable)
    else:
        state = jax.jit(tx.init)(trainable)  # moments follow the params' shardings; the step count is
        state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else _to_global(x, P(), mesh), state)
        keep = jax.tree.map(lambda x: x.sharding, (trainable, state))
        step_fn = jax.jit(step, out_shardings=(*keep, NamedSharding(mesh, P())))
    losses = []
    for _ in range(STEPS):
        trainable, state, loss = step_fn(trainable, state, frozen, data)
        losses.append(loss)
    return jpeft.combine(trainable, frozen), state, losses


def _linen_setup(case: str) -> tuple[Any, Any, Any, Any]:
    """(method, host-local base params, loss, host-local data) of GPT-2, as tests/test_sharding.py's."""
    from tests.test_sharding import _setup

    method, params, loss, data = _setup("gpt2", case.split("-")[1], BATCH)
    assert method == _method(case), (method, _method(case))
    return method, params, loss, data


def _outputs(case: str, method: Any, peft: Any, out: str) -> dict[str, Any]:
    """jpeft.merge and jpeft.export_hf of a (trained or restored) tree or model, gathered to the host."""
    from flax import nnx

    import jpeft

    merged = jpeft.merge(method, peft)
    merged = _host(nnx.state(merged) if isinstance(merged, nnx.Module) else merged)
    if case != "nnx-qlora":  # on NNX models export_hf writes LoRA, not QLoRA (a JpeftError says so)
        jpeft.export_hf(
            os.path.join(out, "export", case), method, peft, None if case.startswith("linen") else _llama_profile()
        )
    return {f"merged{k}": v for k, v in merged.items()}


def _leaves(trained: Any, state: Any) -> dict[str, Any]:
    """The deltas and optimizer state, gathered to the host, under the names the test compares."""
    return {**{f"params{k}": v for k, v in _host(trained).items()}, **{f"opt{k}": v for k, v in _host(state).items()}}


def train(args: argparse.Namespace) -> None:
    import jax
    import numpy as np
    from flax import nnx

    import jpeft
    from tests.test_sharding import _randomize

    mesh = _mesh(args.mesh)
    last: tuple[Any, ...] = ()
    for case in CASES:
        start = time.perf_counter()
        if case.startswith("linen"):
            method, params, loss_fn, data = _linen_setup(case)
            peft = _randomize(jpeft.apply(method, params, key=jax.random.key(0)))
            if mesh is not None:
                specs = jpeft.partition_specs(method, peft, _base_specs(params), mesh=mesh)
                peft, data = _to_global(peft, specs, mesh), _batch(data, mesh)
            peft, state, losses = _train_linen(method, peft, loss_fn, data, mesh)
            trained, saved_state = jpeft.split(method, peft)[0], state
        else:
            method = _method(case)
            peft = jpeft.apply(method, _nnx_base(method), key=jax.random.key(0))
            _randomise_nnx(peft)
            shardings = None if mesh is None else _place_nnx(method, peft, mesh)
            state, losses = _train_nnx(method, peft, _batch(_nnx_data(), mesh), shardings)
            trained, saved_state = nnx.state(peft, jpeft.Delta), nnx.state(state)
        split = _split_counts(trained)
        jpeft.save(os.path.join(args.out, "ckpt", case), method, peft, step=STEPS, opt_state=state)
        arrays = {
            **_leaves(trained, saved_state),
            **_outputs(case, method, peft, args.out),
            "loss": np.asarray([v for v in _host(losses).values()]),
        }
        _report(args, case, arrays, start, split=split)
        last = (case, method, peft, state)
    if args.kill_in_save:
        _killed_save(args, *last)


def _killed_save(args: argparse.Namespace, case: str, method: Any, peft: Any, state: Any) -> None:
    """A save of step STEPS + 1 in the middle of which the last process, once its shards are written
    (before the commit), SIGKILLs itself (``--kill-in-save one``: the others must get a JpeftError) or
    every process of the group, whose pids the processes wrote to ``<out>/pid-<i>`` (``all``: the
    whole job dies, as in a preemption; one machine only)."""
    import jax
    import orbax.checkpoint as ocp

    import jpeft

    me, last = jax.process_index(), jax.process_count() - 1
    if me == last:
        write = ocp.CompositeCheckpointHandler.save

        def write_then_die(self: Any, *a: Any, **k: Any) -> Any:
            write(self, *a, **k)  # this process's shards are on disk; the commit has not happened
            if args.kill_in_save == "all":
                for i in range(last):
                    with open(os.path.join(args.out, f"pid-{i}")) as f:
                        os.kill(int(f.read()), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

        ocp.CompositeCheckpointHandler.save = write_then_die
    print(json.dumps({"event": "killed-save", "process": me}), flush=True)
    start = time.perf_counter()
    try:
        jpeft.save(os.path.join(args.out, "ckpt", case), method, peft, step=STEPS + 1, opt_state=state)
        error = None
    except jpeft.JpeftError as e:  # a survivor: orbax's barrier fails once the dead process is noticed
        error = str(e)
    seconds = round(time.perf_counter() - start, 2)
    print(json.dumps({"event": "save-failed", "process": me, "error": error, "seconds": seconds}), flush=True)
    os._exit(0)  # the group has lost a process: jax.distributed's shutdown at exit would wait on it


def restore(args: argparse.Namespace) -> None:
    import jax
    import numpy as np
    import optax
    from flax import nnx

    import jpeft
    import jpeft.io

    mesh = _mesh(args.mesh)

    def restore_case(case: str, path: str) -> tuple[Any, Any, Any]:
        """``(checkpoint, trained deltas, optimizer state)`` of ``case``'s latest step under ``path``."""
        if case.startswith("linen"):
            method, params, _, _ = _linen_setup(case)
            if mesh is not None:
                specs = jpeft.partition_specs(
                    method, jpeft.apply(method, params, key=jax.random.key(0)), _base_specs(params)
                )
                params = _to_global(params, _strip(specs), mesh)  # QLoRA's NF4 kernels: a spec per child array
            template = lambda m, p: jax.jit(jpeft.optimizer(optax.adam(LR), m, p).init)(jpeft.split(m, p)[0])  # noqa: E731
            got = jpeft.restore(path, params, opt_state=template)
            return got, jpeft.split(got.method, got.params)[0], got.opt_state
        method = _method(case)
        base = _nnx_base(method)
        if mesh is not None:
            specs = jpeft.partition_specs(
                method,
                jpeft.apply(method, base, key=jax.random.key(0)),
                _base_specs(_strip(nnx.state(base).to_pure_dict())),
                mesh=mesh,
            )
            nnx.update(base, _to_global(nnx.state(base), nnx.state(specs, nnx.Not(jpeft.Delta)), mesh))
        got = jpeft.restore(
            path, base, opt_state=lambda m, model: nnx.Optimizer(model, optax.adam(LR), wrt=jpeft.Delta)
        )
        return got, nnx.state(got.params, jpeft.Delta), nnx.state(got.opt_state)

    last: tuple[Any, ...] = ()
    for case in CASES:
        start = time.perf_counter()
        path = os.path.join(args.source, "ckpt", case)
        listed = jpeft.io.steps(path)
        got, trained, state = restore_case(case, path)
        split = _split_counts(trained)
        arrays = {**_leaves(trained, state), **_outputs(case, got.method, got.params, args.out)}
        _report(args, case, arrays, start, split=split, steps=listed, step=got.step)
        last = (case, got.method, got.params, got.opt_state, arrays)
    if args.kill_in_save:  # the last case saved again right after its restore, then a save that loses a process
        # With its optimizer state, before any step: leaves the template left process-local (an nnx.Optimizer's
        # step count) are restored replicated over the mesh, so this multi-host save can write them.
        case, method, peft, opt, before = last
        jpeft.save(os.path.join(args.out, "ckpt", case), method, peft, step=STEPS, opt_state=opt)
        _, trained, state = restore_case(case, os.path.join(args.out, "ckpt", case))
        again = _leaves(trained, state)
        same = sorted(again) == sorted(k for k in before if k.startswith(("params", "opt"))) and all(
            np.array_equal(again[k], before[k]) for k in again
        )
        print(json.dumps({"event": "resaved", "of": case, "leaves": len(again), "bit_exact": same}), flush=True)
        _killed_save(args, case, method, peft, opt)


def _report(args: argparse.Namespace, case: str, arrays: dict[str, Any], start: float, **extra: Any) -> None:
    import jax
    import numpy as np

    if jax.process_index() == 0:
        np.savez(os.path.join(args.out, f"{case}.npz"), **arrays)
    line = {
        "case": case,
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "mesh": args.mesh,
        "seconds": round(time.perf_counter() - start, 2),
        **extra,
    }
    print(json.dumps(line), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.multihost._worker", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("train", "restore"))
    parser.add_argument("--out", required=True, help="the directory of this run's outputs (checkpoints under ckpt/)")
    parser.add_argument("--source", help="restore: the --out of the train run")
    parser.add_argument("--mesh", default="2x4", help="'<data>x<model>' over all devices, or 'none' (one device)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, help="the local coordinator's port; omit on a pod")
    parser.add_argument("--devices", type=int, default=0, help="simulated CPU devices per process (0: real ones)")
    parser.add_argument("--oracle", help="restore: then train as `train --mesh none` would, into this directory")
    parser.add_argument(
        "--kill-in-save", choices=("one", "all"), help="end with a save in which the last process kills itself or all"
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.kill_in_save == "all":
        with open(os.path.join(args.out, f"pid-{args.process_id}"), "w") as f:
            f.write(str(os.getpid()))
    _start(args)
    if args.command == "train":
        train(args)
        return
    restore(args)
    if args.oracle:  # the same training on one device of this process (saves a process start)
        os.makedirs(args.oracle, exist_ok=True)
        train(argparse.Namespace(**{**vars(args), "mesh": "none", "out": args.oracle, "kill_in_save": None}))


if __name__ == "__main__":
    main()
