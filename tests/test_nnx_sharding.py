"""jpeft.partition_specs on NNX models, delta sharding metadata, and training on a simulated 8-device mesh.

In-process: the specs derived for the NNX twin of the synthetic model equal those written down from
its kernels' specs and layouts (the same table as tests/test_sharding.py's linen test); a model whose
kernels carry ``out_sharding`` metadata (``nnx.with_partitioning``, stacked by ``nnx.vmap`` with a
partition name) gives its deltas derived metadata, read back by ``nnx.get_partition_spec``; errors.

Subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, this file run as a script):
LoRA on the ``nnx.vmap``-stacked synthetic model trains for STEPS ``nnx.jit`` steps with its state
placed by the derived specs on a 2x4 ('data', 'model') mesh, and must give the losses and parameters
of the same steps on one device (1e-5); the sharded model is saved and restored onto the sharded base
(deltas come back with the derived shardings); under ``jax.set_mesh`` ``jpeft.apply`` shards the
deltas of an annotated model eagerly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jpeft
from tests import _models as M
from tests import _nnx_models as N
from tests.test_sharding import fsdp_specs

R = jpeft.RESERVED
MESH = AbstractMesh((2, 4), ("data", "model"))
METHOD = jpeft.LoRA(targets=M.ALL_TARGETS, rank=2)
STEPS = 3
TOL = dict(rtol=1e-5, atol=1e-5)


def _specs(state: nnx.State) -> dict[tuple[str, ...], Any]:
    return {tuple(str(k) for k in p): v.get_value() for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def base() -> nnx.Module:
    return N.synthetic()


def test_specs_follow_the_weights_on_the_stacked_model(base, key):
    peft = jpeft.apply(METHOD, base, key=key)
    given = fsdp_specs(nnx.state(base).to_pure_dict())  # by state path: the linen twin's paths
    specs = jpeft.partition_specs(METHOD, peft, given, mesh=MESH)
    assert isinstance(specs, nnx.State)
    got = _specs(specs)
    # Written down from the kernels' specs (fsdp_specs) and NNX layouts: (stack, in..., out...), as on linen.
    expected = {
        "embed": (P(None, None), P(None, "model")),  # table (11, 8): P(None, 'model')
        "layers/q": (P("data", "model", None), P("data", None, None)),  # (L, D, D): P('data', 'model', None)
        "layers/v": (P("data", None, None), P("data", None, "model")),  # P('data', None, 'model')
        "layers/o": (P(None, "model", None), P(None, None, None)),
        "layers/dg_in": (P(None, None, None), P(None, None, None, "model")),  # (L, D, 2, 4)
        "layers/dg_out": (P(None, None, "model", None), P(None, None, None)),  # (L, 2, 4, D)
        "layers/conv": (P(None, None, "model", None), P(None, None, None)),  # (L, 3, D, D)
    }
    for module, (a, b) in expected.items():
        at = tuple(module.split("/")) + (R, "default")
        assert (got[at + ("lora_a",)], got[at + ("lora_b",)]) == (a, b), module
    # The State has the structure of nnx.state(model); base leaves keep their specs, one entry per axis.
    assert got.keys() == _specs(nnx.state(peft)).keys()
    assert got[("layers", "q", "kernel")] == P("data", "model", None) and got[("layers", "q", "bias")] == P(None, None)
    # Variable types are kept, so NNX filters select the same leaves of the specs as of the state.
    assert _specs(nnx.state(specs, jpeft.Delta)).keys() == _specs(nnx.state(peft, jpeft.Delta)).keys()
    # nnx.get_partition_spec of a base without metadata (every leaf P()) works as base_specs: deltas replicated.
    plain = _specs(jpeft.partition_specs(METHOD, peft, nnx.get_partition_spec(nnx.state(base))))
    assert plain[("layers", "q", R, "default", "lora_a")] == P(None, None, None)


class _Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.q = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.o = nnx.Linear(16, 8, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.o(jax.nn.relu(self.q(x)))


class Annotated(nnx.Module):
    """Kernels with logical ``out_sharding`` metadata, stacked by ``nnx.vmap`` with a partition name."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def blocks(rngs: nnx.Rngs) -> _Block:
            return _Block(rngs)

        self.layers = blocks(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(h: jax.Array, block: _Block) -> jax.Array:
            return block(h)

        return run(x, self.layers)


def _annotated() -> nnx.Module:
    with nnx.use_eager_sharding(False):  # no mesh here: metadata only
        return Annotated(nnx.Rngs(0))


def test_deltas_carry_sharding_metadata_derived_from_the_kernels(key):
    model = _annotated()
    method = jpeft.DoRA(targets=("q", "o"), rank=2)
    peft = jpeft.apply(method, model, key=key)
    got = _specs(nnx.get_partition_spec(nnx.state(peft)))
    q, o = ("layers", "q", R, "default"), ("layers", "o", R, "default")
    # q kernel (layers, embed, mlp): A the input axis, B the output axis, the magnitude the output axis.
    assert (got[q + ("lora_a",)], got[q + ("lora_b",)], got[q + ("magnitude",)]) == (
        P("layers", "embed", None),
        P("layers", None, "mlp"),
        P("layers", "mlp"),
    )
    assert (got[o + ("lora_a",)], got[o + ("lora_b",)]) == (P("layers", "mlp", None), P("layers", None, "embed"))
    # The same as partition_specs from the base's metadata, and the scan (which removes the layer axis
    # from the metadata of every variable it slices) runs the model.
    derived = _specs(jpeft.partition_specs(method, peft, nnx.get_partition_spec(nnx.state(model))))
    assert {p: s for p, s in derived.items() if R in p} == {p: s for p, s in got.items() if R in p}
    assert peft(jnp.ones((2, 8))).shape == (2, 8)
    # A base without metadata gives deltas without it.
    plain = jpeft.apply(jpeft.LoRA(targets=".*", rank=2), nnx.Linear(8, 4, rngs=nnx.Rngs(0)), key=key)
    assert "out_sharding" not in plain.__jpeft__["default"]["lora_a"].get_metadata()


# --- errors ----------------------------------------------------------------------------------------
def test_bad_base_specs_raise(base, key):
    peft = jpeft.apply(jpeft.LoRA(targets=r"layers/q", rank=2), base, key=key)
    given = fsdp_specs(nnx.state(base).to_pure_dict())
    del given["head"]["bias"]
    with pytest.raises(
        jpeft.JpeftError,
        match=r"base_specs has no entry for the base variable 'head/bias' "
        r"\(Param, shape \(11,\)\)\. Pass nnx.get_partition_spec",
    ):
        jpeft.partition_specs(METHOD, peft, given)
    with pytest.raises(
        jpeft.JpeftError, match=r"base_specs for an NNX model must be an nnx.State of specs .*; got list"
    ):
        jpeft.partition_specs(METHOD, peft, [P()])
    with pytest.raises(jpeft.JpeftError, match=r"expects a jpeft method first; got dict"):
        jpeft.partition_specs({}, peft, {})
    given = fsdp_specs(nnx.state(base).to_pure_dict())
    given["head"]["kernel"] = P(None, "model")  # (8, 11): 'model' (4) does not divide 11
    with pytest.raises(
        jpeft.JpeftError,
        match=r"'head/kernel' has shape \(8, 11\) and spec P\(None, 'model'\): "
        r"axis 1 \(size 11\) is split over mesh axis 'model' of size 4",
    ):
        jpeft.partition_specs(METHOD, peft, given, mesh=MESH)


# --- training on a simulated mesh (subprocess) ----------------------------------------------------
def test_mesh_steps_equal_the_single_device_steps():
    flags = (
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
    )
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_nnx_sharding"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stderr[-4000:]
    r = json.loads(lines[-1])
    assert r["error"] is None, r["error"]
    assert r["devices"] == 8
    assert r["max_abs_diff"] <= 1e-5, r
    assert r["sharded_deltas"] >= 8 and r["sharded_base"] >= 8, r  # leaves the mesh actually splits
    assert r["kept"] and r["restored_sharded"] == r["sharded_deltas"], r
    assert r["eager_sharded"] == 4, r  # q and o: A and B, each split over 'layers' (and one axis over 'model')


def _train(model: nnx.Module, ids: jax.Array, shardings: Any = None) -> tuple[nnx.Module, nnx.Optimizer, list[float]]:
    """STEPS adam steps under ``nnx.jit``; with ``shardings`` (an ``nnx.State`` of ``NamedSharding``) the
    updated state is constrained to them (else XLA may split the deltas' replicated axes too)."""
    optimizer = nnx.Optimizer(model, _TX, wrt=jpeft.Delta)

    @nnx.jit
    def step(model, optimizer, ids):
        def loss_fn(model):
            logits = model(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jpeft.Delta))(model)
        optimizer.update(model, grads)
        if shardings is not None:
            nnx.update(model, jax.lax.with_sharding_constraint(nnx.state(model), shardings))
        return loss

    return model, optimizer, [float(step(model, optimizer, ids)) for _ in range(STEPS)]


_TX = optax.adam(1e-2)


def _start(base: nnx.Module) -> nnx.Module:
    model = jpeft.apply(METHOD, base, key=jax.random.key(0))
    rng = np.random.RandomState(1)  # non-zero B, so that A's first gradient is not zero
    for _, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):
        var[...] = var[...] + jnp.asarray(0.1 * rng.standard_normal(var.shape), var.dtype)
    return model


def _run() -> dict[str, Any]:
    ids = jnp.asarray(np.random.RandomState(0).randint(0, M.VOCAB, (4, M.SEQ)), jnp.int32)
    want_model, _, want_loss = _train(_start(N.synthetic()), ids)
    want = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(want_model))}

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    base = N.synthetic()
    specs = jpeft.partition_specs(METHOD, _start(base), fsdp_specs(nnx.state(base).to_pure_dict()), mesh=mesh)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    nnx.update(base, jax.device_put(nnx.state(base), nnx.state(shardings, nnx.Not(jpeft.Delta))))
    model = _start(base)  # on the sharded base; its deltas placed by the derived specs
    nnx.update(model, jax.device_put(nnx.state(model), shardings))
    model, optimizer, loss = _train(model, jax.device_put(ids, NamedSharding(mesh, P("data"))), shardings)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    diff = 0.0
    flat_sh = dict(nnx.to_flat_state(shardings))
    kept = True
    for p, v in nnx.to_flat_state(nnx.state(model)):
        x = v.get_value()
        np.testing.assert_allclose(np.asarray(x), want[p], **TOL, err_msg=str(p))
        diff = max(diff, float(np.max(np.abs(np.asarray(x, np.float64) - want[p]), initial=0.0)))
        kept &= x.sharding.is_equivalent_to(flat_sh[p].get_value(), x.ndim)  # training kept the placement
    split = {p: not v.get_value().sharding.is_fully_replicated for p, v in nnx.to_flat_state(nnx.state(model))}

    with tempfile.TemporaryDirectory() as path:  # save the sharded model, restore onto the sharded base
        jpeft.save(path, METHOD, model, step=STEPS, opt_state=optimizer)
        restored = jpeft.restore(path, base, opt_state=lambda m, peft: nnx.Optimizer(peft, _TX, wrt=jpeft.Delta))
    trained = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    for (p, got), (_, want) in zip(
        nnx.to_flat_state(nnx.state(restored.opt_state)), nnx.to_flat_state(nnx.state(optimizer)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(p))
    restored_sharded = 0
    for p, v in nnx.to_flat_state(nnx.state(restored.params, jpeft.Delta)):
        x = v.get_value()
        np.testing.assert_array_equal(np.asarray(x), trained[p], err_msg=str(p))
        assert x.sharding.is_equivalent_to(flat_sh[p].get_value(), x.ndim), (p, x.sharding)
        restored_sharded += not x.sharding.is_fully_replicated

    with jax.set_mesh(jax.make_mesh((2, 4), ("layers", "model"), axis_types=(AxisType.Auto,) * 2)):
        with nnx.logical_axis_rules((("layers", "layers"), ("embed", None), ("mlp", "model"))):
            annotated = Annotated(nnx.Rngs(0))  # eager sharding: the kernels are placed at creation
            peft = jpeft.apply(jpeft.LoRA(targets=("q", "o"), rank=2), annotated, key=jax.random.key(0))
    eager = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(peft, jpeft.Delta))]
    return {
        "max_abs_diff": diff,
        "kept": bool(kept),
        "sharded_deltas": sum(s for p, s in split.items() if R in p),
        "sharded_base": sum(s for p, s in split.items() if R not in p),
        "restored_sharded": restored_sharded,
        "eager_sharded": sum(not x.sharding.is_fully_replicated for x in eager),
    }


def main() -> None:
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "float32")
    try:
        result = {"error": None, "devices": jax.device_count(), **_run()}
    except Exception:  # reported to the parent test
        import traceback

        result = {"error": traceback.format_exc()[-3000:], "devices": jax.device_count()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
