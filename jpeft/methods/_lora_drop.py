"""LoRA-drop: keep LoRA where its output matters, and let the other layers share one LoRA.

Stage 1 trains a plain LoRA briefly; :func:`lora_drop_importance` measures each target's output
``sum ||s x A B||^2`` over sample batches, and :func:`lora_drop_select` turns that into a
:class:`LoRADrop` method and a fresh tree for stage 2.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _intercept, _tree
from jpeft._errors import JpeftError
from jpeft._intercept import linear_of
from jpeft._method import Context
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.methods._lora import LoRA

_SHARED: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("jpeft_lora_drop", default=None)
_SOW = "lora_drop_importance"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRADrop(LoRA):
    """LoRA where the targets in ``keep`` have their own factors and all others share one pair.

    The shared layers are grouped by module name (the last path component, the "matrix type": all
    non-kept ``query`` layers share one pair, all non-kept ``value`` layers another), so a group's
    kernels must have one shape. Layout in the tree:

    * a kept target: ``<module>/__jpeft__/<name>/lora_a`` and ``lora_b``, as in LoRA;
    * a shared target: an empty marker ``<module>/__jpeft__/<name> = {}``;
    * each group's pair, once, at the tree's root: ``__jpeft__/<name>/<group>/lora_a`` and
      ``lora_b``. ``jpeft.wrap`` hands it to the shared layers while the root module runs.

    A group's gradient is the sum over the layers that share it. Trainable parameters:
    ``r (d_in + d_out)`` per kept target plus one such term per group. Mergeable: each shared layer
    gets ``W + s A_g B_g``. Targets must be single layers, not ``nn.scan`` stacks. See
    :class:`jpeft.LoRA` for the other arguments; ``use_dora`` is not supported.

    Args:
      keep: '/'-joined paths of the targets that keep their own factors.

    Raises:
      JpeftError: if a ``keep`` path is not a target, a target is a stack, or a group mixes shapes.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {f"l{i}": {"q": {"kernel": jnp.ones((4, 4))}} for i in range(3)}
      >>> method = jpeft.LoRADrop(targets=["q"], rank=2, keep=("l1/q",))
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> jax.tree.map(jnp.shape, peft["__jpeft__"]), peft["l0"]["q"]["__jpeft__"]
      ({'default': {'q': {'lora_a': (4, 2), 'lora_b': (2, 4)}}}, {'default': {}})
      >>> method.param_count(params)  # l1/q's own pair plus the pair that l0/q and l2/q share
      32

    References:
      Zhou et al., "LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation", 2024.
    """

    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.keep, str) or not all(isinstance(k, str) for k in self.keep):
            raise JpeftError(
                f"{self._name()}(keep={self.keep!r}): keep must be a sequence of '/'-joined module paths, "
                "e.g. ('encoder/layer/0/attention/self/query',)."
            )
        object.__setattr__(self, "keep", tuple(self.keep))
        if self.use_dora:
            raise JpeftError(
                f"{self._name()}(use_dora=True): LoRA-drop shares plain LoRA factors; DoRA is not supported."
            )

    def _plan(self, params: PyTree) -> tuple[list[Path], dict[str, list[Path]]]:
        """The targets, and the shared layers of each group; validates ``keep`` and shapes."""
        targets = super().select(params)
        joined = {join(p) for p in targets}
        unknown = sorted(set(self.keep) - joined)
        if unknown:
            raise JpeftError(
                f"{self._name()}(keep=...): {unknown} are not among the {len(targets)} targets, which look "
                f"like {join(targets[0])!r}. Pass paths of targeted modules."
            )
        modules, ctx, groups = _tree.modules(params), Context(params), {}
        shapes: dict[str, tuple[int, ...]] = {}
        for path in targets:
            layout = ctx.layout(self._name(), path, modules[path], self.layouts)
            shape = tuple(modules[path][layout.leaf].shape)
            if layout.split(shape)[0]:
                raise JpeftError(
                    f"{self._name()}: target {join(path)!r} is a stack of layers ({layout.leaf} {shape}); "
                    "LoRA-drop selects single layers. Unroll the nn.scan, or exclude the stack from targets."
                )
            if join(path) in self.keep:
                continue
            group = path[-1]
            if shapes.setdefault(group, shape) != shape:
                raise JpeftError(
                    f"{self._name()}: the shared group {group!r} mixes kernel shapes {shapes[group]} and {shape} "
                    f"(at {join(path)!r}); one pair cannot serve both. Keep these layers, or target them apart."
                )
            groups.setdefault(group, []).append(path)
        return targets, groups

    # --- structure -----------------------------------------------------------------------------
    def select(self, params: PyTree) -> list[Path]:
        targets, groups = self._plan(params)
        return ([()] if groups else []) + targets

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        if path:
            return super().init_module(key, path, own, ctx) if join(path) in self.keep else {}
        _, groups = self._plan(ctx.params)
        modules = _tree.modules(ctx.params)
        return {
            g: super(LoRADrop, self).init_module(jax.random.fold_in(key, i), ps[0], modules[ps[0]], ctx)
            for i, (g, ps) in enumerate(sorted(groups.items()))
        }

    def param_count(self, params: PyTree) -> int:
        targets, groups = self._plan(params)
        ctx, modules = Context(params), _tree.modules(params)

        def per(path: Path) -> int:
            _, _, d_in, d_out = self._shapes(path, modules[path], ctx)
            return self.rank * (math.prod(d_in) + math.prod(d_out))

        own = sum(per(p) for p in targets if join(p) in self.keep)
        return self.extra_count(params) + own + sum(per(ps[0]) for ps in groups.values())

    # --- forward and merge ---------------------------------------------------------------------
    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        if "lora_a" in deltas:  # a kept layer
            return super().forward(module, next_fun, args, kwargs, deltas)
        if deltas:  # the root's groups: publish them while the model runs
            token = _SHARED.set(deltas)
            try:
                return next_fun(*args, **kwargs)
            finally:
                _SHARED.reset(token)
        group = module.path[-1] if module.path else None  # a shared layer's empty marker
        shared = _SHARED.get()
        if shared is None or group not in shared:
            raise JpeftError(
                f"{self._name()}: {join(module.path)!r} shares the {group!r} pair stored at the tree's root "
                f"(__jpeft__/<adapter>/{group}), but the root module's __call__ did not run with it. Apply "
                "the whole tree through the root module: jpeft.wrap(model.apply, method)."
            )
        return super().forward(module, next_fun, args, kwargs, shared[group])

    def merge_module(self, path: Path, own: Mapping[str, Any], deltas: Any, ctx: Context) -> dict[str, Any]:
        if not path:
            return {}
        if "lora_a" in deltas:
            return super().merge_module(path, own, deltas, ctx)
        stores = [s[path[-1]] for s in ctx.params.get(RESERVED, {}).values() if path[-1] in s]
        if len(stores) != 1:
            raise JpeftError(
                f"{self._name()}: {join(path)!r} shares a {path[-1]!r} pair, and the tree's root holds "
                f"{len(stores)} of them (one per LoRA-drop adapter), expected 1. Merge a tree with one "
                "LoRA-drop adapter."
            )
        return super().merge_module(path, own, stores[0], ctx)


def _check_lora(method: Any, where: str) -> None:
    if not isinstance(method, LoRA) or isinstance(method, LoRADrop) or method.use_dora:
        raise JpeftError(
            f"{where} measures a trained plain LoRA (jpeft.LoRA, LoRAFA or LoRAPlus, without DoRA); got "
            f"{method!r}."
        )


def _call(apply_fn: Callable[..., Any], params: PyTree, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return apply_fn({"params": params}, mutable=["intermediates"], **batch)
    args = batch if isinstance(batch, tuple) else (batch,)
    return apply_fn({"params": params}, *args, mutable=["intermediates"])


def lora_drop_importance(
    method: LoRA, peft_params: PyTree, apply_fn: Callable[..., Any], batches: Iterable[Any], *, name: str = "default"
) -> dict[str, float]:
    """Each LoRA target's output importance ``I_i = sum over batches and tokens of ||s x_i A_i B_i||^2``.

    A dedicated pass: the model runs with LoRA in effect (no dropout), and an interceptor sows each
    target's ``sum ||s x A B||^2`` into the ``'intermediates'`` collection. Nothing is jitted; pass
    the plain ``model.apply``.

    Args:
      method: the trained LoRA.
      peft_params: its tree.
      apply_fn: ``model.apply`` (for HF Flax models, ``model.module.apply`` with the inputs it needs).
      batches: sample data; each batch is a mapping of keyword arguments, a tuple of positional
        arguments, or one positional argument of ``apply_fn``.
      name: the adapter to measure.

    Returns:
      ``{module path: importance}`` for every target, in path order.

    Raises:
      JpeftError: if ``method`` is not a plain LoRA, or a target never ran.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> class Two(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     return nn.Dense(4, name="b")(nn.Dense(4, name="a")(x))
      >>> model, x = Two(), jnp.ones((2, 4))
      >>> method = jpeft.LoRA(targets=["a", "b"], rank=2)
      >>> peft = jpeft.apply(method, model.init(jax.random.key(0), x)["params"], key=jax.random.key(1))
      >>> peft["a"]["__jpeft__"]["default"]["lora_b"] = jnp.ones((2, 4))  # as if trained; b's B is 0
      >>> {k: v > 0 for k, v in jpeft.lora_drop_importance(method, peft, model.apply, [x]).items()}
      {'a': True, 'b': False}
    """
    _check_lora(method, "jpeft.lora_drop_importance")

    def forward(module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        linear = linear_of(module)
        layout = linear.layout_of(module)
        y = next_fun(*args, **kwargs)
        x = linear.inputs(args, kwargs)
        a, b = deltas["lora_a"], deltas["lora_b"]
        dtype = jnp.promote_types(jnp.promote_types(a.dtype, y.dtype), jnp.float32)
        if layout.kind != "embed":
            x = x.astype(dtype)
        h = linear.down(module, x, a.astype(dtype)) * jnp.asarray(method.scale, dtype)
        delta = jnp.tensordot(h, b.astype(dtype), axes=1)
        module.sow("intermediates", _SOW, jnp.sum(delta * delta))
        return y + delta.astype(y.dtype)

    targets = method.select(peft_params)
    totals = {join(p): 0.0 for p in targets}
    seen: set[str] = set()
    with nn.intercept_methods(_intercept.interceptor(forward, name)):
        for batch in batches:
            _, state = _call(apply_fn, peft_params, batch)
            for path, value in _tree.leaves(_tree.as_dicts(state.get("intermediates", {}))):
                if _SOW in path:
                    module = join(path[: path.index(_SOW)])
                    totals[module] = totals.get(module, 0.0) + float(np.sum(np.asarray(value, np.float64)))
                    seen.add(module)
    missing = sorted(set(totals) - seen)
    if missing:
        raise JpeftError(
            f"jpeft.lora_drop_importance: targets {missing[:3]} never ran on the batches. Check that "
            "apply_fn runs the whole model, and that batches is not empty."
        )
    return totals


def lora_drop_select(
    method: LoRA,
    peft_params: PyTree,
    apply_fn: Callable[..., Any],
    batches: Iterable[Any],
    *,
    key: jax.Array,
    threshold: float = 0.9,
    name: str = "default",
) -> tuple[LoRADrop, PyTree]:
    """LoRA-drop's selection: the :class:`LoRADrop` method and a fresh tree for stage 2.

    The importances of :func:`lora_drop_importance` are normalised to shares. Sorted from the most
    important (ties by path), targets keep their own LoRA until the kept shares sum to at least
    ``threshold``; all other targets share one pair per module name.

    Args:
      method: the trained LoRA of stage 1.
      peft_params: its tree.
      apply_fn: ``model.apply``; see :func:`lora_drop_importance`.
      batches: sample data; see :func:`lora_drop_importance`.
      key: a ``jax.random`` key for the stage-2 factors.
      threshold: the cumulative importance share to keep, in (0, 1].
      name: the adapter to measure and to create.

    Returns:
      ``(LoRADrop(...), tree)``: the tree is the base of ``peft_params`` with fresh stage-2 deltas.

    Raises:
      JpeftError: on a threshold outside (0, 1], or when every importance is 0 (an untrained LoRA,
        whose B is still 0).

    Example:
      With ``model``, ``x``, ``method`` and ``peft`` of :func:`lora_drop_importance`'s example, ``a``
      keeps its own LoRA and ``b`` moves to the shared pair of its group:

      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> class Two(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     return nn.Dense(4, name="b")(nn.Dense(4, name="a")(x))
      >>> model, x = Two(), jnp.ones((2, 4))
      >>> method = jpeft.LoRA(targets=["a", "b"], rank=2)
      >>> peft = jpeft.apply(method, model.init(jax.random.key(0), x)["params"], key=jax.random.key(1))
      >>> peft["a"]["__jpeft__"]["default"]["lora_b"] = jnp.ones((2, 4))
      >>> new, tree = jpeft.lora_drop_select(method, peft, model.apply, [x], key=jax.random.key(2))
      >>> new.keep, sorted(tree["__jpeft__"]["default"]), tree["b"]["__jpeft__"]
      (('a',), ['b'], {'default': {}})

    References:
      Zhou et al., "LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation", 2024.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise JpeftError(f"jpeft.lora_drop_select(threshold={threshold!r}): threshold must be in (0, 1].")
    importance = lora_drop_importance(method, peft_params, apply_fn, batches, name=name)
    order = sorted(importance, key=lambda p: (-importance[p], p))
    cumulative = np.cumsum([importance[p] for p in order])
    if not cumulative[-1] > 0:
        raise JpeftError(
            "jpeft.lora_drop_select: every LoRA output is 0 on the batches, so importance cannot rank "
            "layers. Train the LoRA first (B starts at 0)."
        )
    count = int(np.argmax(cumulative >= threshold * cumulative[-1])) + 1
    fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(LoRA)}
    new = LoRADrop(**{**fields, "keep": tuple(sorted(order[:count]))})

    def strip(tree: Any) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        out = {k: strip(v) for k, v in tree.items() if k != RESERVED}
        store = {k: v for k, v in tree.get(RESERVED, {}).items() if k != name}
        return {**out, RESERVED: store} if store else out

    from jpeft._core import apply

    return new, apply(new, strip(peft_params), key=key, name=name)
