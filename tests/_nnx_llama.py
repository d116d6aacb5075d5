"""An NNX Llama-style decoder whose state paths and call mirror HF's ``FlaxLlamaForCausalLM``.

``LlamaForCausalLM`` has RoPE attention (grouped-query capable), a gated MLP, RMSNorm, a causal
mask, and takes ``(input_ids, attention_mask=None, position_ids=None, ..., return_dict=True)`` like
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
import numpy as np
from flax import nnx
from transformers.modeling_flax_outputs import FlaxCausalLMOutput

from tests import _hf_models as H
from tests._nnx_models import load


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes of ``tests/_hf_models.make('llama')`` (a tiny ``LlamaConfig``)."""

    vocab_size: int = H.VOCAB
    hidden_size: int = H.HIDDEN
    num_hidden_layers: int = H.LAYERS
    num_attention_heads: int = H.HEADS
    num_key_value_heads: int = H.HEADS
    intermediate_size: int = H.FFN
    max_position_embeddings: int = 64
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def of(cls, hf: Any) -> Config:
        """The config of an HF ``LlamaConfig``."""
        return cls(**{f.name: getattr(hf, f.name) for f in dataclasses.fields(cls)})


@functools.cache
def _sincos(num_pos: int, dim: int) -> np.ndarray:
    """HF Flax Llama's ``create_sinusoidal_positions``: ``(num_pos, 1, 2 dim)``, sin then cos."""
    inv_freq = 1.0 / (10000 ** (np.arange(0, dim, 2) / dim))
    freqs = np.einsum("i , j -> i j", np.arange(num_pos), inv_freq).astype("float32")
    emb = np.concatenate((freqs, freqs), axis=-1)
    return np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1)


def _rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate((-x[..., half:], x[..., :half]), axis=-1) * sin


class RMSNorm(nnx.Module):
    def __init__(self, cfg: Config):
        self.epsilon = cfg.rms_norm_eps
        self.weight = nnx.Param(jnp.ones((cfg.hidden_size,)))

    def __call__(self, h: jax.Array) -> jax.Array:
        variance = jnp.mean(jnp.power(jnp.asarray(h, jnp.float32), 2), -1, keepdims=True)
        weight = self.weight[...].reshape((1,) * (h.ndim - 1) + (-1,))  # explicit rank: tests raise on promotion
        return weight * (h / jnp.sqrt(variance + self.epsilon))


class Attention(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        dense = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.q_proj = dense(d, cfg.num_attention_heads * hd)
        self.k_proj = dense(d, cfg.num_key_value_heads * hd)
        self.v_proj = dense(d, cfg.num_key_value_heads * hd)
        self.o_proj = dense(cfg.num_attention_heads * hd, d)

    def __call__(self, h: jax.Array, attention_mask: jax.Array, position_ids: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, t = h.shape[:2]
        q = self.q_proj(h).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(h).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(h).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        sin, cos = jnp.split(jnp.asarray(_sincos(cfg.max_position_embeddings, cfg.head_dim))[position_ids], 2, axis=-1)
        k, q = _rotate(k, sin, cos), _rotate(q, sin, cos)
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        causal = jnp.tril(jnp.ones((t, t), bool))
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = jnp.where(allowed, 0.0, jnp.finfo(h.dtype).min).astype(h.dtype)
        scores = jnp.einsum("...qhd,...khd->...hqk", q / jnp.sqrt(cfg.head_dim).astype(h.dtype), k) + bias
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(b, t, -1)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        dense = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.gate_proj = dense(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = dense(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = dense(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.down_proj(self.up_proj(h) * jax.nn.silu(self.gate_proj(h)))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, h: jax.Array, attention_mask: jax.Array, position_ids: jax.Array) -> jax.Array:
        h = h + self.self_attn(self.input_layernorm(h), attention_mask, position_ids)
        return h + self.mlp(self.post_attention_layernorm(h))


class LayerCollection(nnx.Module):
    """HF's ``FlaxLlamaLayerCollection``: layers named ``'0'``, ``'1'``, ... run in a loop."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.n = cfg.num_hidden_layers
        for i in range(self.n):
            setattr(self, str(i), DecoderLayer(cfg, rngs))

    def __call__(self, h: jax.Array, attention_mask: jax.Array, position_ids: jax.Array) -> jax.Array:
        for i in range(self.n):
            h = getattr(self, str(i))(h, attention_mask, position_ids)
        return h


class LlamaModel(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs, scan: bool = False):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.scan = scan
        if scan:

            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def layers(rngs: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(cfg, rngs)

            self.layers = layers(rngs)
        else:
            self.layers = LayerCollection(cfg, rngs)
        self.norm = RMSNorm(cfg)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array) -> jax.Array:
        h = self.embed_tokens(input_ids.astype("i4"))
        if self.scan:

            @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry)
            def run(h: jax.Array, layer: DecoderLayer, mask: jax.Array, pos: jax.Array) -> jax.Array:
                return layer(h, mask, pos)

            h = run(h, self.layers, attention_mask, position_ids)
        else:
            h = self.layers(h, attention_mask, position_ids)
        return self.norm(h)


class LlamaForCausalLM(nnx.Module):
    """The causal LM; ``__call__`` takes the HF Flax module's arguments (deterministic only)."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, scan: bool = False):
        self.model = LlamaModel(cfg, rngs, scan)
        self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
        return_dict: bool = True,
    ) -> Any:
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
        logits = self.lm_head(self.model(input_ids, attention_mask, position_ids))
        return FlaxCausalLMOutput(logits=logits) if return_dict else (logits,)


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
