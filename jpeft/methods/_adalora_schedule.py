"""AdaLoRA's training-time part: importance scores, the rank budget schedule and its state, as an optax transform.

``jpeft.optimizer`` wraps the user's transform with :func:`_schedule` (through
:meth:`jpeft.AdaLoRA.wrap_optimizer`); :func:`adalora_ranks` reads the kept ranks from its state.
The method itself (forward pass, merge, orthogonality penalty) is in ``_adalora.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft._errors import JpeftError
from jpeft._tree import RESERVED, PyTree, join

if TYPE_CHECKING:
    from jpeft.methods._adalora import AdaLoRA

_LEAVES = ("lora_a", "lora_e", "lora_b")


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
            raise JpeftError(f"{method._name()}'s schedule needs the parameters: call tx.update(grads, state, params).")
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
