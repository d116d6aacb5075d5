"""Prompt tuning and P-tuning on tiny HF models: the exact [t; x] oracle, folding, training, errors."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft._tree import RESERVED
from tests import _hf_models as H

P = 3
TOKENS = (5, 17, 42)
TOL = dict(rtol=1e-5, atol=1e-5)


def extend(inputs: dict[str, jax.Array], tokens: Any) -> dict[str, jax.Array]:
    """The base model's inputs for ``[tokens] + x``: real tokens in front, positions arange(P + T)."""
    batch, length = inputs["input_ids"].shape
    n = len(tokens)
    out = dict(inputs)
    out["input_ids"] = jnp.concatenate([jnp.broadcast_to(jnp.asarray(tokens, jnp.int32), (batch, n)), inputs["input_ids"]], 1)
    out["attention_mask"] = jnp.concatenate([jnp.ones((batch, n), jnp.int32), inputs["attention_mask"]], 1)
    out["position_ids"] = jnp.broadcast_to(jnp.arange(n + length, dtype=jnp.int32), (batch, n + length))
    if "token_type_ids" in inputs:
        out["token_type_ids"] = jnp.zeros((batch, n + length), jnp.int32)
    return out


def check_oracle(family: str, method: jpeft.Method, peft: Any, *, sliced_logits: bool = True) -> None:
    """wrap(apply)(peft) on x equals the base model on [TOKENS] + x at x's positions."""
    m = H.make(family)
    out = jpeft.wrap(m.apply, method)({"params": peft}, **m.inputs, output_hidden_states=True)
    ref = m.apply({"params": m.params}, **extend(m.inputs, TOKENS), output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == H.LAYERS + 1
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert a.shape == (H.BATCH, H.SEQ, H.HIDDEN)
        np.testing.assert_allclose(a, b[:, P:], **TOL)
    np.testing.assert_allclose(out.logits, ref.logits[:, P:] if sliced_logits else ref.logits, **TOL)


@functools.cache
def sharp_gpt2() -> H.HFModel:
    """A tiny GPT-2 with larger random weights (std 0.3), so that its logits can move enough for training.

    H.make's GPT-2 (std 0.02) gives near-uniform logits whatever its inputs, which no prompt can fix.
    """
    import transformers

    config = transformers.GPT2Config(
        vocab_size=H.VOCAB, n_embd=H.HIDDEN, n_layer=H.LAYERS, n_head=H.HEADS, n_inner=H.FFN, n_positions=64,
        initializer_range=0.3, tie_word_embeddings=False,
    )
    with jax.numpy_rank_promotion("allow"):
        model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
    m = H.make("gpt2")

    def apply(variables: Any, **inputs: Any) -> Any:
        with jax.numpy_rank_promotion("allow"):
            return model.module.apply(variables, **{"deterministic": True, **inputs})

    return H.HFModel(model=model, params=dict(model.params), apply=apply, inputs=m.inputs, logits=m.logits)


def train_gpt2(method: jpeft.Method, peft: Any, *, steps: int = 20, lr: float = 0.3) -> tuple[float, float, Any]:
    """Trains the trainable half to steer every position to token 7; returns (first loss, last loss, tree).

    On a random (untrained) model the virtual tokens can only move the outputs through attention, so
    the reachable loss is bounded; the drop is deterministic, so a fixed margin is a clear signal.
    """
    m = sharp_gpt2()
    wrapped = jpeft.wrap(m.apply, method)
    trainable, frozen = jpeft.split(method, peft)
    tx = jpeft.optimizer(optax.adam(lr), method, trainable)

    def loss_fn(t: Any) -> jax.Array:
        logits = wrapped({"params": jpeft.combine(t, frozen)}, **m.inputs).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(logits.shape[:2], 7)).mean()

    @jax.jit
    def step(t: Any, state: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(t)
        updates, state = tx.update(grads, state, t)
        return optax.apply_updates(t, updates), state, loss

    state, losses = tx.init(trainable), []
    for _ in range(steps):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    return losses[0], float(jax.jit(loss_fn)(trainable)), jpeft.combine(trainable, frozen)


def check_base_identical(base: Any, trained: Any) -> None:
    flat = dict(jpeft.list_paths(base) and [(p, None) for p in jpeft.list_paths(base)])
    for path in flat:
        a, b = base, trained
        for k in path.split("/"):
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_prompt_tuning_equals_base_model_on_real_token_prefix(family: str, key: jax.Array) -> None:
    m = H.make(family)
    method = jpeft.PromptTuning(num_virtual_tokens=P, init="text", init_ids=TOKENS)
    peft = jpeft.apply(method, m.params, key=key)
    # BERT classifies from position 0, which is t_1 in both runs: its logits are not sliced.
    check_oracle(family, method, peft, sliced_logits=family != "bert")


def test_bart_prompt_goes_on_the_encoder_only(key: jax.Array) -> None:
    """As HF PEFT for seq2seq: wrap(apply)(peft) on (x, y) equals the base model on ([t] + x, y)."""
    m = H.make("bart")
    method = jpeft.PromptTuning(num_virtual_tokens=P, init="text", init_ids=TOKENS)
    peft = jpeft.apply(method, m.params, key=key)
    out = jpeft.wrap(m.apply, method)({"params": peft}, **m.inputs, output_hidden_states=True)
    ref = m.apply({"params": m.params}, **extend(m.inputs, TOKENS), output_hidden_states=True)
    assert out.encoder_last_hidden_state.shape == (H.BATCH, H.SEQ, H.HIDDEN)
    np.testing.assert_allclose(out.encoder_last_hidden_state, ref.encoder_last_hidden_state[:, P:], **TOL)
    for a, b in zip(out.encoder_hidden_states, ref.encoder_hidden_states, strict=True):
        np.testing.assert_allclose(a, b[:, P:], **TOL)
    for a, b in zip(out.decoder_hidden_states, ref.decoder_hidden_states, strict=True):
        assert a.shape == b.shape == (H.BATCH, H.SEQ, H.HIDDEN)  # the decoder is not extended
        np.testing.assert_allclose(a, b, **TOL)
    np.testing.assert_allclose(out.logits, ref.logits, **TOL)
    base = m.apply({"params": m.params}, **m.inputs).logits
    assert np.abs(np.asarray(out.logits - base)).max() > 1e-3  # the prompt does reach the decoder


def test_roberta_positions_follow_roberta_rule(key: jax.Array) -> None:
    """RoBERTa's positions start at pad + 1 and skip padding; the prompt takes pad + 1 .. pad + P."""
    from transformers.models.roberta.modeling_flax_roberta import create_position_ids_from_input_ids

    m = H.make("roberta")
    method = jpeft.PromptTuning(num_virtual_tokens=P, init="text", init_ids=TOKENS)
    peft = jpeft.apply(method, m.params, key=key)
    out = jpeft.wrap(m.apply, method)({"params": peft}, **m.inputs, output_hidden_states=True)
    ref_inputs = extend(m.inputs, TOKENS)
    pad = m.model.config.pad_token_id
    ref_inputs["position_ids"] = jnp.asarray(create_position_ids_from_input_ids(np.asarray(ref_inputs["input_ids"]), pad))
    ref = m.apply({"params": m.params}, **ref_inputs, output_hidden_states=True)
    real = np.asarray(m.inputs["attention_mask"], bool)  # padded positions get pad + P, not pad: masked anyway
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b[:, P:])[real], **TOL)
    np.testing.assert_allclose(out.logits, ref.logits, **TOL)


def test_positional_inputs_and_jit_agree_with_keywords(key: jax.Array) -> None:
    m = H.make("gpt2")
    method = jpeft.PromptTuning(num_virtual_tokens=P)
    peft = jpeft.apply(method, m.params, key=key)
    wrapped = jpeft.wrap(m.model.module.apply, method)
    x = m.inputs
    with jax.numpy_rank_promotion("allow"):
        positional = wrapped({"params": peft}, x["input_ids"], x["attention_mask"], x["position_ids"]).logits
        jitted = jax.jit(lambda p: wrapped({"params": p}, x["input_ids"], x["attention_mask"], x["position_ids"]))
        compiled = jitted(peft).logits
    keywords = jpeft.wrap(m.apply, method)({"params": peft}, **x).logits
    assert positional.shape == (H.BATCH, H.SEQ, H.VOCAB)
    np.testing.assert_allclose(positional, keywords, **TOL)
    np.testing.assert_allclose(compiled, keywords, **TOL)
    base = m.apply({"params": m.params}, **x).logits  # a random prompt does change the outputs
    assert np.abs(np.asarray(keywords - base)).max() > 1e-3


def test_inits(key: jax.Array) -> None:
    m = H.make("gpt2")
    table = np.asarray(m.params["transformer"]["wte"]["embedding"])

    def prompt(method: jpeft.PromptTuning) -> np.ndarray:
        tree = jpeft.apply(method, m.params, key=key)
        return np.asarray(tree["transformer"]["wte"][RESERVED]["default"]["prompt"])

    rand = prompt(jpeft.PromptTuning(num_virtual_tokens=5))
    assert rand.shape == (5, H.HIDDEN) and np.abs(rand).max() <= 0.5 and rand.std() > 0.1
    vocab = prompt(jpeft.PromptTuning(num_virtual_tokens=5, init="vocab"))
    for row in vocab:  # every row is a row of the embedding table
        assert np.abs(table - row).sum(axis=1).min() == 0
    # text: tokenised once, repeated to fill P (HF PEFT's TEXT init)
    method = jpeft.PromptTuning(num_virtual_tokens=5, init="text", init_text="ab", tokenizer=lambda s: [ord(c) - 90 for c in s])
    assert method.init_ids == (7, 8) and method.tokenizer is None
    np.testing.assert_array_equal(prompt(method), table[[7, 8, 7, 8, 7]])
    hf_style = jpeft.PromptTuning(init="text", init_text="a", tokenizer=lambda s: {"input_ids": [3, 4]})
    assert hf_style.init_ids == (3, 4)
    assert hash(method) == hash(jpeft.PromptTuning(num_virtual_tokens=5, init="text", init_ids=(7, 8), init_text="ab"))


def _np_linear(d: dict[str, np.ndarray], name: str, x: np.ndarray) -> np.ndarray:
    return x @ d[f"{name}_kernel"] + d[f"{name}_bias"]


def _np_lstm(x: np.ndarray, wi: np.ndarray, wh: np.ndarray, b: np.ndarray) -> np.ndarray:
    def sig(z: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-z))

    k = wh.shape[0]
    h, c, out = np.zeros(k), np.zeros(k), []
    for xt in x:
        z = xt @ wi + h @ wh + b
        i, f, g, o = z[:k], z[k : 2 * k], z[2 * k : 3 * k], z[3 * k :]
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        out.append(h)
    return np.stack(out)


def np_prompt_encoder(encoder: str, d: dict[str, np.ndarray]) -> np.ndarray:
    """HF PEFT's PromptEncoder in NumPy: MLP d->k->k->d, or 2-layer biLSTM then MLP 2k->2k->d."""
    x = d["input_embeds"]
    if encoder == "mlp":
        h = np.maximum(_np_linear(d, "mlp0", x), 0)
        return _np_linear(d, "mlp2", np.maximum(_np_linear(d, "mlp1", h), 0))
    for layer in range(2):
        p = f"lstm{layer}"
        fwd = _np_lstm(x, d[f"{p}_fwd_wi"], d[f"{p}_fwd_wh"], d[f"{p}_fwd_b"])
        bwd = _np_lstm(x[::-1], d[f"{p}_bwd_wi"], d[f"{p}_bwd_wh"], d[f"{p}_bwd_b"])[::-1]
        x = np.concatenate([fwd, bwd], axis=-1)
    return _np_linear(d, "mlp1", np.maximum(_np_linear(d, "mlp0", x), 0))


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_encoder_reference_and_fold(encoder: str, key: jax.Array) -> None:
    m = H.make("gpt2")
    method = jpeft.PTuning(num_virtual_tokens=P, encoder=encoder, encoder_hidden_size=8)
    peft = jpeft.apply(method, m.params, key=key)
    deltas = peft["transformer"]["wte"][RESERVED]["default"]
    expected = np_prompt_encoder(encoder, jax.tree.map(lambda a: np.asarray(a, np.float64), deltas))
    np.testing.assert_allclose(method.prompt(deltas), expected, **TOL)
    # merge caches the encoder output: a PromptTuning tree with the same outputs
    folded = jpeft.merge(method, peft)
    assert set(folded["transformer"]["wte"][RESERVED]["default"]) == {"prompt"}
    assert folded["transformer"]["wte"]["embedding"] is m.params["transformer"]["wte"]["embedding"]
    plain = method.prompt_method()
    assert type(plain) is jpeft.PromptTuning and plain.num_virtual_tokens == P
    a = jpeft.wrap(m.apply, method)({"params": peft}, **m.inputs).logits
    b = jpeft.wrap(m.apply, plain)({"params": folded}, **m.inputs).logits
    np.testing.assert_array_equal(a, b)
    if encoder == "lstm":
        return
    # and the encoder's prompt follows the [t; x] oracle too
    table = m.params["transformer"]["wte"]["embedding"]
    as_tokens = jpeft.merge(method, peft)
    as_tokens["transformer"]["wte"][RESERVED]["default"]["prompt"] = table[jnp.asarray(TOKENS)]
    check_oracle("gpt2", plain, as_tokens)


def test_param_counts_closed_form(key: jax.Array) -> None:
    import transformers

    def counted(method: jpeft.Method, params: Any) -> int:
        tree = jax.eval_shape(lambda: jpeft.apply(method, params, key=key))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(jpeft.split(method, tree)[0]))

    config = transformers.BertConfig()  # BERT-base shapes, no download: only eval_shape
    module = transformers.FlaxBertForSequenceClassification.module_class(config)
    ids = jnp.ones((1, 4), jnp.int32)
    bert = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids, ids, ids, None))["params"]
    d, n, k = 768, 20, 768
    cases = {
        jpeft.PromptTuning(num_virtual_tokens=n): n * d,
        jpeft.PTuning(num_virtual_tokens=n): n * d + (d * k + k) + (k * k + k) + (k * d + d),
        jpeft.PTuning(num_virtual_tokens=n, encoder="lstm", encoder_hidden_size=k): n * d
        + 2 * (4 * k * d + 4 * k * k + 4 * k)
        + 2 * (4 * k * 2 * k + 4 * k * k + 4 * k)
        + (2 * k * 2 * k + 2 * k)
        + (2 * k * d + d),
    }
    for method, closed in cases.items():
        assert method.param_count(bert) == counted(method, bert) == closed
    tiny = H.make("gpt2").params
    assert jpeft.PromptTuning(num_virtual_tokens=P).param_count(tiny) == P * H.HIDDEN


@pytest.mark.parametrize("method", [jpeft.PromptTuning(num_virtual_tokens=P), jpeft.PTuning(num_virtual_tokens=P, encoder_hidden_size=16)])
def test_training_lowers_loss_and_keeps_base(method: jpeft.Method, key: jax.Array) -> None:
    m = sharp_gpt2()
    peft = jpeft.apply(method, m.params, key=key)
    first, last, trained = train_gpt2(method, peft)
    assert last < first - 0.15, (first, last)
    check_base_identical(m.params, trained)


def test_errors(key: jax.Array) -> None:
    m = H.make("gpt2")
    with pytest.raises(jpeft.JpeftError, match=r"PromptTuning\(num_virtual_tokens=0\): num_virtual_tokens must be a positive int"):
        jpeft.PromptTuning(num_virtual_tokens=0)
    with pytest.raises(jpeft.JpeftError, match=r"init must be one of"):
        jpeft.PromptTuning(init="zeros")
    with pytest.raises(jpeft.JpeftError, match=r"init='text'\): pass init_ids"):
        jpeft.PromptTuning(init="text")
    with pytest.raises(jpeft.JpeftError, match=r"init_text needs tokenizer"):
        jpeft.PromptTuning(init="text", init_text="hello")
    with pytest.raises(jpeft.JpeftError, match=r"init_ids must be a sequence of int"):
        jpeft.PromptTuning(init="text", init_ids=("a",))
    with pytest.raises(jpeft.JpeftError, match=r"init_ids must hold at least one"):
        jpeft.PromptTuning(init="text", init_ids=())
    with pytest.raises(jpeft.JpeftError, match=r"profile must be a jpeft.profiles.Profile"):
        jpeft.PromptTuning(profile="gpt2")
    with pytest.raises(jpeft.JpeftError, match=r"encoder must be one of"):
        jpeft.PTuning(encoder="gru")
    with pytest.raises(jpeft.JpeftError, match=r"encoder_hidden_size must be a positive int"):
        jpeft.PTuning(encoder_hidden_size=0)
    with pytest.raises(jpeft.JpeftError, match=r"ids \[100\] are outside the vocabulary .*expected 0 <= id < 100"):
        jpeft.apply(jpeft.PromptTuning(num_virtual_tokens=2, init="text", init_ids=(1, 100)), m.params, key=key)
    with pytest.raises(jpeft.JpeftError, match=r"PromptTuning: the parameter tree matches no known family .*profile="):
        jpeft.apply(jpeft.PromptTuning(), {"dense": {"kernel": jnp.ones((2, 2))}}, key=key)
    import dataclasses

    half = dataclasses.replace(jpeft.profiles.BART, decoder_prefix=None)
    with pytest.raises(jpeft.JpeftError, match=r"profile 'bart' sets only one of encoder_prefix .* needs both"):
        jpeft.apply(jpeft.PromptTuning(profile=half), H.make("bart").params, key=key)
    bart = H.make("bart")
    on_bart = jpeft.apply(jpeft.PromptTuning(num_virtual_tokens=2), bart.params, key=key)
    no_decoder = {k: v for k, v in bart.inputs.items() if k != "decoder_input_ids"}
    with pytest.raises(jpeft.JpeftError, match=r"needs decoder_input_ids of shape \(batch, seq\) as argument 2"):
        jpeft.wrap(bart.apply, jpeft.PromptTuning(num_virtual_tokens=2))({"params": on_bart}, **no_decoder)
    # return_dict=False: the (2, 10, 100) logits are encoder-length (2 + 8) or decoder-length (0 + 10)
    short = dict(bart.inputs, decoder_input_ids=jnp.ones((2, 10), jnp.int32), decoder_attention_mask=jnp.ones((2, 10)),
                 decoder_position_ids=jnp.broadcast_to(jnp.arange(10), (2, 10)))
    with pytest.raises(jpeft.JpeftError, match=r"shape \(2, 10, 100\) could be encoder-length \(2 \+ 8\) .*return_dict=True"):
        jpeft.wrap(bart.apply, jpeft.PromptTuning(num_virtual_tokens=2))({"params": on_bart}, **short, return_dict=False)
    two = dict(m.params, other=H.make("llama").params)
    with pytest.raises(jpeft.JpeftError, match=r"matches several families, \['gpt2', 'llama'\]"):
        jpeft.apply(jpeft.PromptTuning(), two, key=key)
    method = jpeft.PromptTuning(num_virtual_tokens=2)
    peft = jpeft.apply(method, m.params, key=key)
    with pytest.raises(jpeft.JpeftError, match=r"needs input_ids of shape \(batch, seq\)"):
        jpeft.wrap(m.apply, method)({"params": peft}, attention_mask=m.inputs["attention_mask"])
    with pytest.raises(jpeft.JpeftError, match=r"cannot be merged into the base weights"):
        jpeft.merge(method, peft)
    with pytest.raises(jpeft.JpeftError, match=r"names several adapters"):
        both = jpeft.apply(method, peft, key=key, name="b")
        jpeft.wrap(m.apply, method, active=("default", "b"))({"params": both}, **m.inputs)
    with pytest.raises(jpeft.JpeftError, match=r"holds no deltas of adapter 'x'"):
        jpeft.merge(jpeft.PTuning(num_virtual_tokens=2), jpeft.apply(jpeft.PTuning(num_virtual_tokens=2), m.params, key=key, name="y"), name="x")


@pytest.mark.parametrize(
    "kw",
    [{"init": "vocab"}, {"init": "text", "init_ids": (5, 6)}, {"init_ids": (5, 6)}, {"init_text": "hi"},
     {"init_text": "hi", "tokenizer": lambda s: [1, 2]}],
    ids=["init", "init-text", "init_ids", "init_text", "init_text-tokenizer"],
)
def test_ptuning_refuses_prompt_tuning_init_fields(kw: dict[str, Any]) -> None:
    """P-tuning's prompt is the encoder's output over learned N(0, 1) inputs (HF PEFT's PromptEncoder has
    no text init), so PromptTuning's init fields would be silently ignored: they are refused."""
    field = next(iter(kw))
    with pytest.raises(jpeft.JpeftError, match=rf"PTuning\({field}=.*\): P-tuning has no {field}; .*jpeft\.PromptTuning\(init=\.\.\.\)"):
        jpeft.PTuning(num_virtual_tokens=2, **kw)
    jpeft.PTuning(num_virtual_tokens=2, init="random")  # the default is accepted
