"""AdaLoRA: low-rank adaptation in SVD form, with a rank budget that follows importance scores.

The forward pass and the merge are LoRA's with a diagonal in the middle. The training-time part,
importance scores and the budget schedule, is an optax transform that ``jpeft.optimizer`` wraps
around the user's transform (:meth:`AdaLoRA.wrap_optimizer`); the orthogonality penalty is a loss
term from ``jpeft.regularizer``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft import _errors, _layout, _tree
from jpeft._errors import JpeftError
from jpeft._intercept import linear_of
from jpeft._layout import Layout
from jpeft._method import Context, Method
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.methods._lora import _param_dtype

_LEAVES = ("lora_a", "lora_e", "lora_b")


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
            raise JpeftError(f"{name}(orth_reg_weight={w!r}): orth_reg_weight must be a number >= 0 and finite; got {w!r}.")
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
def _adapter_triplets(tree: PyTree, name: str) -> list[Mapping[str, jax.Array]]:
    """Every ``{lora_a, lora_e, lora_b}`` store of adapter ``name`` in the tree, in tree order."""
    if not isinstance(tree, Mapping):
        return []
    store = tree.get(RESERVED, {})
    out = [store[name]] if isinstance(store, Mapping) and set(store.get(name, {})) >= set(_LEAVES) else []
    for k, v in tree.items():
        if k != RESERVED:
            out.extend(_adapter_triplets(v, name))
    return out


def _fro(x: jax.Array) -> jax.Array:
    """The Frobenius norm over the last two axes, with gradient 0 (not NaN) where it is 0."""
    sq = jnp.sum(x * x, axis=(-2, -1))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _orth_norms(deltas: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``||P^T P - I||_F`` and ``||Q Q^T - I||_F`` of one target, one entry per layer of a stack."""
    e = deltas["lora_e"]
    r, stack = e.shape[-1], e.shape[:-1]
    p = deltas["lora_a"].astype(jnp.float32).reshape(stack + (-1, r))
    q = deltas["lora_b"].astype(jnp.float32).reshape(stack + (r, -1))
    eye = jnp.broadcast_to(jnp.eye(r, dtype=jnp.float32), stack + (r, r))
    return _fro(jnp.swapaxes(p, -1, -2) @ p - eye).reshape(-1), _fro(q @ jnp.swapaxes(q, -1, -2) - eye).reshape(-1)


# --- the budget schedule as an optax transform ---------------------------------------------------
class AdaLoRAState(NamedTuple):
    """The state of AdaLoRA's schedule, keyed by ``'<module>/__jpeft__/<adapter>'``.

    Attributes:
      count: the number of updates done.
      ipt: the smoothed sensitivity ``Ibar`` of each ``lora_a``, ``lora_e`` and ``lora_b`` entry.
      unc: the uncertainty ``Ubar`` of each entry.
      mask: ``True`` where a singular value is kept, shape ``(*stack, init_r)``.
      inner: the wrapped optimizer's state.
      acc: when the wrapped optimizer holds an ``optax.MultiSteps``, the mean gradient of each
        ``lora_a``, ``lora_e`` and ``lora_b`` over the micro-steps since the last real update
        (``{}`` otherwise).
      micro: the number of those micro-steps.
    """

    count: jax.Array
    ipt: dict[str, dict[str, jax.Array]]
    unc: dict[str, dict[str, jax.Array]]
    mask: dict[str, jax.Array]
    inner: optax.OptState
    acc: dict[str, dict[str, jax.Array]]
    micro: jax.Array


def _key_names(path: Any) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _triplets(method: AdaLoRA, tree: PyTree) -> dict[str, dict[str, jax.Array]]:
    """``'<module>/__jpeft__/<adapter>' -> {lora_a, lora_e, lora_b}`` for every full triplet."""
    found: dict[str, dict[str, jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = _key_names(path)
        if len(keys) >= 3 and keys[-3] == RESERVED and keys[-1] in _LEAVES:
            found.setdefault(join(keys[:-1]), {})[keys[-1]] = leaf
    out = {k: v for k, v in sorted(found.items()) if set(v) == set(_LEAVES)}
    if not out:
        raise JpeftError(
            f"{method._name()}'s schedule found no lora_a/lora_e/lora_b triplet in the tree. Build the "
            "optimizer with jpeft.optimizer(tx, method, peft) on the tree from jpeft.apply(method, ...)."
        )
    for k, v in out.items():
        if v["lora_e"].shape[-1] != method.init_r:
            raise JpeftError(
                f"{method._name()}(init_r={method.init_r}): {k}/lora_e has shape {tuple(v['lora_e'].shape)}, "
                f"expected rank {method.init_r} on its last axis. Build the optimizer with the method that "
                "made the tree."
            )
    return out


def _budgets(method: AdaLoRA, n: int) -> np.ndarray:
    """The budget at each masking step ``t = tinit + k delta_t``, in exact integer arithmetic."""
    span = method.total_step - method.tfinal - method.tinit
    b0, bt = method.init_r * n, method.target_r * n
    return np.asarray(
        [bt + ((b0 - bt) * (span - k * method.delta_t) ** 3) // span**3 for k in range(span // method.delta_t + 1)],
        np.int32,
    )


def _triplet_scores(s: dict[str, jax.Array], n_stack: int) -> jax.Array:
    """``S_i = s(lambda_i) + mean s(P[:, i]) + mean s(Q[i, :])``, shape ``(*stack, r)``."""
    a, e, b = s["lora_a"], s["lora_e"], s["lora_b"]
    a_axes = tuple(range(n_stack, a.ndim - 1))
    b_axes = tuple(range(n_stack + 1, b.ndim))
    return e + jnp.mean(a, axis=a_axes) + jnp.mean(b, axis=b_axes)


def _multisteps(state: optax.OptState) -> optax.MultiStepsState | None:
    """The one ``optax.MultiStepsState`` inside a wrapped optimizer's state, or ``None``."""
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.MultiStepsState))
        if isinstance(s, optax.MultiStepsState)
    ]
    if len(found) > 1:
        raise JpeftError(
            f"AdaLoRA's schedule found {len(found)} optax.MultiSteps in the wrapped optimizer; it counts real "
            "updates through one. Use a single optax.MultiSteps."
        )
    return found[0] if found else None


def _schedule(method: AdaLoRA, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps ``tx`` with AdaLoRA's importance scores, budget schedule and masking.

    Where ``tx`` accumulates gradients (an ``optax.MultiSteps`` inside it, as ``jpeft.optimizer(
    optax.MultiSteps(...), ...)`` builds), the schedule counts *real* updates, the ones MultiSteps
    emits: the sensitivities use the mean gradient of the accumulated micro-steps, and micro-steps
    that emit no update leave the schedule's state as it is.
    """
    end = method.total_step - method.tfinal

    def init(params: PyTree) -> AdaLoRAState:
        trip = _triplets(method, params)
        zeros = {k: {n: jnp.zeros(x.shape, jnp.float32) for n, x in v.items()} for k, v in trip.items()}
        mask = {k: jnp.ones(v["lora_e"].shape, bool) for k, v in trip.items()}
        inner = tx.init(params)
        acc = jax.tree.map(jnp.copy, zeros) if _multisteps(inner) is not None else {}
        # Two distinct counters: one buffer in two fields cannot be donated (jit(donate_argnums) refuses it).
        count, micro = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
        return AdaLoRAState(count, zeros, jax.tree.map(jnp.copy, zeros), mask, inner, acc, micro)

    def update(updates: PyTree, state: AdaLoRAState, params: PyTree = None) -> tuple[PyTree, AdaLoRAState]:
        if params is None:
            raise JpeftError(
                f"{method._name()}'s schedule needs the parameters: call tx.update(grads, state, params)."
            )
        trip, grads = _triplets(method, params), _triplets(method, updates)
        new, inner = tx.update(updates, state.inner, params)
        steps = _triplets(method, new)
        acc, micro, real = state.acc, state.micro, True
        before, after = _multisteps(state.inner), _multisteps(inner)
        if before is not None and after is not None:  # count only the updates MultiSteps emits
            real = after.gradient_step != before.gradient_step
            mean = jax.tree.map(lambda a, g: a + (g.astype(jnp.float32) - a) / (micro + 1), acc, grads)
            grads = mean
            acc = jax.tree.map(lambda m: jnp.where(real, jnp.zeros_like(m), m), mean)
            micro = jnp.where(real, 0, micro + 1)
        t = state.count + 1
        scoring = (t <= end) & real
        ipt, unc, scores = {}, {}, []
        for k, v in trip.items():
            ipt[k], unc[k], s = {}, {}, {}
            for n in _LEAVES:
                sens = jnp.abs((v[n] + steps[k][n]) * grads[k][n]).astype(jnp.float32)
                i_bar = method.beta1 * state.ipt[k][n] + (1 - method.beta1) * sens
                u_bar = method.beta2 * state.unc[k][n] + (1 - method.beta2) * jnp.abs(sens - i_bar)
                ipt[k][n] = jnp.where(scoring, i_bar, state.ipt[k][n])
                unc[k][n] = jnp.where(scoring, u_bar, state.unc[k][n])
                s[n] = ipt[k][n] * unc[k][n]
            scores.append(_triplet_scores(s, v["lora_e"].ndim - 1).reshape(-1))
        # The budget, and whether this step masks.
        n = sum(math.prod(v["lora_e"].shape[:-1]) for v in trip.values())
        table = jnp.asarray(_budgets(method, n))
        since = t - method.tinit
        periodic = (since > 0) & (t < end) & (since % method.delta_t == 0)
        remask = (periodic | (t == end)) & real
        budget = jnp.where(t >= end, method.target_r * n, table[jnp.clip(since // method.delta_t, 0, table.size - 1)])
        flat = jnp.concatenate(scores)
        order = jnp.argsort(-flat, stable=True)
        keep = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32)) < budget
        mask, offset = {}, 0
        for k, v in trip.items():
            shape = v["lora_e"].shape
            mask[k] = jnp.where(remask, keep[offset : offset + math.prod(shape)].reshape(shape), state.mask[k])
            offset += math.prod(shape)
        # Masked singular values: the update takes them to exactly 0 (theta + (-theta) == 0).
        apply_mask = remask | ((t > end) & real)
        e_updates = {
            k + "/lora_e": jnp.where(apply_mask & ~mask[k], -v["lora_e"], steps[k]["lora_e"]).astype(
                steps[k]["lora_e"].dtype
            )
            for k, v in trip.items()
        }
        new = jax.tree_util.tree_map_with_path(lambda p, u: e_updates.get(join(_key_names(p)), u), new)
        return new, AdaLoRAState(jnp.where(real, t, state.count), ipt, unc, mask, inner, acc, micro)

    return optax.GradientTransformation(init, update)


def adalora_ranks(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """The current rank of every AdaLoRA target, read from the optimizer state.

    Args:
      opt_state: the state of ``jpeft.optimizer(tx, AdaLoRA(...), peft)``.

    Returns:
      ``{module path: kept rank}``; the rank has the module's stack shape (``()`` for an unstacked
      module, ``(L,)`` for an ``nn.scan`` stack of L layers). Where a module holds several AdaLoRA
      adapters, the key is ``'<module>/__jpeft__/<adapter>'``.

    Raises:
      JpeftError: if the state holds no AdaLoRA schedule, or several.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jpeft
      >>> params = {"q": {"kernel": jnp.ones((6, 4))}}
      >>> method = jpeft.AdaLoRA(targets=["q"], init_r=3, target_r=1, total_step=4)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> state = jpeft.optimizer(optax.adam(1e-2), method, peft).init(peft)
      >>> {k: int(v) for k, v in jpeft.adalora_ranks(state).items()}  # before pruning: init_r
      {'q': 3}

      :class:`AdaLoRA`'s example trains until the ranks reach ``target_r``.
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AdaLoRAState))
        if isinstance(s, AdaLoRAState)
    ]
    if len(found) != 1:
        raise JpeftError(
            f"jpeft.adalora_ranks found {len(found)} AdaLoRA schedules in the optimizer state, expected 1. "
            "Pass the state of jpeft.optimizer(tx, jpeft.AdaLoRA(...), peft)."
        )
    mask = found[0].mask
    modules = ["/".join(k.split("/")[:-2]) for k in mask]  # drop '__jpeft__/<adapter>'
    unique = len(set(modules)) == len(modules)
    return {
        (m if unique else k): jnp.sum(v, axis=-1, dtype=jnp.int32)
        for m, (k, v) in zip(modules, mask.items(), strict=True)
    }
