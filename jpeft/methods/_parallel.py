"""Parallel bottleneck adapters: parallel, scaled parallel and multi-head parallel.

Each is an adapter of ``jpeft.methods._adapters`` (the bottleneck ``g``, zero up-projection at
init, not mergeable) that reads a sub-layer's *input* and adds to its *output*. The two are
different modules (``ffn_in`` and ``ffn_out``, or ``query`` and ``attn_out``), so the leaves live in
the scope of their lowest common ancestor (the FFN or attention block, or the whole layer for BERT,
whose FFN is split over two modules). While that ancestor runs, a nested interceptor reads the
input module's argument and adds the adapter output to the output module's result
(``jpeft._intercept.submodule_calls``: linen's ``intercept_methods``, or on ``flax.nnx`` the
adapted classes' ``__call__``). Nothing outlives the call, so this holds under ``jit``, ``grad``,
``nn.scan``/``nnx.scan`` and ``nn.remat``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _errors
from jpeft._errors import JpeftError
from jpeft._intercept import linear_of, submodule_calls
from jpeft._method import Context
from jpeft._tree import Path, PyTree, join
from jpeft.methods._adapters import ACTIVATIONS, _Adapter, _module_paths


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Parallel(_Adapter):
    """An adapter from the input of the ``source`` site to the ``sink`` site, at their common ancestor."""

    reenters: ClassVar[bool] = True  # forward intercepts the projections inside the block's own call
    bottleneck: int

    source: ClassVar[str] = ""
    sink: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        _errors.positive_int(self._name(), "bottleneck", self.bottleneck)

    def _pairs(self, params: PyTree) -> dict[Path, tuple[Path, Path]]:
        """Each site (common ancestor) -> its ``(source, sink)`` module paths."""
        profile = self.resolve_profile(params)
        paths = _module_paths(params)
        sources = [p for p in paths if re.fullmatch(getattr(profile, self.source), join(p))]
        sinks = [p for p in paths if re.fullmatch(getattr(profile, self.sink), join(p))]

        def common(a: Path, b: Path) -> int:
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n

        out: dict[Path, tuple[Path, Path]] = {}
        for sink in sorted(sinks):
            best = max(sources, key=lambda s: common(s, sink))
            site = sink[: common(best, sink)]
            if not site or site in (best, sink):
                raise JpeftError(
                    f"{self._name()}: the profile's {self.sink} site {join(sink)!r} shares no enclosing module "
                    f"with a {self.source} site (nearest {join(best)!r}). A parallel adapter needs both inside "
                    "one module (the layer or the sub-layer block); fix the profile's regexes."
                )
            if site in out:
                raise JpeftError(
                    f"{self._name()}: the profile's {self.sink} regex matches both {join(out[site][1])!r} and "
                    f"{join(sink)!r} inside {join(site)!r}; expected one per layer. Fix the profile's {self.sink} regex."
                )
            out[site] = (best, sink)
        return out

    def select(self, params: PyTree) -> list[Path]:
        return sorted(self._pairs(params))

    def _roles(self, path: Path, ctx: Context) -> tuple[tuple, int, int, Any]:
        """``(stack, d_source, d_sink, sink kernel)`` of the site at ``path``."""
        source, sink = self._pairs(ctx.params)[path]
        nodes = _module_paths(ctx.params)
        _, s_in, s_out, s_kernel = self._kernel(source, nodes[source], ctx, self.source)
        stack, t_in, t_out, t_kernel = self._kernel(sink, nodes[sink], ctx, self.sink)
        return stack, *self._widths(source, s_kernel, s_in, s_out, sink, t_kernel, t_in, t_out, ctx), t_kernel

    def _widths(self, source, s_kernel, s_in, s_out, sink, t_kernel, t_in, t_out, ctx) -> tuple[int, int]:
        raise NotImplementedError

    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        site = tuple(module.path)
        cands = self._candidates()
        seen: list[jax.Array] = []

        def role(m: nn.Module, field: str) -> bool:
            return any(re.fullmatch(getattr(p, field), join(m.path)) for p in cands)

        def inner(m: Any, nf: Any, a: tuple, kw: dict) -> Any:
            if role(m, self.source) and not seen:
                return self._at_source(m, nf, a, kw, seen)
            if role(m, self.sink):
                if not seen:
                    raise JpeftError(
                        f"{self._name()}: inside {join(site)!r} the {self.sink} module {join(m.path)!r} ran before "
                        f"any {self.source} module, so the adapter has no input. The profile's {self.source} and "
                        f"{self.sink} must name the sub-layer's first and last projections."
                    )
                done.append(True)
                return self._at_sink(m, nf, a, kw, seen[0], deltas)
            return nf(*a, **kw)

        done: list[bool] = []
        with submodule_calls(module, inner):  # linen's intercept_methods, or the NNX backend's hook
            out = next_fun(*args, **kwargs)
        if not done:
            raise JpeftError(
                f"{self._name()}: no {self.sink} module ran inside the call of {join(site)!r}, so the adapter "
                f"was not applied: the profile's {self.sink} regex names no module that this block calls. "
                "Fix the profile's regexes."
            )
        return out

    def _at_source(self, m: nn.Module, nf: Any, a: tuple, kw: dict, seen: list) -> Any:
        raise NotImplementedError

    def _at_sink(self, m: nn.Module, nf: Any, a: tuple, kw: dict, u: jax.Array, deltas: Any) -> Any:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelAdapter(_Parallel):
    """He et al.'s parallel adapter on the FFN: ``h_ffn <- h_ffn + s * g(x)``, x the FFN input.

    ``g(x) = f(x W_down + b_down) W_up + b_up`` with ``W_down: (d, r)``, ``W_up: (r, d)``. ``x`` is
    the input of the profile's ``ffn_in`` projection (the FFN input) and ``s g(x)`` is added to the
    output of its ``ffn_out`` projection, before dropout and the residual add. ``W_down`` is
    Kaiming-uniform (adapter-hub's ``mam_adapter`` init), the rest zero. Trainable parameters:
    ``L (2 d r + r + d)``, plus ``L`` with ``scaling="learned"``. Not mergeable.

    Args:
      bottleneck: r.
      scaling: ``s``, a number, or ``"learned"`` for a trainable scalar per layer starting at 1.
      nonlinearity: ``f``, one of :data:`ACTIVATIONS`; ReLU by default.
      profile: the architecture profile that names ``ffn_in`` and ``ffn_out``; detected by default.
        The leaves live in the scope of the two modules' lowest common ancestor.
      dtype: dtype of the adapter leaves; by default the kernel's, promoted to at least float32.
      extra_trainable: regex over base leaf paths that train fully (e.g. a task head).

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> from flax.traverse_util import unflatten_dict
      >>> d = 16  # a one-layer GPT-2-shaped tree; its Conv1D kernels are (out, in)
      >>> shapes = {"wte/embedding": (50, d), "h/0/attn/c_attn/kernel": (3 * d, d), "h/0/attn/c_proj/kernel": (d, d),
      ...           "h/0/mlp/c_fc/kernel": (4 * d, d), "h/0/mlp/c_proj/kernel": (d, 4 * d)}
      >>> params = unflatten_dict({tuple(k.split("/")): jnp.zeros(s) for k, s in shapes.items()})
      >>> method = jpeft.ParallelAdapter(bottleneck=8)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> jax.tree.map(jnp.shape, peft["h"]["0"]["mlp"][jpeft.RESERVED]["default"])  # in the FFN block's scope
      {'down_bias': (8,), 'down_kernel': (16, 8), 'up_bias': (16,), 'up_kernel': (8, 16)}

    References:
      He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022.
    """

    scaling: float | str = 1.0

    source: ClassVar[str] = "ffn_in"
    sink: ClassVar[str] = "ffn_out"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scaling != "learned":
            if isinstance(self.scaling, str):
                raise JpeftError(
                    f"{self._name()}(scaling={self.scaling!r}): scaling must be a number > 0 or 'learned'."
                )
            _errors.positive_number(self._name(), "scaling", self.scaling)

    def _widths(self, source, s_kernel, s_in, s_out, sink, t_kernel, t_in, t_out, ctx) -> tuple[int, int]:
        return self._one_axis(source, s_kernel, "input", s_in), self._one_axis(sink, t_kernel, "output", t_out)

    def _shapes(self, path: Path, ctx: Context) -> dict[str, tuple[int, ...]]:
        stack, d_x, d_y, _ = self._roles(path, ctx)
        r = self.bottleneck
        shapes = {"down_kernel": stack + (d_x, r), "down_bias": stack + (r,), "up_kernel": stack + (r, d_y)}
        shapes["up_bias"] = stack + (d_y,)
        if self.scaling == "learned":
            shapes["scaling"] = stack
        return shapes

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        stack, d_x, d_y, kernel = self._roles(path, ctx)
        dtype = self._param_dtype(kernel)
        leaves = self._bottleneck_leaves(key, stack, d_x, self.bottleneck, d_y, dtype)
        if self.scaling == "learned":
            leaves["scaling"] = jnp.ones(stack, dtype)
        return leaves

    def _at_source(self, m: nn.Module, nf: Any, a: tuple, kw: dict, seen: list) -> Any:
        seen.append(linear_of(m).inputs(a, kw) if not a else a[0])
        return nf(*a, **kw)

    def _at_sink(self, m: nn.Module, nf: Any, a: tuple, kw: dict, u: jax.Array, deltas: Any) -> Any:
        y = nf(*a, **kw)
        dtype = jnp.promote_types(deltas["up_kernel"].dtype, y.dtype)
        bottleneck = {k: v for k, v in deltas.items() if k != "scaling"}
        s = deltas["scaling"].astype(dtype) if self.scaling == "learned" else jnp.asarray(self.scaling, dtype)
        return y + (s * self._g(u, bottleneck, dtype)).astype(y.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledParallelAdapter(ParallelAdapter):
    """The scaled parallel adapter: :class:`ParallelAdapter` with ``s = 4`` (or ``"learned"``).

    ``h_ffn <- h_ffn + s * f(x W_down + b_down) W_up + b_up``, the FFN-side half of the MAM adapter.
    See :class:`ParallelAdapter` for the arguments.

    Example:
      >>> import jpeft
      >>> jpeft.ScaledParallelAdapter(bottleneck=512).scaling
      4.0

    References:
      He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022.
    """

    scaling: float | str = 4.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiHeadParallelAdapter(_Parallel):
    """He et al.'s multi-head parallel adapter: a parallel adapter per attention head, before ``W_o``.

    For each head ``i`` with query ``q_i = (x W_q)_i: (..., d_h)``,
    ``head_i <- head_i + f(q_i P_k^(i)T) P_v^(i)`` with ``P_k^(i), P_v^(i): (r, d_h)``: prefix
    tuning with the softmax replaced by ``f`` and the gate removed (the reference code's
    ``cross_attn_relu``), so the down projection is ``W_q^(i) P_k^(i)T``, built on the frozen query
    projection. The adapted heads feed the profile's ``attn_out`` projection; a fused QKV
    projection (``qkv_fused``) contributes its first third. Leaves ``prefix_key`` and
    ``prefix_value`` of shape ``(num_heads, r, d_h)``; ``P_k`` is Kaiming-uniform, ``P_v = 0``.
    Trainable parameters: ``2 r d`` per attention layer. Not mergeable.

    Args:
      bottleneck: r (the prefix length of the equivalent prefix tuning).
      num_heads: the number of attention heads; the query width must divide by it.
      nonlinearity: ``f``, one of :data:`ACTIVATIONS`; ReLU by default.
      profile: the architecture profile that names ``query`` and ``attn_out``; detected by default.
        The leaves live in the scope of the attention block (their lowest common ancestor).
      dtype: dtype of the adapter leaves; by default the kernel's, promoted to at least float32.
      extra_trainable: regex over base leaf paths that train fully (e.g. a task head).

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> from flax.traverse_util import unflatten_dict
      >>> d = 16  # a one-layer GPT-2-shaped tree; its Conv1D kernels are (out, in)
      >>> shapes = {"wte/embedding": (50, d), "h/0/attn/c_attn/kernel": (3 * d, d), "h/0/attn/c_proj/kernel": (d, d),
      ...           "h/0/mlp/c_fc/kernel": (4 * d, d), "h/0/mlp/c_proj/kernel": (d, 4 * d)}
      >>> params = unflatten_dict({tuple(k.split("/")): jnp.zeros(s) for k, s in shapes.items()})
      >>> method = jpeft.MultiHeadParallelAdapter(bottleneck=3, num_heads=4)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> jax.tree.map(jnp.shape, peft["h"]["0"]["attn"][jpeft.RESERVED]["default"])  # (heads, r, d_h)
      {'prefix_key': (4, 3, 4), 'prefix_value': (4, 3, 4)}
      >>> method.param_count(params) == 2 * 3 * d
      True

    References:
      He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022.
    """

    num_heads: int

    source: ClassVar[str] = "query"
    sink: ClassVar[str] = "attn_out"

    def __post_init__(self) -> None:
        super().__post_init__()
        _errors.positive_int(self._name(), "num_heads", self.num_heads)

    def _fused(self, path: Path, ctx: Context) -> bool:
        fused = self.resolve_profile(ctx.params).qkv_fused
        return fused is not None and re.fullmatch(fused, join(path)) is not None

    def _widths(self, source, s_kernel, s_in, s_out, sink, t_kernel, t_in, t_out, ctx) -> tuple[int, int]:
        d_q = self._one_axis(source, s_kernel, "output", s_out) // (3 if self._fused(source, ctx) else 1)
        d_o = self._one_axis(sink, t_kernel, "input", t_in)
        if d_q != d_o or d_q % self.num_heads:
            raise JpeftError(
                f"{self._name()}(num_heads={self.num_heads}): the query {join(source)!r} outputs {d_q} features "
                f"and the attention output {join(sink)!r} takes {d_o}; they must be equal and divisible by "
                "num_heads. Pass the model's number of attention heads."
            )
        return d_q, d_q

    def _shapes(self, path: Path, ctx: Context) -> dict[str, tuple[int, ...]]:
        stack, d, _, _ = self._roles(path, ctx)
        shape = stack + (self.num_heads, self.bottleneck, d // self.num_heads)
        return {"prefix_key": shape, "prefix_value": shape}

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        shape = self._shapes(path, ctx)["prefix_key"]
        dtype = self._param_dtype(self._roles(path, ctx)[-1])
        bound = 1.0 / math.sqrt(shape[-1])
        return {
            "prefix_key": jax.random.uniform(key, shape, dtype, -bound, bound),
            "prefix_value": jnp.zeros(shape, dtype),
        }

    def _at_source(self, m: nn.Module, nf: Any, a: tuple, kw: dict, seen: list) -> Any:
        y = nf(*a, **kw)
        fused = any(p.qkv_fused and re.fullmatch(p.qkv_fused, join(m.path)) for p in self._candidates())
        seen.append(y[..., : y.shape[-1] // 3] if fused else y)
        return y

    def _at_sink(self, m: nn.Module, nf: Any, a: tuple, kw: dict, q: jax.Array, deltas: Any) -> Any:
        if not a:
            raise JpeftError(
                f"{self._name()}: the attention output module {join(m.path)!r} was called with keyword "
                f"arguments {sorted(kw)} only; the multi-head parallel adapter rewrites its first positional "
                "argument (the merged heads). Call the module with its input positionally."
            )
        heads = a[0]
        pk, pv = deltas["prefix_key"], deltas["prefix_value"]
        dtype = jnp.promote_types(pk.dtype, heads.dtype)
        h, r, d_h = pk.shape
        qh = q.astype(dtype).reshape(q.shape[:-1] + (h, d_h))
        scores = ACTIVATIONS[self.nonlinearity](jnp.einsum("...he,hre->...hr", qh, pk.astype(dtype)))
        delta = jnp.einsum("...hr,hre->...he", scores, pv.astype(dtype)).reshape(heads.shape)
        return nf(heads + delta.astype(heads.dtype), *a[1:], **kw)
