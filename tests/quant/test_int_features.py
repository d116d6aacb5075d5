"""INT8 / INT4 bases across features (issue 13, Deliver 4): sharding specs, mesh training, checkpoints.

Oracles: specs written down from the rule (codes keep the kernel's spec, scales its column split),
the same training step run on one device (the mesh runs, to 1e-5), and the arrays that were saved
(bit-equal after restore; 3 + 2 Adam steps with a save/restore in between == 5 steps, bit for bit).

The mesh runs (``on_quantized(LoRA)`` on Int8 and Int4 bases of the synthetic scanned model, jit on
a 2x4 mesh with the codes split, then save and restore onto the sharded base) are cases
``jit-synthetic-int8`` / ``jit-synthetic-int4`` of tests/test_sharding.py's one mesh subprocess.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
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
