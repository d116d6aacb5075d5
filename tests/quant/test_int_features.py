"""INT8 / INT4 bases across features (issue 13, Deliver 4): sharding specs, mesh training, checkpoints.

Oracles: specs written down from the rule (codes keep the kernel's spec, scales its column split),
the same training step run on one device (the mesh runs, to 1e-5), and the arrays that were saved
(bit-equal after restore; 3 + 2 Adam steps with a save/restore in between == 5 steps, bit for bit).

The mesh runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported,
so one subprocess (this file run as a script) runs them: on the synthetic scanned model with q, v
and o quantised (Int8 per channel, Int4 in blocks of 4 rows), ``on_quantized(LoRA)`` trains two
Adam steps under ``jax.jit`` with ``NamedSharding`` s from ``jpeft.partition_specs`` on a 2x4
('data', 'model') mesh (FSDP-style base specs of tests/test_sharding.py, so the codes are split),
and the result is saved and restored onto the sharded base: the deltas come back with the
shardings ``partition_specs`` derives from the kernels' codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
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
from tests import test_sharding as S

R = jpeft.RESERVED
MESH = AbstractMesh((2, 4), ("data", "model"))
FORMATS = {"int8": jpeft.Int8(), "int4": jpeft.Int4(block_size=4)}
QUANTISED = r"layers/(q|v|o)"


def _method() -> jpeft.OnQuantized:
    return jpeft.on_quantized(jpeft.LoRA(targets=("layers/q", "layers/v"), rank=2), compute_dtype="float32")


def _quantised(fmt: str) -> dict[str, Any]:
    return jpeft.quantize(M.params(), FORMATS[fmt], targets=QUANTISED)


# --- specs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_int_kernels_get_specs_for_their_codes_and_scales(fmt):
    params = _quantised(fmt)
    method = _method()
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    specs = jpeft.partition_specs(method, peft, S.fsdp_specs(params), mesh=MESH)
    # Logical kernels (L, D, D): q P('data', 'model', None), v P('data', None, 'model'), o P(None, 'model', None).
    # Codes keep that spec (Int4: rows / 2, still split 4 ways); the scales (L, D / block, D) the column split only.
    want = {
        "q": (P("data", "model", None), P("data", None, None)),
        "v": (P("data", None, "model"), P("data", None, "model")),
        "o": (P(None, "model", None), P(None, None, None)),
    }
    for name, (codes, scales) in want.items():
        q = specs["layers"][name]["kernel"]
        assert isinstance(q, jpeft.IntArray) and (q.codes, q.scales) == (codes, scales), name
    # The LoRA factors (under the composition's 'lora' key) follow the logical kernel, as over a float one.
    assert specs["layers"]["q"][R]["default"]["lora"] == {
        "lora_a": P("data", "model", None),
        "lora_b": P("data", None, None),
    }
    assert specs["layers"]["v"][R]["default"]["lora"] == {
        "lora_a": P("data", None, None),
        "lora_b": P("data", None, "model"),
    }
    # The spec tree has the structure of the params (so it maps to NamedShardings for device_put).
    want_tree = jax.tree.structure(jax.tree.map(lambda _: P(), peft))
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == want_tree


def test_int4_codes_that_a_mesh_axis_does_not_divide_raise():
    # Kernel (8, 3) split 4 ways over its rows is valid; Int4 packs them into 4 rows of bytes, not 8.
    params = jpeft.quantize(
        {"q": {"kernel": jnp.ones((8, 3)), "bias": jnp.ones(3)}}, jpeft.Int4(block_size=2), targets=("q",)
    )
    method = jpeft.on_quantized(jpeft.LoRA(targets=("q",), rank=2))
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    mesh = AbstractMesh((8,), ("model",))
    with pytest.raises(
        jpeft.JpeftError,
        match=r"'q/kernel/codes' has shape \(4, 3\) and spec P\('model', None\): axis 0 "
        r"\(size 4\) is split over mesh axis 'model' of size 8.* derived from P\('model', None\), given "
        r"for the quantised kernel 'q/kernel' of shape \(8, 3\): its codes are split like its axes",
    ):
        jpeft.partition_specs(method, peft, {"q": {"kernel": P("model"), "bias": None}}, mesh=mesh)


def test_nnx_int_kernels_get_the_linen_specs():
    method = _method()
    linen = jpeft.partition_specs(
        method, jpeft.apply(method, _quantised("int4"), key=jax.random.key(0)), S.fsdp_specs(M.params()), mesh=MESH
    )
    model = jpeft.apply(
        method, jpeft.quantize(N.synthetic(), FORMATS["int4"], targets=QUANTISED), key=jax.random.key(0)
    )
    state = jpeft.partition_specs(method, model, S.fsdp_specs(M.params()), mesh=MESH)
    for name in ("q", "v", "o"):
        got = state["layers"][name]["kernel"].get_value()
        want = linen["layers"][name]["kernel"]
        assert (got.codes, got.scales) == (want.codes, want.scales), name
    assert state["layers"]["q"][R]["default"]["lora"]["lora_a"].get_value() == P("data", "model", None)


# --- checkpoints ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linen_run():
    """(method, base, step, trainable, frozen, adam): a jitted Adam step of on_quantized(LoRA) on Int8."""
    method, base = _method(), _quantised("int8")
    peft = S._randomize(jpeft.apply(method, base, key=jax.random.key(0)))
    fwd = jpeft.wrap(M.Model().apply, method)
    ids = M.inputs()
    tx = jpeft.optimizer(optax.adam(1e-2), method, peft)

    @jax.jit
    def step(t, f, state):
        def loss(t):
            logits = fwd({"params": jpeft.combine(t, f)}, ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        g = jax.grad(loss)(t)
        updates, state = tx.update(g, state, t)
        return optax.apply_updates(t, updates), state

    t, f = jpeft.split(method, peft)
    return method, base, step, t, f, tx


def _steps(step, t, f, state, n):
    for _ in range(n):
        t, state = step(t, f, state)
    return t, state


def _bit_equal(got: Any, want: Any) -> None:
    g, w = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in g] == [p for p, _ in w]
    for (p, a), (_, b) in zip(g, w, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(p)


def test_linen_checkpoint_round_trip_is_bit_exact_and_training_continues(linen_run, tmp_path):
    method, base, step, t0, f0, tx = linen_run
    init = tx.init(t0)
    t5, s5 = _steps(step, t0, f0, init, 5)
    t3, s3 = _steps(step, t0, f0, init, 3)
    saved = jpeft.combine(t3, f0)
    jpeft.save(tmp_path, method, saved, step=3, opt_state=s3)
    back = jpeft.restore(tmp_path, _quantised("int8"), opt_state=s3)
    assert back.method == method and back.step == 3
    _bit_equal(back.params, saved)  # the IntArray kernels are the base's; the deltas the saved arrays
    assert isinstance(back.params["layers"]["q"]["kernel"], jpeft.IntArray)
    t, f = jpeft.split(method, back.params)
    t, s = _steps(step, t, f, back.opt_state, 2)
    _bit_equal((t, s), (t5, s5))
    # A checkpoint of an Int8 base does not restore onto the Int4 one (the base fingerprint differs).
    with pytest.raises(jpeft.JpeftError, match=r"base"):
        jpeft.restore(tmp_path, _quantised("int4"))


def test_nnx_checkpoint_round_trip_is_bit_exact_and_training_continues(tmp_path):
    method = _method()
    base = jpeft.quantize(N.synthetic(), FORMATS["int4"], targets=QUANTISED)
    model = jpeft.apply(method, base, key=jax.random.key(0))
    rng = np.random.RandomState(1)
    for _, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):
        var[...] = var[...] + jnp.asarray(0.1 * rng.standard_normal(var.shape), var.dtype)
    ids = M.inputs()

    @nnx.jit
    def step(model, opt):
        def loss(model):
            logits = model(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, jpeft.trainable(method, model)))(model)
        opt.update(model, grads)

    def flat(m):
        return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m, jpeft.Delta))}

    def run(m, n, opt=None):
        opt = opt or nnx.Optimizer(m, optax.adam(1e-2), wrt=jpeft.trainable(method, m))
        for _ in range(n):
            step(m, opt)
        return opt

    import copy

    m5 = copy.deepcopy(model)
    run(m5, 5)
    opt3 = run(model, 3)
    jpeft.save(tmp_path, method, model, step=3, opt_state=opt3)
    back = jpeft.restore(
        tmp_path, base, opt_state=lambda m, mod: nnx.Optimizer(mod, optax.adam(1e-2), wrt=jpeft.trainable(m, mod))
    )
    got, want = flat(back.params), flat(model)
    assert got.keys() == want.keys() and all(np.array_equal(got[p], want[p]) for p in want)
    assert isinstance(back.params.layers.q.kernel.get_value(), jpeft.IntArray)
    run(back.params, 2, back.opt_state)
    got, want = flat(back.params), flat(m5)
    assert got.keys() == want.keys() and all(np.array_equal(got[p], want[p]) for p in want)


# --- merge on NNX ------------------------------------------------------------------------------------
def test_nnx_merge_refuses_then_requantizes_within_half_a_step():
    from tests.quant.test_int import _np_dequant

    method = _method()
    model = jpeft.apply(
        method, jpeft.quantize(N.synthetic(), FORMATS["int4"], targets=QUANTISED), key=jax.random.key(0)
    )
    rng = np.random.RandomState(2)
    for _, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):
        var[...] = jnp.asarray(0.3 * rng.standard_normal(var.shape), var.dtype)
    with pytest.raises(
        jpeft.JpeftError, match=r"merging into the quantised kernel 'layers/q/kernel' would re-quantise"
    ):
        jpeft.merge(method, model)
    merged, report = jpeft.quant.merge_requantized(method, model)
    assert not nnx.state(merged, jpeft.Delta)
    q = merged.layers.q.kernel.get_value()
    assert isinstance(q, jpeft.IntArray) and (q.bits, q.block_size) == (4, 4)
    # NumPy: the dequantised base plus s A B per layer, re-quantised to within half a step of its new blocks
    d = model.layers.q.__jpeft__["default"]["lora"]
    lora = method.methods[0]
    w = _np_dequant(model.layers.q.kernel.get_value()) + lora.scale * np.einsum(
        "lir,lro->lio", np.asarray(d["lora_a"][...]), np.asarray(d["lora_b"][...])
    )
    err = np.abs(w - _np_dequant(q))
    assert np.all(err <= np.repeat(np.asarray(q.scales), 4, axis=-2) / 2 * (1 + 1e-5) + 1e-7)
    np.testing.assert_allclose(report["layers/q/kernel"]["max_abs_error"], err.max(), rtol=1e-4)
    # o is quantised but not adapted: re-quantising its dequantised kernel gives the same codes
    np.testing.assert_array_equal(merged.layers.o.kernel.get_value().codes, model.layers.o.kernel.get_value().codes)


# --- training on a simulated mesh (subprocess) ----------------------------------------------------
CASES = ("int8", "int4")
STEPS = 2


def test_mesh_steps_equal_the_single_device_step():
    """One test item, so that the subprocess runs once even under pytest-xdist."""
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.quant.test_int_features"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {
        r["case"]: r for r in map(json.loads, filter(lambda line: line.startswith("{"), proc.stdout.splitlines()))
    }
    assert sorted(results) == sorted(CASES), proc.stderr[-4000:]
    failed = {case: r["error"] for case, r in results.items() if r["error"] is not None}
    assert not failed, failed
    for r in results.values():
        assert r["devices"] == 8
        assert r["split_codes"] == 3, r  # q, v and o's codes each split over 'data' and/or 'model'
        assert r["restored_sharded"] == 4, r  # q and v's lora_a, lora_b: all split over 'data' (the layer axis)


def _run_case(fmt: str) -> dict[str, Any]:
    method, params = _method(), _quantised(fmt)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, M.VOCAB, (8, M.SEQ)), jnp.int32)
    fwd = jpeft.wrap(M.Model().apply, method)

    def loss_fn(peft, ids):
        logits = fwd({"params": peft}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    peft = S._randomize(jpeft.apply(method, params, key=jax.random.key(0)))
    tx = jpeft.optimizer(optax.adam(1e-2), method, peft)
    trainable, frozen = jpeft.split(method, peft)

    def step(t, state, f, ids):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(jpeft.combine(t, f), ids))(t)
        updates, state = tx.update(grads, state, t)
        return optax.apply_updates(t, updates), state, loss

    def train(step_fn, t, state, f, ids):
        losses = []
        for _ in range(STEPS):
            t, state, loss = step_fn(t, state, f, ids)
            losses.append(loss)
        return t, state, np.asarray(losses)

    want = train(jax.jit(step), trainable, tx.init(trainable), frozen, ids)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    replicated = NamedSharding(mesh, P())
    specs = jpeft.partition_specs(method, peft, S.fsdp_specs(params), mesh=mesh)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    t_sh, f_sh = jpeft.split(method, shardings)
    d_sh = NamedSharding(mesh, P("data"))
    t, f, d = jax.device_put(trainable, t_sh), jax.device_put(frozen, f_sh), jax.device_put(ids, d_sh)
    state = jax.jit(tx.init)(t)
    s_sh = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
    state = jax.device_put(state, s_sh)
    step_fn = jax.jit(step, in_shardings=(t_sh, s_sh, f_sh, d_sh), out_shardings=(t_sh, s_sh, replicated))
    got = train(step_fn, t, state, f, d)
    np.testing.assert_allclose(got[2], want[2], **S.TOL, err_msg="loss")
    worst = max(S._compare(got[0], want[0]), S._compare(got[1], want[1]))
    ints = [
        x for x in jax.tree.leaves(f, is_leaf=lambda v: isinstance(v, jpeft.IntArray)) if isinstance(x, jpeft.IntArray)
    ]
    split = sum(x.codes.addressable_shards[0].data.size < x.codes.size for x in ints)

    # Save the sharded result and restore it onto the sharded base: deltas come back as partition_specs derives.
    def like(tree, sh):  # the shardings of the base leaves only
        return {k: like(v, sh[k]) if isinstance(v, Mapping) else sh[k] for k, v in tree.items()}

    base = jax.device_put(params, like(params, shardings))
    trained = jpeft.combine(got[0], f)
    with tempfile.TemporaryDirectory() as path:
        jpeft.save(path, method, trained, step=STEPS, opt_state=got[1])
        restored = jpeft.restore(path, base, opt_state=got[1])
    restored_sharded = 0
    for (p, x), y, sh in zip(
        jax.tree_util.tree_flatten_with_path(restored.params)[0],
        jax.tree.leaves(trained),
        jax.tree.leaves(shardings, is_leaf=lambda v: isinstance(v, NamedSharding)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))
        assert x.sharding.is_equivalent_to(sh, x.ndim), (jax.tree_util.keystr(p), x.sharding, sh)
        restored_sharded += R in jax.tree_util.keystr(p) and not x.sharding.is_fully_replicated
    return {
        "loss": got[2].tolist(),
        "max_abs_diff": worst,
        "split_codes": int(split),
        "restored_sharded": restored_sharded,
    }


if __name__ == "__main__":
    for fmt in CASES:
        try:
            out = {"devices": jax.device_count(), "error": None, **_run_case(fmt)}
        except Exception as e:  # reported to the test, which fails on it
            import traceback

            out = {"devices": jax.device_count(), "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
        print(json.dumps({"case": fmt, **out}), flush=True)
