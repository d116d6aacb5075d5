"""The ``flax.nnx`` backend: the same methods on NNX modules, with base paths unchanged.

Design (DESIGN.md §8). ``jpeft.apply(method, model, key=...)`` returns a new model object (the
graph is copied with ``nnx.clone``, so every base array is shared, not copied) in
which each target module

* holds its deltas beside its own variables, as ``<module>.__jpeft__[<name>][<leaf>]``: NNX
  ``Variable`` s of jpeft's types (:class:`Delta`, a ``nnx.Param``; LoRA-family factors also
  ``nnx.LoRAParam``; frozen leaves :class:`FrozenDelta`, not a ``Param``). State paths of the base
  weights do not change, so loaders, orbax checkpoints and sharding rules keep addressing them;
* is re-classed to a cached subclass of its own class whose ``__call__`` hands the call to the
  method through the same core as the linen interceptor (``_intercept.site_call``), with a
  :class:`View` of the module: its path, its leaves (under the names linen uses), its deltas.

No global state is patched (qwix patches classes; ``nnx.LoRA`` replaces modules and so changes
paths); modules without deltas are untouched objects of their own classes. Under ``nnx.vmap``
stacks and ``nnx.scan`` the deltas are ordinary variables of the layer, so they are stacked and
sliced with its weights.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from jpeft import _intercept, _layout, _nnx_linear, _tree
from jpeft._errors import JpeftError
from jpeft._intercept import Linear
from jpeft._method import Context, Method
from jpeft._tree import RESERVED, Path, PyTree, join


class Delta(nnx.Param):
    """A trainable jpeft delta leaf on an NNX model: ``nnx.Optimizer(model, tx, wrt=jpeft.Delta)``.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> peft = jpeft.apply(jpeft.LoRA(targets=".*", rank=2), model, key=jax.random.key(1))
      >>> sorted(k for k, _ in nnx.to_flat_state(nnx.state(peft, jpeft.Delta)))
      [('__jpeft__', 'default', 'lora_a'), ('__jpeft__', 'default', 'lora_b')]
    """


class LoRADelta(Delta, nnx.LoRAParam):
    """A LoRA-family factor: both a :class:`Delta` and an ``nnx.LoRAParam`` (tunix ``PeftTrainer``).

    Example:
      >>> import jpeft
      >>> from flax import nnx
      >>> issubclass(jpeft.LoRADelta, nnx.LoRAParam) and issubclass(jpeft.LoRADelta, jpeft.Delta)
      True
    """


class FrozenDelta(nnx.Variable):
    """A delta leaf that does not train (LoRA-FA's ``A``); no ``Param`` filter selects it.

    Example:
      >>> import jpeft
      >>> from flax import nnx
      >>> issubclass(jpeft.FrozenDelta, nnx.Param)
      False
    """


class DeltaRng(nnx.Variable):
    """The dropout key of an adapted module (methods with ``dropout > 0``), split on every call.

    It lives at ``<module>.__jpeft_rng__`` with one key per stacked layer, so ``nnx.scan`` gives
    each layer its own stream, and advances like ``nnx.Dropout``'s rng state (keep it in the state
    your jitted step returns). ``model.eval()`` turns delta dropout off, ``model.train()`` on.

    Example:
      >>> import jax, jpeft
      >>> from flax import nnx
      >>> model = jpeft.apply(jpeft.LoRA(targets=".*", rank=2, dropout=0.1), nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
      ...                     key=jax.random.key(1))
      >>> isinstance(model.__jpeft_rng__, jpeft.DeltaRng), model.deterministic
      (True, False)
    """


RNG = "__jpeft_rng__"
"""The attribute of an adapted module that holds its :class:`DeltaRng`."""

#: The variable types whose leaves make jpeft's tree view of an NNX model.
TREE_TYPES = nnx.Any(nnx.Param, FrozenDelta)


def is_model(obj: Any) -> bool:
    """Whether ``obj`` is an NNX module (the NNX backend applies)."""
    return isinstance(obj, nnx.Module)


# --- the tree view -----------------------------------------------------------------------------
def modules(model: nnx.Module) -> dict[Path, nnx.Module]:
    """Every module of the graph by its path (``nnx.List`` indices as strings)."""
    return {tuple(str(k) for k in p): m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}


def tree(model: nnx.Module) -> dict[str, Any]:
    """The model's ``Param`` (and frozen delta) arrays as the nested dict jpeft's tree functions take.

    Leaves are named as linen names them: a weight kept in another attribute (tunix's ``w``) is
    shown as ``kernel``, so methods, profiles and HF name maps read one spelling.
    """
    out: dict[str, Any] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, TREE_TYPES)):
        node = out
        keys = [str(k) for k in path]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = read(var)
    for path, module in modules(model).items():
        linear = _nnx_linear.record(module)
        if linear is not None and linear.weight is not None and linear.weight != "kernel":
            node = _tree.get(out, path) if path else out
            if linear.weight in node:
                node["kernel"] = node.pop(linear.weight)
    return out


def read(var: nnx.Variable) -> Any:
    """A variable's array; a non-array value (a quantised kernel, ``jpeft.NF4Array``) as it is."""
    value = var.get_value()
    return var[...] if isinstance(value, jax.Array) else value


def write(var: nnx.Variable, value: Any) -> None:
    """Sets a variable's value in place; a quantised kernel is replaced whole (``jpeft.merge``)."""
    if isinstance(var.get_value(), jax.Array):
        var[...] = value
    else:
        var.set_value(value)


class View:
    """What a method sees of an NNX module: the same surface as a bound linen module.

    ``path``, ``get_variable('params', leaf)`` / ``has_variable`` (leaves under linen's names; the
    reserved key gives the delta store), ``has_rng`` / ``make_rng`` (``'dropout'``: from the
    module's :class:`DeltaRng` unless the module is ``deterministic``), ``jpeft_linear`` (the module's :class:`jpeft.Linear` record), and
    every other attribute of the module (``axis``, ``kernel_size``, ...).
    """

    scope = None

    def __init__(self, module: nnx.Module, path: Path, linear: Linear | None):
        self.module = module
        self.path = path
        self.jpeft_linear = linear

    def _attr(self, name: str) -> str:
        return _nnx_linear.weight_attr(self.jpeft_linear, name)

    def has_variable(self, col: str, name: str) -> bool:
        if name == RESERVED:
            return RESERVED in vars(self.module)
        var = vars(self.module).get(self._attr(name))
        return isinstance(var, nnx.Variable)

    def get_variable(self, col: str, name: str) -> Any:
        if name == RESERVED:
            return values(vars(self.module)[RESERVED])
        var = vars(self.module).get(self._attr(name))
        return None if var is None else read(var)

    def has_rng(self, name: str) -> bool:
        on = name == "dropout" and isinstance(vars(self.module).get(RNG), DeltaRng)
        return on and not getattr(self.module, "deterministic", False)

    def make_rng(self, name: str) -> jax.Array:
        if not self.has_rng(name):
            raise JpeftError(f"jpeft on NNX draws no {name!r} rng at {join(self.path)!r}.")
        var = vars(self.module)[RNG]
        new, sub = jax.random.split(var.get_value())
        var.set_value(new)
        return sub

    @contextlib.contextmanager
    def submodule_calls(self, inner: _intercept.Inner) -> Iterator[None]:
        """``_intercept.submodule_calls`` on NNX: the submodules' calls go through ``_adapted_call``.

        For the duration, each submodule not yet of an adapted class is re-classed to one (restored
        afterwards), and ``(submodules, inner)`` is pushed on a thread-local stack that
        ``_adapted_call`` consults; nothing outlives the call.
        """
        subs: dict[int, tuple[nnx.Module, Path]] = {}
        for p, m in nnx.iter_graph(self.module):
            if p and isinstance(m, nnx.Module):
                subs.setdefault(id(m), (m, tuple(self.path) + tuple(str(k) for k in p)))
        swapped = []
        try:
            for m, _ in subs.values():
                cls = type(m)
                if adapted_class(cls) is not cls:
                    # object.__setattr__: Pytree.__setattr__ would add "__class__" to the graph for good
                    object.__setattr__(m, "__class__", adapted_class(cls))
                    swapped.append((m, cls))
            _CALL.hooks = (*getattr(_CALL, "hooks", ()), (subs, inner))
            yield
        finally:
            _CALL.hooks = tuple(h for h in getattr(_CALL, "hooks", ()) if h[0] is not subs)
            for m, cls in swapped:
                object.__setattr__(m, "__class__", cls)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def values(store: Any) -> Any:
    """A delta store of NNX ``Variable`` s as nested dicts of arrays."""
    if isinstance(store, nnx.Variable):
        return store[...]
    # nnx.capture adds a '__captures__' tuple to every module of the graph, nnx.Dict stores included
    return {k: values(v) for k, v in store.items() if isinstance(v, nnx.Variable) or hasattr(v, "items")}


class NnxContext(Context):
    """:class:`jpeft._method.Context` whose layouts come from the module types, not from profiles."""

    def __init__(self, params: PyTree, mods: Mapping[Path, nnx.Module]):
        super().__init__(params)
        self.mods = mods

    def layout(self, owner: str, path: Path, module_params: Mapping[str, Any], overrides: tuple[tuple[str, str], ...]) -> _layout.Layout:
        import re

        if any(re.fullmatch(p, join(path)) for p, _ in overrides):
            return _layout.resolve(owner, path, module_params, tuple(overrides))
        module = self.mods.get(tuple(path))
        linear = None if module is None else _nnx_linear.record(module)
        if linear is None:
            kind = "no module" if module is None else f"{type(module).__module__}.{type(module).__qualname__}"
            raise JpeftError(
                f"{owner}: target {join(path)!r} ({kind}) is not an NNX module type jpeft knows a layout for. "
                "jpeft reads nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, nnx.Conv and einsum-style "
                "modules (an einsum_str attribute and one >=2-D nnx.Param). Register the type with "
                "jpeft.register_linear(T, jpeft.Linear(jpeft.Layout('dense'), weight=...)), or narrow targets."
            )
        return linear.layout_of(View(module, tuple(path), linear))


# --- the adapted classes -----------------------------------------------------------------------
_ADAPTED: dict[type, type] = {}
_CALL = threading.local()


def adapted_class(cls: type) -> type:
    """The cached subclass of ``cls`` whose ``__call__`` runs jpeft's deltas; same name and module."""
    if getattr(cls, "_jpeft_base", None) is cls:
        return cls
    base = getattr(cls, "_jpeft_base", cls)
    if base not in _ADAPTED:
        _ADAPTED[base] = type(
            base.__name__,
            (base,),
            {"__call__": _adapted_call, "_jpeft_base": base, "__module__": base.__module__, "__qualname__": base.__qualname__},
        )
        _ADAPTED[base]._jpeft_base = base
    return _ADAPTED[base]


def _adapted_call(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    if vars(self).get("_jpeft_root") and getattr(_CALL, "root", None) is not self:  # prompt/prefix: Method.call
        from jpeft import _nnx_root

        return _nnx_root.call(self, functools.partial(_nnx_root.inside, self, _adapted_call), args, kwargs)
    base = type(self)._jpeft_base
    next_fun = functools.partial(base.__call__, self)
    for subs, inner in reversed(getattr(_CALL, "hooks", ())):  # the newest hook is innermost, as on linen
        if id(self) in subs:
            view = View(self, subs[id(self)][1], _nnx_linear.record(self))
            next_fun = functools.partial(_hooked, inner, view, next_fun)
    store = vars(self).get(RESERVED)
    if store is None:
        return next_fun(*args, **kwargs)
    index = getattr(_CALL, "index", None)
    names = getattr(_CALL, "active", None) or self._jpeft_active
    present = [(i, n) for i, n in enumerate(names) if n in store]
    if not present:
        return next_fun(*args, **kwargs)
    methods = dict(self._jpeft_methods)
    view = View(self, self._jpeft_path, _nnx_linear.record(self))
    first = methods[present[0][1]]
    return _intercept.site_call(
        view,
        next_fun,
        args,
        kwargs,
        values(store),
        present,
        lambda n: methods[n].forward,
        index,
        False,
        first.base_forward,
        any(methods[n].reenters for _, n in present),
    )


def _hooked(inner: _intercept.Inner, view: View, next_fun: Any, *args: Any, **kwargs: Any) -> Any:
    return inner(view, next_fun, args, kwargs)


# --- apply, merge, switching -------------------------------------------------------------------
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


def _variables(method: Method, path: Path, deltas: Any, sharding: Any) -> Any:
    """The delta Variables; ``sharding``: their metadata (``out_sharding`` ...), nested like ``deltas``, or None."""
    if isinstance(deltas, Mapping):
        return nnx.Dict(
            {k: _variables(method, path + (k,), v, None if sharding is None else sharding.get(k)) for k, v in deltas.items()}
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
        variables = _variables(method, tuple(path) + (RESERVED, name), deltas, sharding)
        if _dropout(method) and _nnx_linear.record(module) is not None:
            layout = ctx.layout(method._name(), tuple(path), own, tuple(getattr(method, "layouts", ())))
            _add_rng(module, jax.random.fold_in(jax.random.fold_in(key, i), 0xD0), layout.split(tuple(own[layout.leaf].shape))[0])
        first = store is None
        if first:
            setattr(module, RESERVED, nnx.Dict({name: variables}))
            object.__setattr__(module, "__class__", adapted_class(type(module)))
            module._jpeft_path = tuple(path)
            module._jpeft_methods = ((name, method),)
            module._jpeft_active = current or (name,)
        else:
            store[name] = variables
            module._jpeft_methods = module._jpeft_methods + ((name, method),)
    from jpeft import _nnx_root

    _nnx_root.mark(new, name, method)  # prompt and prefix methods: the root's call runs method.call
    return new


def set_adapter(model: nnx.Module, active: str | Sequence[str]) -> None:
    """Chooses the adapter(s) an adapted NNX model runs; see ``jpeft.set_adapter``."""
    names = (active,) if isinstance(active, str) else tuple(active)
    held = adapter_names(model)
    missing = [n for n in names if n not in held]
    if not names or missing or len(set(names)) != len(names):
        raise JpeftError(
            f"jpeft.set_adapter(active={active!r}): the model holds adapters {sorted(held) or 'none'}; name one or "
            "several distinct ones of them."
        )
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
        _remove(module, name)
        merged += 1
    if not merged:
        raise JpeftError(
            f"jpeft.merge({type(method).__name__}): the NNX model holds no deltas of adapter {name!r}. Pass the "
            "model returned by jpeft.apply (and trained)."
        )
    return new


def _remove(module: nnx.Module, name: str) -> None:
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
