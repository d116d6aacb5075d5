"""Properties of the tree API over random trees, method configurations and adapter names (Hypothesis).

Expectations come from what the strategies built (``tests/properties/_strategies.py``), never from
jpeft's own walk of the tree: which leaves exist, which the method trains, their shapes and dtypes.
"""

from __future__ import annotations

import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jpeft
from tests.properties import _strategies as S

RESERVED = "__jpeft__"


def _skeleton(tree):
    """The dict structure of ``tree`` with each leaf replaced by its identity: detects any mutation."""
    if isinstance(tree, dict):
        return {k: _skeleton(v) for k, v in tree.items()}
    return id(tree)


def _base(tree):
    return {p: x for p, x in S.leaves(tree) if RESERVED not in p}


def _deltas(tree):
    return {p: x for p, x in S.leaves(tree) if RESERVED in p}


def _apply_checked(drawn, tree, name, key):
    before = _skeleton(tree.params)
    peft = jpeft.apply(drawn.method, tree.params, key=key, name=name)
    assert _skeleton(tree.params) == before, "apply mutated its input"
    base, original = _base(peft), tree.base_paths()
    assert set(base) == set(original), "apply changed the base paths"
    assert all(base[p] is original[p] for p in original), "apply copied a base leaf"
    deltas = _deltas(peft)
    assert all(p[p.index(RESERVED) + 1] == name for p in deltas), "a delta sits under another adapter name"
    assert bool(deltas) == drawn.method.has_deltas
    for m in drawn.targets:  # each target holds deltas (LoRA-drop: maybe none, a pair shared from the root)
        node = peft
        for k in m.path + (RESERVED, name):
            node = node[k]
        mine = {p: x for p, x in deltas.items() if p[: len(m.path) + 1] == m.path + (RESERVED,)}
        assert mine or drawn.kind == "LoRADrop", f"no deltas at target {m.joined}"
        assert all(x.shape[: len(m.stack)] == m.stack for x in mine.values() if x.ndim > len(m.stack))
    return peft


def _perturbed(peft, seed):
    """Deltas with random non-zero values (so properties do not hold only at init)."""
    rng = np.random.RandomState(seed)

    def go(tree, path=()):
        if isinstance(tree, dict):
            return {k: go(v, path + (k,)) for k, v in tree.items()}
        if RESERVED in path and jnp.issubdtype(tree.dtype, jnp.floating):
            return jnp.asarray(rng.uniform(0.5, 1.5, tree.shape), tree.dtype)
        return tree

    return go(peft)


trees_and_methods = S.generic_trees().flatmap(lambda t: st.tuples(st.just(t), S.weight_methods(t)))
profile_trees_and_methods = S.profile_trees().flatmap(lambda t: st.tuples(st.just(t), S.profile_methods(t)))


@S.examples(12)
@given(trees_and_methods, S.names, st.integers(0, 2**31 - 1))
def test_apply_never_mutates_and_shares_base_leaves(tm, name, seed):
    tree, drawn = tm
    _apply_checked(drawn, tree, name, jax.random.key(seed))


@S.examples(10)
@given(profile_trees_and_methods, S.names)
def test_apply_of_profile_methods_never_mutates_and_shares_base_leaves(tm, name):
    tree, drawn = tm
    _apply_checked(drawn, tree, name, jax.random.key(0))


def _expected_trainable(drawn, tree, peft):
    base = set(tree.base_paths())
    trainable = set(drawn.trained_base | drawn.extra) & base
    return trainable, base - trainable


@S.examples(15)
@given(st.one_of(trees_and_methods, profile_trees_and_methods), S.names)
def test_labels_freeze_every_base_leaf_the_method_does_not_train(tm, name):
    tree, drawn = tm
    peft = jpeft.apply(drawn.method, tree.params, key=jax.random.key(1), name=name)
    labels = dict(S.leaves(jpeft.labels(drawn.method, peft)))
    assert set(labels) == {p for p, _ in S.leaves(peft)}
    trainable, frozen = _expected_trainable(drawn, tree, peft)
    if drawn.kind in ("Freeze",):
        frozen -= {p for p in frozen if S._layer_of(p) is None}  # outside the layers: the method's own choice
    for p in frozen:
        assert labels[p] == "frozen", f"{'/'.join(p)} is labelled {labels[p]!r}, expected frozen"
    for p in trainable:
        assert labels[p] not in ("frozen", None), f"{'/'.join(p)} should train; labelled {labels[p]!r}"
    deltas = [labels[p] for p in _deltas(peft)]
    assert not deltas or any(lab != "frozen" for lab in deltas), "no delta leaf trains"


@S.examples(15)
@given(st.one_of(trees_and_methods, profile_trees_and_methods), S.names)
def test_split_then_combine_is_the_identity(tm, name):
    tree, drawn = tm
    peft = jpeft.apply(drawn.method, tree.params, key=jax.random.key(2), name=name)
    trainable, frozen = jpeft.split(drawn.method, peft)
    labels = dict(S.leaves(jpeft.labels(drawn.method, peft)))
    for p, x in S.leaves(peft):  # each leaf in exactly the half its label says, as the same object
        half, other = (frozen, trainable) if labels[p] == "frozen" else (trainable, frozen)
        assert dict(S.leaves(half))[p] is x and dict(S.leaves(other))[p] is None
    back = jpeft.combine(trainable, frozen)
    assert _skeleton(back) == _skeleton(peft)


MERGEABLE = tuple(k for k in S.WEIGHT_KINDS if k != "LoRADrop")


@S.examples(10)
@given(S.generic_trees().flatmap(lambda t: st.tuples(st.just(t), S.weight_methods(t, MERGEABLE))), S.names)
def test_merge_keeps_structure_shapes_and_dtypes(tm, name):
    tree, drawn = tm
    peft = _perturbed(jpeft.apply(drawn.method, tree.params, key=jax.random.key(3), name=name), 0)
    merged = jpeft.merge(drawn.method, peft, name=name)
    got, want = dict(S.leaves(merged)), tree.base_paths()
    assert set(got) == set(want)
    for p, x in want.items():
        assert (got[p].shape, got[p].dtype) == (x.shape, x.dtype), "/".join(p)
    touched = {m.path for m in drawn.targets}
    for p, x in want.items():  # leaves of modules without deltas are the caller's own objects
        if p[:-1] not in touched:
            assert got[p] is x, f"merge replaced the untouched leaf {'/'.join(p)}"


@S.examples(6)
@given(profile_trees_and_methods, S.names)
def test_merge_of_a_profile_method_keeps_the_base_or_refuses_clearly(tm, name):
    tree, drawn = tm
    peft = jpeft.apply(drawn.method, tree.params, key=jax.random.key(4), name=name)
    try:
        merged = jpeft.merge(drawn.method, peft, name=name)
    except jpeft.JpeftError:
        assert not drawn.method.mergeable or tree.family == "gpt2", "a mergeable method refused to merge"
        return
    got, want = dict(S.leaves(merged)), tree.base_paths()
    if not {p for p in got if RESERVED in p}:  # prompt/prefix folds keep their plain prefixes
        assert set(got) == set(want)
    for p, x in want.items():
        assert (got[p].shape, got[p].dtype) == (x.shape, x.dtype), "/".join(p)


@S.examples(8)
@given(trees_and_methods, st.lists(S.names, min_size=2, max_size=3, unique=True))
def test_named_adapters_are_independent_and_remove_restores_the_base(tm, adapter_names):
    tree, drawn = tm
    if not drawn.method.has_deltas:
        return
    peft = tree.params
    for i, n in enumerate(adapter_names):
        peft = jpeft.apply(drawn.method, peft, key=jax.random.key(i), name=n)
    assert jpeft.adapters(peft) == sorted(adapter_names)
    for n in adapter_names:
        one = jpeft.remove(peft, n)
        assert jpeft.adapters(one) == sorted(set(adapter_names) - {n})
    for n in adapter_names:
        peft = jpeft.remove(peft, n)
    assert _skeleton(peft) == _skeleton(tree.params)


@S.examples(3)
@given(st.one_of(trees_and_methods, profile_trees_and_methods), S.names)
def test_save_then_restore_is_the_identity(tm, name):
    tree, drawn = tm
    peft = jpeft.apply(drawn.method, tree.params, key=jax.random.key(5), name=name)
    rng = np.random.RandomState(0)
    labels = dict(S.leaves(jpeft.labels(drawn.method, peft)))
    trained = {
        p: jnp.asarray(rng.standard_normal(x.shape), x.dtype) for p, x in S.leaves(peft) if labels[p] != "frozen"
    }

    def put(t, path=()):
        if isinstance(t, dict):
            return {k: put(v, path + (k,)) for k, v in t.items()}
        return trained.get(path, t)

    peft = put(peft)
    root = tempfile.mkdtemp(prefix="jpeft-prop-")
    if not trained:  # Freeze(trainable_layers=0): a clear refusal, never an empty checkpoint
        with pytest.raises(jpeft.JpeftError, match="nothing to save"):
            jpeft.save(root, drawn.method, peft, step=3, name=name)
        return shutil.rmtree(root, ignore_errors=True)
    try:
        jpeft.save(root, drawn.method, peft, step=3, name=name)
        method, restored, opt_state, step = jpeft.restore(root, tree.params)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert (method, opt_state, step) == (drawn.method, None, 3)
    got, want = dict(S.leaves(restored)), dict(S.leaves(peft))
    assert set(got) == set(want)
    for p, x in want.items():
        assert (got[p].shape, got[p].dtype) == (x.shape, x.dtype), "/".join(p)
        np.testing.assert_array_equal(np.asarray(got[p], np.float32), np.asarray(x, np.float32), err_msg="/".join(p))
        if p not in trained and RESERVED not in p:  # frozen deltas (LoRA-FA's A) are saved and restored
            assert got[p] is x, f"restore replaced the frozen base leaf {'/'.join(p)}"
