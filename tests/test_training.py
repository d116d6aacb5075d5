"""A short LoRA run on a tiny GPT-2: the loss falls clearly, and every frozen weight stays bit-identical.

The run uses the lean path end to end: ``jpeft.split``, gradients w.r.t. the trainable half only,
``jpeft.optimizer(optax.adamw)`` on that half, ``jpeft.combine`` inside a jitted step.

GPT-2's LM head is tied to the frozen token embedding, whose tiny init (std 0.02) bounds the
logits; so, like HF PEFT's ``modules_to_save``, the final LayerNorm trains too
(``extra_trainable``). Everything else in the base is frozen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from tests import _hf_models as H

STEPS = 60


def test_lora_training_lowers_the_loss_and_keeps_the_base(key):
    hf = H.make("gpt2")
    params = hf.params
    original = jax.tree.map(lambda x: np.array(x, copy=True), params)
    method = jpeft.LoRA(targets=("c_attn", "c_fc"), rank=4, alpha=8.0, extra_trainable=r".*/ln_f/.*")
    peft = jpeft.apply(method, params, key=key)
    trainable, frozen = jpeft.split(method, peft)
    tx = jpeft.optimizer(optax.adamw(5e-2, weight_decay=0.01), method, trainable)
    state = tx.init(trainable)
    wrapped = jpeft.wrap(hf.apply, method)
    # One fixed batch of random tokens, seen every step: the model must memorise it.
    inputs = hf.inputs
    targets = inputs["input_ids"][:, 1:]
    weights = inputs["attention_mask"][:, 1:]

    def lm_loss(logits: jax.Array) -> jax.Array:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
        return jnp.sum(losses * weights) / jnp.sum(weights)

    def loss_fn(trainable, frozen):
        return lm_loss(hf.logits(wrapped({"params": jpeft.combine(trainable, frozen)}, **inputs)))

    @jax.jit
    def step(trainable, state, frozen):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    losses = []
    for _ in range(STEPS):
        trainable, state, loss = step(trainable, state, frozen)
        losses.append(float(loss))
    final = float(loss_fn(trainable, frozen))
    assert np.isfinite(losses).all()
    assert final < 0.7 * losses[0], f"loss {losses[0]:.3f} -> {final:.3f}"

    trained = jpeft.combine(trainable, frozen)
    flat_trained = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(trained)[0]}
    moved = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(original)[0]:
        name = jax.tree_util.keystr(path)
        if not np.array_equal(np.asarray(flat_trained[name]), leaf):
            moved.add(name)
    assert moved == {"['transformer']['ln_f']['scale']", "['transformer']['ln_f']['bias']"}, moved
    # The merged model is the trained model, with plain HF apply.
    merged = jpeft.merge(method, trained)
    np.testing.assert_allclose(float(lm_loss(hf.logits(hf.apply({"params": merged}, **inputs)))), final, rtol=1e-4)
