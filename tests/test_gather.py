"""Gathered mixed batches (``jpeft._gather``): row for row equal to the looped path and to each adapter alone.

Oracles: the looped path (every adapter on the whole batch, rows selected: ``_gather.looped()``), each
adapter run alone (``active=name``) on the same rows, and the base model for ``-1`` rows. A spy on
``_gather.low_rank`` shows where the gathered path ran and where it fell back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft import _gather
from tests import _models as M
from tests import _nnx_models as N

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = jnp.concatenate([M.inputs(0), M.inputs(1), M.inputs(2)])  # 6 rows
INDEX = jnp.asarray([1, -1, 0, 2, 1, 0], jnp.int32)
NAMES = ("a", "b", "c")


def lora(rank: int, **kw) -> jpeft.LoRA:
    return jpeft.LoRA(targets=M.ALL_TARGETS, rank=rank, alpha=4.0, layouts=M.LAYOUTS, **kw)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = _gather.low_rank

    def counted(*a, **kw):
        calls.append(len(a[4]))
        return real(*a, **kw)

    monkeypatch.setattr(_gather, "low_rank", counted)
    return calls


def linen_tree(methods) -> dict:
    t = M.params()
    for i, (n, m) in enumerate(zip(NAMES, methods, strict=True)):
        t = jpeft.apply(m, t, key=jax.random.key(i + 1), name=n)
    return M.random_deltas(t, seed=4, scale=0.3)


def check_rows(got, alone: dict, base, index=INDEX) -> None:
    for row, i in enumerate(np.asarray(index)):
        want = base[row] if i < 0 else alone[NAMES[i]][row]
        np.testing.assert_allclose(got[row], want, **TOL)


def test_linen_gathered_equals_looped_and_each_adapter_alone(spy):
    methods = [lora(2), lora(4), lora(3)]  # one linen method: one scale, unequal ranks
    tree = linen_tree(methods)
    run = jpeft.wrap(M.Model().apply, methods[0], active=NAMES)
    got = jax.jit(lambda t, i: run({"params": t}, IDS, adapter_index=i))(tree, INDEX)
    assert spy and set(spy) == {3}  # q, v, o, dg_in, dg_out gathered (the embed and conv sites loop)
    with _gather.looped():
        looped = jax.jit(lambda t, i: run({"params": t}, IDS, adapter_index=i))(tree, INDEX)
    np.testing.assert_allclose(got, looped, **TOL)
    alone = {n: jpeft.wrap(M.Model().apply, methods[0], active=n)({"params": tree}, IDS) for n in NAMES}
    check_rows(got, alone, M.Model().apply({"params": M.params()}, IDS))


def test_linen_gradients_equal_looped():
    method = lora(2)
    tree = linen_tree([method, lora(4), lora(3)])
    run = jpeft.wrap(M.Model().apply, method, active=NAMES)
    loss = lambda t: jnp.sum(jnp.sin(run({"params": t}, IDS, adapter_index=INDEX)))  # noqa: E731
    got = jax.jit(jax.grad(loss))(tree)
    with _gather.looped():
        want = jax.jit(jax.grad(loss))(tree)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)


def test_dora_falls_back_to_the_looped_path(spy):
    method = jpeft.DoRA(targets=M.LINEAR_TARGETS, rank=2, layouts=M.LAYOUTS)
    t = M.params()
    for i, n in enumerate(NAMES):
        t = jpeft.apply(method, t, key=jax.random.key(i + 1), name=n)
    tree = M.random_deltas(t, seed=4, scale=0.3)
    run = jpeft.wrap(M.Model().apply, method, active=NAMES)
    got = jax.jit(lambda t, i: run({"params": t}, IDS, adapter_index=i))(tree, INDEX)
    assert not spy
    alone = {n: jpeft.wrap(M.Model().apply, method, active=n)({"params": tree}, IDS) for n in NAMES}
    check_rows(got, alone, M.Model().apply({"params": M.params()}, IDS))


def nnx_model(methods) -> nnx.Module:
    model = N.synthetic()
    for i, (n, m) in enumerate(zip(NAMES, methods, strict=True)):
        model = jpeft.apply(m, model, key=jax.random.key(i + 1), name=n)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, M.random_deltas(state, seed=6, scale=0.3))


def nnx_mixed(model, index):
    return nnx.jit(lambda m, x, i: jpeft.call(m, x, adapter_index=i, active=NAMES))(model, IDS, index)


def test_nnx_gathered_with_per_adapter_scales_equals_looped_and_alone(spy):
    methods = [
        lora(2),
        lora(4, use_rslora=True),
        jpeft.LoRAPlus(targets=M.ALL_TARGETS, rank=3, alpha=6.0, layouts=M.LAYOUTS),
    ]
    model = nnx_model(methods)
    got = nnx_mixed(model, INDEX)
    assert spy
    with _gather.looped():
        looped = nnx_mixed(model, INDEX)
    np.testing.assert_allclose(got, looped, **TOL)
    alone = {n: jpeft.call(model, IDS, active=(n,)) for n in NAMES}
    check_rows(got, alone, N.synthetic()(IDS))


def test_nnx_mixed_kinds_fall_back(spy):
    model = nnx_model([lora(2), jpeft.DoRA(targets=M.LINEAR_TARGETS, rank=2, layouts=M.LAYOUTS), lora(3)])
    got = nnx_mixed(model, INDEX)
    assert not spy
    alone = {n: jpeft.call(model, IDS, active=(n,)) for n in NAMES}
    check_rows(got, alone, N.synthetic()(IDS))
