"""jpeft.save / jpeft.restore on NNX models (issue 11): bit-exact round trip and resume, wrong bases refused.

Oracles: the arrays that were saved (bit-equal after restore), uninterrupted training (3 + 2 steps
with a save/restore in between equal 5 steps bit for bit, model and adam state), and the linen twin
(a checkpoint saved from the linen model restores onto the NNX twin with the same arrays).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jpeft
from tests import _models as M
from tests import _nnx_models as N

R = jpeft.RESERVED
METHOD = jpeft.LoRA(targets=M.ALL_TARGETS, rank=2)


def _randomize(model: nnx.Module, seed: int = 1) -> nnx.Module:
    """Non-zero deltas (B = 0 at init would make the round trip trivial), in place."""
    rng = np.random.RandomState(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):
        var[...] = var[...] + jnp.asarray(0.1 * rng.standard_normal(var.shape), var.dtype)
    return model


def _flat(model_or_state) -> dict:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _assert_bit_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for p in want:
        assert got[p].dtype == want[p].dtype and np.array_equal(got[p], want[p]), p


@pytest.fixture(scope="module")
def base() -> nnx.Module:
    return N.synthetic()


def test_round_trip_is_bit_exact_and_returns_a_new_model(base, tmp_path):
    peft = _randomize(jpeft.apply(METHOD, base, key=jax.random.key(0)))
    jpeft.save(tmp_path, METHOD, peft, step=7)
    method, restored, opt_state, step = jpeft.restore(tmp_path, base)
    assert (method, opt_state, step) == (METHOD, None, 7)
    assert restored is not base and not hasattr(base.layers.q, R)  # the base model is left as it was
    _assert_bit_equal(_flat(restored), _flat(peft))
    # Variable types survive (the optimizer filters select the same leaves), and the model runs with them.
    assert type(restored.layers.q.__jpeft__["default"]["lora_a"]) is jpeft.LoRADelta
    ids = M.inputs()
    forward = nnx.jit(lambda model, ids: model(ids))  # one compile: both models have the same graph
    np.testing.assert_array_equal(np.asarray(forward(restored, ids)), np.asarray(forward(peft, ids)))


def test_trainable_base_leaves_and_frozen_deltas_come_back(base, tmp_path):
    # BitFit trains base biases (saved as base leaves); LoRA-FA's A is a FrozenDelta (saved, not trained).
    for i, method in enumerate((jpeft.BitFit(), jpeft.LoRAFA(targets=r"layers/q", rank=2))):
        peft = jpeft.apply(method, base, key=jax.random.key(0))
        for _, var in nnx.to_flat_state(nnx.state(peft, nnx.Any(jpeft.FrozenDelta, nnx.Param))):
            var[...] = var[...] + 0.5  # every leaf, so a leaf that does not come back shows
        jpeft.save(tmp_path / str(i), method, peft, step=1)
        restored = jpeft.restore(tmp_path / str(i), base).params
        got, want, orig = _flat(restored), _flat(peft), _flat(base)
        saved = [p for p in want if R in p or p[-1] == "bias"] if i == 0 else [p for p in want if R in p]
        assert saved, method
        for p in want:  # saved leaves as trained, the others as in the base
            np.testing.assert_array_equal(got[p], want[p] if p in saved else orig[p], err_msg=str(p))


@nnx.jit
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, ids: jax.Array) -> jax.Array:
    def loss_fn(model):
        logits = model(ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jpeft.Delta))(model)
    optimizer.update(model, grads)
    return loss


TX = optax.adam(1e-2)  # one object: nnx.jit keys its cache on the optimizer's graph, tx included


def _optimizer(method: jpeft.Method, model: nnx.Module) -> nnx.Optimizer:
    return nnx.Optimizer(model, TX, wrt=jpeft.Delta)


def test_resumed_training_equals_uninterrupted_training_bit_for_bit(base, tmp_path):
    ids = M.inputs()
    model = _randomize(jpeft.apply(METHOD, base, key=jax.random.key(0)))
    start = _flat(model)
    optimizer = _optimizer(METHOD, model)
    for _ in range(3):
        _train_step(model, optimizer, ids)
    jpeft.save(tmp_path, METHOD, model, step=3, opt_state=optimizer)
    ck = jpeft.restore(tmp_path, base, opt_state=_optimizer)
    assert isinstance(ck.opt_state, nnx.Optimizer) and int(ck.opt_state.step[...]) == 3
    _assert_bit_equal(_flat(ck.opt_state), _flat(optimizer))
    for _ in range(2):
        _train_step(ck.params, ck.opt_state, ids)

    straight = _randomize(jpeft.apply(METHOD, base, key=jax.random.key(0)))
    _assert_bit_equal(_flat(straight), start)
    straight_opt = _optimizer(METHOD, straight)
    for _ in range(5):
        _train_step(straight, straight_opt, ids)
    assert not np.array_equal(
        _flat(straight)[("layers", "q", R, "default", "lora_b")], start[("layers", "q", R, "default", "lora_b")]
    )
    _assert_bit_equal(_flat(ck.params), _flat(straight))
    _assert_bit_equal(_flat(ck.opt_state), _flat(straight_opt))
    _assert_bit_equal(_flat(base), {p: v for p, v in start.items() if R not in p})  # the base never trained


def test_a_linen_checkpoint_restores_onto_the_nnx_twin(base, tmp_path):
    method = dataclasses.replace(METHOD, layouts=M.LAYOUTS)  # linen's layouts of dg_in, dg_out, conv
    peft = M.random_deltas(jpeft.apply(method, M.params(), key=jax.random.key(0)), seed=3)
    jpeft.save(tmp_path, method, peft, step=2)
    restored = jpeft.restore(tmp_path, base).params
    for path, var in nnx.to_flat_state(nnx.state(restored, jpeft.Delta)):
        want = peft
        for k in path:
            want = want[str(k)]
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(want), err_msg=str(path))


# --- errors ----------------------------------------------------------------------------------------
def _saved_linear(tmp_path) -> nnx.Module:
    base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    method = jpeft.LoRA(targets=".*", rank=2)
    jpeft.save(tmp_path, method, jpeft.apply(method, base, key=jax.random.key(1)), step=1)
    return base


def test_another_base_is_refused(tmp_path, base):
    _saved_linear(tmp_path)
    with pytest.raises(
        jpeft.JpeftError,
        match=r"(?s)not the base tree this checkpoint was saved from.*\n  kernel: "
        r"expected \(4, 3\) float32, found \(4, 5\) float32",
    ):
        jpeft.restore(tmp_path, nnx.Linear(4, 5, rngs=nnx.Rngs(0)))  # other shapes
    with pytest.raises(
        jpeft.JpeftError,
        match=r"(?s)not the base tree this checkpoint was saved from.*\n  bias: "
        r"expected \(3,\) float32, found missing",
    ):
        jpeft.restore(tmp_path, base)  # another model


def test_a_model_holding_the_adapter_is_refused(tmp_path):
    base = _saved_linear(tmp_path)
    peft = jpeft.apply(jpeft.LoRA(targets=".*", rank=2), base, key=jax.random.key(1))
    with pytest.raises(jpeft.JpeftError, match=r"already holds adapter 'default'"):
        jpeft.restore(tmp_path, peft)


def test_deltas_that_apply_makes_differently_are_refused(tmp_path, monkeypatch):
    base = _saved_linear(tmp_path)
    real = jpeft.LoRA.init_module

    def wider(self, key, path, own, ctx):  # as if the method's structure had changed since the save
        return {
            k: jnp.concatenate([v, v], axis=-1) if k == "lora_a" else v
            for k, v in real(self, key, path, own, ctx).items()
        }

    monkeypatch.setattr(jpeft.LoRA, "init_module", wider)
    with pytest.raises(
        jpeft.JpeftError,
        match=r"leaves listed in .*step_1/meta/metadata' are not those LoRA makes .*\n  __jpeft__/default/lora_a: "
        r"expected \(4, 4\) float32, found \(4, 2\) float32",
    ):
        jpeft.restore(tmp_path, base)


def test_an_optimizer_template_that_does_not_match_is_refused(tmp_path):
    base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    method = jpeft.LoRA(targets=".*", rank=2)
    peft = jpeft.apply(method, base, key=jax.random.key(1))
    jpeft.save(tmp_path, method, peft, step=1, opt_state=nnx.Optimizer(peft, optax.adam(1e-3), wrt=jpeft.Delta))
    with pytest.raises(jpeft.JpeftError, match=r"the opt_state template has \d+ leaves, the checkpoint \d+"):
        jpeft.restore(tmp_path, base, opt_state=lambda m, model: nnx.Optimizer(model, optax.sgd(1e-3), wrt=jpeft.Delta))


def test_save_refuses_a_non_method(tmp_path):
    base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.save expects a jpeft method; got Linear"):
        jpeft.save(tmp_path, base, base, step=1)
