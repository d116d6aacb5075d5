"""The root call of an NNX model under a prompt or prefix method: the ``Method.call`` seam on NNX.

On linen, ``jpeft.wrap`` runs ``method.call(apply_fn, variables, args, kwargs)``, which extends the
inputs by the virtual positions, calls ``apply_fn`` and slices the outputs. On NNX the model itself
is called, so ``jpeft.apply`` marks its root (``_jpeft_root``: the ``(name, method)`` pairs with a
call hook) and re-classes it like any adapted module; its ``__call__`` runs :func:`call`, which
hands the same ``method.call`` an ``apply_fn`` that calls the base root ``__call__``:

* ``variables['params']`` is the model's tree view (``jpeft._nnx.tree``), so profiles, sites and
  ``materialize`` read the same paths as on linen;
* deltas that ``materialize`` computes (prefix tuning's per-layer prefixes from its MLP) are put
  on their modules for the call only (:func:`installed`), as ``Variable`` s, so that ``nnx.scan``
  slices a stacked layer's prefixes with its weights;
* ``apply_fn.jpeft_root`` is a view of the root whose ``submodule_calls`` re-classes the
  submodules for the call, which is how ``_positions.module_calls`` reaches the layer stack.

Nothing outlives the call: classes and attributes are restored, under ``nnx.jit`` too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flax import nnx

from jpeft import _nnx, _nnx_apply, _tree
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import RESERVED, Path, PyTree


class _Materialized(nnx.Variable):
    """A delta leaf computed for one call (prefixes from prefix tuning's MLP); never trained or saved."""


def has_call(method: Method) -> bool:
    """Whether ``method`` (or a component of a composition) extends the model's root call."""
    from jpeft.methods._prompt import virtual_part

    return virtual_part(method) is not None


def mark(model: nnx.Module, name: str, method: Method) -> None:
    """Makes ``model``'s ``__call__`` run ``method.call`` for adapter ``name`` (in place; ``jpeft.apply``)."""
    if not has_call(method):
        return
    # object.__setattr__: Pytree.__setattr__ would add "__class__" to the graph for good
    object.__setattr__(model, "__class__", _nnx.adapted_class(type(model)))
    model._jpeft_root = tuple(p for p in vars(model).get("_jpeft_root", ()) if p[0] != name) + ((name, method),)


def call(model: nnx.Module, next_fun: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The root ``__call__``: ``method.call`` of the active adapter, around ``next_fun`` (the rest of the call)."""
    active = getattr(_nnx._CALL, "active", None) or _nnx_apply.active_names(model)
    parts = [(n, m) for n, m in model._jpeft_root if n in active]
    if not parts:
        return next_fun(*args, **kwargs)
    name, method = parts[0]
    _refuse_cache(model, method, args, kwargs)

    def apply_fn(variables: PyTree, *a: Any, **kw: Any) -> Any:
        with installed(model, variables["params"], name, method, active):
            return next_fun(*a, **kw)

    apply_fn.jpeft_root = _nnx.View(model, (), None)
    return method.call(
        apply_fn, {"params": _nnx.tree(model)}, args, kwargs, active=active[0] if len(active) == 1 else active
    )


CACHE_ARGS = ("cache", "kv_cache", "past_key_values", "decode", "init_cache")
"""Root-call arguments that mean cached decoding, which a plain root call cannot follow (``jpeft.generate`` does)."""


def _refuse_cache(model: nnx.Module, method: Method, args: tuple, kwargs: dict) -> None:
    """Refuses a root call that decodes through a KV cache: each step would get the P virtual
    positions again (prompts) or miss them in the cache (prefixes), silently wrong. A caller's own
    sampler (tunix's ``Sampler``) cannot say which call is the prefill, so ``jpeft.generate``
    (``jpeft._generate_nnx``) decodes these methods: it writes the virtual positions once."""
    import inspect

    try:
        bound = inspect.signature(type(model)._jpeft_base.__call__).bind(model, *args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    used = [k for k in CACHE_ARGS if bound.get(k) is not None and bound.get(k) is not False]
    if used:
        raise JpeftError(
            f"{type(method).__name__} on an NNX model: the root call got {used[0]}=..., cached decoding, which a "
            "plain call of a prompt or prefix method cannot follow (each step would see the virtual positions again, "
            "and a sampler's masks and positions leave no room for them). Decode with jpeft.generate(model, "
            "input_ids, max_new_tokens) (tunix's decoders), which puts them in the cache once, or call the model on "
            "the whole sequence."
        )


def inside(model: nnx.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(model, *args, **kwargs)`` with the root hook off for ``model`` (the rest of its adapted call)."""
    old = getattr(_nnx._CALL, "root", None)
    _nnx._CALL.root = model
    try:
        return fn(model, *args, **kwargs)
    finally:
        _nnx._CALL.root = old


def _same(a: Any, b: Any) -> bool:
    """Whether two delta stores have the same leaf paths."""
    paths = lambda t: sorted(_tree.list_paths(t)) if isinstance(t, Mapping) else None  # noqa: E731
    return paths(a) == paths(b)


def _variables(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return nnx.Dict({k: _variables(v) for k, v in tree.items()})
    return _Materialized(tree)


@contextlib.contextmanager
def installed(model: nnx.Module, params: PyTree, name: str, method: Method, active: tuple[str, ...]) -> Iterator[None]:
    """For the block, each module holds adapter ``name``'s deltas as ``params`` (from ``materialize``) has them.

    Modules whose store already matches are left alone; the others get the computed leaves (and,
    if they had no deltas, an adapted class) until the block ends.
    """
    undo: list[Callable[[], None]] = []
    try:
        for path, module in _nnx.modules(model).items():
            node = _node(params, path)
            store = node.get(RESERVED) if isinstance(node, Mapping) else None
            if not isinstance(store, Mapping) or name not in store:
                continue
            held = vars(module).get(RESERVED)
            if held is not None and name in held and _same(_nnx.values(held[name]), store[name]):
                continue
            undo.append(_install(module, path, name, method, active, store[name]))
        yield
    finally:
        for fn in reversed(undo):
            fn()


def _node(params: PyTree, path: Path) -> Any:
    node = params
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


def _install(
    module: nnx.Module, path: Path, name: str, method: Method, active: tuple, leaves: Any
) -> Callable[[], None]:
    """Puts ``leaves`` on ``module`` as adapter ``name``; returns the function that undoes it."""
    saved = {k: vars(module)[k] for k in ("_jpeft_path", "_jpeft_methods", "_jpeft_active") if k in vars(module)}
    cls = type(module)
    held = vars(module).get(RESERVED)
    old = None if held is None or name not in held else held[name]
    if held is None:
        setattr(module, RESERVED, nnx.Dict({name: _variables(leaves)}))
        object.__setattr__(module, "__class__", _nnx.adapted_class(cls))
    else:
        held[name] = _variables(leaves)
    module._jpeft_path = tuple(path)
    module._jpeft_methods = tuple(p for p in saved.get("_jpeft_methods", ()) if p[0] != name) + ((name, method),)
    module._jpeft_active = tuple(active)

    def undo() -> None:
        if held is None:
            delattr(module, RESERVED)
        elif old is None:
            del held[name]
        else:
            held[name] = old
        for k in ("_jpeft_path", "_jpeft_methods", "_jpeft_active"):
            if k in saved:
                setattr(module, k, saved[k])
            else:
                delattr(module, k)
        object.__setattr__(module, "__class__", cls)

    return undo


# --- merge: whole-tree folds (prefix tuning's MLP, P-tuning's encoder) ----------------------------
def folded_method(method: Method) -> Method | None:
    """The method that runs what ``method.merge_tree`` returns, or ``None`` when it has no such fold."""
    for attr in ("folded_method", "prompt_method"):
        fn = getattr(method, attr, None)
        if fn is not None:
            return fn()
    return None


def merge_tree(method: Method, model: nnx.Module, name: str) -> nnx.Module | None:
    """``jpeft.merge`` for a method with a whole-tree fold: a new model that runs the folded method.

    ``None`` when ``method.merge_tree`` has no fold for it (the per-module path applies). The new
    model holds, under ``name``, the folded leaves (plain prefixes, a cached prompt) as the method's
    ``folded_method()`` / ``prompt_method()`` would have made them, and runs that method.
    """
    folded = method.merge_tree(_nnx.tree(model), name)
    if folded is None:
        return None
    runner = folded_method(method)
    if runner is None:
        raise JpeftError(
            f"jpeft.merge({type(method).__name__}) on an NNX model: the method folds its deltas into another "
            "method's tree but names no method to run it (folded_method() or prompt_method()). Merge on linen."
        )
    new = _nnx_apply.copy(model)
    for path, module in _nnx.modules(new).items():
        node = _node(folded, path)
        store = node.get(RESERVED, {}) if isinstance(node, Mapping) else {}
        held = vars(module).get(RESERVED)
        if name not in store:
            if held is not None and name in held:
                _nnx_apply.remove(module, name)
            continue
        variables = _nnx_apply.make_variables(runner, tuple(path) + (RESERVED, name), store[name], None)
        if held is None:
            setattr(module, RESERVED, nnx.Dict({name: variables}))
            object.__setattr__(module, "__class__", _nnx.adapted_class(type(module)))
            module._jpeft_path = tuple(path)
            module._jpeft_methods = ((name, runner),)
            module._jpeft_active = _nnx_apply.active_names(model) or (name,)
        else:
            held[name] = variables
            module._jpeft_methods = tuple(p for p in module._jpeft_methods if p[0] != name) + ((name, runner),)
    if "_jpeft_root" in vars(new):
        new._jpeft_root = tuple((n, runner if n == name else m) for n, m in new._jpeft_root)
    return new
