"""Prefix tuning and P-tuning v2 on tiny HF GPT-2 and Llama: the exact [t; x] oracle, folding, training."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft._tree import RESERVED
from tests import _hf_models as H
from tests.methods.test_prompt import TOKENS, TOL, check_base_identical, check_oracle, extend, sharp_gpt2, train_gpt2

P = len(TOKENS)


def real_kv(family: str) -> dict[tuple[str, ...], jax.Array]:
    """The base model's own key/value projection outputs for TOKENS, per module: ``{path: (P, features)}``.

    Captured on ``[TOKENS] + x``; the models are causal, so positions 0..P-1 see TOKENS only.
    """
    m = H.make(family)
    _, state = m.apply(
        {"params": m.params}, **extend(m.inputs, TOKENS), capture_intermediates=lambda mdl, _: mdl.name in ("c_attn", "k_proj", "v_proj"),
        mutable=["intermediates"],
    )
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        keys = tuple(k.key for k in path if hasattr(k, "key"))
        out[keys[:-1]] = value[0, :P]
    return out


def _leaves(path: tuple[str, ...], y: jax.Array) -> dict[str, jax.Array]:
    if path[-1] == "c_attn":  # GPT-2's fused [q; k; v]
        return {"prefix_key": y[:, H.HIDDEN : 2 * H.HIDDEN], "prefix_value": y[:, 2 * H.HIDDEN :]}
    return {"prefix": y}


def _node(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def oracle_tree(method: jpeft.PrefixTuning, family: str, key: jax.Array, *, within: jpeft.Method | None = None,
                component: str | None = None) -> Any:
    """``jpeft.apply``, then every layer's prefixes set to the base model's own k/v of TOKENS.

    With the MLP reparameterisation, W2 is solved so that ``tanh(E W1 + b1) W2 + b2`` hits the
    targets: the hidden ``(P, k)`` has full row rank, so the least-squares solution is exact.
    ``within``: a composition holding ``method`` under the key ``component`` (its tree is made).
    """
    m = H.make(family)
    peft = jpeft.apply(within or method, m.params, key=key)
    kv = real_kv(family)
    sites = method.prefix_sites(m.params)
    assert len(sites) == 2 * H.LAYERS and {s.path for s in sites} <= set(kv)
    if not method.prefix_projection:
        for path in {s.path for s in sites}:
            store = _node(peft, path)[RESERVED]
            want = _leaves(path, kv[path])
            assert {k: v.shape for k, v in store["default"].items()} == {k: v.shape for k, v in want.items()}
            store["default"] = want
        return peft
    target = np.concatenate([np.asarray(_leaves(s.path, kv[s.path])[s.leaf], np.float64) for s in sites], axis=1)
    store = _node(peft, method.embedding_site(m.params)[0])[RESERVED]["default"]
    store = store if component is None else store[component]
    e, w1, b1, b2 = (np.asarray(store[k], np.float64) for k in ("prefix_embedding", "w1", "b1", "b2"))
    hidden = np.tanh(e @ w1 + b1)
    store["w2"] = jnp.asarray(np.linalg.pinv(hidden) @ (target - b2), jnp.float32)
    return peft


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "method",
    [
        jpeft.PTuningV2(num_virtual_tokens=P),
        jpeft.PrefixTuning(num_virtual_tokens=P, prefix_projection=False),
        jpeft.PrefixTuning(num_virtual_tokens=P, projection_hidden_size=8),
    ],
    ids=["ptuning_v2", "prefix", "prefix_mlp"],
)
def test_prefixes_of_real_tokens_equal_base_model_on_real_token_prefix(
    family: str, method: jpeft.PrefixTuning, key: jax.Array
) -> None:
    check_oracle(family, method, oracle_tree(method, family, key))


@pytest.mark.parametrize("which", ["compose", "mam"])
def test_composed_prefix_mlp_materialises_its_own_namespace(which: str, key: jax.Array) -> None:
    """compose(PrefixTuning(prefix_projection=True), ...) and MAM(prefix_projection=True) used to raise
    KeyError 'prefix_embedding': the MLP sits at ``__jpeft__/<name>/<component>`` in a composed tree.

    Oracle: the MLP solved to give the base model's own k/v of TOKENS, and the adapter zero at init,
    so the wrapped composition on x equals the base model on [TOKENS] + x.
    """
    if which == "mam":
        composed = jpeft.MAM(prefix_tokens=P, adapter_bottleneck=4, prefix_projection=True)
        component = "prefix"
    else:
        composed = jpeft.compose(
            jpeft.PrefixTuning(num_virtual_tokens=P, projection_hidden_size=8), jpeft.ScaledParallelAdapter(bottleneck=4)
        )
        component = composed.keys[0]
    prefix = composed.methods[0]
    assert prefix.prefix_projection
    peft = oracle_tree(prefix, "gpt2", key, within=composed, component=component)
    check_oracle("gpt2", composed, peft)


DECODER_TOKENS = (7, 61, 23)  # u: the decoder's real-token prefix in the BART oracle


def extend_bart(inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """BART's inputs for ``([TOKENS] + x, [DECODER_TOKENS] + y)``."""
    out = extend(inputs, TOKENS)
    batch, length = inputs["decoder_input_ids"].shape
    u = jnp.broadcast_to(jnp.asarray(DECODER_TOKENS, jnp.int32), (batch, P))
    out["decoder_input_ids"] = jnp.concatenate([u, inputs["decoder_input_ids"]], 1)
    out["decoder_attention_mask"] = jnp.concatenate([jnp.ones((batch, P), jnp.int32), inputs["decoder_attention_mask"]], 1)
    out["decoder_position_ids"] = jnp.broadcast_to(jnp.arange(P + length, dtype=jnp.int32), (batch, P + length))
    return out


def bart_oracle_tree(method: jpeft.PrefixTuning, row: dict[str, jax.Array], key: jax.Array) -> Any:
    """Prefixes that make the wrapped BART on ``(x, y)`` the base BART on ``([t] + x, [u] + y)``.

    ``row`` is one example (batch 1). In the base run the rows of t and u see x (the encoder is
    bidirectional; the decoder cross-attends to x), so their keys and values depend on x: they are
    captured per example. Given them, x's and y's rows compute exactly what the base model computes,
    layer by layer: they read the prefix positions only through those keys and values. Captured:
    encoder and decoder self-attention k/v of t and u, and the cross-attention k/v projections of
    the encoder's output at t's positions.
    """
    m = H.make("bart")
    peft = jpeft.apply(method, m.params, key=key)
    _, state = m.apply(
        {"params": m.params}, **extend_bart(row), capture_intermediates=lambda mdl, _: mdl.name in ("k_proj", "v_proj"),
        mutable=["intermediates"],
    )
    kv = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        kv[tuple(k.key for k in path if hasattr(k, "key"))[:-1]] = value[0, :P]
    sites = method.prefix_sites(m.params)
    assert len(sites) == 3 * 2 * H.LAYERS and {s.path for s in sites} == set(kv)  # enc self, dec self, cross
    assert sum("encoder_attn" in s.path for s in sites) == 2 * H.LAYERS
    if not method.prefix_projection:
        for path in kv:
            store = _node(peft, path)[RESERVED]
            assert store["default"]["prefix"].shape == kv[path].shape == (P, H.HIDDEN)
            store["default"] = {"prefix": kv[path]}
        return peft
    target = np.concatenate([np.asarray(kv[s.path], np.float64) for s in sites], axis=1)
    store = _node(peft, method.embedding_site(m.params)[0])[RESERVED]["default"]
    e, w1, b1, b2 = (np.asarray(store[k], np.float64) for k in ("prefix_embedding", "w1", "b1", "b2"))
    store["w2"] = jnp.asarray(np.linalg.pinv(np.tanh(e @ w1 + b1)) @ (target - b2), jnp.float32)
    return peft


@pytest.mark.parametrize(
    "method",
    [jpeft.PTuningV2(num_virtual_tokens=P), jpeft.PrefixTuning(num_virtual_tokens=P, projection_hidden_size=8)],
    ids=["ptuning_v2", "prefix_mlp"],
)
def test_bart_prefixes_on_encoder_decoder_and_cross_attention_equal_base_on_real_tokens(
    method: jpeft.PrefixTuning, key: jax.Array
) -> None:
    m = H.make("bart")
    for b in range(H.BATCH):  # row 1 has a padded last encoder position
        row = {k: v[b : b + 1] for k, v in m.inputs.items()}
        peft = bart_oracle_tree(method, row, key)
        out = jpeft.wrap(m.apply, method)({"params": peft}, **row, output_hidden_states=True)
        ref = m.apply({"params": m.params}, **extend_bart(row), output_hidden_states=True)
        assert out.logits.shape == (1, H.SEQ, H.VOCAB)
        assert out.encoder_last_hidden_state.shape == (1, H.SEQ, H.HIDDEN)
        np.testing.assert_allclose(out.encoder_last_hidden_state, ref.encoder_last_hidden_state[:, P:], **TOL)
        for a, r in zip(out.encoder_hidden_states + out.decoder_hidden_states,
                        ref.encoder_hidden_states + ref.decoder_hidden_states, strict=True):
            np.testing.assert_allclose(a, r[:, P:], **TOL)
        np.testing.assert_allclose(out.logits, ref.logits[:, P:], **TOL)
        # The cross-attention prefixes matter: zeroing them moves the logits by 10x the tolerance
        # (this random BART's attention is weak, so the change is small but well above rounding).
        no_cross = jax.tree_util.tree_map_with_path(
            lambda p, x: 0 * x if "encoder_attn" in jax.tree_util.keystr(p) and RESERVED in jax.tree_util.keystr(p) else x,
            peft,
        )
        if not method.prefix_projection:
            changed = jpeft.wrap(m.apply, method)({"params": no_cross}, **row).logits
            assert np.abs(np.asarray(changed - out.logits)).max() > 1e-4


def test_fold_mlp_into_plain_prefixes(key: jax.Array) -> None:
    m = H.make("gpt2")
    method = jpeft.PrefixTuning(num_virtual_tokens=P, projection_hidden_size=16)
    peft = jpeft.apply(method, m.params, key=key)
    folded = jpeft.merge(method, peft)
    plain = method.folded_method()
    assert type(plain) is jpeft.PTuningV2 and plain.num_virtual_tokens == P
    assert RESERVED not in folded["transformer"]["wte"]  # the MLP is gone
    layer = folded["transformer"]["h"]["1"]["attn"]["c_attn"]
    assert {k: v.shape for k, v in layer[RESERVED]["default"].items()} == {
        "prefix_key": (P, H.HIDDEN),
        "prefix_value": (P, H.HIDDEN),
    }
    assert layer["kernel"] is m.params["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"]
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(jpeft.split(plain, folded)[0])) == plain.param_count(m.params)
    a = jpeft.wrap(m.apply, method)({"params": peft}, **m.inputs).logits
    b = jpeft.wrap(m.apply, plain)({"params": folded}, **m.inputs).logits
    np.testing.assert_array_equal(a, b)
    base = m.apply({"params": m.params}, **m.inputs).logits
    assert np.abs(np.asarray(a - base)).max() > 1e-3  # random prefixes do change the outputs


def test_param_counts_closed_form(key: jax.Array) -> None:
    import transformers

    def counted(method: jpeft.Method, params: Any) -> int:
        tree = jax.eval_shape(lambda: jpeft.apply(method, params, key=key))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(jpeft.split(method, tree)[0]))

    config = transformers.BertConfig()  # BERT-base shapes, no download: only eval_shape
    module = transformers.FlaxBertForSequenceClassification.module_class(config)
    ids = jnp.ones((1, 4), jnp.int32)
    bert = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids, ids, ids, None))["params"]
    n_layers, d, n, k = 12, 768, 30, 512
    cases = {
        jpeft.PTuningV2(num_virtual_tokens=20): 2 * n_layers * 20 * d,
        jpeft.PrefixTuning(num_virtual_tokens=n, prefix_projection=False): 2 * n_layers * n * d,
        jpeft.PrefixTuning(num_virtual_tokens=n): n * d + d * k + k + 2 * n_layers * d * k + 2 * n_layers * d,
    }
    for method, closed in cases.items():
        assert method.param_count(bert) == counted(method, bert) == closed
    # grouped-query attention: d_kv = kv_heads * head_dim < d
    llama = transformers.FlaxLlamaForCausalLM.module_class(
        transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64)
    )
    with jax.numpy_rank_promotion("allow"):  # HF's Llama relies on it
        gqa = jax.eval_shape(lambda: llama.init(jax.random.key(0), ids, ids, ids))["params"]
    assert jpeft.PTuningV2(num_virtual_tokens=5).param_count(gqa) == counted(jpeft.PTuningV2(num_virtual_tokens=5), gqa) == 2 * 2 * 5 * 16


def test_mam_on_bart_at_init_is_its_prefixes(key: jax.Array) -> None:
    """MAM's parallel adapter is zero at init, so on BART it runs exactly its three kinds of prefixes."""
    m = H.make("bart")
    mam = jpeft.MAM(prefix_tokens=P, adapter_bottleneck=4)
    peft = jpeft.apply(mam, m.params, key=key)
    plain = jpeft.PTuningV2(num_virtual_tokens=P)
    sites = plain.prefix_sites(m.params)
    same = jpeft.apply(plain, m.params, key=key)
    for s in sites:
        _node(same, s.path)[RESERVED]["default"] = {"prefix": _node(peft, s.path)[RESERVED]["default"]["prefix"]["prefix"]}
    a = jpeft.wrap(m.apply, mam)({"params": peft}, **m.inputs)
    b = jpeft.wrap(m.apply, plain)({"params": same}, **m.inputs)
    np.testing.assert_allclose(a.logits, b.logits, **TOL)
    np.testing.assert_allclose(a.encoder_last_hidden_state, b.encoder_last_hidden_state, **TOL)
    base = m.apply({"params": m.params}, **m.inputs).logits
    assert np.abs(np.asarray(a.logits - base)).max() > 1e-3


def test_bart_large_counts_closed_form_and_mam_share(key: jax.Array) -> None:
    """BART-large shapes (eval_shape only, no download): 36 attention modules get prefixes.

    12 encoder self-attentions, 12 decoder self-attentions and 12 cross-attentions, each ``2 P d``.
    MAM (He et al., 2022: l = 30 prefixes, a parallel FFN adapter of r = 512 in all 24 layers) trains
    6.7% of BART-large's parameters, the paper's figure.
    """
    import transformers

    config = transformers.BartConfig(
        d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16, decoder_attention_heads=16,
        encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=50265, max_position_embeddings=1024,
    )
    module = transformers.FlaxBartForConditionalGeneration.module_class(config)
    ids = jnp.ones((1, 4), jnp.int32)
    with jax.numpy_rank_promotion("allow"):  # HF's BART relies on it
        bart = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids, ids, ids, ids, ids))["params"]
    base = sum(math.prod(x.shape) for x in jax.tree.leaves(bart))
    d, n, k, attentions = 1024, 30, 512, 36
    prefixes = 2 * n * d * attentions
    cases = {
        jpeft.PTuningV2(num_virtual_tokens=n): prefixes,
        jpeft.PrefixTuning(num_virtual_tokens=n, prefix_projection=False): prefixes,
        jpeft.PrefixTuning(num_virtual_tokens=n): n * d + d * k + k + 2 * attentions * d * (k + 1),
    }
    for method, closed in cases.items():
        tree = jax.eval_shape(lambda m=method: jpeft.apply(m, bart, key=key))
        assert method.param_count(bart) == sum(math.prod(x.shape) for x in jax.tree.leaves(jpeft.split(method, tree)[0])) == closed
    assert prefixes == 2_211_840
    mam = jpeft.MAM(prefix_tokens=n, adapter_bottleneck=k, adapter_scaling=4.0)
    adapters = 24 * (d * k + k + k * d + d)  # one parallel FFN adapter per encoder and decoder layer
    assert mam.param_count(bart) == prefixes + adapters == 27_414_528
    assert round(100 * mam.param_count(bart) / base, 1) == 6.7  # He et al., Table 1: 6.7% (of the base model)
    text = jpeft.summary(mam, jax.eval_shape(lambda: jpeft.apply(mam, bart, key=key)))
    # jpeft.summary divides by all parameters, the added ones included: 27.4M / (406.3M + 27.4M)
    assert f"trainable params: {prefixes + adapters:,} || all params: {base + prefixes + adapters:,}" in text
    assert text.count("encoder_attn/k_proj") == 12


@pytest.mark.parametrize(
    "method",
    [jpeft.PTuningV2(num_virtual_tokens=P), jpeft.PrefixTuning(num_virtual_tokens=P, projection_hidden_size=16)],
    ids=["ptuning_v2", "prefix_mlp"],
)
def test_training_lowers_loss_and_keeps_base(method: jpeft.Method, key: jax.Array) -> None:
    m = sharp_gpt2()
    peft = jpeft.apply(method, m.params, key=key)
    first, last, trained = train_gpt2(method, peft)
    assert last < 0.7 * first, (first, last)
    check_base_identical(m.params, trained)


def test_errors(key: jax.Array) -> None:
    m = H.make("gpt2")
    with pytest.raises(jpeft.JpeftError, match=r"PTuningV2\(num_virtual_tokens=-1\): num_virtual_tokens must be a positive int"):
        jpeft.PTuningV2(num_virtual_tokens=-1)
    with pytest.raises(jpeft.JpeftError, match=r"projection_hidden_size must be a positive int"):
        jpeft.PrefixTuning(projection_hidden_size=0)
    with pytest.raises(jpeft.JpeftError, match=r"prefix_projection=1\): must be a bool"):
        jpeft.PrefixTuning(prefix_projection=1)
    with pytest.raises(jpeft.JpeftError, match=r"PTuningV2: the parameter tree matches no known family"):
        jpeft.apply(jpeft.PTuningV2(), {"dense": {"kernel": jnp.ones((2, 2))}}, key=key)
    import dataclasses

    embed = dataclasses.replace(jpeft.profiles.GPT2, qkv_fused=None, key=r"(.*/)?wpe", value=r"(.*/)?h/\d+/attn/c_attn")
    with pytest.raises(jpeft.JpeftError, match=r"transformer/wpe has a 'embed' kernel; key and value projections must be dense"):
        jpeft.apply(jpeft.PTuningV2(profile=embed), m.params, key=key)
    nokv = dataclasses.replace(jpeft.profiles.LLAMA, key=r"nothing", value=r"nothing")
    with pytest.raises(jpeft.JpeftError, match=r"profile 'llama' finds no key or value projection"):
        jpeft.apply(jpeft.PTuningV2(profile=nokv), H.make("llama").params, key=key)
    c_proj = r"(.*/)?h/\d+/attn/c_proj"
    odd = dataclasses.replace(jpeft.profiles.GPT2, qkv_fused=c_proj, key=c_proj, value=c_proj)
    with pytest.raises(jpeft.JpeftError, match=r"fused QKV module .*c_proj has output features \(32,\)"):
        jpeft.apply(jpeft.PTuningV2(profile=odd), m.params, key=key)
    method = jpeft.PTuningV2(num_virtual_tokens=2)
    with pytest.raises(jpeft.JpeftError, match=r"PTuningV2\(prefix_projection=False\) cannot be merged"):
        jpeft.merge(method, jpeft.apply(method, m.params, key=key))
    mlp = jpeft.PrefixTuning(num_virtual_tokens=2, projection_hidden_size=4)
    with pytest.raises(jpeft.JpeftError, match=r"holds no prefix MLP of adapter 'x'"):
        jpeft.merge(mlp, jpeft.apply(mlp, m.params, key=key), name="x")
