"""Ladder side tuning (Sung et al. 2022): a narrow side network that reads the frozen backbone.

The side network has one block per backbone layer, of width ``d / r``. Before side block ``i``, a
*ladder* connection mixes the backbone's layer-``i`` output ``b_i``, linearly down-projected, with
the side network's previous state through a learned gate::

    z_i = mu_i * (stop_gradient(b_i) D_i + c_i) + (1 - mu_i) * s_{i-1},   mu_i = sigmoid(alpha_i / T)
    s_i = SideBlock_i(z_i),   s_{-1} = stop_gradient(x_emb) D_in + c_in

and the last state, up-projected (``s_{L-1} U + u``), replaces the last layer's output before what
the model runs after its layers (GPT-2's ``ln_f`` and LM head, BERT's pooler, Llama's ``norm``).
Backbone activations enter only through ``stop_gradient``: no gradient flows through a backbone
layer, and training stores the narrow side network's activations only (the paper's memory saving).
The side blocks per family and their pruning init are in ``jpeft.methods._lst_blocks``.
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

from jpeft import _errors, profiles
from jpeft._errors import JpeftError
from jpeft._method import Context, Method
from jpeft._tree import Path, PyTree, join
from jpeft.methods import _lst_blocks as blocks
from jpeft.methods._adapters import ACTIVATIONS, _module_paths

_STATE = threading.local()
"""The side network's state between two layer calls of one model call (``side``, ``layer``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LadderSideTuning(Method):
    r"""Ladder side tuning (LST): a side network of width ``d / reduction`` on the frozen backbone.

    One side block per backbone layer, of the backbone's kind at width ``d / reduction`` (heads of
    width ``d_head / reduction``, FFN ``d_ff / reduction``): pre-LayerNorm attention and FFN for
    GPT-2 (causal) and BERT / RoBERTa (padding mask); for Llama-style decoders pre-RMSNorm causal
    attention with rotary positions (the backbone's rope base ``rope_theta``), as many key-value
    heads as the backbone, and the gated SiLU MLP. Each reads the layer's output through a linear
    down-projection and a gate ``mu_i = sigmoid(alpha_i / T)`` (``alpha_i = 0`` at init,
    ``T = temperature``); the side network's last state, up-projected, replaces
    (``output='replace'``) or is added to (``output='add'``) the backbone's final hidden state.
    Backbone activations are read through ``stop_gradient``: no backward pass runs through a
    backbone layer. The side blocks start from the backbone by **structural pruning by weight
    magnitude** (the paper ranks rows and columns by importance; jpeft uses their L1 norm, which
    needs no data): one set ``S`` of ``d / reduction`` hidden features for the whole side network
    (the largest summed L1 norms of the hidden rows of the q, k, v and FFN-input kernels and the
    hidden columns of the attention- and FFN-output kernels, over all layers); per layer and head
    (Llama: per key-value group, in rotary pairs) the ``d_head / reduction`` head features with the
    largest L1 norms over the q, k, v columns and the attention-output rows; per layer the
    ``d_ff / reduction`` FFN features with the largest L1 norms over the FFN-input columns and
    FFN-output row. The pruned kernels and biases are copied; the side norms start at ``(1, 0)``;
    every down-projection starts as the selection of ``S`` and the up-projection as its transpose.
    Not mergeable, not the base model at init.

    Supported: the GPT-2, BERT / RoBERTa and Llama profiles (HF's ``FlaxLlamaForCausalLM``,
    ``jpeft.models``' NNX Llama, SmolLM2; not tunix's decoders, whose layers return ``(cache, x)``),
    unscanned layers, full-sequence calls (no KV cache), one LST adapter per call; linen
    (``jpeft.wrap``) and NNX models alike (the side state passes from layer call to layer call).

    Args:
      num_heads: the backbone's (query) attention heads (the tree does not hold them), e.g.
        ``config.num_attention_heads``; required. Key-value heads follow from the kernels.
      reduction: ``r``; ``d``, ``d_head`` and ``d_ff`` must be multiples of it (Llama:
        ``d_head / r`` even, for the rotary pairs). The paper's 8.
      temperature: ``T`` of the gates; the paper's 0.1.
      output: ``'replace'`` (the paper: the side network's output feeds the head) or ``'add'``.
      nonlinearity: the side FFN's, one of ``jpeft.methods._adapters.ACTIVATIONS``; by default the
        family's (``gelu_new`` for GPT-2, ``gelu`` for BERT, ``swish`` (SiLU) for Llama).
      rope_theta: the rotary base of Llama side blocks: pass the backbone's ``config.rope_theta``
        (HF's Flax Llama always rotates with 10000, the default; SmolLM2 uses 1e5).
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
    rope_theta: float = 10000.0
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
        _errors.positive_number(name, "rope_theta", self.rope_theta)
        _errors.one_of(name, "output", self.output, ("replace", "add"))
        if self.nonlinearity is not None:
            _errors.one_of(name, "nonlinearity", self.nonlinearity, tuple(ACTIVATIONS))
        if self.profile is not None and not isinstance(self.profile, profiles.Profile):
            raise JpeftError(f"{name}(profile={self.profile!r}): profile must be a jpeft.profiles.Profile or None.")

    # --- structure -----------------------------------------------------------------------------
    def resolve_profile(self, params: PyTree) -> profiles.Profile:
        profile = self.profile if self.profile is not None else profiles.detect(params)
        profiles.check(profile, params)
        if profile.name not in blocks.KIND:
            raise JpeftError(
                f"{self._name()}: the {profile.name!r} profile is not supported; ladder side tuning builds its side "
                f"blocks for the {', '.join(blocks.KIND)} families (Dense or Conv1D projections, layers that return "
                "their hidden state, no encoder-decoder). Use another method for this model."
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

    def dims(self, params: PyTree) -> blocks.Dims:
        """The backbone's sizes (``blocks.Dims``), checked against ``reduction`` and ``num_heads``."""
        path = self.select(params)[0]
        k = blocks.layer_kernels(self._name(), self.resolve_profile(params), path, Context(params))
        (d, f), qo, kv = k["fc"].shape, k["q"].shape[1], k["k"].shape[1]
        name, r, h = self._name(), self.reduction, self.num_heads
        if qo % h or kv % (qo // h):
            raise JpeftError(
                f"{name}(num_heads={h}): the query width {qo} of {join(path)} is not a multiple of num_heads, or "
                f"its key width {kv} not a multiple of the head size; pass config.num_attention_heads."
            )
        dh = qo // h
        if d % r or dh % r or f % r:
            raise JpeftError(
                f"{name}(reduction={r}): the hidden size {d}, head size {dh} ({qo} / {h} heads) and FFN size {f} of "
                f"{join(path)} must be multiples of reduction; pick a reduction that divides all three."
            )
        if blocks.KIND[self.resolve_profile(params).name] == "llama" and (dh // r) % 2:
            raise JpeftError(
                f"{name}(reduction={r}): the side head size {dh} / {r} = {dh // r} is odd; rotary positions rotate "
                "feature pairs, so pick a reduction with an even d_head / reduction."
            )
        return blocks.Dims(d=d, heads=h, kv_heads=kv // dh, head=dh, ffn=f, r=r)

    def hidden_keep(self, params: PyTree) -> jax.Array:
        """The global set ``S`` of hidden features the side network keeps (see the class docs)."""
        dims, ctx = self.dims(params), Context(params)
        kernels = (
            blocks.layer_kernels(self._name(), self.resolve_profile(params), p, ctx) for p in self.select(params)
        )
        score = sum(blocks.hidden_score(k) for k in kernels)
        return blocks.top_k(score, dims.d // self.reduction)

    def _shapes(self, params: PyTree, first: bool, last: bool) -> dict[str, tuple[int, ...]]:
        dims = self.dims(params)
        d, ds = dims.d, dims.side[0]
        shapes = {"alpha": (), "down_kernel": (d, ds), "down_bias": (ds,)}
        shapes |= blocks.shapes(blocks.KIND[self.resolve_profile(params).name], dims)
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
            profile = self.resolve_profile(ctx.params)
            cached = (self, self.select(ctx.params), self.dims(ctx.params), self.hidden_keep(ctx.params), profile)
            ctx._lst = cached
        _, layers, dims, keep, profile = cached
        k = blocks.layer_kernels(self._name(), profile, tuple(path), ctx)
        dtype = jnp.promote_types(k["q"].dtype, jnp.float32)
        sel = jnp.zeros((dims.d, keep.shape[0]), dtype).at[jnp.asarray(keep), jnp.arange(keep.shape[0])].set(1)
        zeros = jnp.zeros((dims.side[0],), dtype)
        out = {"alpha": jnp.zeros((), dtype), "down_kernel": sel, "down_bias": zeros}
        out |= blocks.prune(blocks.KIND[profile.name], k, keep, dims, dtype)
        if tuple(path) == tuple(layers[0]):
            out["in_kernel"], out["in_bias"] = sel, zeros
        if tuple(path) == tuple(layers[-1]):
            out["up_kernel"], out["up_bias"] = sel.T, jnp.zeros((dims.d,), dtype)
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

    def _layer_index(self, module: Any) -> tuple[int | None, str]:
        """The layer's index and the supported family whose layer pattern its path matches."""
        path = join(getattr(module, "_jpeft_path", None) or module.path)
        candidates = (self.profile,) if self.profile is not None else profiles.ALL
        for p in candidates:
            m = re.search(p.layer_pattern, path)
            if m and p.name in blocks.KIND:
                return int(m.group(1)), p.name
        return None, candidates[0].name

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
        positions = args[2] if len(args) > 2 else kwargs.get("position_ids")
        index, family = self._layer_index(module)
        sg = jax.lax.stop_gradient if self.detach else (lambda v: v)
        p = {n: v.astype(jnp.promote_types(v.dtype, b.dtype)) for n, v in deltas.items()}
        if "in_kernel" in p:
            state = blocks.lin(sg(x).astype(p["in_kernel"].dtype), p["in_kernel"], p["in_bias"])
        else:
            state, previous = getattr(_STATE, "side", None), getattr(_STATE, "layer", None)
            if state is None or index is None or previous != index - 1:
                raise JpeftError(
                    f"{name}: layer {index} ran without the side state of layer {index - 1 if index else '?'} (it "
                    f"holds layer {previous}'s). The side network needs every layer's deltas, called in order in one "
                    "call: no drop_layers=/drop_random=, no nn.scan or nn.remat around the layers, one LST adapter active."
                )
        mu = jax.nn.sigmoid(p["alpha"] / self.temperature)
        z = mu * blocks.lin(sg(b).astype(state.dtype), p["down_kernel"], p["down_bias"]) + (1 - mu) * state
        act = ACTIVATIONS[self.nonlinearity or blocks.ACTIVATION[family]]
        kind, causal = blocks.KIND[family], family in blocks.CAUSAL
        s = blocks.block(
            kind, p, z, mask, positions, heads=self.num_heads, causal=causal, act=act, rope_theta=self.rope_theta
        )
        if "up_kernel" not in p:
            _STATE.side, _STATE.layer = s, index
            return out
        _STATE.side, _STATE.layer = None, None
        y = blocks.lin(s, p["up_kernel"], p["up_bias"]).astype(b.dtype)
        y = y if self.output == "replace" else b + y
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
