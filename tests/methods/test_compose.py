"""jpeft.compose: namespaced deltas, combined labels, merge and summary, ordering and conflicts."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
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


def lora_pair() -> jpeft.Compose:
    return jpeft.compose(jpeft.LoRAPlus(targets=("up",), rank=2, alpha=4.0), jpeft.LoRAFA(targets=("down",), rank=3))


def numpy_mlp(tree: Any, method: jpeft.Compose, x: np.ndarray) -> np.ndarray:
    def dense(name: str, h: np.ndarray) -> np.ndarray:
        w = np.asarray(tree[name]["kernel"], np.float64)
        if R in tree[name]:
            for key, deltas in tree[name][R]["default"].items():
                scale = method.methods[method.keys.index(key)].scale
                w = w + scale * np.asarray(deltas["lora_a"], np.float64) @ np.asarray(deltas["lora_b"], np.float64)
        return h @ w + np.asarray(tree[name]["bias"], np.float64)

    return dense("head", np.tanh(dense("down", np.tanh(dense("up", np.asarray(x, np.float64))))))


def test_deltas_are_namespaced_per_component():
    method = lora_pair()
    tree = jpeft.apply(method, mlp_params(), key=jax.random.key(1))
    assert jpeft.list_paths(tree)[:4] == [
        "down/__jpeft__/default/lorafa/lora_a",
        "down/__jpeft__/default/lorafa/lora_b",
        "down/bias",
        "down/kernel",
    ]
    assert list(tree["up"][R]["default"]) == ["loraplus"]
    np.testing.assert_allclose(jpeft.wrap(MLP().apply, method)({"params": tree}, X), MLP().apply({"params": mlp_params()}, X))


def test_wrapped_equals_numpy_and_merge():
    method = lora_pair()
    tree = M.random_deltas(jpeft.apply(method, mlp_params(), key=jax.random.key(1)), seed=2, scale=0.3)
    got = jpeft.wrap(MLP().apply, method)({"params": tree}, X)
    np.testing.assert_allclose(got, numpy_mlp(tree, method, np.asarray(X)), **TOL)
    merged = jpeft.merge(method, tree)
    assert jax.tree.structure(merged) == jax.tree.structure(mlp_params())
    assert merged["head"]["kernel"] is tree["head"]["kernel"]
    np.testing.assert_allclose(MLP().apply({"params": merged}, X), got, **TOL)


def test_labels_optimizer_and_count_combine_the_components():
    method = lora_pair()
    tree = M.random_deltas(jpeft.apply(method, mlp_params(), key=jax.random.key(1)), seed=2, scale=0.3)
    lab = jpeft.labels(method, tree)
    assert lab["up"][R]["default"]["loraplus"] == {"lora_a": "loraplus:lora_a", "lora_b": "loraplus:lora_b"}
    assert lab["down"][R]["default"]["lorafa"] == {"lora_a": "frozen", "lora_b": "lorafa:trainable"}
    assert lab["up"]["kernel"] == "frozen"
    # LoRA+'s B moves lr_ratio times further than its A under Adam's first step (sign-like update).
    tx = jpeft.optimizer(optax.adam(1e-2), method, tree)
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    up = updates["up"][R]["default"]["loraplus"]
    np.testing.assert_allclose(up["lora_b"], 16.0 * up["lora_a"][0, 0], rtol=1e-5)
    assert float(jnp.abs(updates["down"][R]["default"]["lorafa"]["lora_a"]).max()) == 0.0
    assert float(jnp.abs(updates["up"]["kernel"]).max()) == 0.0
    want = 2 * (4 + 6) + 3 * 5  # LoRA+ on up (4->6), LoRA-FA on down trains B only (3 x 5)
    assert method.param_count(mlp_params()) == want
    assert f"trainable params: {want:,}" in jpeft.summary(method, tree)


def test_gradients_reach_exactly_the_trainable_leaves():
    method = lora_pair()
    tree = M.random_deltas(jpeft.apply(method, mlp_params(), key=jax.random.key(1)), seed=2, scale=0.3)
    trainable, frozen = jpeft.split(method, tree)
    wrapped = jpeft.wrap(MLP().apply, method)
    grads = jax.grad(lambda t: jnp.sum(wrapped({"params": jpeft.combine(t, frozen)}, X) ** 2))(trainable)
    got = {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert got == {
        "up/__jpeft__/default/loraplus/lora_a",
        "up/__jpeft__/default/loraplus/lora_b",
        "down/__jpeft__/default/lorafa/lora_b",
    }
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_on_the_scanned_model_under_jit():
    method = jpeft.compose(jpeft.LoRA(targets=r"layers/q", rank=2), jpeft.DoRA(targets=r"layers/v", rank=2))
    tree = M.random_deltas(jpeft.apply(method, M.params(), key=jax.random.key(1)), seed=3, scale=0.3)
    assert tree["layers"]["q"][R]["default"]["lora"]["lora_a"].shape == (M.LAYERS, M.D, 2)
    ids = M.inputs()
    run = jpeft.wrap(M.Model().apply, method)
    eager = run({"params": tree}, ids)
    np.testing.assert_allclose(jax.jit(run)({"params": tree}, ids), eager, **TOL)
    np.testing.assert_allclose(M.Model().apply({"params": jpeft.merge(method, tree)}, ids), eager, rtol=1e-4, atol=1e-5)


def test_nested_compose_flattens_and_keys_are_unique():
    inner = jpeft.compose(jpeft.LoRA(targets=("up",)), jpeft.LoRA(targets=("down",)))
    outer = jpeft.compose(inner, jpeft.LoRA(targets=("head",)))
    assert outer.keys == ("lora", "lora2", "lora3")
    assert hash(outer) == hash(jpeft.compose(inner, jpeft.LoRA(targets=("head",))))


def test_two_components_with_one_role_on_one_module_raise():
    method = jpeft.compose(jpeft.LoRA(targets=("up",), rank=2), jpeft.DoRA(targets=("up", "down"), rank=2))
    with pytest.raises(jpeft.JpeftError, match=r"'lora' and 'dora' both act on 'up' as 'weight' methods"):
        jpeft.apply(method, mlp_params(), key=jax.random.key(0))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: jpeft.Compose(methods=()), "non-empty sequence of jpeft methods"),
        (lambda: jpeft.Compose(methods=(jpeft.LoRA(targets="q"), "lora")), "non-empty sequence"),
        (lambda: jpeft.compose(jpeft.LoRA(targets="q"), keys=("a/b",)), "distinct non-empty str"),
        (lambda: jpeft.compose(jpeft.LoRA(targets="q"), jpeft.LoRA(targets="v"), keys=("a", "a")), "distinct"),
    ],
)
def test_bad_compositions_raise(make, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        make()


def test_tree_of_another_method_raises_in_labels():
    tree = jpeft.apply(jpeft.LoRA(targets=("up",), rank=2), mlp_params(), key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match="belongs to no component"):
        jpeft.labels(lora_pair(), tree)
