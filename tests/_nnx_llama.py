"""The NNX Llama twin of the tiny HF ``FlaxLlamaForCausalLM``: ``jpeft.models._llama``'s decoder.

``LlamaForCausalLM`` (the library decoder, returning ``FlaxCausalLMOutput``) has RoPE attention
(grouped-query capable), a gated MLP, RMSNorm, a causal mask, and takes ``(input_ids, attention_mask=None, position_ids=None, ..., return_dict=True)`` like
the HF Flax module (``tests/_hf_models.make("llama")``). Its state is HF's parameter tree leaf for
leaf (``model/embed_tokens/embedding``, ``model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel``,
``mlp/{gate,up,down}_proj/kernel``, ``input_layernorm/weight``, ``post_attention_layernorm/weight``,
``model/norm/weight``, ``lm_head/kernel``), so :func:`llama` loads the HF weights into it and
``jpeft.profiles.LLAMA`` matches ``jpeft._nnx.tree(model)``.

With ``scan=True`` the layers are one ``nnx.vmap``-stacked ``DecoderLayer`` run by ``nnx.scan``
(paths ``model/layers/self_attn/...``, leading axis L), :data:`SCANNED` is its profile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from transformers.modeling_flax_outputs import FlaxCausalLMOutput

from jpeft.models import _llama
from tests import _hf_models as H
from tests._nnx_models import load


def Config() -> _llama.Config:
    """The sizes of ``tests/_hf_models.make('llama')`` (a tiny ``LlamaConfig``)."""
    return _llama.Config(
        vocab_size=H.VOCAB,
        hidden_size=H.HIDDEN,
        num_hidden_layers=H.LAYERS,
        num_attention_heads=H.HEADS,
        num_key_value_heads=H.HEADS,
        intermediate_size=H.FFN,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )


class LlamaForCausalLM(_llama.LlamaForCausalLM):
    """The library decoder, returning HF's ``FlaxCausalLMOutput`` like the HF Flax module."""

    def _output(self, logits: jax.Array) -> Any:
        return FlaxCausalLMOutput(logits=logits)


def _scanned_profile() -> Any:
    from jpeft import profiles

    fields = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
    return dataclasses.replace(
        profiles.LLAMA,
        name="llama_scanned",
        detect=r"(.*/)?layers/mlp/gate_proj/kernel",
        **{f: getattr(profiles.LLAMA, f).replace(r"layers/\d+/", "layers/") for f in fields},
    )


SCANNED = _scanned_profile()
"""The profile of the scanned variant: LLAMA's sites without the layer index (one stacked module each)."""


@functools.cache
def _graph(scan: bool) -> Any:
    return nnx.split(LlamaForCausalLM(Config(), nnx.Rngs(0), scan))


def llama(params: dict[str, Any] | None = None, *, scan: bool = False) -> LlamaForCausalLM:
    """A fresh ``LlamaForCausalLM`` holding ``params`` (default: ``make('llama').params``)."""
    params = H.make("llama").params if params is None else params
    if scan:
        layers = params["model"]["layers"]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[str(i)] for i in range(len(layers))])
        params = {**params, "model": {**params["model"], "layers": stacked}}
    graphdef, state = _graph(scan)
    return load(nnx.merge(graphdef, jax.tree.map(lambda x: x, state), copy=True), params)
