"""Freeze (top-l layers) and Full fine-tuning on tiny HF BERT, GPT-2 and BART and the synthetic scan
model: exact labels, closed-form counts, gradients, the identity wrap and merge, training, errors."""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from tests import _hf_models as H
from tests import _models as M
from tests.methods import _common as K

L, D, FF = H.LAYERS, H.HIDDEN, H.FFN

# Parameters of one transformer block, from the architectures' definitions.
P_LAYER = {
    # q, k, v, attention output (d x d + d each), two LayerNorms, FFN in and out.
    "bert": 4 * (D * D + D) + 2 * 2 * D + (D * FF + FF) + (FF * D + D),
    # c_attn (d x 3d + 3d), c_proj, c_fc, mlp c_proj, ln_1 and ln_2.
    "gpt2": (D * 3 * D + 3 * D) + (D * D + D) + (D * FF + FF) + (FF * D + D) + 2 * 2 * D,
}
HEAD = {"bert": r"classifier/.*", "gpt2": r"transformer/ln_f/.*"}
HEAD_SIZE = {"bert": D * 3 + 3, "gpt2": 2 * D}


@functools.cache
def params(name: str):
    return K.model(name)[0]


def layer_paths(name: str, *layers: int) -> set[tuple[str, ...]]:
    """The leaves of the given layers, read off the tree by path prefix."""
    prefix = {"bert": ("bert", "encoder", "layer"), "gpt2": ("transformer", "h")}[name]
    return {p for p in K.flat(params(name)) if p[: len(prefix)] == prefix and int(p[len(prefix)]) in layers}


@pytest.mark.parametrize("name", ["bert", "gpt2"])
@pytest.mark.parametrize("top", [0, 1, 2])
def test_freeze_trains_the_last_layers_and_the_head(name, top):
    method = jpeft.Freeze(trainable_layers=top, extra_trainable=HEAD[name])
    peft = jpeft.apply(method, params(name), key=jax.random.key(1))
    head = {p for p in K.flat(peft) if re.fullmatch(HEAD[name], "/".join(p))}
    assert K.trainable_paths(method, peft) == layer_paths(name, *range(L - top, L)) | head
    assert K.count(method, peft) == method.param_count(params(name)) == top * P_LAYER[name] + HEAD_SIZE[name]


def test_freeze_counts_layers_per_stack_on_bart():
    method = jpeft.Freeze(trainable_layers=1)
    peft = jpeft.apply(method, H.make("bart").params, key=jax.random.key(1))
    want = {p for p in K.flat(peft) if re.search(r"(encoder|decoder)/layers/1/", "/".join(p))}
    assert want and K.trainable_paths(method, peft) == want
    assert {p[1] for p in want} == {"encoder", "decoder"}


def test_freeze_with_a_layer_pattern_of_ones_own():
    tree = {"blocks": {str(i): {"w": {"kernel": jax.numpy.ones((2, 2))}} for i in range(12)}, "out": {"bias": jax.numpy.ones(2)}}
    method = jpeft.Freeze(trainable_layers=3, layer_pattern=r"blocks/(\d+)")  # 10 and 11 sort after 9
    assert K.trainable_paths(method, tree) == {("blocks", str(i), "w", "kernel") for i in (9, 10, 11)}
    assert method.param_count(tree) == 12


@pytest.mark.parametrize("name", ["gpt2"])
def test_freeze_grads_reach_exactly_the_trainable_leaves(name):
    method = jpeft.Freeze(trainable_layers=1, extra_trainable=HEAD[name])
    peft = jpeft.apply(method, params(name), key=jax.random.key(1))
    assert set(K.check_grads(name, method, peft)) == layer_paths(name, L - 1) | {
        p for p in K.flat(peft) if re.fullmatch(HEAD[name], "/".join(p))
    }


def test_wrap_and_merge_are_identities():
    for method in (jpeft.Freeze(trainable_layers=1), jpeft.Full()):
        p, apply = K.model("gpt2")
        assert jpeft.wrap(apply, method).__wrapped__ is apply  # runs the model unchanged
        peft = jpeft.apply(method, p, key=jax.random.key(1))
        merged = jpeft.merge(method, peft)
        assert jax.tree.structure(merged) == jax.tree.structure(p)
        assert all(K.flat(merged)[q] is x for q, x in K.flat(p).items())


def test_freeze_training_lowers_the_loss_and_keeps_the_base():
    method = jpeft.Freeze(trainable_layers=1, extra_trainable=HEAD["gpt2"])
    K.check_training("gpt2", method, jpeft.apply(method, params("gpt2"), key=jax.random.key(1)), steps=40, lr=1e-2)


# --- Full --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["synthetic", "bert", "gpt2"])
def test_full_trains_everything(name):
    method = jpeft.Full()
    peft = jpeft.apply(method, params(name), key=jax.random.key(1))
    assert K.trainable_paths(method, peft) == set(K.flat(params(name)))
    total = sum(x.size for x in jax.tree.leaves(params(name)))
    assert K.count(method, peft) == method.param_count(params(name)) == total


def test_full_grads_and_training_on_the_scan_model():
    method = jpeft.Full()
    peft = jpeft.apply(method, params("synthetic"), key=jax.random.key(1))
    key_bias = {("layers", "k", "bias")}  # the softmax ignores it
    assert set(K.check_grads("synthetic", method, peft, zero_ok=key_bias)) == set(K.flat(peft))
    K.check_training("mlp", method, jpeft.apply(method, params("mlp"), key=jax.random.key(1)), steps=40, lr=1e-2)


# --- Freeze on nn.scan-stacked layers ---------------------------------------------------------
SCAN = dict(scan_layers=r"layers/.*", extra_trainable=r"head/.*")


def stacked_paths() -> dict[tuple[str, ...], jax.Array]:
    return {p: x for p, x in K.flat(params("synthetic")).items() if p[0] == "layers"}


@pytest.mark.parametrize("top,label", [(0, "frozen"), (1, "freeze_stacked"), (M.LAYERS, "trainable")])
def test_freeze_labels_and_counts_stacked_leaves(top, label):
    method = jpeft.Freeze(trainable_layers=top, **SCAN)
    labels = K.flat(jpeft.labels(method, params("synthetic")))
    assert {p: v for p, v in labels.items() if p[0] == "layers"} == dict.fromkeys(stacked_paths(), label)
    assert {labels[p] for p in labels if p[0] == "head"} == {"trainable"}
    assert {labels[p] for p in labels if p[0] == "embed"} == {"frozen"}
    # Closed form: l of the L slices of every stacked leaf, plus the head (d x V + V).
    per_layer = sum(x.size for x in stacked_paths().values()) // M.LAYERS
    assert method.param_count(params("synthetic")) == top * per_layer + M.D * M.VOCAB + M.VOCAB
    assert per_layer == 4 * (M.D * M.D + M.D) + 2 * M.D + (M.D * 8 + 8) + (8 * M.D + M.D) + (
        M.CONV_WINDOW * M.D * M.D + M.D)


@functools.cache
def train_scan(method: jpeft.Freeze, *, lean: bool, steps: int = 5) -> tuple[dict, Any]:
    """Adam steps on the scan model, by the full tree (``optimizer`` on it) or by ``split``'s halves."""
    tree, apply = K.model("synthetic")
    target = jax.random.normal(jax.random.key(3), K.base_output("synthetic").shape)
    trainable, frozen = jpeft.split(method, tree) if lean else (tree, None)
    tx = jpeft.optimizer(optax.adam(1e-2), method, trainable)
    state = tx.init(trainable)

    def loss(t):
        full = jpeft.combine(t, frozen) if lean else t
        return jnp.mean((apply({"params": full}) - target) ** 2)

    @jax.jit
    def step(t, s):
        updates, s = tx.update(jax.grad(loss)(t), s, t)
        return optax.apply_updates(t, updates), s

    for _ in range(steps):
        trainable, state = step(trainable, state)
    return K.flat(jpeft.combine(trainable, frozen) if lean else trainable), state


def test_freeze_trains_only_the_last_slices_of_stacked_leaves():
    method = jpeft.Freeze(trainable_layers=1, **SCAN)
    trained, state = train_scan(method, lean=False)
    before = K.flat(params("synthetic"))
    for p, x in stacked_paths().items():
        # The first L - l slices are bit-identical; the last one moved (but layers/k/bias, which the
        # softmax ignores: its gradient, and so its Adam update, is exactly 0).
        np.testing.assert_array_equal(trained[p][: M.LAYERS - 1], x[: M.LAYERS - 1], err_msg=str(p))
        assert p == ("layers", "k", "bias") or not np.array_equal(trained[p][-1], x[-1]), p
    for p, x in before.items():
        assert np.array_equal(trained[p], x) == (p[0] == "embed"), p
    # The frozen slices keep zero Adam moments.
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    moments = {(tuple(str(k.key) for k in p), i): m for s in adam for i, tree in enumerate((s.mu, s.nu))
               for p, m in jax.tree_util.tree_flatten_with_path(tree)[0] if p[0].key == "layers"}
    assert len(moments) == 2 * len(stacked_paths())
    for (p, _), m in moments.items():
        assert not np.any(m[: M.LAYERS - 1]) and (p == ("layers", "k", "bias") or np.all(m[-1] != 0)), p


def test_freeze_stacked_split_path_agrees_with_the_full_tree():
    method = jpeft.Freeze(trainable_layers=1, **SCAN)
    trainable, frozen = jpeft.split(method, params("synthetic"))
    assert {p[0] for p, x in K.flat(trainable).items() if x is not None} == {"layers", "head"}
    full, _ = train_scan(method, lean=False)
    lean, _ = train_scan(method, lean=True)
    for p, x in full.items():
        np.testing.assert_allclose(lean[p], x, rtol=1e-6, atol=1e-7, err_msg=str(p))


def test_freeze_stacked_errors():
    tree = params("synthetic")
    cases = [
        (dict(scan_layers=r"nothing/.*"), r"scan_layers='nothing/\.\*'\) matches none of the leaf paths"),
        (dict(scan_layers=r"layers/.*|embed/.*"), r"leading axes of different lengths \{2: 'layers/.*', 11: 'embed/"),
        (dict(trainable_layers=3, scan_layers=r"layers/.*"), r"the scan_layers stack has 2 layers; pass trainable_"),
    ]
    for kw, match in cases:
        with pytest.raises(jpeft.JpeftError, match=match):
            jpeft.apply(jpeft.Freeze(**{"trainable_layers": 1, **kw}), tree, key=jax.random.key(0))
    both = {"layers": {"0": {"w": jnp.ones((2, 2))}}}
    with pytest.raises(jpeft.JpeftError, match=r"'layers/0/w' matches both layer_pattern=.* \(layer 0\) and scan_layers"):
        jpeft.Freeze(trainable_layers=1, layer_pattern=r"layers/(\d+)", scan_layers=r"layers/.*").param_count(both)
    scalar = {"layers": {"s": jnp.ones(())}}
    with pytest.raises(jpeft.JpeftError, match=r"'layers/s' has shape \(\) and no leading layer axis"):
        jpeft.Freeze(trainable_layers=1, scan_layers=r"layers/.*").param_count(scalar)
    with pytest.raises(jpeft.JpeftError, match=r"Freeze\(scan_layers='\('\): not a valid regular expression"):
        jpeft.Freeze(trainable_layers=1, scan_layers="(")


def test_unnamed_scanned_layers_raise():
    # One leaf holds every layer, and no scan_layers names it.
    method = jpeft.Freeze(trainable_layers=1, layer_pattern=r"(?:^|/)layers/(\d+)(?=/|$)")
    with pytest.raises(jpeft.JpeftError, match=r"finds no layer index .* stacked by nn.scan .* scan_layers="):
        jpeft.apply(method, M.params(), key=jax.random.key(0))


# --- errors ------------------------------------------------------------------------------------
def test_no_profile_and_no_layer_pattern_raises():
    with pytest.raises(jpeft.JpeftError, match=r"Freeze\(trainable_layers=1\): no architecture profile matches"):
        jpeft.apply(jpeft.Freeze(trainable_layers=1), M.params(), key=jax.random.key(0))


def test_more_layers_than_the_stack_raises():
    with pytest.raises(jpeft.JpeftError, match=r"the stack 'transformer/h/' has 2 layers; pass trainable_layers <= 2"):
        jpeft.apply(jpeft.Freeze(trainable_layers=3), params("gpt2"), key=jax.random.key(0))


def test_pattern_capturing_no_index_raises():
    method = jpeft.Freeze(trainable_layers=1, layer_pattern=r"(h)/\d+")
    with pytest.raises(jpeft.JpeftError, match=r"group 1 captured 'h' in 'transformer/h/0/.*digits only"):
        jpeft.apply(method, params("gpt2"), key=jax.random.key(0))


def test_full_on_an_empty_tree_raises():
    with pytest.raises(jpeft.JpeftError, match=r"Full: the tree holds no parameters"):
        jpeft.apply(jpeft.Full(), {}, key=jax.random.key(0))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(trainable_layers=-1), r"Freeze\(trainable_layers=-1\): trainable_layers must be an int >= 0"),
        (dict(trainable_layers=True), r"trainable_layers must be an int >= 0"),
        (dict(trainable_layers=1, layer_pattern=r"layers/\d+"), r"must have exactly one group, the layer index"),
        (dict(trainable_layers=1, layer_pattern=r"layers/(\d+"), r"not a valid regular expression"),
    ],
)
def test_bad_fields_raise(kw, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.Freeze(**kw)
