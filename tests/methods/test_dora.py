"""DoRA's output combine (``jpeft.methods._dora.combine``, which keeps only the layer output for the
backward) against a copy of the formula it replaced: forward and gradients equal to 1e-5."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft

D_IN, D_HID, D_OUT = 6, 10, 5


class MLP(nn.Module):
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(D_HID, use_bias=self.use_bias, name="fc")(x))
        return nn.Dense(D_OUT, use_bias=self.use_bias, name="proj")(h)


def _old_dense(x, kernel, bias, d, s):
    """Today's formula before the change (the oracle): ``y + (f - 1) (y - bias) + f delta``."""

    def row(v):  # (out,) -> (1, ..., out): the config raises on implicit rank promotion
        return jnp.reshape(v, (1,) * (x.ndim - 1) + v.shape)

    w = kernel + s * d["lora_a"] @ d["lora_b"]
    f = row(d["magnitude"] / jax.lax.stop_gradient(jnp.sqrt(jnp.sum(w * w, axis=0))))
    b = 0 if bias is None else row(bias)
    y = x @ kernel + b
    delta = (x @ d["lora_a"]) * s @ d["lora_b"]
    base = y - b
    return y + (f - 1) * base + f * delta


def _old_mlp(params, x, s):
    def layer(name, x):
        p = params[name]
        return _old_dense(x, p["kernel"], p.get("bias"), p["__jpeft__"]["default"], s)

    return layer("proj", nn.gelu(layer("fc", x)))


@pytest.fixture(scope="module", params=[True, False], ids=["bias", "no_bias"])
def case(request):
    model = MLP(use_bias=request.param)
    x = jax.random.normal(jax.random.key(0), (3, 4, D_IN))
    params = model.init(jax.random.key(1), x)["params"]
    method = jpeft.DoRA(targets=("fc", "proj"), rank=2, alpha=3.0)
    peft = jpeft.apply(method, params, key=jax.random.key(2))
    rng = np.random.RandomState(0)  # non-zero B and moved magnitudes, so every term matters

    def perturb(path, v):
        name = jax.tree_util.keystr(path)
        if "lora_b" in name:
            return jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype)
        if "magnitude" in name:
            return v * jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
        return v

    peft = jax.tree_util.tree_map_with_path(perturb, peft)
    if request.param:  # non-zero biases
        for k in ("fc", "proj"):
            peft[k]["bias"] = jnp.asarray(rng.normal(0, 1.0, peft[k]["bias"].shape), jnp.float32)
    wrapped = jpeft.wrap(model.apply, method)
    target = jax.random.normal(jax.random.key(3), (3, 4, D_OUT))
    return wrapped, peft, x, target, method.scale


def test_forward_equals_old_formula(case):
    wrapped, peft, x, _, s = case
    new = jax.jit(lambda p: wrapped({"params": p}, x))(peft)
    np.testing.assert_allclose(new, _old_mlp(peft, x, s), rtol=1e-5, atol=1e-5)


def test_gradients_equal_old_formula(case):
    wrapped, peft, x, target, s = case

    def loss(fn):
        return jax.jit(jax.grad(lambda p: jnp.sum(jnp.tanh(fn(p)) * target)))

    new = loss(lambda p: wrapped({"params": p}, x))(peft)
    old = loss(lambda p: _old_mlp(p, x, s))(peft)
    # every leaf: the DoRA factors and magnitudes, and the frozen kernels and biases (the input path)
    for (path, g_new), g_old in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(old), strict=True):
        np.testing.assert_allclose(g_new, g_old, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_zero_magnitude_gradient_is_nan_not_silent():
    """At a magnitude entry of exactly 0, z = (out - bias) / f cannot be recovered: NaN, never a quiet 0."""
    from jpeft.methods._dora import combine

    y, d = jnp.ones((2, 3)), jnp.full((2, 3), 0.5)
    f, b = jnp.array([[0.0, 1.0, 2.0]]), jnp.zeros((1, 3))
    g = jax.grad(lambda f: jnp.sum(combine(y, d, f, b)))(f)
    assert np.isnan(g[0, 0]) and np.allclose(g[0, 1:], [3.0, 3.0])
