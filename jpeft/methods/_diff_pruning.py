"""Diff pruning: a sparse additive kernel delta behind hard-concrete L0 gates."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _errors, _layout, _tree
from jpeft._errors import JpeftError
from jpeft._intercept import linear_of
from jpeft._method import Context, Method
from jpeft._tree import Path, PyTree, join


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffPruning(Method):
    """Diff pruning: ``W' = W + z * w``, with a hard-concrete gate ``z`` per kernel entry.

    ``w`` and ``log_alpha`` have the kernel's shape (``(d_in, d_out)`` for a dense layer). The
    gate is a stretched, clipped binary concrete variable (Louizos et al.):

    * training (a ``'dropout'`` rng is passed to the wrapped apply): ``u ~ U(0, 1)``,
      ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``;
    * otherwise (and in ``merge``), the deterministic gate ``s = sigmoid(log_alpha)``;

    then ``z = clip(s (zeta - gamma) + gamma, 0, 1)``, exactly 0 or 1 with non-zero probability.
    The expected number of non-zero gates, ``sum sigmoid(log_alpha - beta log(-gamma / zeta))``, is
    the method's :meth:`penalty`: add ``lam * jpeft.regularizer(method, peft)`` to the loss.
    ``w = 0`` at init, so training starts at the base model; ``log_alpha = log_alpha_init``
    (default 5: every gate starts open, ``z = 1``). Trainable: ``2 |W|`` per target (``w`` and
    ``log_alpha``). Mergeable: ``W + z_det * w``. The paper's magnitude projection to a fixed
    sparsity and the fine-tuning with a fixed mask that follows are left to the user.

    Args:
      targets: a regex over '/'-joined module paths, or module-name suffixes.
      beta: the concrete temperature (2/3).
      gamma: the lower stretch limit, < 0.
      zeta: the upper stretch limit, > 1.
      log_alpha_init: the initial ``log_alpha`` of every gate.
      layouts: ``(regex, layout)`` pairs for kernels not in Flax's (in, out) layout; see
        ``jpeft.Layout``. Profiles of known families add theirs.
      dtype: dtype of ``w`` and ``log_alpha``; by default the kernel's, promoted to float32.
      extra_trainable: regex over base leaf paths that train fully (e.g. a classifier head).

    Raises:
      JpeftError: on bad fields or a target pattern that matches nothing.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> params = {"dense": nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))["params"]}
      >>> method = jpeft.DiffPruning(targets=("dense",))
      >>> peft = jpeft.apply(method, params, key=jax.random.key(1))
      >>> jax.tree.map(jnp.shape, peft["dense"]["__jpeft__"])
      {'default': {'log_alpha': (4, 3), 'w': (4, 3)}}
      >>> round(float(jpeft.regularizer(method, peft)), 2)  # 12 open gates
      11.98

    References:
      Guo, Rush and Kim, "Parameter-Efficient Transfer Learning with Diff Pruning", ACL 2021.
      Louizos, Welling and Kingma, "Learning Sparse Neural Networks through L0 Regularization",
      ICLR 2018.
    """

    targets: str | tuple[str, ...]
    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    log_alpha_init: float = 5.0
    layouts: tuple[tuple[str, str], ...] = ()
    dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        object.__setattr__(self, "targets", _tree.normalize_targets(name, self.targets))
        _errors.positive_number(name, "beta", self.beta)
        for field, ok, want in (("gamma", lambda v: v < 0, "< 0"), ("zeta", lambda v: v > 1, "> 1")):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value) or not math.isfinite(value):
                raise JpeftError(
                    f"{name}({field}={value!r}): {field} must be a number {want}, finite (the stretch interval "
                    "(gamma, zeta) must contain [0, 1]; the usual values are -0.1 and 1.1)."
                )
        value = self.log_alpha_init
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise JpeftError(f"{name}(log_alpha_init={value!r}): log_alpha_init must be a finite number.")
        object.__setattr__(self, "layouts", _layout.overrides(name, self.layouts))
        object.__setattr__(self, "dtype", _errors.float_dtype(name, "dtype", self.dtype))

    # --- gates ---------------------------------------------------------------------------------
    def gate(self, log_alpha: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The hard-concrete gate ``z``: sampled with ``key``, deterministic without."""
        if key is None:
            s = jax.nn.sigmoid(log_alpha)
        else:
            eps = 1e-6
            u = jax.random.uniform(key, log_alpha.shape, log_alpha.dtype, eps, 1.0 - eps)
            s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / self.beta)
        return jnp.clip(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    # --- structure -----------------------------------------------------------------------------
    def select(self, params: PyTree) -> list[Path]:
        return _tree.select(self._name(), self.targets, params)

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        layout = ctx.layout(self._name(), path, own, self.layouts)
        kernel = own[layout.leaf]
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise JpeftError(
                f"{self._name()}: {join(path + (layout.leaf,))} has dtype {kernel.dtype}, expected a float kernel. "
                "Exclude this module from targets."
            )
        dtype = jnp.dtype(self.dtype) if self.dtype else jnp.promote_types(kernel.dtype, jnp.float32)
        return {
            "w": jnp.zeros(kernel.shape, dtype),
            "log_alpha": jnp.full(kernel.shape, self.log_alpha_init, dtype),
        }

    def param_count(self, params: PyTree) -> int:
        ctx = Context(params)
        modules = _tree.modules(params)
        total = self.extra_count(params)
        for path in self.select(params):
            layout = ctx.layout(self._name(), path, modules[path], self.layouts)
            total += 2 * _tree.size(modules[path][layout.leaf])
        return total

    # --- forward -------------------------------------------------------------------------------
    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        linear = linear_of(module)
        layout = linear.layout_of(module)
        kernel = module.get_variable("params", layout.leaf)
        w, log_alpha = deltas["w"], deltas["log_alpha"]
        if tuple(w.shape) != tuple(kernel.shape) or tuple(log_alpha.shape) != tuple(kernel.shape):
            raise JpeftError(
                f"{self._name()}: at {join(module.path)!r} ({type(module).__name__}) w/log_alpha have shapes "
                f"{tuple(w.shape)}/{tuple(log_alpha.shape)}, expected the {layout.leaf}'s {tuple(kernel.shape)}. "
                "Call jpeft.apply on this model's params again."
            )
        y = next_fun(*args, **kwargs)
        key = module.make_rng("dropout") if module.has_rng("dropout") else None
        dtype = jnp.promote_types(w.dtype, y.dtype)
        delta = (self.gate(log_alpha, key) * w).astype(dtype)
        x = linear.inputs(args, kwargs)
        if layout.kind != "embed":
            x = x.astype(dtype)
        return (y.astype(dtype) + linear.down(module, x, layout.as_down(delta))).astype(y.dtype)

    # --- merge and penalty ---------------------------------------------------------------------
    def merge_module(self, path: Path, own: Mapping[str, Any], deltas: Any, ctx: Context) -> dict[str, Any]:
        layout = ctx.layout(self._name(), path, own, self.layouts)
        kernel = own[layout.leaf]
        w = deltas["w"]
        dtype = jnp.promote_types(kernel.dtype, w.dtype)
        delta = self.gate(deltas["log_alpha"].astype(dtype)) * w.astype(dtype)
        return {layout.leaf: (kernel.astype(dtype) + delta).astype(kernel.dtype)}

    def penalty(self, path: Path, module_params: Mapping[str, Any], deltas: Any) -> jax.Array:
        """The expected number of non-zero gates, ``sum sigmoid(log_alpha - beta log(-gamma / zeta))``."""
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return jnp.sum(jax.nn.sigmoid(deltas["log_alpha"].astype(jnp.float32) - shift))

    def nonzero_fraction(self, peft_params: PyTree, *, name: str = "default") -> float:
        """The fraction of delta entries that the deterministic gate leaves non-zero (``z w != 0``).

        Example:
          >>> import jax, jax.numpy as jnp, jpeft
          >>> method = jpeft.DiffPruning(targets=("q",))
          >>> peft = jpeft.apply(method, {"q": {"kernel": jnp.ones((2, 2))}}, key=jax.random.key(0))
          >>> method.nonzero_fraction(peft)  # w = 0 at init
          0.0
        """
        nonzero = total = 0
        for path, leaf in _tree.leaves(peft_params):
            if len(path) >= 3 and path[-3:-1] == (_tree.RESERVED, name) and path[-1] == "w":
                node = _tree.get(peft_params, path[:-1])
                z = self.gate(jnp.asarray(node["log_alpha"], jnp.float32))
                nonzero += int(jnp.count_nonzero(z * jnp.asarray(leaf, jnp.float32)))
                total += _tree.size(leaf)
        if not total:
            raise JpeftError(
                f"{self._name()}.nonzero_fraction: the tree holds no deltas of adapter {name!r}; pass the tree "
                "returned by jpeft.apply (and trained)."
            )
        return nonzero / total
