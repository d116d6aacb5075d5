"""Bottleneck adapters: the shared adapter base and the sequential Houlsby and Pfeiffer adapters.

Every adapter is the bottleneck ``g(u) = f(u W_down + b_down) W_up + b_up`` with ``W_up = 0`` and
``b_up = 0`` at init, so the wrapped model starts as the base model. None of them is mergeable.

The sites come from an architecture profile (``jpeft.profiles``), detected from the tree or passed
as ``profile=``. **Sequential** adapters (Houlsby, Pfeiffer) sit on an output projection
(``attn_out``, ``ffn_out``) and rewrite its output, ``y <- y + g(y)``; their leaves live in that
module's scope. The parallel family (parallel, scaled parallel and multi-head parallel) builds on
:class:`_Adapter` in ``jpeft.methods._parallel``.
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
