"""QLoRA on ``flax.nnx`` models: ``jpeft.quantize`` on a module, NF4 kernels dequantised on the fly.

Oracles: the linen twin (``tests/_models``) quantised and adapted the same way, and the plain NNX
model holding the dequantised weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jpeft
from tests import _models as M
from tests import _nnx_models as N

NF4 = jpeft.NF4(block_size=8, dq_block_size=4)
METHOD = jpeft.QLoRA(targets=r"layers/(q|k|v|o)", rank=2, quant=NF4, compute_dtype="float32")


@pytest.fixture(scope="module")
def pair():
    """(linen tree, NNX model): the same weights, quantised and adapted alike, random deltas (B != 0)."""
    linen = M.random_deltas(jpeft.apply(METHOD, jpeft.quantize(M.params(), METHOD), key=jax.random.key(1)), 3)
    model = jpeft.apply(METHOD, jpeft.quantize(N.synthetic(), METHOD), key=jax.random.key(1))
    for path, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):
        node = linen
        for k in path:
            node = node[str(k)]
        var[...] = node
    return linen, model


def test_quantize_nnx_keeps_paths_and_types():
    model = N.synthetic()
    q = jpeft.quantize(model, METHOD)
    kernel = q.layers.q.kernel
    assert type(kernel) is nnx.Param and isinstance(kernel.get_value(), jpeft.NF4Array)
    assert kernel.get_value().shape == (M.LAYERS, M.D, M.D)
    assert isinstance(model.layers.q.kernel.get_value(), jax.Array)  # the input model is not changed
    assert q.embed.embedding[...] is model.embed.embedding[...]  # other arrays are shared
    flat = lambda m: sorted(p for p, _ in nnx.to_flat_state(nnx.state(m)))  # noqa: E731
    assert flat(q) == flat(model)
    # the same codes as the linen tree's
    linen = jpeft.quantize(M.params(), METHOD)["layers"]["q"]["kernel"]
    np.testing.assert_array_equal(kernel.get_value().codes, linen.codes)


def test_dequantize_nnx_is_the_linen_dequantised_tree():
    q = jpeft.quantize(N.synthetic(), METHOD)
    plain = jpeft.dequantize(q)
    ref = jpeft.dequantize(jpeft.quantize(M.params(), METHOD))
    np.testing.assert_array_equal(plain.layers.o.kernel[...], ref["layers"]["o"]["kernel"])
    assert isinstance(q.layers.o.kernel.get_value(), jpeft.NF4Array)


def test_nnx_qlora_equals_linen_qlora(pair):
    linen, model = pair
    ids = M.inputs()
    want = jpeft.wrap(M.Model().apply, METHOD)({"params": linen}, ids)
    got = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(got - N.load(N.synthetic(), jpeft.dequantize(linen))(ids)).max()) > 1e-3  # B != 0


def test_nnx_qlora_at_init_is_the_dequantised_base():
    model = jpeft.apply(METHOD, jpeft.quantize(N.synthetic(), METHOD), key=jax.random.key(1))
    base = N.load(N.synthetic(), jpeft.dequantize(jpeft.quantize(M.params(), METHOD)))
    ids = M.inputs()
    np.testing.assert_allclose(model(ids), base(ids), atol=1e-5, rtol=1e-5)


def test_nnx_qlora_merge_equals_unmerged(pair):
    _, model = pair
    merged = jpeft.merge(METHOD, model)
    assert type(merged.layers.q) is nnx.Linear and isinstance(merged.layers.q.kernel.get_value(), jax.Array)
    assert not hasattr(merged.layers.q, "__jpeft__")
    np.testing.assert_allclose(merged(M.inputs()), model(M.inputs()), atol=1e-5, rtol=1e-5)


def test_nnx_qlora_trains_deltas_only():
    model = jpeft.apply(METHOD, jpeft.quantize(N.synthetic(), METHOD), key=jax.random.key(1))
    codes = model.layers.q.kernel.get_value().codes
    opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=jpeft.Delta)
    ids = M.inputs()

    @nnx.jit
    def step(m, o):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(ids) ** 2), argnums=nnx.DiffState(0, jpeft.Delta))(m)
        o.update(m, g)
        return loss

    first = step(model, opt)
    assert float(step(model, opt)) < float(first)
    np.testing.assert_array_equal(model.layers.q.kernel.get_value().codes, codes)


class _Einsum(nnx.Module):
    """tunix's attention ``Einsum``: the weight in ``w``, the spec in ``einsum_str``."""

    def __init__(self, einsum_str: str, shape: tuple[int, ...], rngs: nnx.Rngs):
        self.einsum_str = einsum_str
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(self.einsum_str, x, self.w[...])


class _Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q = _Einsum("BTD,DNH->BTNH", (8, 2, 4), rngs)
        self.o = _Einsum("BTNH,NHD->BTD", (2, 4, 8), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.o(self.q(x))


def test_nnx_qlora_on_einsum_style_modules():
    method = jpeft.QLoRA(targets=("q", "o"), rank=2, quant=NF4, compute_dtype="float32")
    q = jpeft.quantize(_Attention(nnx.Rngs(0)), method)
    assert isinstance(q.q.w.get_value(), jpeft.NF4Array)
    peft = jpeft.apply(method, q, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (2, 3, 8))
    plain = jpeft.dequantize(q)
    w_q, w_o = np.asarray(plain.q.w[...], np.float64), np.asarray(plain.o.w[...], np.float64)
    want = np.einsum("btnh,nhd->btd", np.einsum("btd,dnh->btnh", np.asarray(x, np.float64), w_q), w_o)
    np.testing.assert_allclose(peft(x), want, atol=1e-4, rtol=1e-4)
