"""LoRA-drop: keep LoRA where its output matters, and let the other layers share one LoRA.

Stage 1 trains a plain LoRA briefly; :func:`lora_drop_importance` measures each target's output
``sum ||s x A B||^2`` over sample batches, and :func:`lora_drop_select` turns that into a
:class:`LoRADrop` method and a fresh tree for stage 2.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft import _errors, _intercept, _tree
from jpeft._errors import JpeftError
from jpeft._intercept import linear_of
from jpeft._method import Context
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.methods import _lora_drop_nnx
from jpeft.methods._lora import LoRA, LoRAFA, LoRAPlus

_SHARED: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("jpeft_lora_drop", default=None)
_SOW = "lora_drop_importance"
_SLICE = re.compile(r"(.+)\[(\d+)\]")
_TIED = "lora_drop_tied"


def _slice_of(key: str) -> tuple[str, int | None]:
    """Splits a ``keep``/importance key ``'layers/q[1]'`` into ``('layers/q', 1)``; ``(key, None)`` if plain."""
    m = _SLICE.fullmatch(key)
    return (m.group(1), int(m.group(2))) if m else (key, None)


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
    gets ``W + s A_g B_g``. See :class:`jpeft.LoRA` for the other arguments; ``use_dora`` is not
    supported.

    **Stacked targets** (``nn.scan``: a kernel ``(L, d_in, d_out)`` holds every layer) are named by
    ``scan_layers`` and kept per layer slice, as ``'layers/q[1]'``. Such a target holds LoRA factors
    ``(L, d_in, r)`` and ``(L, r, d_out)`` like LoRA; its non-kept slices share one pair by *tying*:
    they start equal, and their leaves get the label ``'lora_drop_tied'``, whose transform replaces
    each tied slice's gradient by the sum over the tied slices (the gradient of the one shared
    pair) before ``tx`` and copies the first tied slice's update to the others after it, so they
    stay exactly equal. The stack is its own group (it shares nothing with other modules) and counts
    ``r (d_in + d_out)`` per kept slice plus one for the tied slices.

    Args:
      keep: '/'-joined paths of the targets that keep their own factors; ``'path[i]'`` for layer
        ``i`` of a stacked target.
      scan_layers: a regex (``re.fullmatch``) over target module paths whose kernels carry one leading
        layer axis, such as ``r'layers/(q|v)'`` for an ``nn.scan`` named ``layers``.
      freeze_a: LoRA-FA's rule: every ``lora_a`` (shared pairs too) stays frozen at its init and only
        B trains; :func:`lora_drop_select` sets it for a ``jpeft.LoRAFA`` input.
      lr_ratio: LoRA+'s rule: B's updates are scaled by ``lr_ratio`` after the user's transform, or
        ``None``; :func:`lora_drop_select` sets it for a ``jpeft.LoRAPlus`` input.

    Raises:
      JpeftError: if a ``keep`` path is not a target (or a layer of a stacked one), a stacked target
        is not named by ``scan_layers`` or has several stack axes, ``scan_layers`` names no target,
        or a group mixes shapes.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {f"l{i}": {"q": {"kernel": jnp.ones((4, 4))}} for i in range(3)}
      >>> method = jpeft.LoRADrop(targets=["q"], rank=2, keep=("l1/q",))
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> jax.tree.map(jnp.shape, peft["__jpeft__"]), peft["l0"]["q"]["__jpeft__"]
      ({'default': {'q': {'lora_a': (4, 2), 'lora_b': (2, 4)}}}, {'default': {}})
      >>> method.param_count(params)  # l1/q's own pair plus the pair that l0/q and l2/q share
      32
      >>> stacked = {"layers": {"q": {"kernel": jnp.ones((3, 4, 4))}}}  # nn.scan: 3 layers in one kernel
      >>> method = jpeft.LoRADrop(targets=["q"], rank=2, keep=("layers/q[2]",), scan_layers="layers/q")
      >>> peft = jpeft.apply(method, stacked, key=jax.random.key(0))
      >>> a = peft["layers"]["q"]["__jpeft__"]["default"]["lora_a"]
      >>> a.shape, bool((a[0] == a[1]).all()), method.param_count(stacked)  # layers 0 and 1 are tied
      ((3, 4, 2), True, 32)

    References:
      Zhou et al., "LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation", 2024.
    """

    keep: tuple[str, ...] = ()
    scan_layers: str | None = None
    mixed_batches: ClassVar[bool] = False
    mixed_batches_why: ClassVar[str] = (
        "its layers read pairs shared through the tree's root, which one call cannot publish per row"
    )
    freeze_a: bool = False
    lr_ratio: float | None = None

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
        if self.scan_layers is not None:
            _errors.regex(self._name(), "scan_layers", self.scan_layers)
        if not isinstance(self.freeze_a, bool):
            raise JpeftError(f"{self._name()}(freeze_a={self.freeze_a!r}): freeze_a must be a bool.")
        if self.lr_ratio is not None:
            _errors.positive_number(self._name(), "lr_ratio", self.lr_ratio)
            if self.freeze_a:
                raise JpeftError(
                    f"{self._name()}(freeze_a=True, lr_ratio={self.lr_ratio!r}): with A frozen only B trains, so a "
                    "B-over-A learning-rate ratio means nothing. Pass one of them."
                )

    def _is_stacked(self, path: Path) -> bool:
        # The root (path ()) holds the groups of unstacked layers, never a stack.
        return bool(path) and self.scan_layers is not None and re.fullmatch(self.scan_layers, join(path)) is not None

    def _plan(self, params: PyTree) -> tuple[list[Path], dict[str, list[Path]], dict[Path, tuple[int, ...]]]:
        """The targets, the shared layers of each group, and the kept slices of each stacked target.

        Validates ``keep``, ``scan_layers`` and shapes.
        """
        targets = super().select(params)
        modules, ctx, groups = _tree.modules(params), Context(params), {}
        shapes: dict[str, tuple[int, ...]] = {}
        depths: dict[Path, int] = {}
        for path in targets:
            layout = ctx.layout(self._name(), path, modules[path], self.layouts)
            shape = tuple(modules[path][layout.leaf].shape)
            stack = layout.split(shape)[0]
            if self._is_stacked(path):
                if len(stack) != 1:
                    raise JpeftError(
                        f"{self._name()}(scan_layers={self.scan_layers!r}): target {join(path)!r} ({layout.leaf} "
                        f"{shape}, layout {layout.spec()!r}) has {len(stack)} stack axes; a stacked target needs "
                        "exactly one leading layer axis. Fix scan_layers or the layout."
                    )
                depths[path] = stack[0]
                continue
            if stack:
                raise JpeftError(
                    f"{self._name()}: target {join(path)!r} is a stack of layers ({layout.leaf} {shape}); "
                    f"name it with scan_layers={re.escape(join(path))!r} to keep and tie its layers per "
                    "slice, or exclude the stack from targets."
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
        if self.scan_layers is not None and not depths:
            raise JpeftError(
                f"{self._name()}(scan_layers={self.scan_layers!r}) names none of the {len(targets)} targets, "
                f"which look like {join(targets[0])!r}; it must fullmatch the module path of a stacked target."
            )
        known = {join(p) for p in targets if p not in depths}
        known |= {f"{join(p)}[{i}]" for p, n in depths.items() for i in range(n)}
        unknown = sorted(set(self.keep) - known)
        if unknown:
            raise JpeftError(
                f"{self._name()}(keep=...): {unknown} are not among the {len(known)} targets and layers of "
                f"stacked targets, which look like {sorted(known)[0]!r}. Pass paths of targeted modules, and "
                "'path[i]' for layer i of a stacked target."
            )
        kept = {p: tuple(i for i in range(n) if f"{join(p)}[{i}]" in self.keep) for p, n in depths.items()}
        return targets, groups, kept

    # --- structure -----------------------------------------------------------------------------
    def select(self, params: PyTree) -> list[Path]:
        targets, groups, _ = self._plan(params)
        return ([()] if groups else []) + targets

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        if path and self._is_stacked(path):
            deltas = super().init_module(key, path, own, ctx)
            tied = _tied(deltas["lora_a"].shape[0], self._kept(path))
            return {k: v.at[tied].set(v[tied[0]]) if tied.size else v for k, v in deltas.items()}
        if path:
            return super().init_module(key, path, own, ctx) if join(path) in self.keep else {}
        _, groups, _ = self._plan(ctx.params)
        modules = _tree.modules(ctx.params)
        return {
            g: super(LoRADrop, self).init_module(jax.random.fold_in(key, i), ps[0], modules[ps[0]], ctx)
            for i, (g, ps) in enumerate(sorted(groups.items()))
        }

    def param_count(self, params: PyTree) -> int:
        targets, groups, kept = self._plan(params)
        ctx, modules = Context(params), _tree.modules(params)

        def per(path: Path) -> int:
            _, _, d_in, d_out = self._shapes(path, modules[path], ctx)
            return self.rank * (self._trains_a() * math.prod(d_in) + math.prod(d_out))

        own = sum(per(p) for p in targets if join(p) in self.keep)
        # A stacked target: one pair per kept slice, plus one for its tied slices if there are any.
        stacked = sum(per(p) * (len(k) + (self._depth(p, modules, ctx) > len(k))) for p, k in kept.items())
        return self.extra_count(params) + own + stacked + sum(per(ps[0]) for ps in groups.values())

    def _depth(self, path: Path, modules: Mapping[Path, Any], ctx: Context) -> int:
        _, stack, _, _ = self._shapes(path, modules[path], ctx)
        return stack[0]

    def _kept(self, path: Path) -> tuple[int, ...]:
        """The kept layer indices of a stacked target, from ``keep``."""
        name = join(path)
        return tuple(sorted(i for m, i in map(_slice_of, self.keep) if m == name and i is not None))

    # --- training ------------------------------------------------------------------------------
    def _trains_a(self) -> bool:
        return not self.freeze_a

    def delta_label(self, leaf: str) -> str:
        if leaf == "lora_a" and self.freeze_a:
            return "frozen"
        if self.lr_ratio is not None:
            return "lora_b" if leaf == "lora_b" else "lora_a"
        return "trainable"

    def delta_label_at(self, path: Path) -> str:
        label = super().delta_label_at(path)
        module = path[: path.index(RESERVED)] if RESERVED in path else path
        if label == "frozen" or not self._is_stacked(module):
            return label
        return f"{_TIED}/lora_b" if label == "lora_b" else _TIED  # tied, and LoRA+'s B kept apart

    def wrap_optimizer(self, tx: optax.GradientTransformation, only: Any) -> optax.GradientTransformation:
        inner = super().wrap_optimizer(tx, only)
        if self.lr_ratio is not None:
            scale = optax.scale(self.lr_ratio)
            inner = optax.chain(inner, only("lora_b", scale), only(f"{_TIED}/lora_b", scale))
        tied = (_TIED, f"{_TIED}/lora_b")
        return optax.chain(
            *(only(t, self._tie(summed=True)) for t in tied), inner, *(only(t, self._tie(summed=False)) for t in tied)
        )

    def _tie(self, *, summed: bool) -> optax.GradientTransformation:
        """Sets each stacked leaf's tied slices to their sum (gradients) or to the first one's (updates)."""

        def one(path: Any, u: jax.Array) -> jax.Array:
            keys = tuple(str(getattr(k, "key", k)) for k in path)
            tied = _tied(u.shape[0], self._kept(keys[: keys.index(RESERVED)]))
            if len(tied) < 2:
                return u
            return u.at[tied].set(jnp.sum(u[tied], axis=0) if summed else u[tied[0]])

        def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
            return jax.tree_util.tree_map_with_path(one, updates), state

        return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

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
                "the whole tree through the root module: jpeft.wrap(model.apply, method), or call the NNX model "
                "jpeft.apply returned."
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


def _tied(depth: int, kept: tuple[int, ...]) -> np.ndarray:
    """The layer indices of a stack that share the tied pair."""
    return np.asarray([i for i in range(depth) if i not in kept], np.int32)


def _check_lora(method: Any, where: str) -> None:
    if type(method) not in (LoRA, LoRAFA, LoRAPlus) or method.use_dora:
        raise JpeftError(
            f"{where} measures a trained plain LoRA (jpeft.LoRA, LoRAFA or LoRAPlus, without DoRA); got "
            f"{method!r}. Other LoRA variants (QLoRA, LoRA-drop itself) have no LoRA-drop counterpart."
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
      peft_params: its tree, or the ``flax.nnx`` model ``jpeft.apply`` returned.
      apply_fn: ``model.apply`` (for HF Flax models, ``model.module.apply`` with the inputs it needs).
        For an NNX model: ``None`` calls the model with each batch; a function is called as
        ``apply_fn(model, *args, **kwargs)``.
      batches: sample data; each batch is a mapping of keyword arguments, a tuple of positional
        arguments, or one positional argument of ``apply_fn``.
      name: the adapter to measure.

    A target stacked by ``nn.scan`` gets one number per layer, keyed ``'<module path>[i]'``: the scan
    must stack the ``'intermediates'`` collection (``variable_axes={'params': 0, 'intermediates': 0}``),
    so that each layer's sown value keeps its slot. On an NNX model (layers stacked by ``nnx.vmap``
    and run by a forward ``nnx.scan`` need nothing more) each value reaches the host through an
    ordered ``jax.debug.callback``, layer by layer.

    Returns:
      ``{module path: importance}`` for every target (``{'path[i]': ...}`` per layer of a stacked
      one), in path order.

    Raises:
      JpeftError: if ``method`` is not a plain LoRA, a target never ran, or a target's sown values
        are stacked over more than one axis.

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
        if nnx_calls is None:
            module.sow("intermediates", _SOW, jnp.sum(delta * delta))
        else:  # NNX: no collection leaves an nnx.scan body, so the host collects, in call order
            _lora_drop_nnx.record(nnx_calls, tuple(module.path), a.ndim, jnp.sum(delta * delta))
        return y + delta.astype(y.dtype)

    from jpeft import _nnx

    nnx_calls: dict[tuple[Path, int], list[float]] | None = None
    if _nnx.is_model(peft_params):
        nnx_calls = {}
        sums = _lora_drop_nnx.sums(peft_params, forward, apply_fn, batches, name, nnx_calls)
        return _totals(method.select(_nnx.tree(peft_params)), sums)
    targets = method.select(peft_params)
    sums: dict[str, np.ndarray] = {}
    with nn.intercept_methods(_intercept.interceptor(forward, name)):
        for batch in batches:
            _, state = _call(apply_fn, peft_params, batch)
            for path, value in _tree.leaves(_tree.as_dicts(state.get("intermediates", {}))):
                if _SOW in path:
                    module = join(path[: path.index(_SOW)])
                    # sow appends to a tuple; each entry is () for a layer, (L,) for an nn.scan stack.
                    parts = value if isinstance(value, (tuple, list)) else (value,)
                    value = sum(np.asarray(v, np.float64) for v in parts)
                    if value.ndim > 1:
                        raise JpeftError(
                            f"jpeft.lora_drop_importance: target {module!r} sowed values of shape {value.shape}; "
                            "expected () for a layer or (L,) for one nn.scan stack. Nested stacks are not supported."
                        )
                    sums[module] = sums[module] + value if module in sums else value
    return _totals(targets, sums)


def _totals(targets: list[Path], sums: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``{path: importance}`` (``{'path[i]': ...}`` per layer of a stack) from the summed values."""
    missing = sorted(set(map(join, targets)) - set(sums))
    if missing:
        raise JpeftError(
            f"jpeft.lora_drop_importance: targets {missing[:3]} never ran on the batches. Check that "
            "apply_fn runs the whole model, and that batches is not empty."
        )
    totals: dict[str, float] = {}
    for module in map(join, targets):
        value = sums[module]
        if value.ndim == 0:
            totals[module] = float(value)
        else:
            totals.update({f"{module}[{i}]": float(v) for i, v in enumerate(value)})
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
    ``threshold``; all other targets share one pair per module name. Each layer of an ``nn.scan``
    stack is ranked on its own; the method gets ``scan_layers`` naming the stacks, and their
    non-kept layers are tied (see :class:`LoRADrop`).

    Args:
      method: the trained LoRA of stage 1.
      peft_params: its tree, or its NNX model (then the result holds a new model, and
        ``peft_params`` is not changed).
      apply_fn: ``model.apply``, or for an NNX model ``None``; see :func:`lora_drop_importance`.
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
    # LoRA-FA's frozen A and LoRA+'s ratio carry over (issue 10, finding 12).
    fields["freeze_a"] = isinstance(method, LoRAFA)
    fields["lr_ratio"] = method.lr_ratio if isinstance(method, LoRAPlus) else None
    stacks = sorted({m for m, i in map(_slice_of, importance) if i is not None})
    scan_layers = "|".join(re.escape(m) for m in stacks) or None
    new = LoRADrop(**{**fields, "keep": tuple(sorted(order[:count])), "scan_layers": scan_layers})

    def strip(tree: Any) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        out = {k: strip(v) for k, v in tree.items() if k != RESERVED}
        store = {k: v for k, v in tree.get(RESERVED, {}).items() if k != name}
        return {**out, RESERVED: store} if store else out

    from jpeft import _nnx
    from jpeft._core import apply

    if _nnx.is_model(peft_params):  # a new model without adapter ``name``; peft_params is not changed
        return new, apply(new, _lora_drop_nnx.without(peft_params, name), key=key, name=name)
    return new, apply(new, strip(peft_params), key=key, name=name)
