"""Buffer donation (issue 10, finding 13): donate the trainable half of ``jpeft.split``, never the whole tree.

``jpeft.apply`` shares every base leaf with the caller's ``params`` (the same array objects), so
``jax.jit(step, donate_argnums=0)`` over the whole tree deletes the caller's base params too.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft

X = jnp.ones((2, 4))


def setup():
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), X)["params"]
    method = jpeft.LoRA(targets=".*", rank=2)
    return model, params, method, jpeft.apply(method, params, key=jax.random.key(1))


def test_donating_the_trainable_half_leaves_the_base_params_alive():
    model, params, method, peft = setup()
    trainable, frozen = jpeft.split(method, peft)
    tx = jpeft.optimizer(optax.sgd(0.1), method, trainable)
    wrapped = jpeft.wrap(model.apply, method)

    def step(t, s, f):
        g = jax.grad(lambda t: jnp.sum(wrapped({"params": jpeft.combine(t, f)}, X) ** 2))(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s

    new, _ = jax.jit(step, donate_argnums=(0, 1))(trainable, tx.init(trainable), frozen)
    assert all(x.is_deleted() for x in jax.tree.leaves(trainable))  # donated
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))
    want = np.asarray(model.apply({"params": params}, X))  # the caller's params still run
    np.testing.assert_allclose(want, X @ params["kernel"] + params["bias"][None], rtol=1e-6)
    assert jax.tree.leaves(new)  # and the next step takes the new trainable half with the same frozen one
    jax.jit(step, donate_argnums=(0, 1))(new, tx.init(new), frozen)


def test_donating_the_whole_tree_deletes_the_callers_params():
    _, params, _, peft = setup()
    jax.jit(lambda p: jax.tree.map(lambda a: a + 1.0, p), donate_argnums=0)(peft)
    assert all(x.is_deleted() for x in jax.tree.leaves(params))  # what the docs warn about
