"""Named adapters on one tree: remove, stacked and mixed-batch wrap, and add_weighted."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from tests import _hf_models as H
from tests import _models as M

TOL = dict(rtol=1e-5, atol=1e-5)
R = jpeft.RESERVED


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(nn.Dense(6, name="up")(x))
        return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(5, name="down")(h)))


X = jax.random.normal(jax.random.key(7), (6, 4))


@functools.cache
def mlp_params() -> dict[str, Any]:
    return MLP().init(jax.random.key(0), X)["params"]


def with_adapters(method: jpeft.LoRA, names: tuple[str, ...], params: Any = None, seed: int = 0) -> Any:
    tree = mlp_params() if params is None else params
    for i, n in enumerate(names):
        tree = jpeft.apply(method, tree, key=jax.random.key(i + 1), name=n)
    return M.random_deltas(tree, seed, scale=0.3)


def numpy_mlp(tree: Any, deltas: dict[str, list[tuple[np.ndarray, np.ndarray, float]]], x: np.ndarray) -> np.ndarray:
    """The MLP in NumPy with ``W + sum_j w_j s_j a_j b_j`` per module."""

    def dense(name: str, h: np.ndarray) -> np.ndarray:
        w = np.asarray(tree[name]["kernel"], np.float64)
        for a, b, scale in deltas.get(name, []):
            w = w + scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
        return h @ w + np.asarray(tree[name]["bias"], np.float64)

    return dense("head", np.tanh(dense("down", np.tanh(dense("up", np.asarray(x, np.float64))))))


def factors(tree: Any, name: str, scale: float, modules=("up", "down")) -> dict[str, list]:
    return {m: [(tree[m][R][name]["lora_a"], tree[m][R][name]["lora_b"], scale)] for m in modules}


# --- remove ------------------------------------------------------------------------------------
def test_remove_one_keeps_the_others_and_the_base_objects():
    method = jpeft.LoRA(targets=("up", "down"), rank=2)
    tree = with_adapters(method, ("a", "b"))
    out = jpeft.remove(tree, "a")
    assert jpeft.adapters(out) == ["b"]
    assert out["up"]["kernel"] is tree["up"]["kernel"]
    assert out["up"][R]["b"]["lora_a"] is tree["up"][R]["b"]["lora_a"]
    assert jpeft.adapters(tree) == ["a", "b"]  # input not mutated
    base = jpeft.remove(out, "b")
    assert jax.tree.structure(base) == jax.tree.structure(mlp_params())


def test_remove_unknown_name_raises():
    tree = with_adapters(jpeft.LoRA(targets=("up",), rank=2), ("a",))
    with pytest.raises(jpeft.JpeftError, match=r"no adapter 'zz'; it holds \['a'\]"):
        jpeft.remove(tree, "zz")


# --- stacked and mixed batches -----------------------------------------------------------------
def test_stacked_adapters_add_their_changes():
    method = jpeft.LoRA(targets=("up", "down"), rank=2, alpha=4.0)
    tree = with_adapters(method, ("a", "b"))
    got = jpeft.wrap(MLP().apply, method, active=["a", "b"])({"params": tree}, X)
    fa, fb = factors(tree, "a", method.scale), factors(tree, "b", method.scale)
    want = numpy_mlp(tree, {m: fa[m] + fb[m] for m in fa}, np.asarray(X))
    np.testing.assert_allclose(got, want, **TOL)


def test_mixed_batch_rows_equal_single_adapter_runs():
    method = jpeft.LoRA(targets=("up", "down"), rank=2, alpha=4.0)
    tree = with_adapters(method, ("a", "b"))
    index = jnp.array([0, 1, -1, 1, 0, -1])
    mixed = jax.jit(lambda t, i: jpeft.wrap(MLP().apply, method, active=["a", "b"])({"params": t}, X, adapter_index=i))
    got = mixed(tree, index)
    singles = {n: jpeft.wrap(MLP().apply, method, active=n)({"params": tree}, X) for n in ("a", "b")}
    base = MLP().apply({"params": mlp_params()}, X)
    for row, i in enumerate(np.asarray(index)):
        want = base[row] if i < 0 else singles[("a", "b")[i]][row]
        np.testing.assert_allclose(got[row], want, **TOL)


def test_mixed_batch_on_tiny_gpt2():
    hf = H.make("gpt2")
    method = jpeft.LoRA(targets=("c_attn", "c_proj"), rank=2, alpha=4.0)
    tree = M.random_deltas(jpeft.apply(method, jpeft.apply(method, hf.params, key=jax.random.key(1), name="x"),
                                 key=jax.random.key(2), name="y"), seed=5, scale=0.3)
    index = jnp.array([1, 0])  # the batch has 2 rows
    got = hf.logits(jpeft.wrap(hf.apply, method, active=("x", "y"))({"params": tree}, **hf.inputs, adapter_index=index))
    for row, name in enumerate(("y", "x")):
        alone = hf.logits(jpeft.wrap(hf.apply, method, active=name)({"params": tree}, **hf.inputs))
        np.testing.assert_allclose(got[row], alone[row], **TOL)


def test_mixed_batch_on_the_scanned_model():
    method = jpeft.LoRA(targets=M.LINEAR_TARGETS, rank=2, layouts=M.LAYOUTS)
    tree = M.params()
    for i, n in enumerate(("a", "b")):
        tree = jpeft.apply(method, tree, key=jax.random.key(i), name=n)
    tree = M.random_deltas(tree, seed=3, scale=0.3)
    ids = M.inputs()
    index = jnp.array([1, -1])
    run = jpeft.wrap(M.Model().apply, method, active=("a", "b"))
    got = run({"params": tree}, ids, adapter_index=index)
    np.testing.assert_allclose(got[0], jpeft.wrap(M.Model().apply, method, active="b")({"params": tree}, ids)[0], **TOL)
    np.testing.assert_allclose(got[1], M.Model().apply({"params": M.params()}, ids)[1], **TOL)


@pytest.mark.parametrize(
    "index,match",
    [
        (jnp.zeros((6, 1), jnp.int32), "1-D int array"),
        (jnp.zeros((6,), jnp.float32), "1-D int array"),
        (jnp.zeros((5,), jnp.int32), "5 entries but the batch has 6"),
        (jnp.array([0, 1, 2, 0, 0, 0]), r"holds \[2\]; valid are -1 \(base\) and 0..1"),
    ],
)
def test_bad_adapter_index_raises(index, match):
    method = jpeft.LoRA(targets=("up",), rank=2)
    tree = with_adapters(method, ("a", "b"))
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.wrap(MLP().apply, method, active=["a", "b"])({"params": tree}, X, adapter_index=index)


def test_bad_active_raises():
    method = jpeft.LoRA(targets=("up",), rank=2)
    tree = with_adapters(method, ("a",))
    with pytest.raises(jpeft.JpeftError, match="distinct adapters"):
        jpeft.wrap(MLP().apply, method, active=["a", "a"])
    with pytest.raises(jpeft.JpeftError, match=r"no deltas of adapter 'b' \(it holds \['a'\]\)"):
        jpeft.wrap(MLP().apply, method, active=["a", "b"])({"params": tree}, X)


# --- add_weighted ------------------------------------------------------------------------------
@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_single_adapter_at_weight_one_equals_it(combination):
    method = jpeft.LoRA(targets=("up", "down"), rank=2, alpha=4.0)
    tree = with_adapters(method, ("a",))
    new, out = jpeft.add_weighted(tree, {"a": 1.0}, method=method, combination=combination, name="w")
    assert new.scale == 1.0 and new.rank == 2
    got = jpeft.wrap(MLP().apply, new, active="w")({"params": out}, X)
    want = jpeft.wrap(MLP().apply, method, active="a")({"params": tree}, X)
    np.testing.assert_allclose(got, want, **TOL)
    assert out["up"][R]["a"]["lora_a"] is tree["up"][R]["a"]["lora_a"]


def test_add_weighted_cat_and_svd_are_the_exact_weighted_sum():
    ma = jpeft.LoRA(targets=("up", "down"), rank=2, alpha=4.0)
    mb = jpeft.LoRA(targets=("up", "down"), rank=1, alpha=3.0)
    tree = M.random_deltas(jpeft.apply(mb, jpeft.apply(ma, mlp_params(), key=jax.random.key(1), name="a"),
                                 key=jax.random.key(2), name="b"), seed=9, scale=0.3)
    weights = {"a": 0.7, "b": -0.4}
    fa, fb = factors(tree, "a", 0.7 * ma.scale), factors(tree, "b", -0.4 * mb.scale)
    want = numpy_mlp(tree, {m: fa[m] + fb[m] for m in fa}, np.asarray(X))
    for combination, extra in (("cat", {}), ("svd", {"svd_rank": 3})):  # svd defaults to max rank (2)
        new, out = jpeft.add_weighted(tree, weights, method={"a": ma, "b": mb}, combination=combination, **extra)
        assert new.rank == 3
        got = jpeft.wrap(MLP().apply, new, active="weighted")({"params": out}, X)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_add_weighted_linear_follows_hf_peft():
    method = jpeft.LoRA(targets=("up",), rank=2, alpha=4.0)
    tree = with_adapters(method, ("a", "b"))
    _, out = jpeft.add_weighted(tree, {"a": 0.25, "b": 0.5}, method=method)
    s, up = method.scale, tree["up"][R]
    np.testing.assert_allclose(
        out["up"][R]["weighted"]["lora_a"], np.sqrt(0.25 * s) * up["a"]["lora_a"] + np.sqrt(0.5 * s) * up["b"]["lora_a"],
        **TOL,
    )


def test_add_weighted_on_stacked_factors():
    method = jpeft.LoRA(targets=r"layers/(q|v)", rank=2)
    tree = M.params()
    for i, n in enumerate(("a", "b")):
        tree = jpeft.apply(method, tree, key=jax.random.key(i), name=n)
    tree = M.random_deltas(tree, seed=4, scale=0.3)
    ids = M.inputs()
    new, out = jpeft.add_weighted(tree, {"a": 1.0, "b": 1.0}, method=method, combination="svd", svd_rank=4)
    got = jpeft.wrap(M.Model().apply, new, active="weighted")({"params": out}, ids)
    want = jpeft.wrap(M.Model().apply, method, active=["a", "b"])({"params": tree}, ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weights={"a": 1.0}, combination="ties"), "combination='ties'"),
        (dict(weights={}), "non-empty mapping"),
        (dict(weights={"zz": 1.0}), "no adapter 'zz'"),
        (dict(weights={"a": 1.0}, name="b"), "'b' exists already"),
        (dict(weights={"a": -1.0}), "'linear' takes sqrt"),
        (dict(weights={"a": float("nan")}), "finite number"),
        (dict(weights={"a": 1.0}, combination="svd", svd_rank=99), "svd rank 99 exceeds"),
        (dict(weights={"a": 1.0}, combination="svd", svd_rank=0), "svd_rank must be a positive int"),
    ],
)
def test_add_weighted_errors(kwargs, match):
    method = jpeft.LoRA(targets=("up",), rank=2)
    tree = with_adapters(method, ("a", "b"))
    weights = kwargs.pop("weights")
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.add_weighted(tree, weights, method=method, **kwargs)


def test_add_weighted_refuses_unequal_linear_ranks_dora_and_other_targets():
    m2, m1 = jpeft.LoRA(targets=("up",), rank=2), jpeft.LoRA(targets=("up",), rank=1)
    tree = jpeft.apply(m1, jpeft.apply(m2, mlp_params(), key=jax.random.key(1), name="a"), key=jax.random.key(2), name="b")
    with pytest.raises(jpeft.JpeftError, match="'linear' needs equal ranks"):
        jpeft.add_weighted(tree, {"a": 1.0, "b": 1.0}, method={"a": m2, "b": m1})
    dora = jpeft.DoRA(targets=("up",), rank=2)
    with pytest.raises(jpeft.JpeftError, match="uses DoRA"):
        jpeft.add_weighted(jpeft.apply(dora, mlp_params(), key=jax.random.key(1)), {"default": 1.0}, method=dora)
    other = jpeft.apply(jpeft.LoRA(targets=("down",), rank=2), tree, key=jax.random.key(3), name="c")
    with pytest.raises(jpeft.JpeftError, match="sit on different modules"):
        jpeft.add_weighted(other, {"a": 1.0, "c": 1.0}, method=m2)
    with pytest.raises(jpeft.JpeftError, match="needs its LoRA method"):
        jpeft.add_weighted(tree, {"a": 1.0, "b": 1.0}, method={"a": m2})
