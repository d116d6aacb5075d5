"""(IA)^3: learned vectors that rescale activations, initialised to ones."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _errors, _layout, _tree
from jpeft._errors import JpeftError
from jpeft._intercept import _axes, linear_of
from jpeft._layout import Layout
from jpeft._method import Context, Method
from jpeft._tree import Path, PyTree, join

OUT, IN = "ia3_out", "ia3_in"
"""The delta leaves: a vector over a module's output features, or over its input features."""


def _feature_axes(layout: Layout, side: str) -> tuple[int, ...]:
    """The kernel's core axes (0-based, after the stack axes) that ``side``'s vector runs along."""
    if layout.kind == "transposed":
        return (0,) if side == OUT else (1,)
    if layout.in_axes is not None:
        return tuple(a for a in range(layout.core_ndim) if (a in layout.in_axes) == (side == IN))
    if side == OUT:
        return tuple(range(layout.n_in, layout.core_ndim))
    if layout.kind == "conv":  # the channels, not the window
        return (layout.n_in - 1,)
    return tuple(range(layout.n_in))


def _vector_shape(layout: Layout, shape: tuple[int, ...], side: str) -> tuple[int, ...]:
    n_stack = len(shape) - layout.core_ndim
    return shape[:n_stack] + tuple(shape[n_stack + a] for a in _feature_axes(layout, side))


def _expand(v: jax.Array, layout: Layout, kernel_ndim: int, side: str) -> jax.Array:
    """Reshapes a vector ``(*S, *features)`` to broadcast against the kernel ``(*S, *core)``."""
    n_stack = kernel_ndim - layout.core_ndim
    axes = _feature_axes(layout, side)
    it = iter(v.shape[n_stack:])
    return v.reshape(v.shape[:n_stack] + tuple(next(it) if a in axes else 1 for a in range(layout.core_ndim)))


def _scale_input(module: nn.Module, layout: Layout, x: jax.Array, v: jax.Array) -> jax.Array:
    """``x`` with its feature axes (those the kernel contracts) multiplied by ``v``."""
    if layout.kind == "dense_general":
        axes = tuple(a % x.ndim for a in _axes(module.axis))
    else:
        axes = (x.ndim - 1,)
    shape = [1] * x.ndim
    for a, n in zip(axes, v.shape, strict=True):
        shape[a] = n
    dtype = jnp.promote_types(x.dtype, v.dtype)
    return (x.astype(dtype) * v.astype(dtype).reshape(shape)).astype(x.dtype)


def _replace_input(args: tuple, kwargs: dict, x: Any) -> tuple[tuple, dict]:
    if args:
        return (x,) + tuple(args[1:]), kwargs
    name = "inputs" if "inputs" in kwargs else "x"
    return args, {**kwargs, name: x}


def _cross_attention(found: tuple[Any, ...], params: PyTree) -> set[Path]:
    """The key and value projections inside a profile's cross-attention blocks (BART's
    ``encoder_attn/k_proj``): modules under a ``cross_attention`` match named like a key or value site."""
    out: set[Path] = set()
    modules = list(_tree.modules(params))
    for p in found:
        if p.cross_attention is None:
            continue
        names = {m[-1] for m in modules if m and re.fullmatch(f"(?:{p.key})|(?:{p.value})", join(m))}
        for m in modules:
            if m and m[-1] in names and any(re.fullmatch(p.cross_attention, join(m[:i])) for i in range(1, len(m))):
                out.add(m)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3(Method):
    """(IA)^3: rescales the key and value outputs and the FFN hidden state by learned vectors.

    A target not in ``feedforward`` gets ``l: (*out)`` on its output, ``y = l * f(x)`` (the bias
    is scaled too, as in HF PEFT); a ``feedforward`` target gets ``l_ff: (*in)`` on its input,
    ``y = f(l_ff * x)``, so on the FFN down-projection ``W_2`` it scales ``act(x W_1)``. All
    vectors start at ones (identity at init). Trainable: ``d_out`` per output target and ``d_in``
    per feedforward target, per layer; for BERT ``L (2 d + d_ff)``. Mergeable: output scaling
    multiplies the kernel's output columns and the bias, input scaling the kernel's input rows.
    For a convolution, the input vector runs over channels. Embeddings take output scaling only.

    With ``targets=None`` the targets are the detected profile's ``key``, ``value`` and ``ffn_out``
    modules, plus the key and value projections of its ``cross_attention`` blocks (the paper's
    ``L (4 d + d_ff)`` for a decoder; HF PEFT's ``k_proj``/``v_proj`` on BART do the same); with ``feedforward=None`` the feedforward modules are the profile's ``ffn_out`` among
    the targets (none when no profile is detected). This is HF PEFT's ``target_modules`` /
    ``feedforward_modules`` split. On GPT-2, whose ``c_attn`` fuses q, k and v, ``c_attn`` gets
    one vector over its whole ``3 d`` output, exactly as HF PEFT does. The paper scales k and v
    only, but a per-feature scale of q is redundant with that of k in ``q k^T`` (only their
    product matters), so both span the same functions; the cost is ``d`` extra parameters a layer.

    Args:
      targets: a regex over '/'-joined module paths, or module-name suffixes; ``None`` for the
        profile's key, value and FFN output projections.
      feedforward: the subset of targets scaled on their input, in the same forms; ``None`` for
        the profile's FFN output projections among the targets.
      layouts: ``(regex, layout)`` pairs for kernels not in Flax's (in, out) layout; see
        ``jpeft.Layout``. Profiles of known families add theirs.
      dtype: dtype of the vectors; by default the kernel's, promoted to at least float32.
      extra_trainable: regex over base leaf paths that train fully (e.g. a classifier head).

    Raises:
      JpeftError: on bad fields, no profile with ``targets=None``, a pattern that matches nothing,
        a feedforward module outside the targets, or an embedding in ``feedforward``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> class FFN(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     return nn.Dense(4, name="w2")(nn.relu(nn.Dense(8, name="w1")(x)))
      >>> x = jnp.ones((2, 4))
      >>> params = FFN().init(jax.random.key(0), x)["params"]
      >>> method = jpeft.IA3(targets=("w1", "w2"), feedforward=("w2",))
      >>> peft = jpeft.apply(method, params, key=jax.random.key(1))
      >>> jax.tree.map(jnp.shape, {k: v["__jpeft__"] for k, v in peft.items()})
      {'w1': {'default': {'ia3_out': (8,)}}, 'w2': {'default': {'ia3_in': (8,)}}}
      >>> bool(jnp.allclose(jpeft.wrap(FFN().apply, method)({"params": peft}, x), FFN().apply({"params": params}, x)))
      True

    References:
      Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
      Learning", NeurIPS 2022.
    """

    targets: str | tuple[str, ...] | None = None
    feedforward: str | tuple[str, ...] | None = None
    layouts: tuple[tuple[str, str], ...] = ()
    dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        for field in ("targets", "feedforward"):
            if getattr(self, field) is not None:
                object.__setattr__(self, field, _tree.normalize_targets(name, getattr(self, field)))
        object.__setattr__(self, "layouts", _layout.overrides(name, self.layouts))
        object.__setattr__(self, "dtype", _errors.float_dtype(name, "dtype", self.dtype))

    # --- structure -----------------------------------------------------------------------------
    def _sites(self, params: PyTree) -> dict[Path, str]:
        """Maps each target module to ``OUT`` or ``IN``."""
        from jpeft import profiles

        found = profiles.matching(params)
        targets = self.targets
        if targets is None:
            if not found:
                raise JpeftError(
                    f"{self._name()}(targets=None): no architecture profile matches this tree, so the key, "
                    "value and FFN output projections are unknown. Pass targets=('key', 'value', 'wo') and "
                    "feedforward=('wo',) with your model's module names."
                )
            targets = "|".join(f"(?:{getattr(p, s)})" for p in found for s in ("key", "value", "ffn_out"))
        hit = _tree.select(self._name(), targets, params)
        if self.targets is None:
            hit = sorted(set(hit) | _cross_attention(found, params))
        if self.feedforward is None:
            ffn = "|".join(f"(?:{p.ffn_out})" for p in found)
            ff = {p for p in hit if ffn and re.fullmatch(ffn, join(p))}
        else:
            ff = set(_tree.select(f"{self._name()}(feedforward)", self.feedforward, params))
            outside = sorted(join(p) for p in ff - set(hit))
            if outside:
                raise JpeftError(
                    f"{self._name()}(feedforward={self.feedforward!r}) selects {outside[:3]}, which targets="
                    f"{self.targets!r} does not: feedforward modules must be a subset of the targets."
                )
        return {p: IN if p in ff else OUT for p in hit}

    def select(self, params: PyTree) -> list[Path]:
        return sorted(self._sites(params))

    def _shape(self, path: Path, own: Mapping[str, Any], ctx: Context, side: str) -> tuple[Layout, tuple[int, ...]]:
        layout = ctx.layout(self._name(), path, own, self.layouts)
        if side == IN and layout.kind == "embed":
            raise JpeftError(
                f"{self._name()}: {join(path)!r} is an embedding, whose input is token ids, and it is in "
                "feedforward; input scaling needs features. Drop it from feedforward (its output can be scaled)."
            )
        return layout, _vector_shape(layout, tuple(own[layout.leaf].shape), side)

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        side = self._sites(ctx.params)[path]
        layout, shape = self._shape(path, own, ctx, side)
        kernel = own[layout.leaf]
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise JpeftError(
                f"{self._name()}: {join(path + (layout.leaf,))} has dtype {kernel.dtype}, expected a float kernel. "
                "Exclude this module from targets."
            )
        dtype = jnp.dtype(self.dtype) if self.dtype else jnp.promote_types(kernel.dtype, jnp.float32)
        return {side: jnp.ones(shape, dtype)}

    def param_count(self, params: PyTree) -> int:
        ctx = Context(params)
        modules = _tree.modules(params)
        total = self.extra_count(params)
        for path, side in self._sites(params).items():
            total += math.prod(self._shape(path, modules[path], ctx, side)[1])
        return total

    # --- forward -------------------------------------------------------------------------------
    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        linear = linear_of(module)
        layout = linear.layout_of(module)
        kernel = module.get_variable("params", layout.leaf)
        side = OUT if OUT in deltas else IN
        v = deltas[side]
        want = _vector_shape(layout, tuple(kernel.shape), side)
        if tuple(v.shape) != want:
            raise JpeftError(
                f"{self._name()}: at {join(module.path)!r} ({type(module).__name__}, {layout.leaf} "
                f"{tuple(kernel.shape)}, layout {layout.spec()!r}) {side} has shape {tuple(v.shape)}, expected "
                f"{want}. The vectors were made for another layout: pass layouts=((r'{join(module.path)}', "
                f"'{layout.spec()}'),) and call jpeft.apply again."
            )
        if side == IN:
            args, kwargs = _replace_input(args, kwargs, _scale_input(module, layout, linear.inputs(args, kwargs), v))
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        dtype = jnp.promote_types(y.dtype, v.dtype)
        scale = linear.to_output(module, v.astype(dtype).reshape((1,) * (y.ndim - v.ndim) + v.shape))
        return (y.astype(dtype) * scale).astype(y.dtype)

    # --- merge ---------------------------------------------------------------------------------
    def merge_module(self, path: Path, own: Mapping[str, Any], deltas: Any, ctx: Context) -> dict[str, Any]:
        layout = ctx.layout(self._name(), path, own, self.layouts)
        kernel = own[layout.leaf]
        side = OUT if OUT in deltas else IN
        v = deltas[side]
        dtype = jnp.promote_types(kernel.dtype, v.dtype)
        out = {layout.leaf: (kernel.astype(dtype) * _expand(v.astype(dtype), layout, kernel.ndim, side)).astype(kernel.dtype)}
        if side == OUT and "bias" in own:
            bias = own["bias"]
            out["bias"] = (bias.astype(dtype) * v.astype(dtype)).astype(bias.dtype)
        return out
