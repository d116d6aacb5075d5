"""The training API on NNX models (issue 11): filters, nnx.Optimizer, the lean path, labels and friends.

Oracles are independent of the NNX backend: the linen twin (``tests/_models.Model``) with the same
weights and deltas, trained by the linen functions; and the base variables' own values before training.
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

IDS = M.inputs()
LR = 1e-2


def _loss(logits: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, IDS).mean()


def _pair(method: jpeft.Method, seed: int = 3) -> tuple[dict, nnx.Module]:
    """The linen tree and the NNX twin with the same weights and (random, non-zero) deltas."""
    linen = jpeft.apply(method, M.params(), key=jax.random.key(1))
    if method.has_deltas:
        linen = M.random_deltas(linen, seed)
    model = jpeft.apply(method, N.synthetic(), key=jax.random.key(1))
    N.load(model, linen)
    return linen, model


def _flat(tree: dict) -> dict[str, np.ndarray]:
    return {p: np.asarray(jpeft._tree.get(tree, tuple(p.split("/")))) for p in jpeft.list_paths(tree)}


def _state(model: nnx.Module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}


LORA = jpeft.LoRA(targets=("q", "v"), rank=2, alpha=4.0)
LORA_FA = jpeft.LoRAFA(targets=("q", "v"), rank=2, alpha=4.0)
ADALORA = jpeft.AdaLoRA(targets=("q", "v"), init_r=3, target_r=2, tinit=1, tfinal=1, total_step=5, delta_t=1)
METHODS = {
    "LoRA": LORA,
    "LoRAFA": LORA_FA,
    "LoRAPlus": jpeft.LoRAPlus(targets=("q", "v"), rank=2, alpha=4.0, lr_ratio=16.0),
    "AdaLoRA": ADALORA,
    "IA3": jpeft.IA3(targets=("k", "v", "o"), feedforward=("o",)),
    "DiffPruning": jpeft.DiffPruning(targets=("q", "v")),
    "BitFit": jpeft.BitFit(),
    "Freeze": jpeft.Freeze(trainable_layers=1, scan_layers=r"layers/.*"),
    "Full": jpeft.Full(),
}


# --- nnx.Optimizer with NNX filters --------------------------------------------------------------
@pytest.mark.parametrize("wrt", [nnx.LoRAParam, jpeft.Delta], ids=["LoRAParam", "Delta"])
def test_optimizer_filter_trains_deltas_only(wrt):
    _, model = _pair(LORA)
    before = _state(model)
    opt = nnx.Optimizer(model, optax.adam(LR), wrt=wrt)

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: _loss(m(IDS)), argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)

    for _ in range(2):
        step(model, opt)
    after = _state(model)
    assert before.keys() == after.keys()
    for path, value in before.items():
        if jpeft.RESERVED in path:
            assert not np.array_equal(value, after[path]), path
        else:
            np.testing.assert_array_equal(value, after[path], err_msg=path)  # bit-identical base


def test_lora_fa_frozen_a_not_selected_and_unchanged():
    _, model = _pair(LORA_FA)
    for f in (nnx.LoRAParam, jpeft.Delta, nnx.Param, jpeft.trainable(LORA_FA, model)):
        leaves = {k[-1] for k, _ in nnx.to_flat_state(nnx.state(model, f)) if jpeft.RESERVED in k}
        assert leaves == {"lora_b"}, (f, leaves)
    before = _state(model)
    # wrt=nnx.Param also selects the base: jpeft.optimizer gives it zero updates (handled, documented).
    opt = nnx.Optimizer(model, jpeft.optimizer(optax.adam(LR), LORA_FA, model), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        opt.update(model, nnx.grad(lambda m: _loss(m(IDS)))(model))

    step(model, opt)
    after = _state(model)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {"layers/q/__jpeft__/default/lora_b", "layers/v/__jpeft__/default/lora_b"}
    # the frozen base keeps no optimizer state: adam's two moments cover the two B factors only, plus a count
    b_size = M.LAYERS * 2 * M.D  # (L, r, d_out)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(opt.opt_state))) == 2 * 2 * b_size + 1


# --- the lean path and adam steps against the linen twin -------------------------------------------
def test_lean_path_gradients_equal_linen():
    linen, model = _pair(LORA)
    wrapped = jpeft.wrap(M.Model().apply, LORA)
    trainable, frozen = jpeft.split(LORA, linen)
    g_linen = jax.grad(lambda t: _loss(wrapped({"params": jpeft.combine(t, frozen)}, IDS)))(trainable)

    graphdef, deltas, rest = jpeft.split(LORA, model)
    assert {k for k, _ in nnx.to_flat_state(deltas)} == {k for k, _ in nnx.to_flat_state(nnx.state(model, jpeft.Delta))}
    g_nnx = jax.grad(lambda d: _loss(jpeft.combine(graphdef, d, rest)(IDS)))(deltas)
    flat = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.as_pure(g_nnx))}
    want = {p: v for p, v in _flat(g_linen).items()}
    assert flat.keys() == want.keys()
    for p in want:
        np.testing.assert_allclose(flat[p], want[p], rtol=1e-5, atol=1e-6, err_msg=p)

    # one optax step over the trainable State with jpeft.optimizer, merged back into the model
    tx_n, tx_l = jpeft.optimizer(optax.adam(LR), LORA, model), jpeft.optimizer(optax.adam(LR), LORA, linen)
    u_n, _ = tx_n.update(g_nnx, tx_n.init(deltas), deltas)
    u_l, _ = tx_l.update(g_linen, tx_l.init(trainable), trainable)
    nnx.update(model, optax.apply_updates(deltas, u_n))
    stepped = optax.apply_updates(trainable, u_l)
    tree = jpeft._nnx.tree(model)
    for p, v in _flat(stepped).items():
        np.testing.assert_allclose(np.asarray(jpeft._tree.get(tree, tuple(p.split("/")))), v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["LoRA", "LoRAPlus", "AdaLoRA", "BitFit", "Freeze"])
def test_adam_steps_equal_linen(name):
    method = METHODS[name]
    linen, model = _pair(method)
    steps = 3
    reg = name == "AdaLoRA"

    wrapped = jpeft.wrap(M.Model().apply, method)
    tx_l = jpeft.optimizer(optax.adam(LR), method, linen)

    @jax.jit
    def step_l(params, state):
        def loss(p):
            return _loss(wrapped({"params": p}, IDS)) + (jpeft.regularizer(method, p) if reg else 0.0)

        updates, state = tx_l.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx_l.init(linen)
    for _ in range(steps):
        linen, state = step_l(linen, state)

    wrt = jpeft.trainable(method, model)
    opt = nnx.Optimizer(model, jpeft.optimizer(optax.adam(LR), method, model), wrt=wrt)

    @nnx.jit
    def step_n(model, opt):
        def loss(m):
            return _loss(m(IDS)) + (jpeft.regularizer(method, m) if reg else 0.0)

        opt.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model))

    for _ in range(steps):
        step_n(model, opt)
    got, want = _flat(jpeft._nnx.tree(model)), _flat(linen)
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-6, err_msg=p)
    if reg:  # the schedule masked singular values on both sides alike
        e = got["layers/q/__jpeft__/default/lora_e"]
        assert (e == 0).any() and np.array_equal(e == 0, want["layers/q/__jpeft__/default/lora_e"] == 0)


# --- the tree functions on NNX equal linen's on the twin -------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_tree_functions_equal_linen(name):
    method = METHODS[name]
    linen, model = _pair(method)
    assert jpeft.list_paths(model) == jpeft.list_paths(linen)
    assert jpeft.labels(method, model) == jpeft.labels(method, linen)
    assert jpeft.summary(method, model) == jpeft.summary(method, linen)
    np.testing.assert_allclose(jpeft.regularizer(method, model), jpeft.regularizer(method, linen), rtol=1e-6)
    jpeft.check(model)
    selected = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, jpeft.trainable(method, model)))}
    assert selected == {p for p, lab in _flat_labels(jpeft.labels(method, linen)) if lab != "frozen"}


def _flat_labels(tree: dict, path: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _flat_labels(v, path + (k,))]
    return [("/".join(path), tree)]


def test_einsum_weight_attr_is_renamed():
    """A module whose weight is not ``kernel`` (tunix ``w``): labels and the optimizer map the name."""

    class Proj(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 2, 3)))
            self.einsum_str = "btd,dnh->btnh"

        def __call__(self, x: jax.Array) -> jax.Array:
            return jnp.einsum(self.einsum_str, x, self.w[...])

    method = jpeft.LoRA(targets=".*", rank=2, extra_trainable="kernel")
    model = jpeft.apply(method, Proj(nnx.Rngs(0)), key=jax.random.key(1))
    assert jpeft.list_paths(model) == ["__jpeft__/default/lora_a", "__jpeft__/default/lora_b", "kernel"]
    assert {k for k, _ in nnx.to_flat_state(nnx.state(model, jpeft.trainable(method, model)))} >= {("w",)}
    opt = nnx.Optimizer(model, jpeft.optimizer(optax.sgd(1.0), method, model), wrt=jpeft.trainable(method, model))
    w = np.asarray(model.w[...])
    opt.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, jpeft.trainable(method, model))))
    np.testing.assert_allclose(np.asarray(model.w[...]), w - 1, rtol=1e-6)


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "wrt"), [("BitFit", jpeft.Delta), ("IA3", nnx.LoRAParam), ("Freeze", jpeft.Delta)])
def test_error_filter_leaves_out_trainable(name, wrt):
    method = METHODS[name]
    _, model = _pair(method)
    with pytest.raises(
        jpeft.JpeftError, match=r"leaves out \d+ of the \d+ variables the method trains.*wrt=jpeft\.trainable"
    ):
        nnx.Optimizer(model, jpeft.optimizer(optax.adam(LR), method, model), wrt=wrt)


def test_error_base_model_trains_nothing():
    base = N.synthetic()
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.trainable\(LoRA\): the method trains no variable"):
        jpeft.trainable(LORA, base)
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.optimizer\(LoRA\): no variable of the NNX model trains"):
        jpeft.optimizer(optax.adam(LR), LORA, base)
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.split.*trains no variable|trains no variable"):
        jpeft.split(LORA, base)


def test_error_trainable_needs_nnx_model():
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.trainable expects a flax.nnx.Module; got dict"):
        jpeft.trainable(LORA, M.params())
    with pytest.raises(jpeft.JpeftError, match=r"expects a jpeft method"):
        jpeft.trainable("LoRA", N.synthetic())


def test_error_combine_three_linen_trees():
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.combine takes two halves.*got 3 trees"):
        jpeft.combine({"a": 1}, {"a": None}, {"a": None})


def test_error_check_names_nnx_delta_path():
    _, model = _pair(LORA)
    model.layers.q.__jpeft__["default"]["lora_b"][...] = jnp.full_like(
        model.layers.q.__jpeft__["default"]["lora_b"][...], jnp.nan
    )
    with pytest.raises(jpeft.JpeftError, match=r"layers/q/__jpeft__/default/lora_b \(2, 2, 8\): 32 non-finite"):
        jpeft.check(model)


def test_error_regularizer_bad_name_on_nnx():
    _, model = _pair(LORA)
    with pytest.raises(jpeft.JpeftError, match=r"Adapter name must be a non-empty str"):
        jpeft.regularizer(LORA, model, name="a/b")
