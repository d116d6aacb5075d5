"""An NNX Llama decoder whose state paths and call mirror HF's ``FlaxLlamaForCausalLM``.

``LlamaForCausalLM`` has RoPE attention (HF's rotate-half form, grouped-query capable), a gated MLP,
RMSNorm and a causal mask, and takes ``(input_ids, attention_mask=None, position_ids=None, ...,
return_dict=True)`` like the HF Flax module. Its state is HF's parameter tree leaf for leaf
(``model/embed_tokens/embedding``, ``model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel``,
``mlp/{gate,up,down}_proj/kernel``, ``input_layernorm/weight``, ``post_attention_layernorm/weight``,
``model/norm/weight``, ``lm_head/kernel``), so ``jpeft.profiles.LLAMA`` matches it. With
``tie_word_embeddings`` there is no ``lm_head``: the logits are ``h @ embedding.T``.

With ``scan=True`` the layers are one ``nnx.vmap``-stacked ``DecoderLayer`` run by ``nnx.scan``
(paths ``model/layers/self_attn/...``, leading axis L).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes of a Llama decoder, named as in HF's ``LlamaConfig``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Output(NamedTuple):
    """The causal LM's output: ``.logits`` (batch, length, vocab), or ``out[0]``."""

    logits: jax.Array


@functools.cache
def _sincos(num_pos: int, dim: int, base: float = 10000.0) -> np.ndarray:
    """HF Flax Llama's ``create_sinusoidal_positions``: ``(num_pos, 1, 2 dim)``, sin then cos."""
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2) / dim))
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
        table = _sincos(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta)
        sin, cos = jnp.split(jnp.asarray(table)[position_ids], 2, axis=-1)
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
        self.tied = cfg.tie_word_embeddings
        if not self.tied:
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
        h = self.model(input_ids, attention_mask, position_ids)
        logits = self.model.embed_tokens.attend(h) if self.tied else self.lm_head(h)
        return self._output(logits) if return_dict else (logits,)

    def _output(self, logits: jax.Array) -> Any:
        return Output(logits=logits)


def from_params(cfg: Config, params: dict[str, Any], *, scan: bool = False, cls: type = LlamaForCausalLM) -> Any:
    """A ``cls(cfg)`` holding ``params`` (HF Flax Llama's nested dict), built without a random init.

    With ``scan=True``, ``params["model"]["layers"]`` is ``{"0": ..., "1": ...}`` and is stacked here.
    """
    if scan:
        layers = params["model"]["layers"]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *[layers[str(i)] for i in range(len(layers))])
        params = {**params, "model": {**params["model"], "layers": stacked}}
    graphdef, state = _graph(cls, cfg, scan)
    flat = []
    for path, var in nnx.to_flat_state(state):
        node = params
        for k in path:
            node = node[str(k)]
        if tuple(node.shape) != tuple(var.shape):
            raise ValueError(
                f"jpeft.models: {'/'.join(map(str, path))} has shape {tuple(node.shape)}, expected {tuple(var.shape)}"
            )
        flat.append((path, var.replace(jnp.asarray(node, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.cache
def _graph(cls: type, cfg: Config, scan: bool) -> Any:
    return nnx.split(nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0), scan)))
