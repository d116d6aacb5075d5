"""AdaLoRA: low-rank adaptation in SVD form, with a rank budget that follows importance scores.

The forward pass and the merge are LoRA's with a diagonal in the middle. The training-time part,
importance scores and the budget schedule, is an optax transform that ``jpeft.optimizer`` wraps
around the user's transform (:meth:`AdaLoRA.wrap_optimizer`; in ``_adalora_schedule.py``); the
orthogonality penalty is a loss term from ``jpeft.regularizer``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jpeft import _errors, _layout, _tree
from jpeft._errors import JpeftError
from jpeft._intercept import linear_of
from jpeft._layout import Layout
from jpeft._method import Context, Method
from jpeft._tree import Path, PyTree, join
from jpeft.methods._adalora_schedule import (
    _LEAVES,
    AdaLoRAState,
    _adapter_triplets,
    _orth_norms,
    _schedule,
    adalora_ranks,
)
from jpeft.methods._lora import _param_dtype

__all__ = ["AdaLoRA", "AdaLoRAState", "adalora_ranks"]


def _nonnegative_int(owner: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise JpeftError(f"{owner}({field}={value!r}): {field} must be an int >= 0; got {value!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoRA(Method):
    """AdaLoRA: ``y = x W + (alpha / init_r) * dropout(x) P diag(lambda) Q``, pruned by importance.

    ``P: (d_in, r)`` is stored as ``lora_a``, ``lambda: (r,)`` as ``lora_e`` and ``Q: (r, d_out)``
    as ``lora_b`` (Flax's (in, out) layout; HF PEFT stores ``A = P^T``, ``E = lambda[:, None]`` and
    ``B = Q^T``), with ``r = init_r``. As in HF PEFT, P and Q start as N(0, 0.02^2) and lambda at 0,
    so training starts at the base model. Trainable parameters per target: ``init_r (d_in + d_out
    + 1)``; after pruning, ``r_k (d_in + d_out + 1)`` are effective. Mergeable: ``W + s P diag(lambda)
    Q``.

    Training adds two pieces to a plain optax loop:

    * ``jpeft.regularizer(method, peft)``: ``orth_reg_weight`` times the mean, over all ``2 n``
      factor matrices (``n`` targets, each layer of a stack apart), of the *unsquared* Frobenius
      norms ``||P_k^T P_k - I||_F`` and ``||Q_k Q_k^T - I||_F``. That is HF PEFT's and the authors'
      code's form, so the default weight 0.5 is HF PEFT's and means the same; its strength does not
      grow with the number of targets. (The paper's equation sums squared norms instead: at
      BERT-base's shapes, rank 12 on query and value, that is about 115 times larger at init.)
    * ``jpeft.optimizer(tx, method, peft)`` wraps ``tx`` so that after each update, at step ``t``
      (1 for the first update):

      1. every delta entry ``theta`` (after the update) with gradient ``g`` gets the sensitivity
         ``I = |theta g|``, the smoothed sensitivity ``Ibar <- beta1 Ibar + (1 - beta1) I`` and
         the uncertainty ``Ubar <- beta2 Ubar + (1 - beta2) |I - Ibar|``, up to step
         ``total_step - tfinal``;
      2. triplet ``i`` of a matrix scores ``S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)``,
         with ``s = Ibar Ubar``;
      3. the budget is ``b0 = init_r n`` up to ``tinit`` (``n`` counts targets, each layer of a
         stack apart), then ``b(t) = bT + floor((b0 - bT) (1 - (t - tinit) / (total_step - tfinal
         - tinit))^3)`` with ``bT = target_r n``, down to ``bT`` at ``t = total_step - tfinal``;
      4. every ``delta_t`` steps after ``tinit``, and at ``total_step - tfinal``, the ``b(t)``
         triplets with the highest scores (over all targets) stay and every other ``lambda`` is set
         to exactly 0. In between, masked values train and can come back, as in HF PEFT. From
         ``total_step - tfinal`` on, the mask is fixed and is applied at every step, so masked
         values stay exactly 0 whatever the inner optimizer's momentum.

    ``jpeft.adalora_ranks(opt_state)`` reads the current rank of each target.

    Args:
      targets: a regex over '/'-joined module paths, or a sequence of module-name suffixes (see
        ``jpeft.LoRA``).
      total_step: T, the planned number of optimizer updates.
      init_r: the initial rank of every target.
      target_r: the average final rank; the final budget is ``target_r`` times the number of targets.
      tinit: warm-up steps before pruning starts.
      tfinal: steps at the end with a fixed mask.
      delta_t: steps between two maskings.
      beta1: the EMA coefficient of the sensitivity.
      beta2: the EMA coefficient of the uncertainty.
      orth_reg_weight: gamma, the weight of the orthogonality penalty.
      alpha: the scaling numerator; the scale is ``alpha / init_r``.
      dropout: dropout rate on the adapter input (active with a ``'dropout'`` rng).
      layouts: ``(regex, layout)`` pairs for kernels not in Flax's (in, out) layout.
      dtype: dtype of the factors; by default the kernel's, promoted to at least float32.
      extra_trainable: regex over base leaf paths that train fully.

    Raises:
      JpeftError: on ``target_r > init_r``, ``tinit + tfinal >= total_step``, a non-positive
        ``delta_t`` and other out-of-range fields.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jpeft
      >>> params = {"q": {"kernel": jnp.ones((6, 4))}, "v": {"kernel": jnp.ones((6, 4))}}
      >>> method = jpeft.AdaLoRA(targets=["q", "v"], init_r=3, target_r=2, total_step=4)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> jax.tree.map(jnp.shape, peft["q"]["__jpeft__"])
      {'default': {'lora_a': (6, 3), 'lora_b': (3, 4), 'lora_e': (3,)}}
      >>> tx = jpeft.optimizer(optax.adam(1e-2), method, peft)
      >>> state = tx.init(peft)
      >>> for _ in range(4):
      ...   grads = jax.tree.map(jnp.ones_like, peft)
      ...   updates, state = tx.update(grads, state, peft)
      ...   peft = optax.apply_updates(peft, updates)
      >>> {k: int(v) for k, v in jpeft.adalora_ranks(state).items()}
      {'q': 2, 'v': 2}

    References:
      Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023.
    """

    lora_factors: ClassVar[bool] = True

    targets: str | tuple[str, ...]
    total_step: int
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    alpha: float = 8.0
    dropout: float = 0.0
    layouts: tuple[tuple[str, str], ...] = ()
    dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self._name()
        object.__setattr__(self, "targets", _tree.normalize_targets(name, self.targets))
        for field in ("total_step", "init_r", "target_r", "delta_t"):
            _errors.positive_int(name, field, getattr(self, field))
        for field in ("tinit", "tfinal"):
            _nonnegative_int(name, field, getattr(self, field))
        if self.target_r > self.init_r:
            raise JpeftError(
                f"{name}(init_r={self.init_r}, target_r={self.target_r}): target_r must be <= init_r; "
                "the budget only shrinks. Raise init_r or lower target_r."
            )
        if self.tinit + self.tfinal >= self.total_step:
            raise JpeftError(
                f"{name}(tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step}): "
                "tinit + tfinal must be < total_step, to leave steps for the budget to fall. Lower "
                "tinit or tfinal, or raise total_step."
            )
        for field in ("beta1", "beta2", "dropout"):
            _errors.probability(name, field, getattr(self, field))
        _errors.positive_number(name, "alpha", self.alpha)
        w = self.orth_reg_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or not math.isfinite(w):
            raise JpeftError(
                f"{name}(orth_reg_weight={w!r}): orth_reg_weight must be a number >= 0 and finite; got {w!r}."
            )
        object.__setattr__(self, "layouts", _layout.overrides(name, self.layouts))
        object.__setattr__(self, "dtype", _errors.float_dtype(name, "dtype", self.dtype))

    @property
    def scale(self) -> float:
        """The scale ``alpha / init_r``."""
        return self.alpha / self.init_r

    # --- structure -----------------------------------------------------------------------------
    def select(self, params: PyTree) -> list[Path]:
        return _tree.select(self._name(), self.targets, params)

    def _shapes(self, path: Path, own: Mapping[str, Any], ctx: Context) -> tuple[Layout, tuple, tuple, tuple]:
        layout = ctx.layout(self._name(), path, own, self.layouts)
        shape = tuple(own[layout.leaf].shape)
        stack, d_in, d_out = layout.split(shape)
        limit = min(math.prod(d_in), math.prod(d_out))
        if self.init_r > limit:
            raise JpeftError(
                f"{self._name()}(init_r={self.init_r}): {join(path + (layout.leaf,))} has shape {shape} "
                f"(in {d_in}, out {d_out}); init_r must be <= {limit}. Lower init_r or exclude this module."
            )
        return layout, stack, d_in, d_out

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, jax.Array]:
        layout, stack, _, _ = self._shapes(path, own, ctx)
        kernel = own[layout.leaf]
        dtype = _param_dtype(self._name(), path, layout.leaf, kernel, self.dtype)
        a_shape, b_shape = layout.factor_shapes(tuple(kernel.shape), self.init_r)
        ka, kb = jax.random.split(key)
        return {
            "lora_a": 0.02 * jax.random.normal(ka, a_shape, dtype),
            "lora_e": jnp.zeros(stack + (self.init_r,), dtype),
            "lora_b": 0.02 * jax.random.normal(kb, b_shape, dtype),
        }

    def param_count(self, params: PyTree) -> int:
        ctx = Context(params)
        modules = _tree.modules(params)
        total = self.extra_count(params)
        for path in self.select(params):
            _, stack, d_in, d_out = self._shapes(path, modules[path], ctx)
            total += math.prod(stack) * self.init_r * (math.prod(d_in) + math.prod(d_out) + 1)
        return total

    # --- forward and merge ---------------------------------------------------------------------
    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        linear = linear_of(module)
        layout = linear.layout_of(module)
        kernel = module.get_variable("params", layout.leaf)
        a, e, b = (deltas[k] for k in _LEAVES)
        want = layout.factor_shapes(tuple(kernel.shape), e.shape[-1])
        if (tuple(a.shape), tuple(b.shape)) != want or e.ndim != 1:
            raise JpeftError(
                f"{self._name()}: at {join(module.path)!r} ({type(module).__name__}, {layout.leaf} "
                f"{tuple(kernel.shape)}, layout {layout.spec()!r}) lora_a/lora_e/lora_b have shapes "
                f"{tuple(a.shape)}/{tuple(e.shape)}/{tuple(b.shape)}, expected {want[0]}/{want[1][:1]}/"
                f"{want[1]}. Pass layouts=((r'{join(module.path)}', '{layout.spec()}'),) to the method "
                "and call jpeft.apply again."
            )
        y = next_fun(*args, **kwargs)
        x = linear.inputs(args, kwargs)
        if self.dropout > 0 and layout.kind != "embed" and module.has_rng("dropout"):
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
        dtype = jnp.promote_types(a.dtype, y.dtype)
        if layout.kind != "embed":
            x = x.astype(dtype)
        h = linear.down(module, x, a.astype(dtype))
        h = h * (e.astype(dtype) * jnp.asarray(self.scale, dtype)).reshape((1,) * (h.ndim - 1) + e.shape)
        return y + jnp.tensordot(h, b.astype(dtype), axes=1).astype(y.dtype)

    def merge_module(self, path: Path, own: Mapping[str, Any], deltas: Any, ctx: Context) -> dict[str, Any]:
        layout = ctx.layout(self._name(), path, own, self.layouts)
        kernel = own[layout.leaf]
        a, e, b = (deltas[k] for k in _LEAVES)
        dtype = jnp.promote_types(kernel.dtype, a.dtype)
        eb = e.astype(dtype).reshape(e.shape + (1,) * (b.ndim - e.ndim))  # (*stack, r, 1...) against b
        w = kernel.astype(dtype) + self.scale * layout.full_delta(a.astype(dtype), eb * b.astype(dtype))
        return {layout.leaf: w.astype(kernel.dtype)}

    # --- training ------------------------------------------------------------------------------
    def tree_penalty(self, peft_params: PyTree, name: str) -> jax.Array:
        norms = [n for deltas in _adapter_triplets(peft_params, name) for n in _orth_norms(deltas)]
        if not norms:
            raise JpeftError(
                f"jpeft.regularizer({self._name()}): the tree holds no lora_a/lora_e/lora_b triplet of adapter "
                f"{name!r}. Pass the tree from jpeft.apply(method, params, key=..., name={name!r})."
            )
        return self.orth_reg_weight * jnp.mean(jnp.concatenate(norms))

    def penalty(self, path: Path, module_params: Mapping[str, Any], deltas: Any) -> jax.Array:
        raise JpeftError(
            f"{self._name()}'s orthogonality penalty is a mean over every factor matrix of the tree, not a sum "
            "over modules: call jpeft.regularizer(method, peft) with the AdaLoRA method itself (AdaLoRA inside "
            "jpeft.compose is not supported)."
        )

    def wrap_optimizer(self, tx: optax.GradientTransformation, only: Any) -> optax.GradientTransformation:
        return _schedule(self, tx)


# --- the orthogonality penalty -----------------------------------------------------------------
