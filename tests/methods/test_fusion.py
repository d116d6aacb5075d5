"""AdapterFusion over trained Pfeiffer/Houlsby adapters on tiny HF BERT."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from tests import _hf_models as H
from tests._models import random_deltas

R = jpeft.RESERVED
TOL = dict(rtol=1e-5, atol=1e-5)
PFEIFFER = jpeft.PfeifferAdapter(reduction_factor=8)


@functools.cache
def trained(names=("a", "b")):
    hf = H.make("bert")
    tree = hf.params
    for i, n in enumerate(names):
        tree = jpeft.apply(PFEIFFER, tree, key=jax.random.key(i), name=n)
    return hf, random_deltas(tree, 3, scale=0.3, adapters=names)


def run(hf, method, tree, active):
    return hf.logits(jpeft.wrap(hf.apply, method, active=active)({"params": tree}, **hf.inputs))


def test_one_adapter_fusion_equals_the_adapter():
    hf, tree = trained(("a",))
    fusion = jpeft.AdapterFusion(adapters=("a",), adapter=PFEIFFER)
    tree = jpeft.apply(fusion, tree, key=jax.random.key(9), name="fusion")
    np.testing.assert_allclose(run(hf, fusion, tree, "fusion"), run(hf, PFEIFFER, tree, "a"), **TOL)


def test_uniform_attention_averages_the_adapters():
    hf, tree = trained()
    fusion = jpeft.AdapterFusion(adapters=("a", "b"), adapter=PFEIFFER)
    tree = jpeft.apply(fusion, tree, key=jax.random.key(9), name="fusion")
    # query = 0 gives uniform attention; value = identity: y + (g_a(y) + g_b(y)) / 2.
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "'query'" in jax.tree_util.keystr(p) else x, tree
    )

    def concat(node):  # one adapter of width 2r that computes (g_a + g_b) / 2 exactly
        a, b = node[R]["a"], node[R]["b"]
        return {
            "down_kernel": jnp.concatenate([a["down_kernel"], b["down_kernel"]], -1),
            "down_bias": jnp.concatenate([a["down_bias"], b["down_bias"]], -1),
            "up_kernel": jnp.concatenate([a["up_kernel"], b["up_kernel"]], -2) / 2,
            "up_bias": (a["up_bias"] + b["up_bias"]) / 2,
        }

    avg = jax.tree.map(lambda x: x, tree)
    for path in PFEIFFER.select(hf.params):
        node = avg
        for k in path:
            node = node[k]
        node[R] = {**node[R], "avg": concat(node)}
    np.testing.assert_allclose(run(hf, fusion, tree, "fusion"), run(hf, PFEIFFER, avg, "avg"), **TOL)


def test_only_the_fusion_weights_train_and_the_count_is_closed_form():
    hf, tree = trained()
    fusion = jpeft.AdapterFusion(adapters=("a", "b"), adapter=PFEIFFER, temperature=2.0)
    tree = jpeft.apply(fusion, tree, key=jax.random.key(9), name="fusion")
    trainable, frozen = jpeft.split(fusion, tree)
    names = {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    assert names and all("/__jpeft__/fusion/" in n for n in names)
    # Q and K with biases, V without (the paper, AdapterHub's BertFusion: nn.Linear(d, d, bias=False)).
    assert fusion.param_count(jpeft.remove(tree, "fusion")) == H.LAYERS * (3 * H.HIDDEN**2 + 2 * H.HIDDEN)
    assert {n.rsplit("/", 1)[1] for n in names} == {"query", "query_bias", "key", "key_bias", "value"}
    assert sum(x.size for x in jax.tree.leaves(trainable)) == fusion.param_count(jpeft.remove(tree, "fusion"))
    wrapped = jpeft.wrap(hf.apply, fusion, active="fusion")

    def loss(t):
        logits = hf.logits(wrapped({"params": jpeft.combine(t, frozen)}, **hf.inputs))
        return jnp.mean((logits - jnp.broadcast_to(jnp.arange(3.0), logits.shape)) ** 2)

    tx = jpeft.optimizer(optax.adam(1e-2), fusion, trainable)

    @jax.jit
    def step(t, s):
        value, grads = jax.value_and_grad(loss)(t)
        updates, s = tx.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    state, first = tx.init(trainable), loss(trainable)
    for _ in range(30):
        trainable, state, value = step(trainable, state)
    assert float(value) < 0.8 * float(first)  # only the fusion layers move; the head is frozen
    after = jpeft.combine(trainable, frozen)
    for path in PFEIFFER.select(hf.params):
        node_before, node_after = tree, after
        for k in path:
            node_before, node_after = node_before[k], node_after[k]
        for n in ("a", "b"):
            for leaf in node_before[R][n]:
                np.testing.assert_array_equal(node_before[R][n][leaf], node_after[R][n][leaf])


def test_houlsby_adapters_fuse_at_both_sites():
    hf = H.make("bert")
    houlsby = jpeft.HoulsbyAdapter(reduction_factor=8)
    tree = random_deltas(jpeft.apply(houlsby, hf.params, key=jax.random.key(0), name="a"), 1, scale=0.3, adapters=("a",))
    fusion = jpeft.AdapterFusion(adapters=("a",), adapter=houlsby)
    tree = jpeft.apply(fusion, tree, key=jax.random.key(2), name="f")
    assert len(fusion.select(tree)) == 2 * H.LAYERS
    np.testing.assert_allclose(run(hf, fusion, tree, "f"), run(hf, houlsby, tree, "a"), **TOL)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(adapters=(), adapter=PFEIFFER), "non-empty sequence of distinct adapter names"),
        (dict(adapters=("a", "a"), adapter=PFEIFFER), "distinct"),
        (dict(adapters=("a",), adapter=jpeft.LoRA(targets="q")), "sequential adapter method"),
        (dict(adapters=("a",), adapter=PFEIFFER, temperature=0.0), "temperature must be a number > 0"),
    ],
)
def test_bad_fusion_config_raises(kwargs, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.AdapterFusion(**kwargs)


def test_missing_adapter_raises():
    hf, tree = trained(("a",))
    fusion = jpeft.AdapterFusion(adapters=("a", "zz"), adapter=PFEIFFER)
    with pytest.raises(jpeft.JpeftError, match=r"holds no deltas of adapter\(s\) \['zz'\]"):
        jpeft.apply(fusion, tree, key=jax.random.key(0), name="f")
