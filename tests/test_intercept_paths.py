"""The interceptor's side paths (mixed batch, AdapterDrop) with methods other than LoRA.

Two bugs these guard: the mixed-batch and runtime-drop paths handed ``forward`` a ``next_fun`` that
returned a precomputed base output, so (IA)^3's feed-forward ``ia3_in`` (which scales the module's
*input*) had no effect; and the skipped/base path called a QLoRA module's own ``__call__`` on its
NF4 kernel. Every oracle is NumPy on a two-layer MLP (QLoRA: on the kernels dequantised by
``jpeft.dequantize``, the same as the base model with dequantised kernels).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft

R = jpeft.RESERVED
TOL = dict(rtol=1e-5, atol=1e-5)
PATTERN = r"^w(\d)$"  # w1 is layer 1, w2 layer 2


class MLP(nn.Module):
    hidden: int
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.out, name="w2")(nn.relu(nn.Dense(self.hidden, name="w1")(x)))


def np_params(tree: Any) -> dict[str, np.ndarray]:
    return {f"{m}/{k}": np.asarray(tree[m][k], np.float64) for m in ("w1", "w2") for k in ("kernel", "bias")}


# --- (IA)^3 with a feed-forward (input-side) vector -----------------------------------------------
IA3 = jpeft.IA3(targets=("w1", "w2"), feedforward=("w2",))
X = np.random.RandomState(0).standard_normal((4, 5)).astype(np.float32)


@functools.cache
def ia3_setup() -> tuple[MLP, dict[str, Any]]:
    """The model and a tree with two adapters 'a' and 'b' holding distinct non-trivial vectors."""
    model = MLP(hidden=6, out=3)
    params = model.init(jax.random.key(0), X)["params"]
    rng = np.random.RandomState(1)
    tree = params
    for name in ("a", "b"):
        tree = jpeft.apply(IA3, tree, key=jax.random.key(2), name=name)
        for m in ("w1", "w2"):
            d = tree[m][R][name]
            tree[m][R][name] = {k: jnp.asarray(1 + 0.5 * rng.standard_normal(v.shape), v.dtype) for k, v in d.items()}
    return model, tree


def np_ia3(tree: Any, x: np.ndarray, name: str | None) -> np.ndarray:
    """``((relu((x W1 + b1) * l1)) * l_ff) W2 + b2``; ``name=None`` is the base model."""
    p = np_params(tree)
    l1 = np.asarray(tree["w1"][R][name]["ia3_out"], np.float64) if name else 1.0
    lff = np.asarray(tree["w2"][R][name]["ia3_in"], np.float64) if name else 1.0
    h = np.maximum((x @ p["w1/kernel"] + p["w1/bias"]) * l1, 0)
    return (h * lff) @ p["w2/kernel"] + p["w2/bias"]


def test_ia3_mixed_batch_rows_equal_each_adapter_alone():
    model, tree = ia3_setup()
    assert sorted(tree["w2"][R]["a"]) == ["ia3_in"]  # the feed-forward vector scales w2's input
    fn = jpeft.wrap(model.apply, IA3, active=("a", "b"))
    index = jnp.asarray([0, 1, -1, 0])
    got = np.asarray(fn({"params": tree}, X, adapter_index=index))
    for row, name in enumerate(["a", "b", None, "a"]):
        np.testing.assert_allclose(got[row], np_ia3(tree, X[row : row + 1], name)[0], **TOL)
    # The case: one adapter, every row on it.
    one = jpeft.wrap(model.apply, IA3, active="a")({"params": tree}, X[:2], adapter_index=jnp.asarray([0, 0]))
    np.testing.assert_allclose(one, np_ia3(tree, X[:2], "a"), **TOL)


def test_ia3_drop_random_zero_keeps_the_input_vector_gradient():
    model, tree = ia3_setup()
    plain = jpeft.wrap(model.apply, IA3, active="a")
    dropping = jpeft.wrap(model.apply, IA3, active="a", drop_random=0, layer_pattern=PATTERN)

    def loss(fn: Any, t: Any) -> jax.Array:
        return jnp.sum(fn({"params": t}, X, rngs={"dropout": jax.random.key(3)}) ** 2)

    g_plain = jax.grad(functools.partial(loss, plain))(tree)["w2"][R]["a"]["ia3_in"]
    g_drop = jax.grad(functools.partial(loss, dropping))(tree)["w2"][R]["a"]["ia3_in"]
    assert np.abs(np.asarray(g_plain)).max() > 0.1  # (a dead ReLU unit gives one entry 0)
    np.testing.assert_allclose(g_drop, g_plain, **TOL)
    out = dropping({"params": tree}, X, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_allclose(out, np_ia3(tree, X, "a"), **TOL)


def assert_draws_cover(fn, tree, oracles) -> None:
    """Over 8 dropout keys, every output equals one of ``oracles`` (one per number of dropped layers), and both occur."""
    seen = set()
    for seed in range(8):
        got = np.asarray(fn(tree, jax.random.key(seed)))
        hits = [i for i, o in enumerate(oracles) if np.allclose(got, o, **TOL)]
        assert hits, "the output matches no prefix of dropped layers"
        seen.update(hits)
    assert seen == {0, 1}


def test_ia3_drop_random_drops_a_prefix_of_layers():
    model, tree = ia3_setup()
    fn = jax.jit(lambda t, k: jpeft.wrap(model.apply, IA3, active="a", drop_random=2, layer_pattern=PATTERN)(
        {"params": t}, X, rngs={"dropout": k}
    ))
    only_l2 = {m: dict(tree[m]) for m in tree}
    only_l2["w1"][R] = {"a": {"ia3_out": jnp.ones_like(tree["w1"][R]["a"]["ia3_out"])}}
    # n is drawn from 0..2 and layers < n run without deltas: n=0, 1 -> both layers adapted; 2 -> w1 plain.
    oracles = [np_ia3(tree, X, "a"), np_ia3(only_l2, X, "a")]
    assert_draws_cover(fn, tree, oracles)


def test_ia3_mixed_batch_in_a_composition_with_lora():
    """The input-side vector inside ``compose`` (its forward chains the components' next_funs)."""
    model, _ = ia3_setup()
    method = jpeft.compose(jpeft.IA3(targets=("w2",), feedforward=("w2",)), jpeft.LoRA(targets=("w1",), rank=2, alpha=4.0))
    params = model.init(jax.random.key(0), X)["params"]
    tree = jpeft.apply(method, params, key=jax.random.key(4), name="a")
    rng = np.random.RandomState(5)
    tree = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.asarray(1 + 0.5 * rng.standard_normal(v.shape), v.dtype) if R in str(p) else v, tree
    )
    got = np.asarray(jpeft.wrap(model.apply, method, active="a")({"params": tree}, X, adapter_index=jnp.asarray([0, -1, 0, 0])))
    p = np_params(tree)
    lff = np.asarray(tree["w2"][R]["a"]["ia3"]["ia3_in"], np.float64)
    a, b = (np.asarray(tree["w1"][R]["a"]["lora"][k], np.float64) for k in ("lora_a", "lora_b"))
    h = np.maximum(X @ p["w1/kernel"] + p["w1/bias"] + 2.0 * (X @ a @ b), 0)
    want = (h * lff) @ p["w2/kernel"] + p["w2/bias"]
    base = np.maximum(X @ p["w1/kernel"] + p["w1/bias"], 0) @ p["w2/kernel"] + p["w2/bias"]
    np.testing.assert_allclose(got[[0, 2, 3]], want[[0, 2, 3]], **TOL)
    np.testing.assert_allclose(got[1], base[1], **TOL)


# --- QLoRA: the skipped and base paths compute the dequantised layer -------------------------------
QLORA = jpeft.QLoRA(targets=("w1", "w2"), rank=2, alpha=4.0, quant=jpeft.NF4(block_size=64), compute_dtype="float32")
XQ = np.random.RandomState(6).standard_normal((3, 64)).astype(np.float32)


@functools.cache
def qlora_setup() -> tuple[MLP, dict[str, Any], dict[str, np.ndarray]]:
    """The model, a quantised tree with adapters 'a' and 'b' (random factors), and the dequantised base in NumPy."""
    model = MLP(hidden=64, out=8)
    q = jpeft.quantize(model.init(jax.random.key(0), XQ)["params"], QLORA)
    tree = q
    rng = np.random.RandomState(7)
    for name in ("a", "b"):
        tree = jpeft.apply(QLORA, tree, key=jax.random.key(8), name=name)
        for m in ("w1", "w2"):
            d = tree[m][R][name]
            tree[m][R][name] = {k: jnp.asarray(0.2 * rng.standard_normal(v.shape), v.dtype) for k, v in d.items()}
    return model, tree, np_params(jpeft.dequantize(q))


def np_qlora(tree: Any, x: np.ndarray, name: str | None, dropped: tuple[int, ...] = ()) -> np.ndarray:
    """The MLP on dequantised kernels plus ``s x A B`` at every layer not in ``dropped``."""
    _, _, p = qlora_setup()
    h = x.astype(np.float64)
    for i, m in ((1, "w1"), (2, "w2")):
        y = h @ p[f"{m}/kernel"] + p[f"{m}/bias"]
        if name is not None and i not in dropped:
            a, b = (np.asarray(tree[m][R][name][k], np.float64) for k in ("lora_a", "lora_b"))
            y = y + QLORA.scale * (h @ a @ b)
        h = np.maximum(y, 0) if i == 1 else y
    return h


def test_qlora_drop_layers_runs_dequantised_base_at_dropped_layers():
    model, tree, _ = qlora_setup()
    for dropped in ((1,), (1, 2)):
        fn = jpeft.wrap(model.apply, QLORA, active="a", drop_layers=dropped, layer_pattern=PATTERN)
        np.testing.assert_allclose(fn({"params": tree}, XQ), np_qlora(tree, XQ, "a", dropped), **TOL)


def test_qlora_drop_random_equals_a_prefix_of_dropped_layers():
    model, tree, _ = qlora_setup()
    wrapped = jpeft.wrap(model.apply, QLORA, active="a", drop_random=2, layer_pattern=PATTERN)
    fn = jax.jit(lambda t, k: wrapped({"params": t}, XQ, rngs={"dropout": k}))
    oracles = [np_qlora(tree, XQ, "a"), np_qlora(tree, XQ, "a", (1,))]
    assert_draws_cover(fn, tree, oracles)


def test_qlora_mixed_batch_rows_equal_each_adapter_alone():
    model, tree, _ = qlora_setup()
    fn = jpeft.wrap(model.apply, QLORA, active=("a", "b"))
    got = np.asarray(fn({"params": tree}, XQ, adapter_index=jnp.asarray([1, -1, 0])))
    for row, name in enumerate(["b", None, "a"]):
        np.testing.assert_allclose(got[row], np_qlora(tree, XQ[row : row + 1], name)[0], **TOL)


@pytest.mark.parametrize("names", [("a",), ("a", "b")])
def test_qlora_stacked_adapters_add_their_changes(names):
    """Stacked adapters on a quantised layer: the outer one must not drop the inner one's change."""
    model, tree, _ = qlora_setup()
    got = jpeft.wrap(model.apply, QLORA, active=names)({"params": tree}, XQ)
    _, _, p = qlora_setup()
    h = XQ.astype(np.float64)
    for i, m in ((1, "w1"), (2, "w2")):
        y = h @ p[f"{m}/kernel"] + p[f"{m}/bias"]
        for n in names:
            a, b = (np.asarray(tree[m][R][n][k], np.float64) for k in ("lora_a", "lora_b"))
            y = y + QLORA.scale * (h @ a @ b)
        h = np.maximum(y, 0) if i == 1 else y
    np.testing.assert_allclose(got, h, **TOL)
