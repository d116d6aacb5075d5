"""Freeze (top-l layers) and Full fine-tuning on tiny HF BERT, GPT-2 and BART and the synthetic scan
model: exact labels, closed-form counts, gradients, the identity wrap and merge, training, errors."""

from __future__ import annotations

import functools
import re

import jax
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
        assert jpeft.wrap(apply, method) is apply
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


# --- errors ------------------------------------------------------------------------------------
def test_scanned_layers_raise():
    # One leaf holds every layer; labels cannot train its last slices alone.
    method = jpeft.Freeze(trainable_layers=1, layer_pattern=r"(?:^|/)layers/(\d+)(?=/|$)")
    with pytest.raises(jpeft.JpeftError, match=r"finds no layer index .* stacked by nn.scan .* use jpeft.Full\(\)"):
        jpeft.apply(method, M.params(), key=jax.random.key(0))


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
