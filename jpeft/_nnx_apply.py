"""The NNX backend, part two: apply, merge and adapter switching (``jpeft._nnx`` has the view).

``apply`` copies the graph (``nnx.clone``: new ``Variable`` s around the same arrays), gives each
target module its delta variables and its adapted class, and marks the root for prompt and
prefix methods; ``merge`` folds deltas into a copy and restores the original classes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from jpeft import _nnx_linear, _tree
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._nnx import (
    _CALL,
    RESERVED,
    RNG,
    Delta,
    DeltaRng,
    FrozenDelta,
    LoRADelta,
    NnxContext,
    adapted_class,
    modules,
    tree,
    values,
    write,
)
from jpeft._tree import Path, join


def copy(model: nnx.Module) -> nnx.Module:
    """A new object graph with new ``Variable`` s that share every array of ``model`` (``nnx.clone``)."""
    return nnx.clone(model, variables=True)


def _variable_type(method: Method, path: Path) -> type:
    if method.delta_label_at(path) == "frozen":
        return FrozenDelta
    from jpeft.methods._compose import Compose

    if isinstance(method, Compose):
        i = path.index(RESERVED)
        key = path[i + 2]
        method = method.methods[method.keys.index(key)]
        path = path[: i + 2] + path[i + 3 :]
    return LoRADelta if method.lora_factors else Delta


def make_variables(method: Method, path: Path, deltas: Any, sharding: Any) -> Any:
    """The delta Variables; ``sharding``: their metadata (``out_sharding`` ...), nested like ``deltas``, or None."""
    if isinstance(deltas, Mapping):
        return nnx.Dict(
            {k: make_variables(method, path + (k,), v, None if sharding is None else sharding.get(k)) for k, v in deltas.items()}
        )
    return _variable_type(method, path)(deltas, **(sharding or {}))


def _dropout(method: Method) -> bool:
    return bool(getattr(method, "dropout", 0)) or any(getattr(m, "dropout", 0) for m in getattr(method, "methods", ()))


def _add_rng(module: nnx.Module, key: jax.Array, stack: tuple[int, ...]) -> None:
    """Gives a module with delta dropout its :class:`DeltaRng` (one key per stacked layer) and a
    ``deterministic`` flag (``model.eval()`` / ``model.train()`` set it) unless it has one."""
    if RNG not in vars(module):
        n = 1
        for d in stack:
            n *= d
        setattr(module, RNG, DeltaRng(jax.random.split(key, n).reshape(stack)))
    if not hasattr(module, "deterministic"):
        module.deterministic = False


def apply(method: Method, model: nnx.Module, key: jax.Array, name: str) -> nnx.Module:
    """``jpeft.apply`` for an NNX module (the public function validates the arguments first)."""
    new = copy(model)
    view = tree(new)
    targets = method.select(view)
    if not method.has_deltas:
        return new
    mods = modules(new)
    current = active_names(new)  # a module's first adapter joins the model's choice, not its own
    ctx = NnxContext(view, mods)
    for i, path in enumerate(targets):
        module = mods.get(tuple(path))
        if module is None:
            raise JpeftError(f"jpeft.apply: target {join(path)!r} is not a module of the NNX model.")
        store = vars(module).get(RESERVED)
        if store is not None and name in store:
            raise JpeftError(
                f"jpeft.apply: adapter {name!r} already exists at {join(path)!r}. Pass another name=..., or "
                "apply to the model without it."
            )
        node = _tree.get(view, path)
        own = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        deltas = method.init_module(jax.random.fold_in(key, i), path, own, ctx)
        from jpeft._nnx_sharding import delta_metadata

        sharding = delta_metadata(method, module, tuple(path), own, deltas, ctx, name)
        made = make_variables(method, tuple(path) + (RESERVED, name), deltas, sharding)
        if _dropout(method) and _nnx_linear.record(module) is not None:
            layout = ctx.layout(method._name(), tuple(path), own, tuple(getattr(method, "layouts", ())))
            _add_rng(module, jax.random.fold_in(jax.random.fold_in(key, i), 0xD0), layout.split(tuple(own[layout.leaf].shape))[0])
        first = store is None
        if first:
            setattr(module, RESERVED, nnx.Dict({name: made}))
            object.__setattr__(module, "__class__", adapted_class(type(module)))
            module._jpeft_path = tuple(path)
            module._jpeft_methods = ((name, method),)
            module._jpeft_active = current or (name,)
        else:
            store[name] = made
            module._jpeft_methods = module._jpeft_methods + ((name, method),)
    from jpeft import _nnx_root

    _nnx_root.mark(new, name, method)  # prompt and prefix methods: the root's call runs method.call
    return new


def held_names(model: nnx.Module, active: str | Sequence[str], where: str) -> tuple[str, ...]:
    """``active`` as a tuple of distinct adapter names the model holds, or a clear error."""
    names = (active,) if isinstance(active, str) else tuple(active)
    held = adapter_names(model)
    missing = [n for n in names if n not in held]
    if not names or missing or len(set(names)) != len(names):
        raise JpeftError(
            f"{where}(active={active!r}): the model holds adapters {sorted(held) or 'none'}; name one or "
            "several distinct ones of them."
        )
    return names


def set_adapter(model: nnx.Module, active: str | Sequence[str]) -> None:
    """Chooses the adapter(s) an adapted NNX model runs; see ``jpeft.set_adapter``."""
    names = held_names(model, active, "jpeft.set_adapter")
    for module in modules(model).values():
        if RESERVED in vars(module):
            module._jpeft_active = names


def active_names(model: nnx.Module) -> tuple[str, ...]:
    """The adapters the model's adapted modules run (the first module's choice)."""
    for m in modules(model).values():
        if RESERVED in vars(m):
            return m._jpeft_active
    return ()


def methods(model: nnx.Module) -> list[tuple[str, Method]]:
    """Every (name, method) pair applied to the model."""
    seen: dict[str, Method] = {}
    for m in modules(model).values():
        if RESERVED in vars(m):
            seen.update(m._jpeft_methods)
    return list(seen.items())


def adapter_names(model: nnx.Module) -> set[str]:
    """The adapter names an NNX model holds."""
    return {n for m in modules(model).values() if RESERVED in vars(m) for n in vars(m)[RESERVED]}


@contextlib.contextmanager
def calling(index: Any, active: tuple[str, ...] | None) -> Iterator[None]:
    old = getattr(_CALL, "index", None), getattr(_CALL, "active", None)
    _CALL.index, _CALL.active = index, active
    try:
        yield
    finally:
        _CALL.index, _CALL.active = old


def merge(method: Method, model: nnx.Module, name: str) -> nnx.Module:
    """``jpeft.merge`` for an NNX module: a new model of the original classes with deltas folded in."""
    from jpeft import _nnx_root

    refolded = _nnx_root.merge_tree(method, model, name)  # prefix tuning's MLP, P-tuning's encoder
    if refolded is not None:
        return refolded
    new = copy(model)
    view = tree(new)
    ctx = NnxContext(view, modules(new))
    merged = 0
    for path, module in modules(new).items():
        store = vars(module).get(RESERVED)
        if store is None or name not in store:
            continue
        own = {k: v for k, v in _tree.get(view, path).items() if not isinstance(v, Mapping)} if path else {
            k: v for k, v in view.items() if not isinstance(v, Mapping)
        }
        from jpeft import _tied

        folded = _tied.merge_module(method, path, own, values(store[name]), ctx)
        linear = _nnx_linear.record(module)
        for leaf, value in folded.items():
            write(getattr(module, _nnx_linear.weight_attr(linear, leaf)), value)
        remove(module, name)
        merged += 1
    if not merged:
        raise JpeftError(
            f"jpeft.merge({type(method).__name__}): the NNX model holds no deltas of adapter {name!r}. Pass the "
            "model returned by jpeft.apply (and trained)."
        )
    return new


def remove(module: nnx.Module, name: str) -> None:
    store = vars(module)[RESERVED]
    del store[name]
    module._jpeft_methods = tuple(p for p in module._jpeft_methods if p[0] != name)
    module._jpeft_active = tuple(n for n in module._jpeft_active if n != name) or tuple(
        n for n, _ in module._jpeft_methods[:1]
    )
    if not len(store):
        delattr(module, RESERVED)
        for attr in ("_jpeft_path", "_jpeft_methods", "_jpeft_active"):
            delattr(module, attr)
        object.__setattr__(module, "__class__", type(module)._jpeft_base)
