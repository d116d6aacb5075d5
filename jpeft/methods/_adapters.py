"""Bottleneck adapters: Houlsby, Pfeiffer, parallel, scaled parallel and multi-head parallel.

Every adapter is the bottleneck ``g(u) = f(u W_down + b_down) W_up + b_up`` with ``W_up = 0`` and
``b_up = 0`` at init, so the wrapped model starts as the base model. None of them is mergeable.

The sites come from an architecture profile (``jpeft.profiles``), detected from the tree or passed
as ``profile=``:

* **sequential** adapters (Houlsby, Pfeiffer) sit on an output projection (``attn_out``,
  ``ffn_out``) and rewrite its output, ``y <- y + g(y)``; their leaves live in that module's scope.
* **parallel** adapters read a sub-layer's *input* and add to its *output*. The two are different
  modules (``ffn_in`` and ``ffn_out``, or ``query`` and ``attn_out``), so the leaves live in the
  scope of their lowest common ancestor (the FFN or attention block, or the whole layer for BERT,
  whose FFN is split over two modules). While that ancestor runs, a nested interceptor reads the
  input module's argument and adds the adapter output to the output module's result
  (``jpeft._intercept.submodule_calls``: linen's ``intercept_methods``, or on ``flax.nnx`` the
  adapted classes' ``__call__``). Nothing outlives the call, so this holds under ``jit``, ``grad``,
  ``nn.scan``/``nnx.scan`` and ``nn.remat``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _errors, profiles
from jpeft._errors import JpeftError
from jpeft._intercept import linear_of, submodule_calls
from jpeft._method import Context, Method
from jpeft._tree import RESERVED, Path, PyTree, join

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}
"""The adapter nonlinearities ``f``; ``gelu`` is the exact (erf) form, ``gelu_new`` the tanh one."""


def _module_paths(params: PyTree) -> dict[Path, Mapping[str, Any]]:
    """Every module path (proper prefix of a leaf path, outside delta subtrees) -> its node."""
    out: dict[Path, Mapping[str, Any]] = {}

    def visit(node: Mapping[str, Any], path: Path) -> None:
        if path:
            out[path] = node
        for k, v in node.items():
            if isinstance(v, Mapping) and k != RESERVED:
                visit(v, path + (str(k),))

    visit(params, ())
    return out


def _own(node: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if not isinstance(v, Mapping)}


def _broadcast(v: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a per-feature vector to broadcast against ``(..., features)`` without rank promotion."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _linear(u: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    h = jnp.tensordot(u, kernel, axes=1)
    return h + _broadcast(bias, h.ndim)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Adapter(Method):
    """Fields and helpers shared by the adapter family."""

    profile: profiles.Profile | None = None
    nonlinearity: str = "relu"
    dtype: str | None = None

    mergeable: ClassVar[bool] = False
    site_role: ClassVar[str] = "output"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        if self.profile is not None and not isinstance(self.profile, profiles.Profile):
            raise JpeftError(
                f"{name}(profile={self.profile!r}): profile must be a jpeft.profiles.Profile or None "
                f"(detect from the tree); got {type(self.profile).__name__}."
            )
        _errors.one_of(name, "nonlinearity", self.nonlinearity, tuple(ACTIVATIONS))
        object.__setattr__(self, "dtype", _errors.float_dtype(name, "dtype", self.dtype))

    # --- profile and shapes --------------------------------------------------------------------
    def resolve_profile(self, params: PyTree) -> profiles.Profile:
        """The method's profile, or the one detected from ``params``; checked against the tree."""
        profile = self.profile if self.profile is not None else profiles.detect(params)
        profiles.check(profile, params)
        return profile

    def _candidates(self) -> tuple[profiles.Profile, ...]:
        """The profiles whose site regexes the forward pass matches module paths against."""
        return (self.profile,) if self.profile is not None else profiles.ALL

    def _kernel(self, path: Path, node: Mapping[str, Any], ctx: Context, field: str) -> tuple[tuple, tuple, tuple, Any]:
        """``(stack, d_in, d_out, kernel)`` of the linear module at ``path`` (a profile ``field`` site)."""
        own = _own(node)
        if "kernel" not in own:
            raise JpeftError(
                f"{self._name()}: the profile's {field} site {join(path)!r} has no 'kernel' leaf (it holds "
                f"{sorted(node)}); {field} must name a linear module such as a Dense. Fix the profile's "
                f"{field} regex."
            )
        profile = self.resolve_profile(ctx.params)
        layout = ctx.layout(self._name(), path, own, profile.layouts)
        kernel = own[layout.leaf]
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise JpeftError(
                f"{self._name()}: {join(path + (layout.leaf,))} has dtype {kernel.dtype}, expected a float "
                "kernel. Adapters on quantised bases are not supported."
            )
        stack, d_in, d_out = layout.split(tuple(kernel.shape))
        return stack, d_in, d_out, kernel

    def _one_axis(self, path: Path, kernel: Any, what: str, dims: tuple[int, ...]) -> int:
        if len(dims) != 1:
            raise JpeftError(
                f"{self._name()}: {join(path)}/kernel has shape {tuple(kernel.shape)} with {what} axes {dims}; "
                f"adapters need a single {what} feature axis. Point the profile at another module."
            )
        return dims[0]

    def _param_dtype(self, kernel: Any) -> jnp.dtype:
        return jnp.dtype(self.dtype) if self.dtype is not None else jnp.promote_types(kernel.dtype, jnp.float32)

    def _bottleneck_leaves(
        self, key: jax.Array, stack: tuple, d_in: int, r: int, d_out: int, dtype: jnp.dtype
    ) -> dict[str, jax.Array]:
        """``W_down`` Kaiming-uniform (``+-1/sqrt(d_in)``, torch's Linear default), the rest zero."""
        bound = 1.0 / math.sqrt(d_in)
        return {
            "down_kernel": jax.random.uniform(key, stack + (d_in, r), dtype, -bound, bound),
            "down_bias": jnp.zeros(stack + (r,), dtype),
            "up_kernel": jnp.zeros(stack + (r, d_out), dtype),
            "up_bias": jnp.zeros(stack + (d_out,), dtype),
        }

    def _g(self, u: jax.Array, deltas: Any, dtype: jnp.dtype) -> jax.Array:
        """The bottleneck ``f(u W_down + b_down) W_up + b_up`` in ``dtype``."""
        c = {k: v.astype(dtype) for k, v in deltas.items()}
        h = ACTIVATIONS[self.nonlinearity](_linear(u.astype(dtype), c["down_kernel"], c["down_bias"]))
        return _linear(h, c["up_kernel"], c["up_bias"])

    def _shapes(self, path: Path, ctx: Context) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def param_count(self, params: PyTree) -> int:
        ctx = Context(params)
        return self.extra_count(params) + sum(
            math.prod(s) for path in self.select(params) for s in self._shapes(path, ctx).values()
        )


# --- sequential ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class _Sequential(_Adapter):
    """An adapter on the output of each profile site in ``fields``: ``y <- y + g(y)``."""

    reduction_factor: int = 16

    fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        _errors.positive_int(self._name(), "reduction_factor", self.reduction_factor)

    def select(self, params: PyTree) -> list[Path]:
        profile = self.resolve_profile(params)
        paths = _module_paths(params)
        return sorted({p for p in paths for f in self.fields if re.fullmatch(getattr(profile, f), join(p))})

    def _dims(self, path: Path, ctx: Context) -> tuple[tuple, int, int, Any]:
        node = _module_paths(ctx.params)[path]
        field = next(f for f in self.fields if re.fullmatch(getattr(self.resolve_profile(ctx.params), f), join(path)))
        stack, _, d_out, kernel = self._kernel(path, node, ctx, field)
        d = self._one_axis(path, kernel, "output", d_out)
        r = d // self.reduction_factor
        if r < 1:
            raise JpeftError(
                f"{self._name()}(reduction_factor={self.reduction_factor}): {join(path)} outputs {d} features, "
                f"so the bottleneck d // reduction_factor is 0. Use reduction_factor <= {d}."
            )
        return stack, d, r, kernel

    def _shapes(self, path: Path, ctx: Context) -> dict[str, tuple[int, ...]]:
        stack, d, r, _ = self._dims(path, ctx)
        return {
            "down_kernel": stack + (d, r),
            "down_bias": stack + (r,),
            "up_kernel": stack + (r, d),
            "up_bias": stack + (d,),
        }

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        stack, d, r, kernel = self._dims(path, ctx)
        return self._bottleneck_leaves(key, stack, d, r, d, self._param_dtype(kernel))

    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        y = next_fun(*args, **kwargs)
        dtype = jnp.promote_types(deltas["up_kernel"].dtype, y.dtype)
        return y + self._g(y, deltas, dtype).astype(y.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HoulsbyAdapter(_Sequential):
    """Houlsby's two sequential adapters per layer, after the attention and FFN output projections.

    Each site's output ``h`` (the projection's output, before dropout, the residual add and the
    LayerNorm) becomes ``h + f(h W_down + b_down) W_up + b_up`` with ``W_down: (d, r)``,
    ``W_up: (r, d)`` and ``r = d // reduction_factor``. ``W_down`` is Kaiming-uniform, the rest
    zero, so the model is unchanged at init. Trainable parameters: ``L (4 d r + 2 r + 2 d)``. The
    paper also trains the LayerNorms: pass ``extra_trainable`` (e.g. ``r".*layer/\\d+/.*LayerNorm/.*"``
    for BERT, which adds ``4 d L``). Not mergeable.

    Args:
      reduction_factor: ``d / r``; adapter-hub's default 16.
      nonlinearity: ``f``, one of :data:`ACTIVATIONS`; adapter-hub's ``double_seq_bn`` uses swish.
      profile: the architecture profile that names the ``attn_out`` and ``ffn_out`` sites; by
        default the one ``jpeft.profiles.detect`` finds. Its ``layouts`` apply too.
      dtype: dtype of the adapter leaves; by default the kernel's, promoted to at least float32.
      extra_trainable: regex over base leaf paths that train fully (LayerNorms, a task head).

    Raises:
      JpeftError: on bad fields, a tree no profile matches, a profile site that matches nothing,
        or a site too narrow for ``reduction_factor``.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> from flax.traverse_util import unflatten_dict
      >>> d = 16  # a one-layer GPT-2-shaped tree; its Conv1D kernels are (out, in)
      >>> shapes = {"wte/embedding": (50, d), "h/0/attn/c_attn/kernel": (3 * d, d), "h/0/attn/c_proj/kernel": (d, d),
      ...           "h/0/mlp/c_fc/kernel": (4 * d, d), "h/0/mlp/c_proj/kernel": (d, 4 * d)}
      >>> params = unflatten_dict({tuple(k.split("/")): jnp.zeros(s) for k, s in shapes.items()})
      >>> method = jpeft.HoulsbyAdapter(reduction_factor=4)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> jax.tree.map(jnp.shape, peft["h"]["0"]["attn"]["c_proj"][jpeft.RESERVED]["default"])
      {'down_bias': (4,), 'down_kernel': (16, 4), 'up_bias': (16,), 'up_kernel': (4, 16)}
      >>> method.param_count(params) == 4 * d * 4 + 2 * 4 + 2 * d
      True

    References:
      Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019.
    """

    nonlinearity: str = "swish"

    fields: ClassVar[tuple[str, ...]] = ("attn_out", "ffn_out")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PfeifferAdapter(_Sequential):
    """Pfeiffer's one sequential adapter per layer, on the FFN output.

    ``h_ffn <- h_ffn + f(h_ffn W_down + b_down) W_up + b_up`` on the FFN output projection's output,
    before dropout, the residual add and the LayerNorm; ``r = d // reduction_factor``. Trainable
    parameters: ``L (2 d r + r + d)``. Not mergeable.

    Placement: adapter-hub's ``seq_bn`` (``original_ln_before``, ``residual_before_ln``) reads
    ``u = LN2(a + h_ffn)`` and returns ``LN2(a + h_ffn + g(u))``, reusing the frozen LayerNorm.
    Reaching ``a`` and ``LN2`` needs family-specific code; jpeft instead places the adapter where
    Houlsby's second adapter sits (the unified view's sequential FFN adapter), which differs only
    in the adapter's input: ``h_ffn`` rather than ``LN2(a + h_ffn)``.

    Args:
      reduction_factor: ``d / r``; 16 by default.
      nonlinearity: ``f``, one of :data:`ACTIVATIONS`; ReLU by default.
      profile: the architecture profile that names the ``ffn_out`` site; detected by default.
      dtype: dtype of the adapter leaves; by default the kernel's, promoted to at least float32.
      extra_trainable: regex over base leaf paths that train fully (e.g. a task head).

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> from flax.traverse_util import unflatten_dict
      >>> d = 16  # a one-layer GPT-2-shaped tree; its Conv1D kernels are (out, in)
      >>> shapes = {"wte/embedding": (50, d), "h/0/attn/c_attn/kernel": (3 * d, d), "h/0/attn/c_proj/kernel": (d, d),
      ...           "h/0/mlp/c_fc/kernel": (4 * d, d), "h/0/mlp/c_proj/kernel": (d, 4 * d)}
      >>> params = unflatten_dict({tuple(k.split("/")): jnp.zeros(s) for k, s in shapes.items()})
      >>> method = jpeft.PfeifferAdapter(reduction_factor=4)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> sorted(peft["h"]["0"]["mlp"]["c_proj"][jpeft.RESERVED]["default"])
      ['down_bias', 'down_kernel', 'up_bias', 'up_kernel']
      >>> method.param_count(params) == 2 * d * 4 + 4 + d
      True

    References:
      Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
      EACL 2021.
    """

    fields: ClassVar[tuple[str, ...]] = ("ffn_out",)


# --- parallel ------------------------------------------------------------------------------------
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
