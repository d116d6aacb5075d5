"""Prompt and prefix methods on NNX models (issue 11): the NNX Llama twin against HF's linen Llama.

Oracles: the linen ``FlaxLlamaForCausalLM`` under ``jpeft.wrap`` with the same weights and the same
deltas; the base model on the equivalent input (a prompt of token embeddings, prefixes of the
base's own keys and values); the unrolled model for the ``nnx.scan`` variant; and the unmerged
model for ``jpeft.merge``'s folds.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft import _nnx, _nnx_apply, profiles
from jpeft._tree import RESERVED
from tests import _hf_models as H
from tests import _nnx_llama as NL

P = 3
METHODS = {
    "prompt": lambda **kw: jpeft.PromptTuning(num_virtual_tokens=P, **kw),
    "ptuning_mlp": lambda **kw: jpeft.PTuning(num_virtual_tokens=P, encoder_hidden_size=8, **kw),
    "ptuning_lstm": lambda **kw: jpeft.PTuning(num_virtual_tokens=P, encoder="lstm", encoder_hidden_size=8, **kw),
    "prefix_mlp": lambda **kw: jpeft.PrefixTuning(num_virtual_tokens=P, projection_hidden_size=8, **kw),
    "prefix": lambda **kw: jpeft.PrefixTuning(num_virtual_tokens=P, prefix_projection=False, **kw),
    "ptuning_v2": lambda **kw: jpeft.PTuningV2(num_virtual_tokens=P, **kw),
}


@pytest.fixture(scope="module")
def hf() -> H.HFModel:
    return H.make("llama")


def _logits(model: nnx.Module, inputs: dict) -> jax.Array:
    """Eager: on this tiny model the op caches shared by all tests beat one compile per model."""
    return model(**inputs).logits


@nnx.jit
def _jitted(model: nnx.Module, inputs: dict) -> jax.Array:
    return model(**inputs).logits


def _random_deltas(tree: dict, seed: int = 7) -> dict:
    """``{path: array}`` of every delta leaf of a linen peft tree, redrawn N(0, 0.5) (not the init)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    keys = [p for p in sorted(flat) if RESERVED in p]
    return {
        p: 0.5 * jax.random.normal(jax.random.key(seed + i), flat[p].shape, flat[p].dtype) for i, p in enumerate(keys)
    }


def _with(tree: dict, deltas: dict) -> dict:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    return flax.traverse_util.unflatten_dict({**flat, **deltas})


def _write(model: nnx.Module, deltas: dict) -> None:
    """Writes deltas by path into the NNX model (a stacked leaf from the per-layer ones)."""
    for path, var in nnx.to_flat_state(nnx.state(model, jpeft.Delta)):
        path = tuple(str(k) for k in path)
        if path in deltas:
            var[...] = deltas[path]
        else:
            i = path.index("layers") + 1
            var[...] = jnp.stack([deltas[path[:i] + (str(layer),) + path[i:]] for layer in range(H.LAYERS)])


def test_base_logits_equal_hf(hf: H.HFModel) -> None:
    ref = hf.logits(hf.apply({"params": hf.params}, **hf.inputs))
    for scan in (False, True):
        np.testing.assert_allclose(_logits(NL.llama(scan=scan), hf.inputs), ref, atol=1e-5, rtol=0)


def test_linen_profile_matches_nnx_tree() -> None:
    assert profiles.matching(_nnx.tree(NL.llama())) == (profiles.LLAMA,)
    profiles.check(profiles.LLAMA, _nnx.tree(NL.llama()))
    assert profiles.matching(_nnx.tree(NL.llama(scan=True))) == ()  # no layer index: pass NL.SCANNED


@pytest.mark.parametrize("kind", sorted(METHODS))
def test_linen_and_nnx_equal(hf: H.HFModel, kind: str) -> None:
    method = METHODS[kind]()
    peft = jpeft.apply(method, hf.params, key=jax.random.key(1))
    model = jpeft.apply(method, NL.llama(), key=jax.random.key(1))
    at_init = {tuple(str(k) for k in p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, jpeft.Delta))}
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(peft))
    assert at_init.keys() == {p for p in flat if RESERVED in p}
    for p, v in at_init.items():  # same key, same init
        np.testing.assert_array_equal(v, flat[p])
    deltas = _random_deltas(peft)
    _write(model, deltas)
    ref = hf.logits(jpeft.wrap(hf.apply, method)({"params": _with(peft, deltas)}, **hf.inputs))
    out = _logits(model, hf.inputs)
    assert out.shape == (H.BATCH, H.SEQ, H.VOCAB)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_call_leaves_the_model_unchanged(hf: H.HFModel) -> None:
    method = METHODS["prefix_mlp"]()
    model = jpeft.apply(method, NL.llama(), key=jax.random.key(1))
    graphdef, state = nnx.split(model)
    eager = _logits(model, hf.inputs)
    np.testing.assert_allclose(_jitted(model, hf.inputs), eager, atol=1e-5, rtol=0)
    assert nnx.graphdef(model) == graphdef
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(state)
    assert type(model.model.layers).__name__ == "LayerCollection" and RESERVED not in vars(model.model.layers)


def _equivalent_input(hf: H.HFModel, tokens: np.ndarray) -> tuple[dict, jax.Array]:
    """The base NNX model's logits on ``[tokens; x]`` at the caller's positions."""
    b = H.BATCH
    ids = jnp.concatenate([jnp.broadcast_to(jnp.asarray(tokens, jnp.int32), (b, P)), hf.inputs["input_ids"]], axis=1)
    mask = jnp.concatenate([jnp.ones((b, P), jnp.int32), hf.inputs["attention_mask"]], axis=1)
    pos = jnp.broadcast_to(jnp.arange(P + H.SEQ), (b, P + H.SEQ))
    out = _logits(NL.llama(), {"input_ids": ids, "attention_mask": mask, "position_ids": pos})
    return out[:, P:]


def test_prompt_is_the_base_model_on_prepended_tokens(hf: H.HFModel) -> None:
    tokens = np.array([5, 17, 42])
    model = jpeft.apply(
        jpeft.PromptTuning(num_virtual_tokens=P, init="text", init_ids=tuple(tokens)), NL.llama(), key=jax.random.key(0)
    )
    np.testing.assert_allclose(_logits(model, hf.inputs), _equivalent_input(hf, tokens), atol=1e-5, rtol=0)


def test_prefix_of_base_keys_values_is_the_base_model_on_prepended_tokens(hf: H.HFModel) -> None:
    tokens = np.array([5, 17, 42])
    base = NL.llama()
    h = base.model.embed_tokens(jnp.asarray(tokens)[None])
    mask, pos = jnp.ones((1, P), jnp.int32), jnp.arange(P)[None]
    model = jpeft.apply(jpeft.PTuningV2(num_virtual_tokens=P), NL.llama(), key=jax.random.key(0))
    for i in range(H.LAYERS):
        layer = getattr(base.model.layers, str(i))
        x = layer.input_layernorm(h)
        attn = getattr(model.model.layers, str(i)).self_attn
        attn.k_proj.__jpeft__["default"]["prefix"][...] = layer.self_attn.k_proj(x)[0]
        attn.v_proj.__jpeft__["default"]["prefix"][...] = layer.self_attn.v_proj(x)[0]
        h = layer(h, mask, pos)
    np.testing.assert_allclose(_logits(model, hf.inputs), _equivalent_input(hf, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["prompt", "prefix_mlp", "ptuning_v2"])
def test_scan_equals_unrolled(hf: H.HFModel, kind: str) -> None:
    unrolled = jpeft.apply(METHODS[kind](), NL.llama(), key=jax.random.key(1))
    scanned = jpeft.apply(METHODS[kind](profile=NL.SCANNED), NL.llama(scan=True), key=jax.random.key(1))
    deltas = {tuple(str(k) for k in p): v[...] for p, v in nnx.to_flat_state(nnx.state(unrolled, jpeft.Delta))}
    if kind == "prefix_mlp":  # MLP columns: per layer (k, v) unrolled; per site (all layers) stacked
        order = np.arange(2 * H.LAYERS * H.HIDDEN).reshape(H.LAYERS, 2, H.HIDDEN).transpose(1, 0, 2).ravel()
        store = ("model", "embed_tokens", RESERVED, "default")
        deltas[store + ("w2",)] = deltas[store + ("w2",)][:, order]
        deltas[store + ("b2",)] = deltas[store + ("b2",)][order]
    _write(scanned, deltas)
    if kind == "ptuning_v2":
        assert scanned.model.layers.self_attn.k_proj.__jpeft__["default"]["prefix"].shape == (H.LAYERS, P, H.HIDDEN)
    np.testing.assert_allclose(_logits(scanned, hf.inputs), _logits(unrolled, hf.inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["ptuning_mlp", "prefix_mlp"])
def test_merge_folds_the_reparameterisation(hf: H.HFModel, kind: str) -> None:
    method = METHODS[kind]()
    model = jpeft.apply(method, NL.llama(), key=jax.random.key(1))
    merged = jpeft.merge(method, model)
    runner = method.prompt_method() if kind == "ptuning_mlp" else method.folded_method()
    assert dict(_nnx_apply.methods(merged)) == {"default": runner}
    leaves = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(merged, jpeft.Delta))}
    assert leaves == ({"prompt"} if kind == "ptuning_mlp" else {"prefix"})
    assert RESERVED in vars(model.model.embed_tokens)  # the input model keeps its deltas
    np.testing.assert_allclose(_logits(merged, hf.inputs), _logits(model, hf.inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["prompt", "ptuning_v2"])
def test_merge_without_fold_is_refused(kind: str) -> None:
    method = METHODS[kind]()
    model = jpeft.apply(method, NL.llama(), key=jax.random.key(1))
    with pytest.raises(jpeft.JpeftError, match="cannot be merged"):
        jpeft.merge(method, model)


def test_grad_through_the_prefix_mlp_equals_linen(hf: H.HFModel) -> None:
    method = METHODS["prefix_mlp"]()
    peft = jpeft.apply(method, hf.params, key=jax.random.key(1))
    model = jpeft.apply(method, NL.llama(), key=jax.random.key(1))
    wrapped = jpeft.wrap(hf.apply, method)
    ref = jax.grad(lambda t: jnp.sum(hf.logits(wrapped({"params": t}, **hf.inputs)) ** 2))(peft)

    def grads(m: nnx.Module) -> nnx.State:
        return nnx.grad(lambda m: jnp.sum(m(**hf.inputs).logits ** 2), argnums=nnx.DiffState(0, jpeft.Delta))(m)

    ref = flax.traverse_util.flatten_dict(flax.core.unfreeze(ref))
    for path, g in nnx.to_flat_state(grads(model)):
        np.testing.assert_allclose(g[...], ref[tuple(str(k) for k in path)], rtol=1e-4, atol=1e-5)


def test_named_adapters_and_switching(hf: H.HFModel) -> None:
    method = METHODS["prompt"]()
    peft = jpeft.apply(method, hf.params, key=jax.random.key(1), name="a")
    peft = jpeft.apply(method, peft, key=jax.random.key(2), name="b")
    model = jpeft.apply(method, NL.llama(), key=jax.random.key(1), name="a")
    model = jpeft.apply(method, model, key=jax.random.key(2), name="b")
    for name in ("a", "b"):
        jpeft.set_adapter(model, name)
        ref = hf.logits(jpeft.wrap(hf.apply, method, active=name)({"params": peft}, **hf.inputs))
        np.testing.assert_allclose(_logits(model, hf.inputs), ref, atol=1e-5, rtol=0)
    jpeft.set_adapter(model, ("a", "b"))
    with pytest.raises(jpeft.JpeftError, match="one adapter at a time"):
        model(**hf.inputs)
    with pytest.raises(jpeft.JpeftError, match="one adapter at a time"):  # a mixed batch, as on linen
        jpeft.call(model, **hf.inputs, adapter_index=jnp.array([0, 1]), active=("a", "b"))


def test_prompt_beside_lora_runs_only_when_active(hf: H.HFModel) -> None:
    lora = jpeft.LoRA(targets=("q_proj", "v_proj"), rank=2)
    model = jpeft.apply(lora, NL.llama(), key=jax.random.key(1), name="lora")
    only_lora = _logits(model, hf.inputs)
    model = jpeft.apply(METHODS["prompt"](), model, key=jax.random.key(2), name="prompt")
    np.testing.assert_allclose(_logits(model, hf.inputs), only_lora, atol=1e-6, rtol=0)  # "lora" stays active
    jpeft.set_adapter(model, "prompt")
    assert not np.allclose(_logits(model, hf.inputs), only_lora, atol=1e-3)


def test_scanned_model_without_profile_is_a_clear_error() -> None:
    with pytest.raises(jpeft.JpeftError, match="no known family"):
        jpeft.apply(METHODS["ptuning_v2"](), NL.llama(scan=True), key=jax.random.key(0))
