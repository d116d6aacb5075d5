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
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax import nnx

from jpeft import _intercept, _layout, _nnx_linear
from jpeft._errors import JpeftError
from jpeft._intercept import Linear
from jpeft._method import Context
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


def renames(model: nnx.Module) -> dict[Path, Path]:
    """State path -> tree-view path for weights kept under another name (tunix's ``w`` -> ``kernel``)."""
    out = {}
    for path, module in modules(model).items():
        linear = _nnx_linear.record(module)
        if linear is not None and linear.weight is not None and linear.weight not in ("kernel", "embedding"):
            leaf = "embedding" if linear.layout == _layout.Layout("embed") else "kernel"
            out[path + (linear.weight,)] = path + (leaf,)
    return out


def variables(model: nnx.Module) -> dict[Path, nnx.Variable]:
    """The model's ``Param`` (and frozen delta) Variables by tree-view path (see :func:`tree`)."""
    names = renames(model)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, TREE_TYPES)):
        keys = tuple(str(k) for k in path)
        out[names.get(keys, keys)] = var
    return out


def tree(model: nnx.Module) -> dict[str, Any]:
    """The model's ``Param`` (and frozen delta) arrays as the nested dict jpeft's tree functions take.

    Leaves are named as linen names them: a weight kept in another attribute (tunix's ``w``) is
    shown as ``kernel``, so methods, profiles and HF name maps read one spelling.
    """
    out: dict[str, Any] = {}
    for path, var in variables(model).items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = read(var)
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
        if "__call__" not in dir(base) and callable(getattr(base, "encode", None)):  # tunix's Embedder: encode looks up
            _ADAPTED[base].encode = _adapted_encode
        _ADAPTED[base]._jpeft_base = base
    return _ADAPTED[base]


def _adapted_encode(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    """An embedder's ``encode`` (its lookup, for a class without ``__call__``), run like ``__call__``."""
    return _adapted_call(self, *args, _jpeft_call=type(self)._jpeft_base.encode, **kwargs)


def _adapted_call(self: nnx.Module, *args: Any, _jpeft_call: Any = None, **kwargs: Any) -> Any:
    if vars(self).get("_jpeft_root") and getattr(_CALL, "root", None) is not self:  # prompt/prefix: Method.call
        from jpeft import _nnx_root

        return _nnx_root.call(self, functools.partial(_nnx_root.inside, self, _adapted_call), args, kwargs)
    base = type(self)._jpeft_base
    next_fun = functools.partial(_jpeft_call or base.__call__, self)
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
