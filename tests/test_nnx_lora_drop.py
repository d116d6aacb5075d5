"""LoRA-drop on ``flax.nnx`` models: importance, selection, the shared and tied pairs, merge.

Oracles: the linen twin (``tests/_models``) with the same weights and deltas, and NumPy-merged
kernels loaded into the plain NNX model.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import jpeft
from tests import _models as M
from tests import _nnx_models as N

LORA = jpeft.LoRA(targets=r"layers/(q|v)", rank=2)
BATCHES = (M.inputs(0), M.inputs(1))


def _copy_deltas(model: nnx.Module, tree: dict) -> None:
    """Writes the tree's delta leaves into the model's ``jpeft.Delta`` variables of the same paths."""
    for path, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):
        node = tree
        for k in path:
            node = node[str(k)]
        var[...] = node


@pytest.fixture(scope="module")
def stage1():
    """A 'trained' stage-1 LoRA on the linen tree and on its NNX twin (the same random deltas)."""
    linen = M.random_deltas(jpeft.apply(LORA, M.params(), key=jax.random.key(1)), 3)
    model = jpeft.apply(LORA, N.synthetic(), key=jax.random.key(1))
    _copy_deltas(model, linen)
    return linen, model


def test_importance_on_nnx_equals_linen(stage1):
    linen, model = stage1
    want = jpeft.lora_drop_importance(LORA, linen, M.Model().apply, BATCHES)
    assert sorted(want) == ["layers/q[0]", "layers/q[1]", "layers/v[0]", "layers/v[1]"]
    got = jpeft.lora_drop_importance(LORA, model, None, BATCHES)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-5)
    again = jpeft.lora_drop_importance(LORA, model, lambda m, ids: m(ids), BATCHES)
    assert again == got


def test_importance_on_unrolled_nnx_model_is_per_layer(stage1):
    linen, model = stage1
    stacked = jpeft.lora_drop_importance(LORA, model, None, BATCHES)
    method = jpeft.LoRA(targets=r"layers/\d/(q|v)", rank=2)
    unrolled = jpeft.apply(method, N.unrolled(), key=jax.random.key(1))
    for i in range(M.LAYERS):
        for m in ("q", "v"):
            store = getattr(unrolled.layers[i], m).__jpeft__["default"]
            for leaf in ("lora_a", "lora_b"):
                store[leaf][...] = linen["layers"][m]["__jpeft__"]["default"][leaf][i]
    got = jpeft.lora_drop_importance(method, unrolled, None, BATCHES)
    assert sorted(got) == ["layers/0/q", "layers/0/v", "layers/1/q", "layers/1/v"]
    for i in range(M.LAYERS):
        for m in ("q", "v"):
            np.testing.assert_allclose(got[f"layers/{i}/{m}"], stacked[f"layers/{m}[{i}]"], rtol=1e-5)


def test_select_on_nnx_equals_linen_and_stage2_runs(stage1):
    linen, model = stage1
    want, tree = jpeft.lora_drop_select(LORA, linen, M.Model().apply, BATCHES, key=jax.random.key(2), threshold=0.6)
    new, peft = jpeft.lora_drop_select(LORA, model, None, BATCHES, key=jax.random.key(2), threshold=0.6)
    assert new == want and new.scan_layers is not None and 0 < len(new.keep) < 4
    assert jpeft.list_paths(jpeft._nnx.tree(peft)) == jpeft.list_paths(tree)
    assert isinstance(model.layers.q.__jpeft__["default"]["lora_a"], jpeft.LoRADelta)  # stage 1 is not changed
    tree = M.random_deltas(tree, 4)
    _copy_deltas(peft, tree)
    ids = M.inputs()
    y = peft(ids)
    np.testing.assert_allclose(y, jpeft.wrap(M.Model().apply, new)({"params": tree}, ids), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jpeft.merge(new, peft)(ids), y, atol=1e-4, rtol=1e-5)


def test_shared_pairs_at_the_nnx_root_against_numpy_merged_kernels():
    method = jpeft.LoRADrop(targets=r"layers/\d/(q|v)", rank=2, alpha=4.0, keep=("layers/1/q",))
    base = N.unrolled()
    peft = jpeft.apply(method, base, key=jax.random.key(1))
    assert sorted(peft.__jpeft__["default"]) == ["q", "v"]  # one shared pair per group, at the root
    assert len(peft.layers[0].q.__jpeft__["default"]) == 0  # a shared layer holds an empty marker
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(peft, jpeft.Delta))):
        var[...] = 0.3 * jax.random.normal(jax.random.key(10 + i), var.shape)
    shared, s = peft.__jpeft__["default"], method.scale
    tree = jpeft._nnx.tree(base)
    for i in range(M.LAYERS):
        for m in ("q", "v"):
            own = getattr(peft.layers[i], m).__jpeft__["default"]
            pair = own if "lora_a" in own else shared[m]
            a, b = np.asarray(pair["lora_a"][...], np.float64), np.asarray(pair["lora_b"][...], np.float64)
            kernel = tree["layers"][str(i)][m]["kernel"]
            tree["layers"][str(i)][m]["kernel"] = np.asarray(kernel, np.float64) + s * a @ b
    oracle = N.load(N.unrolled(), tree)
    ids = M.inputs()
    np.testing.assert_allclose(peft(ids), oracle(ids), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(peft, ids), oracle(ids), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(jpeft.merge(method, peft)(ids), oracle(ids), atol=1e-4, rtol=1e-5)
