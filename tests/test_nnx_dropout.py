"""Delta dropout on NNX models: each module's own key stream (``jpeft.DeltaRng``), ``eval()``/``train()``.

Oracle: on one ``nnx.Linear`` with a square, invertible ``A B``, the delta of each call is solved
for the dropped-out input ``m * x / (1 - p)``; every entry must be ``0`` or ``x / (1 - p)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jpeft
from tests import _models as M
from tests import _nnx_models as N

P, S = 0.5, 2.0


def _lora_linear() -> tuple[nnx.Module, np.ndarray, np.ndarray]:
    base = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    model = jpeft.apply(jpeft.LoRA(targets=".*", rank=3, alpha=6.0, dropout=P), base, key=jax.random.key(1))
    rng = np.random.RandomState(0)
    a, b = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    model.__jpeft__["default"]["lora_a"][...] = jnp.asarray(a, jnp.float32)
    model.__jpeft__["default"]["lora_b"][...] = jnp.asarray(b, jnp.float32)
    return model, base, a @ b


def test_each_call_drops_input_entries_with_rate_p_and_rescales_the_rest():
    model, base, ab = _lora_linear()
    x = np.random.RandomState(1).uniform(1, 2, (64, 3)).astype(np.float32)
    step = nnx.jit(lambda m, x: m(x))
    kept = []
    for _ in range(2):
        delta = np.asarray(step(model, x) - base(x), np.float64)
        dropped_x = delta @ np.linalg.inv(ab) / S  # = m * x / (1 - p)
        zero, full = np.isclose(dropped_x, 0, atol=1e-3), np.isclose(dropped_x, x / (1 - P), rtol=1e-3)
        assert (zero | full).all(), "every input entry is either dropped or scaled by 1/(1-p)"
        kept.append(full)
    assert 0.35 < np.mean(kept[0]) < 0.65
    assert not np.array_equal(kept[0], kept[1]), "the key advances: two calls draw two masks"


def test_eval_turns_delta_dropout_off_and_train_back_on():
    model, base, ab = _lora_linear()
    x = np.ones((4, 3), np.float32)
    model.eval()
    want = x @ np.asarray(base.kernel[...]) + np.asarray(base.bias[...]) + S * x @ ab
    np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)
    model.train()
    assert not np.allclose(model(x), want, atol=1e-3)


def test_scanned_layers_each_get_their_own_stream():
    method = jpeft.LoRA(targets=r"layers/(q|v)", rank=2, dropout=0.3)
    model = jpeft.apply(method, N.synthetic(), key=jax.random.key(1))
    keys = model.layers.q.__jpeft_rng__.get_value()
    assert keys.shape == (M.LAYERS,)
    assert not np.array_equal(jax.random.key_data(keys[0]), jax.random.key_data(keys[1]))
    out = nnx.jit(lambda m, x: m(x))(model, M.inputs())
    after = model.layers.q.__jpeft_rng__.get_value()
    assert out.shape == (M.BATCH, M.SEQ, M.VOCAB)
    assert not np.array_equal(jax.random.key_data(after), jax.random.key_data(keys)), "nnx.scan wrote the keys back"
    assert not any(isinstance(v, jpeft.DeltaRng) for _, v in nnx.to_flat_state(nnx.state(model, jpeft.Delta)))
