"""Prompt ensembling (``jpeft.PromptEnsemble``): k prompts in one batch, answers combined.

Oracles: each member run alone as a plain ``jpeft.PromptTuning`` whose prompt is written by hand
(linen GPT-2 and BERT, and the NNX Llama twin against linen Llama); the vote and the mean of
log-probabilities worked by hand and in NumPy; the gradient of a member against the plain prompt's.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft._tree import RESERVED
from tests import _hf_models as H
from tests import _nnx_llama as NL
from tests import test_generate as G

K, P = 3, 2
EMBED = {
    "gpt2": ("transformer", "wte"),
    "bert": ("bert", "embeddings", "word_embeddings"),
    "llama": ("model", "embed_tokens"),
}


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def hf(request: pytest.FixtureRequest) -> tuple[str, H.HFModel]:
    return request.param, H.make(request.param)


def _store(tree: dict, family: str) -> dict:
    node = tree
    for k in EMBED[family]:
        node = node[k]
    return node[RESERVED]


def _with_prompt(tree: dict, family: str, name: str, prompt: jax.Array) -> dict:
    """``tree`` with adapter ``name``'s prompt leaf replaced (a fresh nested dict)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    flat[EMBED[family] + (RESERVED, name, "prompt")] = prompt
    return flax.traverse_util.unflatten_dict(flat)


def _prompts(d: int, seed: int = 3) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).normal(0, 0.5, (K, P, d)), jnp.float32)


def _plain(family: str, model: H.HFModel, prompt: jax.Array) -> np.ndarray:
    """The independent oracle: one prompt run alone as a plain PromptTuning adapter."""
    one = jpeft.PromptTuning(num_virtual_tokens=P)
    tree = _with_prompt(jpeft.apply(one, model.params, key=jax.random.key(9)), family, "default", prompt)
    return np.asarray(model.logits(jpeft.wrap(model.apply, one)({"params": tree}, **model.inputs)))


def test_one_batch_equals_k_separate_runs(hf: tuple[str, H.HFModel]) -> None:
    family, model = hf
    method = jpeft.PromptEnsemble(k=K, num_virtual_tokens=P)
    peft = jpeft.apply(method, model.params, key=jax.random.key(0))
    assert _store(peft, family)["default"]["prompt"].shape == (K, P, H.HIDDEN)
    prompts = _prompts(H.HIDDEN)
    peft = _with_prompt(peft, family, "default", prompts)
    out = np.asarray(model.logits(jpeft.wrap(model.apply, method)({"params": peft}, **model.inputs)))
    single = _plain(family, model, prompts[0])
    assert out.shape == (K,) + single.shape  # (k, B, ...): every example once per member
    for m in range(K):
        np.testing.assert_allclose(out[m], _plain(family, model, prompts[m]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[0], out[1], atol=1e-3)  # the members differ


def test_members_start_as_k_independent_prompt_tuning_inits() -> None:
    model = H.make("gpt2")
    peft = jpeft.apply(jpeft.PromptEnsemble(k=K, num_virtual_tokens=P), model.params, key=jax.random.key(0))
    prompts = np.asarray(_store(peft, "gpt2")["default"]["prompt"])
    assert np.abs(prompts).max() <= 0.5 and len({p.tobytes() for p in prompts}) == K  # PromptTuning's ±0.5, distinct
    assert jpeft.PromptEnsemble(k=K, num_virtual_tokens=P).param_count(model.params) == K * P * H.HIDDEN


def test_vote_and_mean_log_probs_by_hand() -> None:
    # k = 3 members, B = 4 examples, C = 3 classes
    logits = np.array(
        [
            [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]],
            [[0.0, 3.0, 0.0], [0.0, 2.0, 0.0], [4.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            [[1.0, 0.0, 0.0], [9.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 1.0]],
        ],
        np.float32,
    )
    # arg-maxes per example: (0, 1, 0) -> 0; (1, 1, 0) -> 1; (2, 0, 1) -> tie -> 0; (0, 1, 2) -> tie -> 0
    assert jpeft.PromptEnsemble.vote(jnp.asarray(logits)).tolist() == [0, 1, 0, 0]
    z = logits - logits.max(-1, keepdims=True)
    want = (z - np.log(np.exp(z).sum(-1, keepdims=True))).mean(0)
    got = np.asarray(jpeft.PromptEnsemble.mean_log_probs(jnp.asarray(logits)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # by hand: example 1's third member is very sure of class 0 (mean log-probs -1.26 vs -3.26 for the voted 1);
    # example 2's tied vote goes to class 0, its mean log-probs to class 1 (-3.02 vs -3.35 and -3.68)
    assert got.argmax(-1).tolist() == [0, 0, 1, 0]
    assert got[1].argmax() != jpeft.PromptEnsemble.vote(jnp.asarray(logits))[1]
    # extra axes (a sequence) pass through
    assert jpeft.PromptEnsemble.vote(jnp.asarray(logits)[:, None]).shape == (1, 4)


def test_training_replicates_examples_and_each_prompt_learns_from_its_copies() -> None:
    model = H.make("gpt2")
    method = jpeft.PromptEnsemble(k=K, num_virtual_tokens=P)
    prompts = _prompts(H.HIDDEN, seed=5)
    peft = _with_prompt(jpeft.apply(method, model.params, key=jax.random.key(0)), "gpt2", "default", prompts)
    trainable, frozen = jpeft.split(method, peft)
    w = jnp.asarray(np.random.RandomState(2).standard_normal((K, H.BATCH, H.SEQ, H.VOCAB)), jnp.float32)
    wrapped = jpeft.wrap(model.apply, method)

    def loss(t: dict, weights: jax.Array) -> jax.Array:
        return jnp.sum(model.logits(wrapped({"params": jpeft.combine(t, frozen)}, **model.inputs)) * weights)

    grad = jax.jit(jax.grad(loss))
    g = _store(grad(trainable, w), "gpt2")["default"]["prompt"]
    one = jpeft.PromptTuning(num_virtual_tokens=P)
    base = jpeft.apply(one, model.params, key=jax.random.key(9))
    plain = jpeft.wrap(model.apply, one)

    @jax.jit
    @jax.grad
    def alone(p: jax.Array, weights: jax.Array) -> jax.Array:
        t = _with_prompt(base, "gpt2", "default", p)
        return jnp.sum(model.logits(plain({"params": t}, **model.inputs)) * weights)

    for m in range(K):
        np.testing.assert_allclose(g[m], alone(prompts[m], w[m]), rtol=1e-4, atol=1e-5)
    # only member 1's copies in the loss: the other prompts get exactly zero gradient
    g1 = _store(grad(trainable, w * (jnp.arange(K) == 1)[:, None, None, None]), "gpt2")["default"]["prompt"]
    assert np.abs(np.asarray(g1[1])).max() > 0 and not np.asarray(g1[0]).any() and not np.asarray(g1[2]).any()


def test_stack_and_unstack_named_prompts() -> None:
    model = H.make("gpt2")
    one = jpeft.PromptTuning(num_virtual_tokens=P)
    tree = model.params
    for i, n in enumerate(("a", "b", "c")):
        tree = jpeft.apply(one, tree, key=jax.random.key(i), name=n)
    ens = jpeft.PromptEnsemble.of(one, k=K)
    assert ens == jpeft.PromptEnsemble(k=K, num_virtual_tokens=P)
    stacked = ens.stack(tree, ["a", "b", "c"], name="ens")
    store = _store(stacked, "gpt2")
    for m, n in enumerate(("a", "b", "c")):
        np.testing.assert_array_equal(store["ens"]["prompt"][m], store[n]["prompt"])
    out = np.asarray(model.logits(jpeft.wrap(model.apply, ens, active="ens")({"params": stacked}, **model.inputs)))
    for m, n in enumerate(("a", "b", "c")):
        want = model.logits(jpeft.wrap(model.apply, one, active=n)({"params": tree}, **model.inputs))
        np.testing.assert_allclose(out[m], want, rtol=1e-5, atol=1e-5)
    back = ens.unstack(jpeft.remove(stacked, "a"), "ens", names=["x", "a", "z"])
    np.testing.assert_array_equal(_store(back, "gpt2")["a"]["prompt"], store["b"]["prompt"])
    assert jpeft.adapters(back) == ["a", "b", "c", "ens", "x", "z"]


def test_nnx_equals_linen_and_each_member_alone() -> None:
    hf = H.make("llama")
    method = jpeft.PromptEnsemble(k=K, num_virtual_tokens=P)
    prompts = _prompts(H.HIDDEN, seed=11)
    model = jpeft.apply(method, NL.llama(), key=jax.random.key(1))
    peft = jpeft.apply(method, hf.params, key=jax.random.key(1))
    np.testing.assert_array_equal(
        model.model.embed_tokens.__jpeft__["default"]["prompt"][...], _store(peft, "llama")["default"]["prompt"]
    )
    model.model.embed_tokens.__jpeft__["default"]["prompt"][...] = prompts
    out = np.asarray(model(**hf.inputs).logits)
    assert out.shape == (K, H.BATCH, H.SEQ, H.VOCAB)
    ref = hf.logits(
        jpeft.wrap(hf.apply, method)({"params": _with_prompt(peft, "llama", "default", prompts)}, **hf.inputs)
    )
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    alone = jpeft.apply(jpeft.PromptTuning(num_virtual_tokens=P), NL.llama(), key=jax.random.key(2))
    run = nnx.jit(lambda model, inputs: model(**inputs).logits)
    for m in range(K):
        alone.model.embed_tokens.__jpeft__["default"]["prompt"][...] = prompts[m]
        np.testing.assert_allclose(out[m], run(alone, hf.inputs), atol=1e-5, rtol=0)


# --- bad inputs (tests/README.md catalogue row 76) ------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1, True, 2.0, "3"])
def test_bad_k(k: object) -> None:
    with pytest.raises(jpeft.JpeftError, match=r"PromptEnsemble\(k=.*k must be a positive int"):
        jpeft.PromptEnsemble(k=k)


def test_refusals() -> None:
    model = H.make("gpt2")
    method = jpeft.PromptEnsemble(k=K, num_virtual_tokens=P)
    peft = jpeft.apply(method, model.params, key=jax.random.key(0))
    wrapped = jpeft.wrap(model.apply, method)
    with pytest.raises(jpeft.JpeftError, match=r"PromptEnsemble.of: expected a jpeft.PromptTuning; got PTuning"):
        jpeft.PromptEnsemble.of(jpeft.PTuning(num_virtual_tokens=P, encoder_hidden_size=4), k=2)
    with pytest.raises(jpeft.JpeftError, match=r"adapter_index= \(a mixed batch\) is not supported"):
        wrapped({"params": peft}, **model.inputs, adapter_index=jnp.zeros((H.BATCH,), jnp.int32))
    two = jpeft.apply(method, peft, key=jax.random.key(1), name="b")
    with pytest.raises(jpeft.JpeftError, match="one adapter at a time"):
        jpeft.wrap(model.apply, method, active=("default", "b"))({"params": two}, **model.inputs)
    with pytest.raises(jpeft.JpeftError, match="cannot be merged"):
        jpeft.merge(method, peft)
    sharp = jpeft.apply(method, G.sharp("gpt2")[1], key=jax.random.key(0))
    with pytest.raises(
        jpeft.JpeftError, match=r"PromptEnsemble: the embedding ran without the ensemble's call.*unstack"
    ):
        jpeft.generate(G.apply_of("gpt2"), method, sharp, model.inputs["input_ids"][:, :4], 2)
    combo = jpeft.compose(method, jpeft.LoRA(targets=("c_attn",), rank=2))
    tree = jpeft.apply(combo, model.params, key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"PromptEnsemble inside jpeft.compose is not supported"):
        jpeft.wrap(model.apply, combo)({"params": tree}, **model.inputs)


def test_bad_scores() -> None:
    for bad in (jnp.zeros((3, 4)), jnp.zeros((3, 4, 2), jnp.int32), [[[0.0]]]):
        for fn in (jpeft.PromptEnsemble.vote, jpeft.PromptEnsemble.mean_log_probs):
            with pytest.raises(jpeft.JpeftError, match=r"expected float scores of shape \(k, B, \.\.\., C\)"):
                fn(bad)


def test_bad_stack_and_unstack() -> None:
    model = H.make("gpt2")
    one = jpeft.PromptTuning(num_virtual_tokens=P)
    tree = jpeft.apply(
        one, jpeft.apply(one, model.params, key=jax.random.key(0), name="a"), key=jax.random.key(1), name="b"
    )
    ens = jpeft.PromptEnsemble(k=2, num_virtual_tokens=P)
    with pytest.raises(jpeft.JpeftError, match=r"names must be a list of k = 2 adapter names; got \['a'\]"):
        ens.stack(tree, ["a"])
    with pytest.raises(jpeft.JpeftError, match=r"holds no prompt-tuning adapter 'nope'; it holds \['a', 'b'\]"):
        ens.stack(tree, ["a", "nope"])
    with pytest.raises(jpeft.JpeftError, match=r"adapter 'a' exists already"):
        ens.stack(tree, ["a", "b"], name="a")
    with pytest.raises(jpeft.JpeftError, match=r"adapter 'a' has a prompt of shape \(2, 32\); expected \(3, 32\)"):
        jpeft.PromptEnsemble(k=2, num_virtual_tokens=3).stack(tree, ["a", "b"])
    with pytest.raises(jpeft.JpeftError, match=r"holds no ensemble adapter 'a' with a \(k=2, P, d\) prompt"):
        ens.unstack(tree, "a")
    stacked = ens.stack(tree, ["a", "b"], name="e")
    with pytest.raises(jpeft.JpeftError, match=r"adapters \['a'\] exist already"):
        ens.unstack(stacked, "e", names=["a", "y"])
    with pytest.raises(jpeft.JpeftError, match=r"names must be k = 2 distinct adapter names"):
        ens.unstack(stacked, "e", names=["y", "y"])
    with pytest.raises(
        jpeft.JpeftError, match=r"expected a linen parameter tree from jpeft.apply; got LlamaForCausalLM"
    ):
        ens.stack(jpeft.apply(ens, NL.llama(), key=jax.random.key(0)), ["a", "b"])
