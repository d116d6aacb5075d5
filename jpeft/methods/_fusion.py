"""AdapterFusion: attention over several trained, frozen adapters (stage 2 of Pfeiffer et al., 2021)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _errors, _tree
from jpeft._errors import JpeftError
from jpeft._method import Context, Method
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.methods._adapters import _Sequential


def _bias(b: jax.Array, ndim: int) -> jax.Array:
    return b.reshape((1,) * (ndim - b.ndim) + b.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterFusion(Method):
    r"""Fuses named, trained sequential adapters with learned attention at every adapter site.

    At a site whose projection outputs ``y: (..., d)``, each frozen adapter ``i`` gives
    ``o_i = g_i(y)`` (its bottleneck, without the residual). The fusion layer attends over them with
    the query taken from ``y`` (the FFN output for Pfeiffer adapters):

    ``q = y W_q + b_q``, ``k_i = o_i W_k + b_k``, ``v_i = o_i W_v`` (no value bias, as in the paper
    and AdapterHub's ``BertFusion``), ``a = softmax_i(q . k_i / T)``, and the output is
    ``y + sum_i a_i v_i``.

    ``W_q`` and ``W_k`` start as N(0, 0.02^2), ``W_v`` as the identity and the biases at zero, so
    with one adapter (or uniform attention and identical adapters) the fused model equals the
    adapter's. Only the fusion weights train: ``jpeft.labels`` marks the named adapters frozen (on a
    ``flax.nnx`` model, pass ``wrt=jpeft.trainable(fusion, model)``: ``jpeft.Delta`` also selects
    the fused adapters' leaves).
    Trainable parameters per site: ``3 d^2 + 2 d``. Not mergeable.

    Args:
      adapters: the names of the trained adapters on the tree (``jpeft.apply(..., name=...)``).
      adapter: the sequential adapter method they were trained with (``PfeifferAdapter(...)`` or
        ``HoulsbyAdapter(...)``); every site of it gets a fusion layer.
      temperature: the softmax temperature ``T``.
      dtype: dtype of the fusion weights; by default the adapters', promoted to at least float32.

    Example:
      >>> import jpeft
      >>> fusion = jpeft.AdapterFusion(adapters=("sst", "mnli"), adapter=jpeft.PfeifferAdapter())
      >>> fusion.delta_label_at(("x", "__jpeft__", "sst", "up_kernel")), fusion.delta_label_at(("x", "__jpeft__", "f", "query"))
      ('frozen', 'trainable')

    References:
      Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", 2021.
    """

    adapters: tuple[str, ...]
    adapter: _Sequential
    temperature: float = 1.0
    dtype: str | None = None

    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    site_role: ClassVar[str] = "output"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        names = tuple(self.adapters) if isinstance(self.adapters, (tuple, list)) else None
        if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise JpeftError(
                f"{name}(adapters={self.adapters!r}): adapters must be a non-empty sequence of distinct adapter "
                "names, e.g. ('sst', 'mnli')."
            )
        object.__setattr__(self, "adapters", names)
        if not isinstance(self.adapter, _Sequential):
            raise JpeftError(
                f"{name}(adapter={self.adapter!r}): adapter must be the sequential adapter method the adapters "
                "were trained with, jpeft.PfeifferAdapter(...) or jpeft.HoulsbyAdapter(...)."
            )
        _errors.positive_number(name, "temperature", self.temperature)
        object.__setattr__(self, "dtype", _errors.float_dtype(name, "dtype", self.dtype))

    # --- structure -----------------------------------------------------------------------------
    def select(self, params: PyTree) -> list[Path]:
        sites = self.adapter.select(params)
        for path in sites:
            node = _tree.get(params, path)
            held = set(node.get(RESERVED, {})) if isinstance(node, Mapping) else set()
            missing = [n for n in self.adapters if n not in held]
            if missing:
                raise JpeftError(
                    f"{self._name()}: adapter site {join(path)!r} holds no deltas of adapter(s) {missing} (it holds "
                    f"{sorted(held) or 'none'}). Train them first with jpeft.apply({type(self.adapter).__name__}"
                    "(...), params, key=..., name=...)."
                )
        return sites

    def _width(self, path: Path, params: PyTree) -> tuple[tuple[int, ...], int, Any]:
        first = _tree.get(params, path)[RESERVED][self.adapters[0]]
        up_bias = first["up_bias"]
        return tuple(up_bias.shape[:-1]), int(up_bias.shape[-1]), up_bias.dtype

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        stack, d, dtype = self._width(path, ctx.params)
        dtype = jnp.dtype(self.dtype) if self.dtype is not None else jnp.promote_types(dtype, jnp.float32)
        kq, kk = jax.random.split(key)
        eye = jnp.broadcast_to(jnp.eye(d, dtype=dtype), stack + (d, d))
        zeros = jnp.zeros(stack + (d,), dtype)
        return {
            "query": 0.02 * jax.random.normal(kq, stack + (d, d), dtype),
            "query_bias": zeros,
            "key": 0.02 * jax.random.normal(kk, stack + (d, d), dtype),
            "key_bias": zeros,
            "value": jnp.array(eye),
        }

    def param_count(self, params: PyTree) -> int:
        total = self.extra_count(params)
        for path in self.select(params):
            stack, d, _ = self._width(path, params)
            total += math.prod(stack) * (3 * d * d + 2 * d)
        return total

    # --- forward -------------------------------------------------------------------------------
    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        y = next_fun(*args, **kwargs)
        store = module.get_variable("params", RESERVED)
        dtype = jnp.promote_types(deltas["value"].dtype, y.dtype)
        w = {k: v.astype(dtype) for k, v in deltas.items()}
        outs = jnp.stack([self.adapter._g(y, store[n], dtype) for n in self.adapters], axis=-2)  # (..., n, d)
        q = y.astype(dtype) @ w["query"] + _bias(w["query_bias"], y.ndim)
        k = outs @ w["key"] + _bias(w["key_bias"], outs.ndim)
        v = outs @ w["value"]
        scores = jnp.einsum("...d,...nd->...n", q, k) / jnp.asarray(self.temperature, dtype)
        fused = jnp.einsum("...n,...nd->...d", jax.nn.softmax(scores, axis=-1), v)
        return y + fused.astype(y.dtype)

    # --- training ------------------------------------------------------------------------------
    def delta_label_at(self, path: Path) -> str:
        name = path[path.index(RESERVED) + 1]
        return "frozen" if name in self.adapters else "trainable"
