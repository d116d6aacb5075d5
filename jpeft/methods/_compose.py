"""Free composition of methods: ``jpeft.compose(m1, m2, ...)`` is itself a method.

Each component keeps its own delta leaves under its own key,
``<module>/__jpeft__/<adapter>/<component>/<leaf>``, and its own optimizer labels, prefixed with
the component key (``'lora:lora_b'``). On a module that several components target, they run in the
order of their :attr:`~jpeft.Method.site_role`: weight reparameterisations innermost, then output
scaling, output adapters, and position overwrites (prompts, prefixes) outermost.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import optax

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._method import Context, Method
from jpeft._tree import RESERVED, Path, PyTree, join

ROLES = ("weight", "scale", "output", "overwrite")


def _key(method: Method, taken: set[str]) -> str:
    base = type(method).__name__.lower()
    key, i = base, 2
    while key in taken:
        key, i = f"{base}{i}", i + 1
    return key


def _overrides(method: Method, hook: str) -> bool:
    return getattr(type(method), hook) is not getattr(Method, hook)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Compose(Method):
    """Several methods on one tree, trained together.

    ``methods`` run side by side: a module that two of them target runs both, in site-role order
    (``'weight'``, ``'scale'``, ``'output'``, ``'overwrite'``). The trainable set is the union of
    the components'. Labels are ``'<component>:<label>'`` so each component keeps its own optimizer
    rule (LoRA+'s B scaling, LoRA-FA's frozen A).

    Conflicts raise at construction or in ``jpeft.apply``: two components with the same role on one
    module (two LoRAs on ``query``: use named adapters and ``wrap(active=[...])`` instead), a base
    leaf trained fully by one component and reparameterised by another, or two components that
    both rewrite the model's inputs (two prompt methods).

    Args:
      methods: the components, in any order.
      keys: their names in the tree; by default the lower-case class names.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}, "v": {"kernel": jnp.ones((4, 4))}}
      >>> m = jpeft.compose(jpeft.LoRA(targets=["q"], rank=2), jpeft.LoRAFA(targets=["v"], rank=2))
      >>> sorted(jpeft.apply(m, params, key=jax.random.key(0))["v"]["__jpeft__"]["default"])
      ['lorafa']
      >>> jpeft.labels(m, jpeft.apply(m, params, key=jax.random.key(0)))["v"]["__jpeft__"]["default"]
      {'lorafa': {'lora_a': 'frozen', 'lora_b': 'lorafa:trainable'}}
    """

    methods: tuple[Method, ...]
    keys: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        methods = tuple(self.methods) if isinstance(self.methods, (tuple, list)) else None
        if not methods or not all(isinstance(m, Method) for m in methods):
            raise JpeftError(
                f"Compose(methods={self.methods!r}): methods must be a non-empty sequence of jpeft methods, "
                "e.g. jpeft.compose(jpeft.LoRA(...), jpeft.IA3(...))."
            )
        if any(isinstance(m, Compose) for m in methods):
            methods = tuple(c for m in methods for c in (m.methods if isinstance(m, Compose) else (m,)))
        object.__setattr__(self, "methods", methods)
        if self.keys is None:
            taken: set[str] = set()
            keys = []
            for m in methods:
                keys.append(_key(m, taken))
                taken.add(keys[-1])
            object.__setattr__(self, "keys", tuple(keys))
        else:
            keys = tuple(self.keys)
            if len(keys) != len(methods) or len(set(keys)) != len(keys) or not all(
                isinstance(k, str) and k and "/" not in k and ":" not in k for k in keys
            ):
                raise JpeftError(
                    f"Compose(keys={self.keys!r}): keys must be {len(methods)} distinct non-empty str without "
                    "'/' or ':', one per method."
                )
            object.__setattr__(self, "keys", keys)
        for m in methods:
            if m.site_role not in ROLES:
                raise JpeftError(f"Compose: {type(m).__name__}.site_role is {m.site_role!r}; expected one of {ROLES}.")
        callers = [type(m).__name__ for m in methods if _overrides(m, "call")]
        if len(callers) > 1:
            raise JpeftError(
                f"Compose: {callers} both rewrite the model's inputs (virtual prompt or prefix positions); "
                "compose at most one of them."
            )

    # --- derived flags -------------------------------------------------------------------------
    @property  # type: ignore[override]
    def has_deltas(self) -> bool:
        return any(m.has_deltas for m in self.methods)

    @property  # type: ignore[override]
    def reenters(self) -> bool:
        return any(m.reenters for m in self.methods)

    @property  # type: ignore[override]
    def mixed_batches(self) -> bool:
        return all(m.mixed_batches for m in self.methods)

    @property  # type: ignore[override]
    def mixed_batches_why(self) -> str:
        return "; ".join(f"{type(m).__name__}: {m.mixed_batches_why}" for m in self.methods if not m.mixed_batches)

    @property  # type: ignore[override]
    def mergeable(self) -> bool:
        return all(m.mergeable for m in self.methods)

    @property  # type: ignore[override]
    def identity_at_init(self) -> bool:
        return all(m.identity_at_init for m in self.methods)

    def _parts(self) -> list[tuple[str, Method]]:
        return list(zip(self.keys, self.methods, strict=True))

    def _ordered(self, present: Any) -> list[tuple[str, Method]]:
        return sorted(((k, m) for k, m in self._parts() if k in present), key=lambda km: ROLES.index(km[1].site_role))

    # --- structure -----------------------------------------------------------------------------
    def _selection(self, params: PyTree) -> dict[Path, list[tuple[str, Method]]]:
        """Module path -> the delta components that target it; checks for conflicts."""
        chosen: dict[Path, list[tuple[str, Method]]] = {}
        for k, m in self._parts():
            if m.has_deltas:
                for p in m.select(params):
                    chosen.setdefault(tuple(p), []).append((k, m))
        modules = _tree.modules(params)
        trained = {}
        for k, m in self._parts():
            if not m.has_deltas:
                label = m.base_labeller(params)
                trained.update({p: k for p, _ in _tree.leaves(params) if RESERVED not in p and label(p) != "frozen"})
        for path, parts in chosen.items():
            roles: dict[str, str] = {}
            for k, m in parts:
                if m.site_role in roles:
                    raise JpeftError(
                        f"Compose: {roles[m.site_role]!r} and {k!r} both act on {join(path)!r} as "
                        f"{m.site_role!r} methods, so their order would be ambiguous. Narrow one's targets, or "
                        "put them in named adapters and stack them with jpeft.wrap(..., active=[...])."
                    )
                roles[m.site_role] = k
            if "weight" in roles:
                for leaf in ("kernel", "embedding"):
                    if leaf in modules.get(path, {}) and path + (leaf,) in trained:
                        raise JpeftError(
                            f"Compose: {trained[path + (leaf,)]!r} trains {join(path + (leaf,))!r} fully while "
                            f"{roles['weight']!r} reparameterises it. Exclude that module from one of them."
                        )
        return chosen

    def select(self, params: PyTree) -> list[Path]:
        chosen = self._selection(params)
        if not chosen:
            for m in self.methods:  # base-only components validate their own selection
                m.select(params)
        order = {p: i for i, p in enumerate(_tree.all_paths(params))}
        return sorted(chosen, key=lambda p: min((v for q, v in order.items() if q[: len(p)] == p), default=0))

    def init_module(self, key: jax.Array, path: Path, own: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        cache = ctx.__dict__.setdefault("_compose", {})
        if id(self) not in cache:
            cache[id(self)] = self._selection(ctx.params)
        parts = cache[id(self)].get(tuple(path), [])
        return {
            k: m.init_module(jax.random.fold_in(key, self.keys.index(k)), path, own, ctx) for k, m in parts
        }

    def param_count(self, params: PyTree) -> int:
        total = sum(m.param_count(params) - m.extra_count(params) for m in self.methods if m.has_deltas)
        label = self.base_labeller(params)
        return total + sum(_tree.size(x) for p, x in _tree.leaves(params) if RESERVED not in p and label(p) != "frozen")

    # --- forward -------------------------------------------------------------------------------
    def forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict, deltas: Any) -> Any:
        fn = next_fun
        for k, m in self._ordered(deltas):

            def step(*a: Any, _m: Method = m, _fn: Callable[..., Any] = fn, _d: Any = deltas[k], **kw: Any) -> Any:
                return _m.forward(module, _fn, a, kw, _d)

            fn = step
        return fn(*args, **kwargs)

    def call(self, apply_fn: Callable[..., Any], variables: PyTree, args: tuple, kwargs: dict, *, active: str) -> Any:
        from jpeft.methods._prompt import VirtualTokens

        for k, m in self._parts():
            if _overrides(m, "call"):  # a virtual-token method reads (and materialises) its own namespace
                extra = {"component": k} if isinstance(m, VirtualTokens) else {}
                return m.call(apply_fn, variables, args, kwargs, active=active, **extra)
        return apply_fn(variables, *args, **kwargs)

    # --- merge ---------------------------------------------------------------------------------
    def merge_module(self, path: Path, own: Mapping[str, Any], deltas: Any, ctx: Context) -> dict[str, Any]:
        if deltas is None:  # jpeft.merge asks a non-mergeable method for its message
            bad = [type(m).__name__ for m in self.methods if not m.mergeable]
            raise JpeftError(
                f"Compose: {bad} cannot be merged into the base weights (they change activations). Keep "
                "using jpeft.wrap(apply_fn, method) for inference."
            )
        current = dict(own)
        for k, m in self._ordered(deltas):
            current.update(m.merge_module(path, current, deltas[k], ctx))
        return {k: v for k, v in current.items() if k in own}

    # --- training ------------------------------------------------------------------------------
    def penalty(self, path: Path, own: Mapping[str, Any], deltas: Any) -> jax.Array | None:
        terms = [m.penalty(path, own, deltas[k]) for k, m in self._parts() if k in deltas]
        terms = [t for t in terms if t is not None]
        return functools.reduce(lambda a, b: a + b, terms) if terms else None

    def delta_label_at(self, path: Path) -> str:
        i = path.index(RESERVED)
        key = path[i + 2] if len(path) > i + 3 else None
        if key not in self.keys:
            raise JpeftError(
                f"Compose: delta leaf {join(path)!r} belongs to no component {list(self.keys)}; the tree was "
                "made by another method. Use the method that jpeft.apply was called with."
            )
        m = self.methods[self.keys.index(key)]
        label = m.delta_label_at(path[: i + 2] + path[i + 3 :])
        return label if label == "frozen" else f"{key}:{label}"

    def base_labeller(self, tree: PyTree) -> Callable[[Path], str]:
        own = super().base_labeller(tree)
        parts = [(k, m.base_labeller(tree)) for k, m in self._parts()]

        def label(path: Path) -> str:
            if own(path) != "frozen":
                return "trainable"
            for k, fn in parts:
                lab = fn(path)
                if lab != "frozen":
                    return f"{k}:{lab}"
            return "frozen"

        return label

    def wrap_optimizer(self, tx: optax.GradientTransformation, only: Any) -> optax.GradientTransformation:
        for k, m in self._parts():
            tx = m.wrap_optimizer(tx, lambda label, t, _k=k: only(f"{_k}:{label}", t))
        return tx

    def base_forward(self, module: nn.Module, next_fun: Any, args: tuple, kwargs: dict) -> Any:
        for _, m in self._parts():
            if _overrides(m, "base_forward"):  # QLoRA computes quantised layers
                return m.base_forward(module, next_fun, args, kwargs)
        return next_fun(*args, **kwargs)


def compose(*methods: Method, keys: tuple[str, ...] | None = None) -> Compose:
    """Composes methods into one: ``jpeft.compose(jpeft.PrefixTuning(...), jpeft.ParallelAdapter(...))``.

    See :class:`Compose`.

    Example:
      >>> import jpeft
      >>> jpeft.compose(jpeft.LoRA(targets=["q"]), jpeft.LoRA(targets=["v"])).keys
      ('lora', 'lora2')
    """
    return Compose(methods=tuple(methods), keys=keys)
