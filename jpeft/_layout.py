"""Kernel layouts: how a linear module's kernel splits into stack, input and output axes.

A layout is known in two places:

* at ``jpeft.apply`` / ``jpeft.merge`` time, from the parameter tree alone, where it is resolved
  from a method's ``layouts`` overrides, then the detected architecture profile, then defaults
  (``'embedding'`` leaves are embeddings, ``'kernel'`` leaves are dense ``(in, out)``);
* at forward time, from the intercepted module's type (see ``jpeft._intercept``). The interceptor
  checks the two agree and names the fix when they do not.

Leading axes beyond the layout's own are *stack* axes: the layer axis of ``nn.scan`` or
``nn.vmap``. Delta leaves carry them too, so the lifted transforms slice them with the kernel.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jpeft._errors import JpeftError
from jpeft._tree import Path, join

SPELLING = r"(dense|transposed|embed)|conv(?::(\d+))?|dense_general:(\d+),(\d+)"
"""The layout spellings :func:`parse` accepts."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a kernel's input and output axes are.

    ``dense``: kernel ``(*S, d_in, d_out)``, Flax's ``nn.Dense``.
    ``transposed``: kernel ``(*S, d_out, d_in)``, HF GPT-2's ``Conv1D``.
    ``embed``: table ``(*S, vocab, d)``; the input is token ids.
    ``conv``: kernel ``(*S, *window, c_in, c_out)`` with ``n_spatial`` window axes.
    ``dense_general``: kernel ``(*S, *in, *out)`` with ``n_in`` and ``n_out`` axes.

    Low-rank factors are ``a: (*S, *in, r)`` and ``b: (*S, r, *out)``; for ``conv``, ``in`` is
    ``(*window, c_in)``, so ``a`` is a convolution and ``b`` a 1x1 convolution.

    ``in_axes`` (``dense_general`` only): the kernel's core axes (0-based, after the stack axes) that
    hold the input features, when they do not lead; the other axes are the output axes, in the
    kernel's order. tunix Gemma 3's ``q_einsum`` ``w: (N, D, H)`` is ``in_axes=(1,)``: ``a: (D, r)``,
    ``b: (r, N, H)``. ``None``: the first ``n_in`` axes.

    Example:
      >>> import jpeft
      >>> jpeft.Layout("dense").factor_shapes((12, 64, 32), rank=4)  # an nn.scan stack of 12 (64, 32) kernels
      ((12, 64, 4), (12, 4, 32))
      >>> jpeft.Layout("transposed").split((96, 32))  # GPT-2's Conv1D: (out, in)
      ((), (32,), (96,))
    """

    kind: str
    n_in: int = 1
    n_out: int = 1
    in_axes: tuple[int, ...] | None = None

    @property
    def leaf(self) -> str:
        """The name of the kernel leaf."""
        return "embedding" if self.kind == "embed" else "kernel"

    @property
    def core_ndim(self) -> int:
        return self.n_in + self.n_out

    def split(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Splits a kernel shape into ``(stack, in, out)`` shapes."""
        n_stack = len(shape) - self.core_ndim
        stack, core = shape[:n_stack], shape[n_stack:]
        if self.kind == "transposed":
            return stack, core[1:], core[:1]
        if self.in_axes is not None:
            ins = self.in_axes
            return stack, tuple(core[i] for i in ins), tuple(n for i, n in enumerate(core) if i not in ins)
        return stack, core[: self.n_in], core[self.n_in :]

    def _moved(self) -> tuple[list[int], list[int]]:
        """``in_axes`` as negative kernel axes, and where they go in the ``(*in, *out)`` order."""
        return [i - self.core_ndim for i in self.in_axes], list(range(-self.core_ndim, -self.n_out))

    def factor_shapes(self, shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Returns the shapes of ``a`` and ``b`` for a kernel of ``shape``."""
        stack, d_in, d_out = self.split(shape)
        return stack + d_in + (rank,), stack + (rank,) + d_out

    def as_down(self, kernel: jax.Array) -> jax.Array:
        """The kernel as a down factor ``(*in, *out)``, so that ``down(x, W) == x W``."""
        if self.in_axes is not None:
            return jnp.moveaxis(kernel, *self._moved())
        return jnp.swapaxes(kernel, -1, -2) if self.kind == "transposed" else kernel

    def reduce_axes(self) -> tuple[int, ...]:
        """Negative kernel axes that hold input features (DoRA's column norm sums over them)."""
        if self.kind == "transposed":
            return (-1,)
        if self.in_axes is not None:
            return tuple(self._moved()[0])
        return tuple(range(-self.core_ndim, -self.n_out))

    def full_delta(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """Returns ``a @ b`` laid out like the kernel, stack axes included."""
        rank = a.shape[-1]
        d_out = b.shape[b.ndim - self.n_out :]
        stack = b.shape[: b.ndim - self.n_out - 1]
        d_in = a.shape[len(stack) : -1]
        a2 = a.reshape(stack + (math.prod(d_in), rank))
        b2 = b.reshape(stack + (rank, math.prod(d_out)))
        w = jnp.matmul(a2, b2).reshape(stack + d_in + d_out)
        if self.in_axes is not None:
            return jnp.moveaxis(w, *self._moved()[::-1])
        return jnp.swapaxes(w, -1, -2) if self.kind == "transposed" else w

    def spec(self) -> str:
        """The string spelling of this layout, as accepted by :func:`parse`."""
        if self.kind == "conv":
            return f"conv:{self.n_in - 1}"
        if self.kind == "dense_general":
            return f"dense_general:{self.n_in},{self.n_out}"
        return self.kind


def overrides(owner: str, layouts: Any) -> tuple[tuple[str, str], ...]:
    """Validates a method's ``layouts`` field: ``(regex, spelling)`` pairs, returned as a tuple."""
    from jpeft import _errors

    try:
        pairs = tuple((str(p), str(s)) for p, s in layouts)
    except (TypeError, ValueError):
        raise JpeftError(
            f"{owner}(layouts={layouts!r}): layouts must be a sequence of (regex, layout) pairs, "
            "e.g. ((r'.*/conv', 'conv'),)."
        ) from None
    for pattern, spec in pairs:
        _errors.regex(owner, "layouts", pattern)
        if re.fullmatch(SPELLING, spec) is None:
            raise JpeftError(
                f"{owner}(layouts=...): unknown layout {spec!r} for {pattern!r}. Use 'dense', "
                "'transposed', 'embed', 'conv', 'conv:N' or 'dense_general:I,O'."
            )
    return pairs


def parse(spec: str | Layout, shape: tuple[int, ...] | None = None) -> Layout:
    """Parses a layout spelling.

    ``'dense'``, ``'transposed'``, ``'embed'``, ``'conv'`` (all leading axes but the last two are
    the window; no stack axis), ``'conv:N'`` (N window axes; the rest lead as stack axes) and
    ``'dense_general:I,O'``.
    """
    if isinstance(spec, Layout):
        return spec
    m = re.fullmatch(SPELLING, str(spec))
    if m is None:
        raise JpeftError(
            f"Unknown layout {spec!r}. Expected one of 'dense', 'transposed', 'embed', 'conv', "
            "'conv:N' (N window axes) or 'dense_general:I,O' (I input and O output axes)."
        )
    if m.group(1):
        return Layout(m.group(1))
    if spec.startswith("conv"):
        if m.group(2) is not None:
            return Layout("conv", n_in=int(m.group(2)) + 1)
        if shape is None or len(shape) < 3:
            raise JpeftError(
                f"Layout 'conv' needs a kernel of rank >= 3 (*window, c_in, c_out); got shape {shape}. "
                "Fix the layouts entry for this module, or drop it from targets."
            )
        return Layout("conv", n_in=len(shape) - 1)
    return Layout("dense_general", n_in=int(m.group(3)), n_out=int(m.group(4)))


def resolve(
    owner: str,
    path: Path,
    module_params: Mapping[str, Any],
    overrides: tuple[tuple[str, str], ...],
) -> Layout:
    """Resolves the layout of the module at ``path`` from overrides, then defaults."""
    for pattern, spec in overrides:
        if re.fullmatch(pattern, join(path)):
            leaf = "embedding" if spec == "embed" else "kernel"
            if leaf not in module_params:
                raise JpeftError(
                    f"{owner}: layout {spec!r} for {join(path)!r} needs a {leaf!r} leaf; the module "
                    f"has {sorted(module_params)}. Fix the layouts entry {pattern!r}."
                )
            layout = parse(spec, tuple(module_params[leaf].shape))
            break
    else:
        if "embedding" in module_params:
            layout = Layout("embed")
        elif "kernel" in module_params:
            layout = Layout("dense")
        else:
            raise JpeftError(
                f"{owner}: target {join(path)!r} has leaves {sorted(module_params)} but no 'kernel' "
                "or 'embedding'; it is not a linear module. Narrow the targets pattern so it selects "
                "only linear modules (see jpeft.list_paths(params))."
            )
    shape = tuple(module_params[layout.leaf].shape)
    if len(shape) < layout.core_ndim:
        raise JpeftError(
            f"{owner}: {join(path + (layout.leaf,))} has shape {shape}, but layout "
            f"{layout.spec()!r} needs at least {layout.core_ndim} axes. Pass "
            "layouts=((pattern, spec),) with the right spelling."
        )
    return layout
