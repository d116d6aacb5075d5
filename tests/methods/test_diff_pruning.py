"""Diff pruning on the synthetic scan model and tiny HF GPT-2: conformance checks 1-8, single layers
against the NumPy reference, the hard-concrete gate and its L0 penalty, training, and every error."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from tests import _hf_models as H
from tests import _models as M
from tests import _reference as R
from tests import test_conformance as C
from tests.methods import _common as K

METHODS = {
    "synthetic": jpeft.DiffPruning(targets=M.ALL_TARGETS, layouts=M.LAYOUTS),
    "gpt2": jpeft.DiffPruning(targets=("c_attn", "c_fc")),
}
MODELS = tuple(METHODS)
KINDS = {"embed": "embed", "dg_in": "dense_general", "dg_out": "dense_general", "conv": "conv"}
N_IN = {"dg_in": 1, "dg_out": 2}


def targets(name: str) -> dict[tuple[str, ...], str]:
    """Each target module and its kernel leaf, written from the models' definitions."""
    if name == "synthetic":
        out = {("embed",): "embedding"}
        out.update({("layers", m): "kernel" for m in ("q", "v", "o", "dg_in", "dg_out", "conv")})
        return out
    return {("transformer", "h", str(i), *m): "kernel" for i in range(H.LAYERS) for m in (("attn", "c_attn"), ("mlp", "c_fc"))}


def randomize(peft: Any, seed: int) -> Any:
    """``w ~ 0.3 N(0, 1)`` and ``log_alpha ~ 2 N(0, 1)``: some gates shut, some open, some between."""
    rng = np.random.RandomState(seed)

    def new(path: Any, x: Any) -> Any:
        names = [str(k.key) for k in path]
        if jpeft.RESERVED not in names:
            return x
        return jnp.asarray((0.3 if names[-1] == "w" else 2.0) * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(new, peft)


@functools.cache
def trees(name: str) -> tuple[Any, Any]:
    peft = jpeft.apply(METHODS[name], K.model(name)[0], key=jax.random.key(1))
    return peft, randomize(peft, seed=2)


@pytest.mark.parametrize("name", MODELS)
def test_1_identity_at_init(name):
    peft, _ = trees(name)
    for path, leaf in targets(name).items():
        deltas = K.get(peft, path)[jpeft.RESERVED]["default"]
        assert not np.any(deltas["w"]) and np.all(np.asarray(deltas["log_alpha"]) == 5.0)
        assert deltas["w"].shape == K.get(peft, path)[leaf].shape
    K.check_identity(name, METHODS[name], peft)


def test_2_each_layer_matches_numpy_reference():
    method = METHODS["synthetic"]
    _, peft = trees("synthetic")
    wrapped = jpeft.wrap(K.model("synthetic")[1], method)
    with nn.intercept_methods(M.capture(tuple(p[-1] for p in targets("synthetic")))):
        _, state = wrapped({"params": peft}, mutable=["intermediates"])
    seen = state["intermediates"]
    for path in targets("synthetic"):
        own = {k: v for k, v in K.get(peft, path).items() if k != jpeft.RESERVED}
        deltas = K.get(peft, path)[jpeft.RESERVED]["default"]
        xs, ys = K.get(seen, path)["x"][0], K.get(seen, path)["y"][0]
        stacked = path[0] == "layers"
        kind, n_in = KINDS.get(path[-1], "dense"), N_IN.get(path[-1], 1)
        for layer in range(M.LAYERS if stacked else 1):
            pick = (lambda t: {k: v[layer] for k, v in t.items()}) if stacked else (lambda t: t)  # noqa: B023
            x, y = (xs[layer], ys[layer]) if stacked else (xs, ys)
            d = pick(deltas)
            want = R.diff_pruning_forward(kind, x, pick(own), d["w"], d["log_alpha"], n_in=n_in)
            assert not np.allclose(want, R.forward(kind, x, pick(own), None, 0.0, n_in=n_in), **K.TOL)
            np.testing.assert_allclose(np.asarray(y), want, **K.TOL, err_msg=f"{'/'.join(path)} layer {layer}")


@pytest.mark.parametrize("kind", ["transposed", "conv2d", "dense_general", "embed"])
def test_2_single_layer_matches_numpy_reference(kind):
    layer, x, layout = C._layer(kind)
    model = C.One(layer)
    promotion = "allow" if kind == "transposed" else "raise"  # HF's Conv1D adds its bias by promotion
    with jax.numpy_rank_promotion(promotion):
        params = model.init(jax.random.key(0), x)["params"]
    method = jpeft.DiffPruning(targets=("layer",), layouts=((r"layer", layout),) if layout else ())
    peft = randomize(jpeft.apply(method, params, key=jax.random.key(1)), seed=3)
    deltas = peft["layer"][jpeft.RESERVED]["default"]

    def apply(variables, x):
        with jax.numpy_rank_promotion(promotion):
            return model.apply(variables, x)

    y = jpeft.wrap(apply, method)({"params": peft}, x)
    own = {k: w for k, w in peft["layer"].items() if k != jpeft.RESERVED}
    want = R.diff_pruning_forward({"conv2d": "conv"}.get(kind, kind), x, own, deltas["w"], deltas["log_alpha"], n_in=2)
    np.testing.assert_allclose(np.asarray(y), want, **K.TOL)
    leaf = "embedding" if kind == "embed" else "kernel"
    kernel = R.f64(own[leaf]) + R.hard_concrete_gate(deltas["log_alpha"]) * R.f64(deltas["w"])
    np.testing.assert_allclose(np.asarray(jpeft.merge(method, peft)["layer"][leaf]), kernel, **K.TOL)


@pytest.mark.parametrize("name", MODELS)
def test_3_4_merge_equals_wrapped_and_keeps_structure(name):
    _, peft = trees(name)
    K.check_merge(name, METHODS[name], peft, {path + (leaf,) for path, leaf in targets(name).items()})


@pytest.mark.parametrize("name", MODELS)
def test_5_grads_reach_exactly_w_and_log_alpha(name):
    _, peft = trees(name)
    grads = K.check_grads(name, METHODS[name], peft)
    assert set(grads) == {p + (jpeft.RESERVED, "default", leaf) for p in targets(name) for leaf in ("w", "log_alpha")}


@pytest.mark.parametrize("name", MODELS)
def test_6_trainable_count_is_closed_form(name):
    peft, _ = trees(name)
    params = K.model(name)[0]
    closed = sum(2 * math.prod(K.get(params, path)[leaf].shape) for path, leaf in targets(name).items())
    assert K.count(METHODS[name], peft) == METHODS[name].param_count(params) == closed


@pytest.mark.parametrize("name", MODELS)
def test_7_jit_agrees_and_does_not_retrace(name):
    K.check_jit(name, METHODS[name], *trees(name))


def test_8_scan_stacked_deltas_have_the_layer_axis():
    peft, _ = trees("synthetic")
    for path, leaf in targets("synthetic").items():
        kernel = K.get(peft, path)[leaf]
        deltas = K.get(peft, path)[jpeft.RESERVED]["default"]
        assert deltas["w"].shape == deltas["log_alpha"].shape == kernel.shape
        assert path[0] != "layers" or kernel.shape[0] == M.LAYERS


# --- the gate and the penalty ------------------------------------------------------------------
def test_regularizer_is_the_expected_l0_norm():
    method = METHODS["synthetic"]
    _, peft = trees("synthetic")
    log_alphas = [x for p, x in K.flat(peft).items() if p[-1] == "log_alpha"]
    want = sum(R.l0_penalty(x) for x in log_alphas)
    np.testing.assert_allclose(float(jpeft.regularizer(method, peft)), want, rtol=1e-5)
    # Traceable: it runs inside a jitted loss, and its gradient is the sigmoid's.
    grad = jax.jit(jax.grad(lambda t: jpeft.regularizer(method, t)))(peft)
    la = np.asarray(peft["layers"]["q"][jpeft.RESERVED]["default"]["log_alpha"], np.float64)
    s = 1 / (1 + np.exp(-(la - (2 / 3) * np.log(0.1 / 1.1))))
    np.testing.assert_allclose(grad["layers"]["q"][jpeft.RESERVED]["default"]["log_alpha"], s * (1 - s), rtol=1e-4)


@pytest.mark.parametrize("log_alpha", [-3.0, 0.0, 1.5])
def test_sampled_gate_is_nonzero_with_the_penalty_probability(log_alpha):
    # The penalty term sigmoid(log_alpha - beta log(-gamma/zeta)) is P(z != 0) under the sampler.
    method = jpeft.DiffPruning(targets="q")
    z = np.asarray(method.gate(jnp.full((200_000,), log_alpha), jax.random.key(0)))
    assert z.min() >= 0 and z.max() <= 1 and np.any(z == 0)
    np.testing.assert_allclose(np.mean(z > 0), R.l0_penalty(np.asarray([log_alpha])), atol=5e-3)
    if log_alpha > 0:
        assert np.any(z == 1), "the stretch makes z exactly 1 with non-zero probability"


def test_dropout_rng_samples_the_gates_and_none_is_deterministic():
    method = METHODS["synthetic"]
    _, peft = trees("synthetic")
    wrapped = jax.jit(lambda p, k: jpeft.wrap(K.model("synthetic")[1], method)({"params": p}, rngs={"dropout": k}))
    one, two = wrapped(peft, jax.random.key(1)), wrapped(peft, jax.random.key(2))
    assert not np.allclose(one, two)
    np.testing.assert_array_equal(wrapped(peft, jax.random.key(1)), one)
    # Without an rng, the deterministic gate: the merged model.
    merged = jpeft.merge(method, peft)
    np.testing.assert_allclose(K.base_fn("synthetic")(merged), K.jitted("synthetic", method)[0](peft), **K.TOL)


def test_penalty_lowers_the_nonzero_fraction():
    # Also the training test: both runs lower the loss and leave every frozen leaf bit-identical.
    method = jpeft.DiffPruning(targets=("up", "down"))
    peft = jpeft.apply(method, K.model("mlp")[0], key=jax.random.key(1))
    fractions = {}
    for lam in (0.0, 0.1):
        trained = K.check_training("mlp", method, peft, steps=100, lr=5e-2, penalty=lam, sample=True)
        fractions[lam] = method.nonzero_fraction(trained)
    # Measured: 1.0 without the penalty and 0.44 with lam = 0.1 (24 of 54 entries).
    assert fractions[0.1] < 0.75 * fractions[0.0], fractions


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(beta=0.0), r"DiffPruning\(beta=0.0\): beta must be a number > 0"),
        (dict(gamma=0.1), r"DiffPruning\(gamma=0.1\): gamma must be a number < 0"),
        (dict(zeta=1.0), r"DiffPruning\(zeta=1.0\): zeta must be a number > 1"),
        (dict(log_alpha_init=float("nan")), r"log_alpha_init must be a finite number"),
        (dict(layouts=((1,),)), r"layouts must be a sequence of \(regex, layout\) pairs"),
        (dict(layouts=(("q", "diagonal"),)), r"unknown layout 'diagonal' for 'q'"),
        (dict(dtype="int8"), r"DiffPruning\(dtype='int8'\): dtype must name a float dtype"),
        (dict(targets=("nothing",)), r"DiffPruning\(targets=\(.nothing.,\)\) matched 0 of 1 module paths"),
    ],
)
def test_bad_fields_raise(kw, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        method = jpeft.DiffPruning(**{"targets": "q", **kw})
        jpeft.apply(method, {"x": {"kernel": jnp.ones((2, 2))}}, key=jax.random.key(0))


def test_integer_kernel_raises():
    params = {"q": {"kernel": jnp.ones((2, 2), jnp.int8)}}
    with pytest.raises(jpeft.JpeftError, match=r"DiffPruning: q/kernel has dtype int8, expected a float kernel"):
        jpeft.apply(jpeft.DiffPruning(targets=("q",)), params, key=jax.random.key(0))


def test_deltas_of_another_shape_raise_at_forward():
    params = {"kernel": jnp.ones((3, 2))}
    method = jpeft.DiffPruning(targets=".*")
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    peft[jpeft.RESERVED]["default"]["w"] = jnp.ones((2, 3))
    layer = jpeft.wrap(nn.Dense(2, use_bias=False).apply, method)
    with pytest.raises(jpeft.JpeftError, match=r"w/log_alpha have shapes \(2, 3\)/\(3, 2\), expected the kernel's \(3, 2\)"):
        layer({"params": peft}, jnp.ones((1, 3)))


def test_nonzero_fraction_without_deltas_raises():
    with pytest.raises(jpeft.JpeftError, match=r"nonzero_fraction: the tree holds no deltas of adapter 'default'"):
        jpeft.DiffPruning(targets="q").nonzero_fraction({"q": {"kernel": jnp.ones((2, 2))}})
