"""UniPELT: LoRA, prefix tuning and a sequential adapter, each behind its own learned gate."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _errors, _tree
from jpeft._errors import JpeftError
from jpeft._intercept import linear_of
from jpeft._method import Context, Method
from jpeft._tree import Path, PyTree, join
from jpeft.methods._adapters import PfeifferAdapter
from jpeft.methods._compose import Compose
from jpeft.methods._lora import LoRA
from jpeft.methods._positions import real_mask
from jpeft.methods._prefix import PrefixTuning
from jpeft.methods._prompt import _WRITE
from jpeft.profiles import Profile

GATE = ("gate_kernel", "gate_bias")


def _gate_leaves(key: jax.Array, stack: tuple[int, ...], d_in: int, dtype: Any) -> dict[str, jax.Array]:
    """``W_g: (*stack, d_in, 1)`` uniform in ``+-1/sqrt(d_in)`` (torch's Linear default), ``b_g = 0``."""
    bound = 1.0 / math.sqrt(d_in)
    return {
        "gate_kernel": jax.random.uniform(key, stack + (d_in, 1), dtype, -bound, bound),
        "gate_bias": jnp.zeros(stack + (1,), dtype),
    }


def gate(module: nn.Module, x: jax.Array, deltas: Mapping[str, Any], open_: bool) -> jax.Array:
    """One gate value per example, ``(B, 1)``: ``mean_t sigmoid(x_t W_g + b_g)`` over ``x: (B, *seq, d)``.

    The mean runs over the caller's real positions only: inside a wrapped UniPELT call the
    virtual (prefix) positions and the positions the caller's attention mask zeroes are left out
    (see :func:`jpeft.methods._prompt.real_mask`); elsewhere over all of ``seq``. Exactly 1 when the
    gates are forced open.
    """
    if open_:
        return jnp.ones((x.shape[0], 1), x.dtype)
    w, b = deltas["gate_kernel"].astype(x.dtype), deltas["gate_bias"].astype(x.dtype)
    g = jax.nn.sigmoid(x @ w + b.reshape((1,) * (x.ndim - 1) + b.shape))  # (B, *seq, 1)
    axes = tuple(range(1, g.ndim - 1))
    mask = real_mask(module, x.shape[1]) if axes else None
    if mask is None:
        return jnp.mean(g, axis=axes)
    m = mask.astype(g.dtype).reshape(mask.shape + (1,) * (g.ndim - 2))
    return jnp.sum(g * m, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1)


def _per_example(g: jax.Array, y: jax.Array) -> jax.Array:
    """``g: (B, 1)`` shaped to broadcast against ``y: (B, ...)``."""
    return g.reshape((g.shape[0],) + (1,) * (y.ndim - 1)).astype(y.dtype)


def _without_gate(deltas: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in deltas.items() if k not in GATE}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedLoRA(LoRA):
    """LoRA whose update ``x A B`` is scaled by the gate ``G_L`` instead of ``alpha / r``.

    ``G_L = mean_t sigmoid(x_t W_g + b_g)`` per example (see :func:`gate`), ``x`` the layer's input:
    ``y = x W + G_L x A B``. With ``force_open`` the gate is off: ``y = x W + (alpha / r) x A B``.
    """

    force_open: bool = False

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        layout, stack, d_in, _ = self._shapes(path, own, ctx)
        if layout.kind not in ("dense", "transposed"):
            raise JpeftError(
                f"{self._name()}: {join(path)!r} has a {layout.kind!r} kernel; UniPELT's LoRA gate needs a dense "
                "layer (nn.Dense or GPT-2's Conv1D). Narrow the LoRA targets."
            )
        deltas = super().init_module(key, path, own, ctx)
        return {**deltas, **_gate_leaves(jax.random.fold_in(key, 7), stack, math.prod(d_in), deltas["lora_a"].dtype)}

    def param_count(self, params: PyTree) -> int:
        ctx, total = Context(params), super().param_count(params)
        modules = _tree.modules(params)
        for path in self.select(params):
            _, stack, d_in, _ = self._shapes(path, modules[path], ctx)
            total += math.prod(stack) * (math.prod(d_in) + 1)
        return total

    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        y = next_fun(*args, **kwargs)
        if self.force_open:  # the gate is off: plain LoRA with its alpha / r
            return super().forward(module, lambda *a, **k: y, args, kwargs, _without_gate(deltas))
        unit = dataclasses.replace(self, alpha=math.sqrt(self.rank) if self.use_rslora else float(self.rank))
        out = LoRA.forward(unit, module, lambda *a, **k: y, args, kwargs, _without_gate(deltas))  # y + x A B
        x = linear_of(module).inputs(args, kwargs)
        g = gate(module, x.astype(out.dtype), deltas, False)
        return y + (_per_example(g, out) * (out - y)).astype(y.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedAdapter(PfeifferAdapter):
    """A sequential (Pfeiffer-placed) adapter scaled by ``G_A = mean_t sigmoid(h_t W_g + b_g)``, ``h`` its input."""

    force_open: bool = False

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        deltas = super().init_module(key, path, own, ctx)
        stack, d = deltas["up_bias"].shape[:-1], deltas["up_bias"].shape[-1]
        return {**deltas, **_gate_leaves(jax.random.fold_in(key, 7), tuple(stack), int(d), deltas["up_bias"].dtype)}

    def param_count(self, params: PyTree) -> int:
        ctx, total = Context(params), super().param_count(params)
        for path in self.select(params):
            stack, d, _, _ = self._dims(path, ctx)
            total += math.prod(stack) * (d + 1)
        return total

    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        y = next_fun(*args, **kwargs)
        out = super().forward(module, lambda *a, **k: y, args, kwargs, _without_gate(deltas))
        g = gate(module, y.astype(out.dtype), deltas, self.force_open)
        return y + (_per_example(g, out) * (out - y)).astype(y.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedPrefix(PrefixTuning):
    """Plain per-layer prefixes scaled per example by ``G_P = mean_t sigmoid(x_t W_g + b_g)``.

    ``x`` is the input of the key or value projection (the attention input); the mean runs over
    the caller's real positions (see :func:`gate`). The gate multiplies that projection's prefix rows.
    """

    prefix_projection: bool = False
    force_open: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefix_projection:
            raise JpeftError("GatedPrefix(prefix_projection=True): UniPELT gates plain prefixes; pass False.")

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        deltas = super().init_module(key, path, own, ctx)
        site = next(s for s in self.prefix_sites(ctx.params) if s.path == path)
        d_in = self._d_in(path, own, ctx)
        return {**deltas, **_gate_leaves(jax.random.fold_in(key, 7), site.stack, d_in, next(iter(deltas.values())).dtype)}

    def _d_in(self, path: Path, own: Mapping[str, Any], ctx: Context) -> int:
        layout = ctx.layout(self._name(), path, own, self.profile_of(ctx.params).layouts)
        return math.prod(layout.split(tuple(own[layout.leaf].shape))[1])

    def param_count(self, params: PyTree) -> int:
        ctx, total = Context(params), super().param_count(params)
        modules = _tree.modules(params)
        for path in self.select(params):
            site = next(s for s in self.prefix_sites(params) if s.path == path)
            total += math.prod(site.stack) * (self._d_in(path, modules[path], ctx) + 1)
        return total

    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        y = next_fun(*args, **kwargs)
        n = _WRITE.get()
        if n is None:
            return y
        x = linear_of(module).inputs(args, kwargs)
        g = gate(module, x.astype(y.dtype), deltas, self.force_open)  # (B, 1)

        def write(y: jax.Array, rows: jax.Array, features: slice) -> jax.Array:
            gated = g.reshape((g.shape[0],) + (1,) * rows.ndim) * rows.astype(y.dtype)[None]
            return y.at[:, :n, ..., features].set(gated)

        if "prefix" in deltas:
            return write(y, deltas["prefix"], slice(None))
        third = y.shape[-1] // 3
        y = write(y, deltas["prefix_key"], slice(third, 2 * third))
        return write(y, deltas["prefix_value"], slice(2 * third, None))


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniPELT(Compose):
    r"""UniPELT: gated LoRA, gated prefix tuning and a gated sequential adapter in every layer.

    Components (keys ``'lora'``, ``'prefix'``, ``'adapter'``):

    - LoRA on ``lora_targets`` (query and value by default): ``y = x W + G_L x A B``, the gate in
      place of ``alpha / r`` (the paper's rule; ``alpha`` applies only with ``force_open``);
    - prefix tuning with plain prefixes of length ``prefix_tokens`` on every key and value
      projection, the prefix rows scaled by ``G_P``;
    - a Pfeiffer-placed adapter after the FFN: ``h <- h + G_A g(h)``.

    Each gate is one scalar per example and module, as in the paper: ``G = mean_t sigmoid(u_t W_g +
    b_g)`` over the sequence of the submodule's input ``u`` (the layer's input for LoRA and the
    prefix, the adapter's input for the adapter), a ``(d_in, 1)`` kernel and a bias (``d_in + 1``
    parameters). The mean runs over the caller's positions whose ``attention_mask`` is 1; the
    prefix positions never count. With ``force_open=True`` every gate is off (1, and LoRA's scale
    is ``alpha / r``): UniPELT equals the un-gated composition.

    The gates average over the whole sequence, so on a causal LM a token's output depends on later
    tokens: ``jpeft.generate`` (cached decoding) refuses UniPELT unless ``force_open=True``.

    Args:
      lora_targets: LoRA's targets (module-name suffixes or a regex).
      rank: LoRA's r.
      alpha: LoRA's alpha.
      prefix_tokens: the prefix length.
      reduction_factor: the adapter's d / r.
      force_open: gates fixed at 1 (an ablation, and the identity the tests check).
      profile: the architecture profile; ``None`` detects one.
      dtype: dtype of every trainable leaf (factors, prefixes, adapter, gates); by default the
        base's, promoted to at least float32.

    Example:
      >>> import jpeft
      >>> jpeft.UniPELT(lora_targets=("query", "value")).keys
      ('lora', 'prefix', 'adapter')

    References:
      Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning", ACL 2022.
    """

    lora_targets: str | tuple[str, ...] = ("query", "value")
    rank: int = 8
    alpha: float = 16.0
    prefix_tokens: int = 10
    reduction_factor: int = 16
    force_open: bool = False
    profile: Profile | None = None
    dtype: str | None = None
    methods: tuple[Method, ...] = ()
    keys: tuple[str, ...] | None = ("lora", "prefix", "adapter")

    @property
    def sequence_gates(self) -> bool:
        """Whether outputs depend on the whole sequence through the gates (not with ``force_open``)."""
        return not self.force_open

    def __post_init__(self) -> None:
        if not isinstance(self.force_open, bool):
            raise JpeftError(f"UniPELT(force_open={self.force_open!r}): force_open must be a bool.")
        _errors.positive_int("UniPELT", "prefix_tokens", self.prefix_tokens)
        object.__setattr__(self, "dtype", _errors.float_dtype("UniPELT", "dtype", self.dtype))
        common = dict(force_open=self.force_open, dtype=self.dtype)
        lora = GatedLoRA(targets=self.lora_targets, rank=self.rank, alpha=self.alpha, **common)
        prefix = GatedPrefix(num_virtual_tokens=self.prefix_tokens, profile=self.profile, **common)
        adapter = GatedAdapter(reduction_factor=self.reduction_factor, profile=self.profile, **common)
        object.__setattr__(self, "methods", (lora, prefix, adapter))
        object.__setattr__(self, "keys", ("lora", "prefix", "adapter"))
        super().__post_init__()
