"""Quantised bases in training: the backward pass dequantises from the codes (issue 13, parts 4 and 5).

``quantized_forward``'s default path is a ``custom_vjp`` whose residual is the quantised kernel
itself, so a step holds one layer's float kernel at a time. Oracles: autodiff through the same
dequantised forward (``remat=False``) and, independently, the float model holding
``jpeft.dequantize``'s kernels run with the plain method; XLA's memory plan of a stack of layers.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from experiments import bench
from tests import _hf_models as H
from tests._models import random_deltas

FORMATS = {"int8": jpeft.Int8(), "int4": jpeft.Int4(block_size=16), "nf4": jpeft.NF4(block_size=16)}
QUANTISED = r".*_proj/kernel"


def _methods():
    return {
        "lora": jpeft.LoRA(targets=r".*/(q|v)_proj", rank=2),
        "ptuning": jpeft.PTuning(num_virtual_tokens=2, encoder_hidden_size=8),
    }


@functools.cache
def _hf():
    return H.make("llama")


@functools.cache
def _weights():
    hf = _hf()
    return jax.random.normal(jax.random.key(3), hf.apply({"params": hf.params}, **hf.inputs).logits.shape)


def _grads(method, tree, wrt="trainable"):
    """Gradients of ``sum(logits * weights)`` by path: of the trainable half, or of the frozen half's floats."""
    hf = _hf()
    trainable, frozen = jpeft.split(method, tree)
    wrapped, weights = jpeft.wrap(hf.apply, method), _weights()

    def loss(t, f):
        return jnp.sum(wrapped({"params": jpeft.combine(t, f)}, **hf.inputs).logits * weights)

    if wrt == "trainable":
        g = jax.jit(jax.grad(loss))(trainable, frozen)
    else:
        g = jax.jit(jax.grad(loss, argnums=1, allow_int=True))(trainable, frozen)
    leaves = jax.tree_util.tree_flatten_with_path(g)[0]
    return {jax.tree_util.keystr(p): x for p, x in leaves if x.dtype != jax.dtypes.float0}


def _assert_same(got, want):
    assert got and sorted(got) == sorted(want)
    scale = max(float(np.abs(w).max()) for w in want.values())
    for path, g in got.items():
        err = float(np.abs(np.asarray(g) - np.asarray(want[path])).max())
        assert err <= 1e-6 * scale, (path, err, scale)  # float32 rounding of a differently fused program
    assert scale > 0


# Each format once, each method kind on two formats (the codes backward is the same code for all).
@pytest.mark.parametrize("fmt, kind", [("int8", "lora"), ("int4", "ptuning"), ("nf4", "lora"), ("nf4", "ptuning")])
def test_codes_backward_gives_autodiffs_gradients(fmt, kind):
    hf = _hf()
    inner = _methods()[kind]
    method = jpeft.on_quantized(inner, compute_dtype="float32")
    assert method.remat
    peft = random_deltas(
        jpeft.apply(method, jpeft.quantize(hf.params, FORMATS[fmt], targets=QUANTISED), key=jax.random.key(1)), 3
    )
    got = _grads(method, peft)
    _assert_same(got, _grads(dataclasses.replace(method, remat=False), peft))  # autodiff, dequantised forward
    _assert_same(got, _grads(jpeft.compose(inner), jpeft.dequantize(peft)))  # the float model, plain method


def test_qlora_codes_backward_equals_lora_on_dequantised_kernels():
    hf = _hf()
    method = jpeft.QLoRA(targets=r".*/(q|v)_proj", rank=2, quant=FORMATS["nf4"], compute_dtype="float32")
    peft = random_deltas(jpeft.apply(method, jpeft.quantize(hf.params, method), key=jax.random.key(1)), 3)
    got = _grads(method, peft)
    twin = jpeft.LoRA(targets=method.targets, rank=method.rank, alpha=method.alpha)
    want = _grads(twin, jpeft.dequantize(peft))  # QLoRA's empty delta entries carry no leaves
    _assert_same({p.replace("qlora", "lora"): g for p, g in got.items()}, want)  # the same leaves by path


def test_differentiating_the_scales_falls_back_to_autodiff():
    """``jpeft.split`` never differentiates a quantised kernel; if a caller does, the scales get autodiff's gradient."""
    hf = _hf()
    method = jpeft.on_quantized(_methods()["lora"], compute_dtype="float32")
    peft = jpeft.apply(method, jpeft.quantize(hf.params, FORMATS["int4"], targets=QUANTISED), key=jax.random.key(1))
    got = _grads(method, random_deltas(peft, 3), wrt="frozen")
    want = _grads(dataclasses.replace(method, remat=False), random_deltas(peft, 3), wrt="frozen")
    assert any(p.endswith("['kernel'].scales") for p in got)
    _assert_same(got, want)


# --- memory: XLA's plan holds one float kernel at a time ------------------------------------------
LAYERS, WIDTH = 6, 256
KERNEL_BYTES = WIDTH * WIDTH * 4


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x = jnp.tanh(nn.Dense(WIDTH, name=f"l{i}")(x))
        return x


@functools.cache
def _stack():
    model, x = _Stack(), jnp.ones((2, WIDTH))
    return model, x, model.init(jax.random.key(0), x)["params"]


def _temp(method, tree):
    model, x, _ = _stack()
    trainable, frozen = jpeft.split(method, tree)
    wrapped = jpeft.wrap(model.apply, method)

    def loss(t, f):
        return jnp.sum(wrapped({"params": jpeft.combine(t, f)}, x))

    return bench.memory_of(jax.jit(jax.grad(loss)).lower(trainable, frozen).compile())["temp"]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_step_plans_one_float_kernel_not_all(fmt):
    _, _, params = _stack()
    lora = jpeft.LoRA(targets=r"l\d", rank=2)
    q = jpeft.quantize(params, FORMATS[fmt], targets=r"l\d/kernel")
    codes = jpeft.on_quantized(lora, compute_dtype="float32")
    kept = dataclasses.replace(codes, remat=False)
    float_temp = _temp(lora, jpeft.apply(lora, params, key=jax.random.key(1)))
    codes_temp = _temp(codes, jpeft.apply(codes, q, key=jax.random.key(1)))
    kept_temp = _temp(kept, jpeft.apply(kept, q, key=jax.random.key(1)))
    assert kept_temp >= LAYERS * KERNEL_BYTES  # autodiff keeps every layer's dequantised kernel
    assert codes_temp <= float_temp + KERNEL_BYTES + 64 * 1024  # one at a time
    if fmt == "nf4":
        qlora = jpeft.QLoRA(targets=r"l\d", rank=2, quant=FORMATS["nf4"], compute_dtype="float32")
        assert _temp(qlora, jpeft.apply(qlora, jpeft.quantize(params, qlora), key=jax.random.key(1))) == codes_temp
