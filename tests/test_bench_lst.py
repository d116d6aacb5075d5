"""experiments.bench_lst's objectives against the model's own logits (a one-layer SmolLM2-shaped Llama,
vocabulary 64): ``lm-chunked`` equals ``lm``, and ``last-token`` equals the
cross-entropy of the model's logits at the last position, for the plain model and under LST."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from experiments import bench_lst, memory
from tests.methods.test_lst import _hf_broadcasts  # noqa: F401 (an autouse fixture: HF's implicit rank promotion)


@functools.cache
def setup():
    model, params = memory.build_model(1, vocab=64)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 8)), jnp.int32)
    batch = {"ids": ids, "mask": jnp.ones_like(ids), "pos": jnp.broadcast_to(jnp.arange(8), ids.shape)}
    batch["target"] = ids[:, 0]
    return model, jax.tree.map(jnp.asarray, params), batch


def test_chunked_equals_lm():
    model, params, batch = setup()
    lm, chunked = (bench_lst.objective_loss(o, chunk=4) for o in ("lm", "lm-chunked"))
    v0, v1 = jax.jit(lambda p: (lm(model.module.apply, p, batch), chunked(model.module.apply, p, batch)))(params)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)


@pytest.mark.parametrize("lst", [False, True], ids=["plain", "lst"])
def test_last_token_equals_model_logits(lst):
    model, params, batch = setup()
    apply_fn = model.module.apply
    if lst:
        method = jpeft.LadderSideTuning(num_heads=memory.SMOLLM2["num_attention_heads"], reduction=8)
        params = jpeft.apply(method, params, key=jax.random.key(1))
        apply_fn = jpeft.wrap(apply_fn, method)

    @jax.jit
    def both(p):
        logits = apply_fn({"params": p}, batch["ids"], batch["mask"], batch["pos"], return_dict=False)[0]
        want = optax.softmax_cross_entropy_with_integer_labels(logits[:, -1], batch["target"]).mean()
        return bench_lst.objective_loss("last-token")(apply_fn, p, batch), want

    got, want = both(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_chunk_must_divide():
    model, params, batch = setup()
    with pytest.raises(ValueError, match="not a multiple of chunk=3"):
        bench_lst.objective_loss("lm-chunked", chunk=3)(model.module.apply, params, batch)
