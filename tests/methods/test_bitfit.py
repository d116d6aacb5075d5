"""BitFit on the synthetic scan model and tiny HF BERT and GPT-2: the labels pick exactly the biases,
closed-form counts (and the paper's fraction on BERT-base shapes), gradients, the identity wrap and
merge, training, and every error."""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest
import transformers

import jpeft
from tests import _hf_models as H
from tests import _models as M
from tests.methods import _common as K

L, D, FF = H.LAYERS, H.HIDDEN, H.FFN


def biases(name: str) -> set[tuple[str, ...]]:
    """Every bias leaf of the model, written from its definition."""
    if name == "bert":
        per = [
            ("attention", "self", "query"),
            ("attention", "self", "key"),
            ("attention", "self", "value"),
            ("attention", "output", "dense"),
            ("attention", "output", "LayerNorm"),
            ("intermediate", "dense"),
            ("output", "dense"),
            ("output", "LayerNorm"),
        ]
        out = {("bert", "encoder", "layer", str(i), *m, "bias") for i in range(L) for m in per}
        return out | {("bert", "embeddings", "LayerNorm", "bias"), ("bert", "pooler", "dense", "bias"), ("classifier", "bias")}
    if name == "gpt2":
        per = [("ln_1",), ("attn", "c_attn"), ("attn", "c_proj"), ("ln_2",), ("mlp", "c_fc"), ("mlp", "c_proj")]
        return {("transformer", "h", str(i), *m, "bias") for i in range(L) for m in per} | {("transformer", "ln_f", "bias")}
    return {("layers", m, "bias") for m in ("ln", "q", "k", "v", "o", "dg_in", "dg_out", "conv")} | {("head", "bias")}


# The closed forms: L (7 d + d_ff) for the transformer blocks, plus what sits outside them.
CLOSED = {
    "bert": L * (7 * D + FF) + D + D + 3,  # embedding LayerNorm, pooler, 3-label classifier
    "gpt2": L * (7 * D + FF) + D,  # c_attn's bias is 3 d; the final LayerNorm
    "synthetic": M.LAYERS * (6 * M.D + int(np.prod(M.DG_OUT)) + M.D) + M.VOCAB,
}
MODELS = tuple(CLOSED)


@functools.cache
def tree(name: str):
    return jpeft.apply(jpeft.BitFit(), K.model(name)[0], key=jax.random.key(1))


@pytest.mark.parametrize("name", MODELS)
def test_labels_are_exactly_the_biases_and_count_is_closed_form(name):
    method = jpeft.BitFit()
    peft = tree(name)
    assert K.trainable_paths(method, peft) == biases(name)
    assert K.count(method, peft) == method.param_count(K.model(name)[0]) == CLOSED[name]


def test_query_ffn_variant_on_bert():
    method = jpeft.BitFit(variant="query_ffn")
    peft = jpeft.apply(method, K.model("bert")[0], key=jax.random.key(1))
    want = {p for p in biases("bert") if p[-2:] == ("query", "bias") or p[-3:-1] == ("intermediate", "dense")}
    assert len(want) == 2 * L and K.trainable_paths(method, peft) == want
    assert K.count(method, peft) == method.param_count(peft) == L * (D + FF)


def test_extra_trainable_adds_the_head():
    method = jpeft.BitFit(extra_trainable=r"classifier/.*")
    peft = jpeft.apply(method, K.model("bert")[0], key=jax.random.key(1))
    assert K.trainable_paths(method, peft) == biases("bert") | {("classifier", "kernel")}
    assert K.count(method, peft) == method.param_count(peft) == CLOSED["bert"] + 3 * D


def test_targets_narrow_the_biases():
    method = jpeft.BitFit(targets=r".*/(LayerNorm|ln_\d|ln_f)")
    peft = jpeft.apply(method, K.model("gpt2")[0], key=jax.random.key(1))
    assert K.trainable_paths(method, peft) == {p for p in biases("gpt2") if p[-2].startswith("ln")}


@functools.cache
def bert_base_shapes():
    """HF BERT-base's parameter shapes (``BertConfig()`` defaults), without allocating them."""
    model = transformers.FlaxBertModel(transformers.BertConfig(), _do_init=False)
    with jax.numpy_rank_promotion("allow"):
        return jax.eval_shape(lambda k: model.init_weights(k, (1, 8)), jax.random.key(0))


def test_bert_base_fraction_is_the_papers():
    shapes = bert_base_shapes()
    layers, d, d_ff = 12, 768, 3072
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert total == 109_482_240
    for method, want in [
        (jpeft.BitFit(), layers * (7 * d + d_ff) + 2 * d),  # + the embedding LayerNorm and the pooler
        (jpeft.BitFit(variant="query_ffn"), layers * (d + d_ff)),
    ]:
        summary = jpeft.summary(method, jpeft.apply(method, shapes, key=jax.random.key(0)))
        got = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", summary)
        assert int(got.group(1).replace(",", "")) == want == method.param_count(shapes)
        assert int(got.group(2).replace(",", "")) == total
        percent = float(got.group(3))
        assert percent == pytest.approx(100 * want / total, abs=1e-4)
        # The paper: 0.08-0.09% of BERT for all biases (0.0940% here), about 0.04% for the subset.
        assert 0.085 <= percent <= 0.095 if method.variant == "all" else 0.035 <= percent <= 0.045


@pytest.mark.parametrize("name", MODELS)
def test_grads_reach_exactly_the_biases(name):
    method = jpeft.BitFit()
    key_biases = {p for p in biases(name) if p[-2] == "key" or p[-2:] == ("k", "bias")}
    grads = K.check_grads(name, method, tree(name), zero_ok=key_biases)
    assert set(grads) == biases(name)


def test_wrap_and_merge_are_identities():
    method = jpeft.BitFit()
    params, apply = K.model("gpt2")
    assert jpeft.wrap(apply, method).__wrapped__ is apply  # runs the model unchanged
    peft = tree("gpt2")
    assert all(K.flat(peft)[p] is x for p, x in K.flat(params).items()), "apply adds and copies nothing"
    trained = K.perturb(method, peft, seed=3)
    merged = jpeft.merge(method, trained)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert all(K.flat(merged)[p] is x for p, x in K.flat(trained).items())


def test_training_lowers_the_loss_and_keeps_the_base():
    K.check_training("gpt2", jpeft.BitFit(), tree("gpt2"), steps=40, lr=2e-2)


# --- errors ------------------------------------------------------------------------------------
def test_model_without_biases_raises():
    with pytest.raises(jpeft.JpeftError, match=r"BitFit\(variant='all'\) found no 'bias' leaf among \d+ modules"):
        jpeft.apply(jpeft.BitFit(), H.make("llama").params, key=jax.random.key(0))


def test_targets_without_biases_raise():
    method = jpeft.BitFit(targets=("word_embeddings",))
    with pytest.raises(jpeft.JpeftError, match=r"found no 'bias' leaf in the modules that targets=\('word_embeddings',\)"):
        jpeft.apply(method, H.make("bert").params, key=jax.random.key(0))


def test_query_ffn_on_fused_qkv_raises():
    with pytest.raises(jpeft.JpeftError, match=r"gpt2 fuses q, k and v into one projection"):
        jpeft.apply(jpeft.BitFit(variant="query_ffn"), H.make("gpt2").params, key=jax.random.key(0))


def test_query_ffn_without_profile_raises():
    with pytest.raises(jpeft.JpeftError, match=r"BitFit\(variant='query_ffn'\): no architecture profile matches"):
        jpeft.apply(jpeft.BitFit(variant="query_ffn"), M.params(), key=jax.random.key(0))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(variant="query"), r"BitFit\(variant='query'\): variant must be one of \('all', 'query_ffn'\)"),
        (dict(variant="query_ffn", targets=("query",)), r"pass targets only with variant='all'"),
        (dict(targets=3), r"targets must be a regex str"),
        (dict(extra_trainable="("), r"not a valid regular expression"),
    ],
)
def test_bad_fields_raise(kw, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.BitFit(**kw)
