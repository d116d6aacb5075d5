"""INT8 / INT4 bases (issue 13, Deliver 4): round-trip bounds, every method on a quantised base, merge, errors.

Oracles: NumPy (the absmax bound ``|w - deq| <= s / 2`` and the dequantised weights, computed here
from the codes and scales), and the float model holding those NumPy-dequantised weights run with
the same method and deltas through the modules' own calls (linen: HF Flax Llama; NNX: its twin).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft import _tree
from tests import _hf_models as H
from tests import _nnx_llama as NL
from tests._models import random_deltas

TOL = dict(atol=2e-5, rtol=2e-5)
LAYER0 = r"model/layers/0/.*/kernel"  # Freeze(1) trains layer 1, so only layer 0 is quantised in the parity tests
INT8, INT4 = jpeft.Int8(), jpeft.Int4(block_size=16)


def _np_codes(q: jpeft.IntArray) -> np.ndarray:
    c = np.asarray(q.codes)
    if q.bits == 8:
        return c.astype(np.int64)
    hi, lo = (c >> 4).astype(np.int64) - 8, (c & 15).astype(np.int64) - 8
    return np.stack([hi, lo], axis=-2).reshape(c.shape[:-2] + (q.rows, c.shape[-1]))


def _np_dequant(q: jpeft.IntArray) -> np.ndarray:
    """NumPy oracle: codes times the scale of their block."""
    bs = q.block_size or q.rows
    return (_np_codes(q) * np.repeat(np.asarray(q.scales, np.float64), bs, axis=-2)).astype(np.float32)


@pytest.mark.parametrize(
    "config", [jpeft.Int8(), jpeft.Int8(block_size=8), jpeft.Int4(block_size=8), jpeft.Int4(block_size=None)]
)
def test_round_trip_error_is_at_most_half_a_step(config):
    rng = np.random.RandomState(0)
    w = rng.standard_normal((3, 32, 12)).astype(np.float32) * rng.uniform(0.1, 3, (1, 1, 12)).astype(np.float32)
    q = jpeft.quantize({"d": {"kernel": w}}, config, targets=["d"])["d"]["kernel"]
    bs = config.block_size or 32
    assert q.shape == w.shape and q.scales.shape == (3, 32 // bs, 12)
    codes = _np_codes(q)
    assert np.abs(codes).max() <= config.qmax and np.abs(codes).max() == config.qmax  # absmax reaches qmax
    step = np.repeat(np.asarray(q.scales), bs, axis=-2)
    np.testing.assert_allclose(step[:, ::bs], np.abs(w).reshape(3, 32 // bs, bs, 12).max(2) / config.qmax, rtol=1e-6)
    deq = np.asarray(jpeft.dequantize(q))
    np.testing.assert_allclose(deq, _np_dequant(q), rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(w - deq) <= step / 2 * (1 + 1e-6))
    assert q.codes.dtype == (np.int8 if config.bits == 8 else np.uint8)
    assert q.codes.nbytes == w.size * config.bits // 8  # int4: two codes per byte


def _methods():
    return {
        "lora": jpeft.LoRA(targets=r".*/(q|v)_proj", rank=2),
        "ia3": jpeft.IA3(),
        "houlsby": jpeft.HoulsbyAdapter(reduction_factor=8),
        "ptuning": jpeft.PTuning(num_virtual_tokens=2, encoder_hidden_size=8),
        "prefix": jpeft.PrefixTuning(num_virtual_tokens=2, projection_hidden_size=8),
        "freeze": jpeft.Freeze(trainable_layers=1),
    }


# Each method runs on both formats: Int8 on one backend, Int4 on the other.
LINEN = {"lora": INT8, "ia3": INT4, "houlsby": INT8, "ptuning": INT4, "prefix": INT8, "freeze": INT4}
NNX = {k: INT4 if v is INT8 else INT8 for k, v in LINEN.items()}


def _float_of(tree):
    """The tree with each IntArray replaced by its NumPy dequantisation."""
    return jax.tree.map(
        lambda v: jnp.asarray(_np_dequant(v)) if isinstance(v, jpeft.IntArray) else v,
        tree,
        is_leaf=lambda v: isinstance(v, jpeft.IntArray),
    )


@pytest.mark.parametrize("kind", list(LINEN))
def test_linen_method_on_quantised_base_equals_float_dequantised_model(kind):
    hf = H.make("llama")
    inner = _methods()[kind]
    method = jpeft.on_quantized(inner, compute_dtype="float32")
    q = jpeft.quantize(hf.params, LINEN[kind], targets=LAYER0)
    assert isinstance(q["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"], jpeft.IntArray)
    peft = random_deltas(jpeft.apply(method, q, key=jax.random.key(1)), 3)
    assert method.param_count(peft) == jpeft.compose(inner).param_count(hf.params)
    y = jax.jit(lambda v: jpeft.wrap(hf.apply, method)({"params": v}, **hf.inputs).logits)(peft)
    want = jax.jit(lambda v: jpeft.wrap(hf.apply, jpeft.compose(inner))({"params": v}, **hf.inputs).logits)(
        _float_of(peft)
    )
    np.testing.assert_allclose(y, want, **TOL)
    plain = jax.jit(lambda v: hf.apply({"params": v}, **hf.inputs).logits)(hf.params)
    assert float(jnp.abs(y - plain).max()) > 1e-4  # the base is really quantised (and the deltas act)
    labels = jpeft.labels(method, peft)
    assert labels["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] == "frozen"


def _nnx_random(model, seed):
    rng = np.random.RandomState(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):
        var[...] = jnp.asarray(rng.normal(0, 0.1, var.shape), var.dtype)
    return model


@pytest.mark.parametrize("kind", list(NNX))
def test_nnx_method_on_quantised_base_equals_float_dequantised_model(kind):
    hf = H.make("llama")
    inner = _methods()[kind]
    method = jpeft.on_quantized(inner, compute_dtype="float32")
    qmodel = jpeft.quantize(NL.llama(), NNX[kind], targets=LAYER0)
    model = _nnx_random(jpeft.apply(method, qmodel, key=jax.random.key(1)), 4)
    got = nnx.jit(lambda m, x: m(**x).logits)(model, hf.inputs)
    ref = jpeft.dequantize(model)  # then overwrite the kernels with the NumPy oracle's
    for path, var in nnx.to_flat_state(nnx.state(qmodel)):
        if isinstance(var.get_value(), jpeft.IntArray):
            node = ref
            for k in path:
                node = node[k] if isinstance(k, int) else getattr(node, str(k))
            node.set_value(jnp.asarray(_np_dequant(var.get_value())))
    want = nnx.jit(lambda m, x: m(**x).logits)(ref, hf.inputs)
    np.testing.assert_allclose(got, want, **TOL)


def test_training_step_moves_deltas_only_and_keeps_codes():
    hf = H.make("llama")
    method = jpeft.on_quantized(jpeft.LoRA(targets=r".*/(q|v)_proj", rank=2), compute_dtype="float32")
    peft = jpeft.apply(method, jpeft.quantize(hf.params, INT4, targets=r".*_proj"), key=jax.random.key(0))
    train, frozen = jpeft.split(method, peft)
    apply = jpeft.wrap(hf.apply, method)

    @jax.jit
    def loss(t, f):
        return jnp.mean(apply({"params": jpeft.combine(t, f)}, **hf.inputs).logits ** 2)

    grads = jax.grad(loss)(train, frozen)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert norms and max(norms) > 0
    assert all(
        isinstance(x, jpeft.IntArray) for p, x in _tree.leaves(frozen) if re.search(r"_proj/kernel$", "/".join(p))
    )


def test_merge_refuses_then_requantizes_with_the_error():
    hf = H.make("llama")
    method = jpeft.on_quantized(jpeft.LoRA(targets=r".*/(q|v)_proj", rank=2), compute_dtype="float32")
    peft = random_deltas(jpeft.apply(method, jpeft.quantize(hf.params, INT8, targets=LAYER0), key=jax.random.key(0)), 1)
    with pytest.raises(jpeft.JpeftError, match="would re-quantise"):
        jpeft.merge(method, peft)
    merged, report = jpeft.quant.merge_requantized(method, peft)
    q = merged["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, jpeft.IntArray) and q.bits == 8
    assert not any(jpeft.RESERVED in p for p, _ in _tree.leaves(merged))
    # the NumPy float merge: dequantised base plus s * A B, and the reported error against it
    node = peft["model"]["layers"]["0"]["self_attn"]["q_proj"]
    d = node[jpeft.RESERVED]["default"]["lora"]
    w = _np_dequant(node["kernel"]) + method.methods[0].scale * np.asarray(d["lora_a"]) @ np.asarray(d["lora_b"])
    err = np.abs(w - _np_dequant(q))
    rep = report["model/layers/0/self_attn/q_proj/kernel"]
    np.testing.assert_allclose(rep["max_abs_error"], err.max(), rtol=1e-4)
    assert np.all(err <= np.asarray(q.scales) / 2 * (1 + 1e-5))
    assert 0 < rep["rel_error"] < 0.02
    # a float merge: dequantise first
    floats = jpeft.merge(method, jpeft.dequantize(peft))
    np.testing.assert_allclose(floats["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"], w, atol=1e-5)


def test_memory_int8_quarter_int4_eighth_of_float32():
    hf = H.make("llama")
    kernels = r".*/(self_attn|mlp)/.*_proj"
    f32 = sum(x.nbytes for p, x in _tree.leaves(hf.params) if re.fullmatch(kernels + "/kernel", "/".join(p)))
    for config, ratio in ((INT8, 1 / 4), (INT4, 1 / 8)):
        q = jpeft.quantize(hf.params, config, targets=kernels)
        stored = sum(
            x.nbytes
            for x in jax.tree.leaves(q, is_leaf=lambda v: isinstance(v, jpeft.IntArray))
            if isinstance(x, jpeft.IntArray)
        )
        codes = sum(
            x.codes.nbytes
            for x in jax.tree.leaves(q, is_leaf=lambda v: isinstance(v, jpeft.IntArray))
            if isinstance(x, jpeft.IntArray)
        )
        shapes = [x.shape for p, x in _tree.leaves(hf.params) if re.fullmatch(kernels + "/kernel", "/".join(p))]
        assert codes == f32 * ratio
        assert stored - codes == sum(4 * o * (r // (config.block_size or r)) for r, o in shapes)  # float32 scales


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: jpeft.Int8(bits=3), r"bits must be 4 or 8"),
        (lambda: jpeft.Int4(block_size=7), r"block_size must\s+be even"),
        (lambda: jpeft.Int8(block_size=0), r"positive int or None"),
        (
            lambda: jpeft.quantize({"d": {"bias": np.zeros(8, "float32")}}, jpeft.Int8(), targets=r"d/bias"),
            r"rank >= 2",
        ),
        (
            lambda: jpeft.quantize(
                {"d": {"kernel": np.zeros((12, 4), "float32")}}, jpeft.Int8(block_size=8), targets=["d"]
            ),
            r"does not divide its axis -2 \(12 rows\)",
        ),
        (
            lambda: jpeft.quantize({"d": {"kernel": np.zeros((8, 4), "float32")}}, jpeft.Int8(), targets=["x"]),
            r"matched 0",
        ),
        (
            lambda: jpeft.quantize({"d": {"kernel": np.zeros((8, 4), "float32")}}, "int8", targets=["d"]),
            r"got str. Other formats: jpeft.Int8",
        ),
    ],
)
def test_bad_inputs_are_clear_errors(make, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        make()


def test_method_errors_before_tracing():
    hf = H.make("llama")
    freeze = jpeft.on_quantized(jpeft.Freeze(trainable_layers=1))
    with pytest.raises(jpeft.JpeftError, match=r"would train it; integer codes cannot train"):
        jpeft.apply(freeze, jpeft.quantize(hf.params, INT8, targets=r".*_proj"), key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"no quantised kernel"):
        jpeft.apply(jpeft.on_quantized(jpeft.LoRA(targets=["q_proj"])), hf.params, key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"compute_dtype must name a float dtype"):
        jpeft.on_quantized(jpeft.LoRA(targets=["q_proj"]), compute_dtype="int8")
    with pytest.raises(jpeft.JpeftError, match=r"QLoRA already computes"):
        jpeft.on_quantized(jpeft.QLoRA(targets=["q_proj"]))
    dora = jpeft.on_quantized(jpeft.DoRA(targets=["q_proj"], rank=2))  # crashed on the abstract kernel before
    with pytest.raises(jpeft.JpeftError, match=r"q_proj' holds a quantised kernel; DoRA's magnitude"):
        jpeft.apply(dora, jpeft.quantize(hf.params, INT8, targets=r".*_proj"), key=jax.random.key(0))
    emb = jpeft.quantize(hf.params, INT8, targets=r"model/embed_tokens/embedding")
    with pytest.raises(jpeft.JpeftError, match=r"only linear layers' 'kernel'"):
        jpeft.apply(jpeft.on_quantized(jpeft.LoRA(targets=["q_proj"])), emb, key=jax.random.key(0))
