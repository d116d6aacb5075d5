"""LoRA-drop's importance pass on ``flax.nnx`` models (see :func:`jpeft.lora_drop_importance`).

A copy of the model runs the measured adapter alone, its method replaced by a stand-in whose
``forward`` is the measuring one. No collection leaves an ``nnx.scan`` body (sown values inside a
scanned layer are dropped unless the model's own scan routes them), so each value reaches the
host through an ordered ``jax.debug.callback``; a stacked target's calls of one model call come
layer by layer and fold into ``(L,)``, as ``nn.scan`` stacks linen's sown values.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jpeft._errors import JpeftError
from jpeft._tree import RESERVED, Path, join

Calls = dict[tuple[Path, int], list[float]]


def _append(calls: Calls, path: Path, ndim: int, value: Any) -> None:
    calls.setdefault((path, ndim), []).append(float(value))


def record(calls: Calls, path: Path, ndim: int, value: jax.Array) -> None:
    """Hands ``value`` (traced) to the host, keyed by the target and the rank of the A it saw."""
    jax.debug.callback(functools.partial(_append, calls, path, ndim), value, ordered=True)


def without(model: Any, name: str) -> Any:
    """A copy of an NNX model without adapter ``name`` (its modules of the original class where no other)."""
    from jpeft import _nnx, _nnx_apply

    new = _nnx_apply.copy(model)
    for module in _nnx.modules(new).values():
        if name in vars(module).get(RESERVED, {}):
            _nnx_apply.remove(module, name)
    return new


class _Measuring:
    """Stands in for the measured adapter's method on an NNX copy: ``forward`` records its output."""

    reenters = False

    def __init__(self, forward: Any):
        self.forward = forward

    def base_forward(self, module: Any, next_fun: Any, args: tuple, kwargs: dict) -> Any:
        return next_fun(*args, **kwargs)


def sums(
    model: Any, forward: Any, apply_fn: Any, batches: Iterable[Any], name: str, calls: Calls
) -> dict[str, np.ndarray]:
    """``lora_drop_importance`` on an NNX model: each target's summed ``||s x A B||^2``, per layer of a stack.

    A copy of the model runs adapter ``name`` alone through the measuring ``forward``, which hands
    each value to the host in call order; a stacked target (``nnx.vmap`` layers run by
    ``nnx.scan``) sees its deltas without the layer axis, and its calls of one model call come
    layer by layer, so they fold into ``(L,)``.
    """
    from jpeft import _nnx, _nnx_apply

    measuring = _nnx_apply.copy(model)
    stored: dict[Path, tuple[int, ...]] = {}  # each measured target's stored (stacked) A shape
    for path, module in _nnx.modules(measuring).items():
        store = vars(module).get(RESERVED)
        if store is None:
            continue
        module._jpeft_active = (name,)
        if name in store and "lora_a" in store[name]:
            stored[path] = tuple(store[name]["lora_a"].shape)
            module._jpeft_methods = tuple(
                (n, _Measuring(forward) if n == name else m) for n, m in module._jpeft_methods
            )
    out: dict[str, np.ndarray] = {}
    for batch in batches:
        calls.clear()
        if isinstance(batch, Mapping):
            args, kwargs = (), dict(batch)
        else:
            args, kwargs = (batch if isinstance(batch, tuple) else (batch,)), {}
        jax.block_until_ready(measuring(*args, **kwargs) if apply_fn is None else apply_fn(measuring, *args, **kwargs))
        jax.effects_barrier()
        for (path, ndim), values in calls.items():
            value = np.asarray(values, np.float64)
            stack = len(stored[path]) - ndim
            if stack > 1 or (stack and value.size % stored[path][0]):
                raise JpeftError(
                    f"jpeft.lora_drop_importance: target {join(path)!r} (A {stored[path]}) ran {value.size} times "
                    f"with A of rank {ndim}; expected an unstacked layer, or one forward nnx.scan over its "
                    f"{stored[path][0]} layers per call. Nested or partial stacks are not supported."
                )
            value = value.reshape(stored[path][0], -1).sum(axis=1) if stack else value.sum()
            out[join(path)] = out[join(path)] + value if join(path) in out else value
    return out
