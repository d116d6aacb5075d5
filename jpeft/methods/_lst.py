"""Ladder side tuning (Sung et al. 2022): a narrow side network that reads the frozen backbone.

The side network has one block per backbone layer, of width ``d / r``. Before side block ``i``, a
*ladder* connection mixes the backbone's layer-``i`` output ``b_i``, linearly down-projected, with
the side network's previous state through a learned gate::

    z_i = mu_i * (stop_gradient(b_i) D_i + c_i) + (1 - mu_i) * s_{i-1},   mu_i = sigmoid(alpha_i / T)
    s_i = SideBlock_i(z_i),   s_{-1} = stop_gradient(x_emb) D_in + c_in

and the last state, up-projected (``s_{L-1} U + u``), replaces the backbone's final hidden state
(the last layer's output) before whatever the model runs after its layer stack (GPT-2's ``ln_f``
and LM head, BERT's pooler and classifier). The backbone's activations enter the side network only
through ``stop_gradient``, so no gradient flows through a backbone layer: training stores the
activations of the narrow side network only (the paper's memory saving).
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _errors, _tree, profiles
from jpeft._errors import JpeftError
from jpeft._method import Context, Method
from jpeft._tree import Path, PyTree, join
from jpeft.methods._adapters import ACTIVATIONS, _module_paths, _own

_STATE = threading.local()
"""The side network's state between two layer calls of one model call (``side``, ``layer``)."""

SUPPORTED = ("gpt2", "bert", "roberta")
CAUSAL = ("gpt2",)
BLOCK = ("ln1_scale", "ln1_bias", "q_kernel", "q_bias", "k_kernel", "k_bias", "v_kernel", "v_bias", "o_kernel")
BLOCK += ("o_bias", "ln2_scale", "ln2_bias", "fc_kernel", "fc_bias", "proj_kernel", "proj_bias")


def _xp(*arrays: Any) -> Any:
    """NumPy for concrete arrays (no per-op compiles at init), ``jax.numpy`` under tracing."""
    return jnp if any(isinstance(a, jax.core.Tracer) for a in arrays) else np


def top_k(score: Any, k: int) -> Any:
    """The indices of the ``k`` largest scores (ties: the lower index), in increasing order."""
    xp = _xp(score)
    return xp.sort(xp.argsort(-score, stable=True)[:k])


def selection(d: int, keep: Any, dtype: Any) -> jax.Array:
    """The ``(d, len(keep))`` matrix ``P`` with ``P[keep[j], j] = 1``: ``x P == x[..., keep]``."""
    return jnp.zeros((d, keep.shape[0]), dtype).at[jnp.asarray(keep), jnp.arange(keep.shape[0])].set(1)


def _vec(v: jax.Array, ndim: int) -> jax.Array:
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _lin(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    return x @ kernel + _vec(bias, x.ndim)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * _vec(scale, x.ndim) + _vec(bias, x.ndim)


def side_block(p: Mapping[str, jax.Array], x: jax.Array, mask: jax.Array | None, heads: int, causal: bool, act: Any):
    """One pre-LayerNorm transformer block of the side network on ``x: (B, T, d_s)``."""
    b, t, _ = x.shape
    h = _layer_norm(x, p["ln1_scale"], p["ln1_bias"])
    q, k, v = (_lin(h, p[f"{n}_kernel"], p[f"{n}_bias"]).reshape(b, t, heads, -1) for n in "qkv")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    allowed = jnp.ones((b, 1, t, t), bool)
    if mask is not None:
        allowed = allowed & (mask[:, None, None, :] > 0)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((t, t), bool))[None, None]
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, -1)
    x = x + _lin(o, p["o_kernel"], p["o_bias"])
    h = _layer_norm(x, p["ln2_scale"], p["ln2_bias"])
    return x + _lin(act(_lin(h, p["fc_kernel"], p["fc_bias"])), p["proj_kernel"], p["proj_bias"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class LadderSideTuning(Method):
    r"""Ladder side tuning (LST): a side network of width ``d / reduction`` on the frozen backbone.

    One side block per backbone layer (pre-LayerNorm attention with the backbone's ``num_heads``
    heads of width ``d_head / reduction``, and an FFN of width ``d_ff / reduction``) reads the
    layer's output through a linear down-projection and a gate ``mu_i = sigmoid(alpha_i / T)``
    (``alpha_i = 0`` at init, ``T = temperature``); the side network's last state, up-projected,
    replaces (``output='replace'``) or is added to (``output='add'``) the backbone's final hidden
    state. Backbone activations are read through ``stop_gradient``: no backward pass runs through
    a backbone layer. The side blocks start from the backbone by **structural pruning by weight
    magnitude** (the paper ranks rows and columns by importance; jpeft uses their L1 norm, which
    needs no data): one set ``S`` of ``d / reduction`` hidden features for the whole side network
    (the largest summed L1 norms of the hidden rows of the q, k, v and FFN-input kernels and the
    hidden columns of the attention- and FFN-output kernels, over all layers); per layer and head,
    the ``d_head / reduction`` head features with the largest L1 norms over the q, k, v columns and
    the attention-output row; per layer the ``d_ff / reduction`` FFN features with the largest L1
    norms over the FFN-input column and FFN-output row. The pruned kernels and biases are copied;
    the side LayerNorms start at ``(1, 0)``; every down-projection starts as the selection of
    ``S`` and the up-projection as its transpose. Not mergeable, not the base model at init.

    Supported: GPT-2 (causal side attention) and BERT / RoBERTa (bidirectional, padding mask)
    profiles, unscanned layers, full-sequence calls (no KV cache), one LST adapter per call; linen
    (``jpeft.wrap``) and NNX models alike (the side state passes from layer call to layer call).

    Args:
      num_heads: the backbone's attention heads (the tree does not hold them), e.g.
        ``config.num_attention_heads``; required.
      reduction: ``r``; ``d_head``, ``d`` and ``d_ff`` must be multiples of it. The paper's 8.
      temperature: ``T`` of the gates; the paper's 0.1.
      output: ``'replace'`` (the paper: the side network's output feeds the head) or ``'add'``.
      nonlinearity: the side FFN's, one of ``jpeft.methods._adapters.ACTIVATIONS``; by default the
        family's (``gelu_new`` for GPT-2, ``gelu`` for BERT).
      profile: the architecture profile; by default the detected one.
      extra_trainable: regex over base leaf paths that train fully (a task head).

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> from transformers import GPT2Config, FlaxGPT2LMHeadModel
      >>> cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
      >>> with jax.numpy_rank_promotion("allow"):  # HF's Flax code relies on implicit rank promotion
      ...   model = FlaxGPT2LMHeadModel(cfg, seed=0)
      >>> method = jpeft.LadderSideTuning(num_heads=4, reduction=4)
      >>> peft = jpeft.apply(method, model.params, key=jax.random.key(0))
      >>> sorted(peft["transformer"]["h"]["1"][jpeft.RESERVED]["default"])[:4]
      ['alpha', 'down_bias', 'down_kernel', 'fc_bias']
      >>> ids = jnp.ones((2, 5), jnp.int32)
      >>> pos = jnp.broadcast_to(jnp.arange(5), ids.shape)
      >>> with jax.numpy_rank_promotion("allow"):
      ...   out = jpeft.wrap(model.module.apply, method)({"params": peft}, ids, jnp.ones_like(ids), pos)
      >>> out.logits.shape
      (2, 5, 50)

    References:
      Sung, Cho and Bansal, "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer
      Learning", NeurIPS 2022.
    """

    num_heads: int | None = None
    reduction: int = 8
    temperature: float = 0.1
    output: str = "replace"
    nonlinearity: str | None = None
    profile: profiles.Profile | None = None

    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    site_role: ClassVar[str] = "output"
    mixed_batches: ClassVar[bool] = False
    mixed_batches_why: ClassVar[str] = "the side state passes from layer to layer within one call"
    #: Whether the side network reads the backbone through ``stop_gradient`` (tests flip it).
    detach: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        if self.num_heads is None:
            raise JpeftError(
                f"{name}(num_heads=None): pass the backbone's number of attention heads, e.g. "
                "num_heads=config.num_attention_heads (GPT-2: config.n_head); the parameter tree does not hold it."
            )
        _errors.positive_int(name, "num_heads", self.num_heads)
        _errors.positive_int(name, "reduction", self.reduction)
        _errors.positive_number(name, "temperature", self.temperature)
        _errors.one_of(name, "output", self.output, ("replace", "add"))
        if self.nonlinearity is not None:
            _errors.one_of(name, "nonlinearity", self.nonlinearity, tuple(ACTIVATIONS))
        if self.profile is not None and not isinstance(self.profile, profiles.Profile):
            raise JpeftError(f"{name}(profile={self.profile!r}): profile must be a jpeft.profiles.Profile or None.")

    # --- structure -----------------------------------------------------------------------------
    def resolve_profile(self, params: PyTree) -> profiles.Profile:
        profile = self.profile if self.profile is not None else profiles.detect(params)
        profiles.check(profile, params)
        if profile.name not in SUPPORTED:
            raise JpeftError(
                f"{self._name()}: the {profile.name!r} profile is not supported; ladder side tuning builds its side "
                f"blocks for the {', '.join(SUPPORTED)} families (multi-head attention with one FFN input "
                "projection, no rotary positions, no encoder-decoder). Use another method for this model."
            )
        return profile

    def select(self, params: PyTree) -> list[Path]:
        profile = self.resolve_profile(params)
        layers = {}
        for p in _module_paths(params):
            m = re.search(profile.layer_pattern, join(p))
            if m and m.end() == len(join(p)):
                layers[p] = int(m.group(1))
        if not layers:
            raise JpeftError(
                f"{self._name()}: no layer module matches the profile's layer_pattern {profile.layer_pattern!r}."
            )
        return sorted(layers, key=layers.get)

    def _kernels(self, path: Path, ctx: Context) -> dict[str, jax.Array]:
        """The layer's q, k, v, o, fc, proj kernels as ``(in, out)`` matrices and their biases."""
        profile = self.resolve_profile(ctx.params)
        node = _tree.get(ctx.params, path)
        found: dict[str, jax.Array] = {}
        fields = {"query": "q", "key": "k", "value": "v", "attn_out": "o", "ffn_in": "fc", "ffn_out": "proj"}
        for sub, child in _module_paths(node).items():
            full = tuple(path) + sub
            own = _own(child)
            for field, short in fields.items():
                if not re.fullmatch(getattr(profile, field), join(full)):
                    continue
                layout = ctx.layout(self._name(), full, own, profile.layouts)
                kernel = own.get(layout.leaf)
                if kernel is None or layout.kind not in ("dense", "transposed") or kernel.ndim != 2:
                    shape = None if kernel is None else tuple(kernel.shape)
                    raise JpeftError(
                        f"{self._name()}: {join(full)} (the {field} site) has kernel shape {shape} and layout "
                        f"{layout.kind!r}; ladder side tuning needs one unstacked 2-D Dense or Conv1D kernel per site "
                        "(no nn.scan stack, no quantised base)."
                    )
                xp = _xp(kernel)
                w = xp.asarray(kernel).T if layout.kind == "transposed" else xp.asarray(kernel)
                bias = xp.asarray(own["bias"]) if "bias" in own else xp.zeros(w.shape[1], w.dtype)
                found[short], found[short + "_b"] = w, bias
        missing = [f for f, s in fields.items() if s not in found]
        if missing:
            raise JpeftError(
                f"{self._name()}: layer {join(path)} has no {missing} site under the {profile.name} profile."
            )
        if profile.qkv_fused is not None:
            w, bias = found["q"], found["q_b"]
            d = w.shape[1] // 3
            for j, n in enumerate("qkv"):
                found[n], found[n + "_b"] = w[:, j * d : (j + 1) * d], bias[j * d : (j + 1) * d]
        return found

    def dims(self, params: PyTree) -> tuple[int, int, int]:
        """``(d, d_head, d_ff)`` of the backbone, checked against ``reduction`` and ``num_heads``."""
        path = self.select(params)[0]
        k = self._kernels(path, Context(params))
        d, f = k["fc"].shape
        name, r, h = self._name(), self.reduction, self.num_heads
        if d % h:
            raise JpeftError(
                f"{name}(num_heads={h}): the hidden size {d} of {join(path)} is not a multiple of num_heads."
            )
        dh = d // h
        if dh % r or f % r:
            raise JpeftError(
                f"{name}(reduction={r}): the head size {dh} (hidden {d} / {h} heads) and the FFN size {f} of "
                f"{join(path)} must be multiples of reduction; pick a reduction that divides both."
            )
        return d, dh, f

    def hidden_keep(self, params: PyTree) -> jax.Array:
        """The global set ``S`` of hidden features the side network keeps (see the class docs)."""
        d, _, _ = self.dims(params)
        ctx = Context(params)
        score = 0.0
        for path in self.select(params):
            k = self._kernels(path, ctx)
            xp = _xp(*k.values())
            k = {n: xp.abs(xp.asarray(v, xp.float32)) for n, v in k.items()}
            score = score + sum(k[n].sum(1) for n in ("q", "k", "v", "fc")) + k["o"].sum(0) + k["proj"].sum(0)
        return top_k(score, d // self.reduction)

    def _shapes(self, params: PyTree, first: bool, last: bool) -> dict[str, tuple[int, ...]]:
        d, dh, f = self.dims(params)
        ds, fs = d // self.reduction, f // self.reduction
        shapes = {"alpha": (), "down_kernel": (d, ds), "down_bias": (ds,)}
        shapes |= {n: (ds,) for n in BLOCK if n.endswith(("_bias", "_scale"))}
        shapes |= {"q_kernel": (ds, ds), "k_kernel": (ds, ds), "v_kernel": (ds, ds), "o_kernel": (ds, ds)}
        shapes |= {"fc_kernel": (ds, fs), "fc_bias": (fs,), "proj_kernel": (fs, ds)}
        if first:
            shapes |= {"in_kernel": (d, ds), "in_bias": (ds,)}
        if last:
            shapes |= {"up_kernel": (ds, d), "up_bias": (d,)}
        return shapes

    def param_count(self, params: PyTree) -> int:
        n = len(self.select(params))
        return self.extra_count(params) + sum(
            math.prod(s) for i in range(n) for s in self._shapes(params, i == 0, i == n - 1).values()
        )

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        cached = vars(ctx).get("_lst")
        if cached is None or cached[0] != self:  # once per jpeft.apply: S needs every layer
            cached = (self, self.select(ctx.params), self.dims(ctx.params), self.hidden_keep(ctx.params))
            ctx._lst = cached
        _, layers, (d, dh, f), keep = cached
        r, h = self.reduction, self.num_heads
        k = self._kernels(tuple(path), ctx)
        dtype = jnp.promote_types(k["q"].dtype, jnp.float32)
        xp = _xp(*k.values())
        k = {n: xp.asarray(v, dtype) for n, v in k.items()}
        a = {n: xp.abs(v) for n, v in k.items()}
        head = (a["q"].sum(0) + a["k"].sum(0) + a["v"].sum(0) + a["o"].sum(1)).reshape(h, dh)
        cols = xp.concatenate([i * dh + top_k(head[i], dh // r) for i in range(h)])
        ffn = top_k(a["fc"].sum(0) + a["proj"].sum(1), f // r)
        sel = selection(d, keep, dtype)
        ones = jnp.ones((d // r,), dtype)
        out = {"alpha": jnp.zeros((), dtype), "down_kernel": sel, "down_bias": jnp.zeros_like(ones)}
        out |= {"ln1_scale": ones, "ln1_bias": 0 * ones, "ln2_scale": ones, "ln2_bias": 0 * ones}
        for n in "qkv":
            out[f"{n}_kernel"], out[f"{n}_bias"] = k[n][keep][:, cols], k[n + "_b"][cols]
        out["o_kernel"], out["o_bias"] = k["o"][cols][:, keep], k["o_b"][keep]
        out["fc_kernel"], out["fc_bias"] = k["fc"][keep][:, ffn], k["fc_b"][ffn]
        out["proj_kernel"], out["proj_bias"] = k["proj"][ffn][:, keep], k["proj_b"][keep]
        out = {n: jnp.asarray(v, dtype) for n, v in out.items()}
        if tuple(path) == tuple(layers[0]):
            out["in_kernel"], out["in_bias"] = sel, jnp.zeros_like(ones)
        if tuple(path) == tuple(layers[-1]):
            out["up_kernel"], out["up_bias"] = sel.T, jnp.zeros((d,), dtype)
        return out

    # --- forward -------------------------------------------------------------------------------
    def call(self, apply_fn: Any, variables: PyTree, args: tuple, kwargs: dict, *, active: str) -> Any:
        """Runs the model (linen: ``jpeft.wrap``) and checks that the last layer used the side network."""
        _STATE.side = _STATE.layer = None
        out = apply_fn(variables, *args, **kwargs)
        if getattr(_STATE, "side", None) is not None:
            layer = _STATE.layer
            _STATE.side = _STATE.layer = None
            raise JpeftError(
                f"{self._name()}: the side network stopped after layer {layer}: the last layer, which up-projects "
                "the side state into the output, ran without its deltas (drop_layers= naming it?). Run every layer "
                "with its deltas (no drop_layers=/drop_random=)."
            )
        return out

    def _layer_index(self, module: Any) -> int | None:
        path = join(getattr(module, "_jpeft_path", None) or module.path)
        for p in (self.profile,) if self.profile is not None else profiles.ALL:
            m = re.search(p.layer_pattern, path)
            if m:
                return int(m.group(1))
        return None

    def forward(self, module: Any, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        name = self._name()
        if kwargs.get("init_cache") or (
            hasattr(module, "is_mutable_collection") and module.is_mutable_collection("cache")
        ):
            raise JpeftError(
                f"{name}: cached decoding (init_cache or a mutable 'cache') is not supported: the side network "
                "attends over the whole sequence without a cache. Run the model on full sequences (no jpeft.generate)."
            )
        out = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        b = out[0] if isinstance(out, tuple) else out
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None and jnp.ndim(mask) != 2:
            raise JpeftError(
                f"{name}: expected the layer's attention_mask as (batch, seq); got shape {jnp.shape(mask)}."
            )
        index = self._layer_index(module)
        sg = jax.lax.stop_gradient if self.detach else (lambda v: v)
        p = {n: v.astype(jnp.promote_types(v.dtype, b.dtype)) for n, v in deltas.items()}
        if "in_kernel" in p:
            state = _lin(sg(x).astype(p["in_kernel"].dtype), p["in_kernel"], p["in_bias"])
        else:
            state, previous = getattr(_STATE, "side", None), getattr(_STATE, "layer", None)
            if state is None or index is None or previous != index - 1:
                raise JpeftError(
                    f"{name}: layer {index} ran without the side state of layer {index - 1 if index else '?'} (it "
                    f"holds layer {previous}'s). The side network needs every layer's deltas, called in order in one "
                    "call: no drop_layers=/drop_random=, no nn.scan or nn.remat around the layers, one LST adapter active."
                )
        mu = jax.nn.sigmoid(p["alpha"] / self.temperature)
        z = mu * _lin(sg(b).astype(state.dtype), p["down_kernel"], p["down_bias"]) + (1 - mu) * state
        act = ACTIVATIONS[self.nonlinearity or ("gelu_new" if self._causal(module) else "gelu")]
        s = side_block(p, z, mask, self.num_heads, self._causal(module), act)
        if "up_kernel" not in p:
            _STATE.side, _STATE.layer = s, index
            return out
        _STATE.side, _STATE.layer = None, None
        y = _lin(s, p["up_kernel"], p["up_bias"]).astype(b.dtype)
        y = y if self.output == "replace" else b + y
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y

    def _causal(self, module: Any) -> bool:
        if self.profile is not None:
            return self.profile.name in CAUSAL
        path = join(getattr(module, "_jpeft_path", None) or module.path)
        return any(re.search(p.layer_pattern, path) for p in profiles.ALL if p.name in CAUSAL)
