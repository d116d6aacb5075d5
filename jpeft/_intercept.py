"""The linen interceptor machinery and the registry of linear module types.

``jpeft.wrap`` enters ``flax.linen.intercept_methods`` with one interceptor. For each intercepted
``__call__`` whose module holds delta leaves of the active adapter in its *own* scope, it hands
control to the method. Reading deltas from the module's scope (not from a side table) is what lets
``nn.scan``, ``nn.vmap`` and ``nn.remat`` slice them together with the layer's weights.

The registry maps a linear module type to a :class:`Linear` record: its kernel layout, where its
input is, and how to apply a down-projection ``a`` to that input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jpeft._errors import JpeftError
from jpeft._layout import Layout
from jpeft._tree import RESERVED, join


def _first_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    for name in ("inputs", "x"):
        if name in kwargs:
            return kwargs[name]
    raise JpeftError(
        f"jpeft cannot find a linear module's input among {len(args)} positional args and kwargs "
        f"{sorted(kwargs)}. Register the module with jpeft.register_linear(T, jpeft.Linear(layout, "
        "inputs=lambda args, kwargs: ...)) to say where its input is."
    )


def _matmul_down(module: nn.Module, x: jax.Array, a: jax.Array) -> jax.Array:
    return x @ a


def _general_down(module: nn.Module, x: jax.Array, a: jax.Array) -> jax.Array:
    axes = tuple(ax % x.ndim for ax in _axes(module.axis))
    return lax.dot_general(x, a, ((axes, tuple(range(len(axes)))), ((), ())))


def _embed_down(module: nn.Module, ids: jax.Array, a: jax.Array) -> jax.Array:
    return jnp.take(a, ids, axis=0)


def _conv_down(module: nn.Module, x: jax.Array, a: jax.Array) -> jax.Array:
    conv = module.clone(parent=None, features=a.shape[-1], use_bias=False, dtype=a.dtype, name=None)
    return conv.apply({"params": {"kernel": a}}, x)


def _axes(axis: Any) -> tuple[int, ...]:
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def _features(features: Any) -> tuple[int, ...]:
    return tuple(features) if isinstance(features, (tuple, list)) else (features,)


def _general_layout(module: nn.Module) -> Layout:
    if _axes(module.batch_dims):
        raise JpeftError(
            f"{type(module).__name__} at {join(module.path)!r} has batch_dims={module.batch_dims}; "
            "jpeft supports DenseGeneral without batch_dims only."
        )
    return Layout("dense_general", n_in=len(_axes(module.axis)), n_out=len(_features(module.features)))


def _conv_layout(module: nn.Module) -> Layout:
    if module.feature_group_count != 1:
        raise JpeftError(
            f"nn.Conv at {join(module.path)!r} has feature_group_count={module.feature_group_count}; "
            "LoRA on grouped convolutions is not supported. Exclude it from targets."
        )
    size = module.kernel_size
    n = 1 if isinstance(size, int) else len(size)
    return Layout("conv", n_in=n + 1)


@dataclasses.dataclass(frozen=True)
class Linear:
    """How jpeft treats one linear module type.

    Attributes:
      layout: the kernel layout, or a function of the bound module that returns it.
      down: ``down(module, x, a) -> h`` applies the down factor ``a`` (without stack axes) to the
        module's input ``x`` and returns ``h`` of shape ``(..., r)``.
      inputs: ``inputs(args, kwargs) -> x`` finds the input among the call's arguments.
      weight: on a ``flax.nnx`` module, the attribute that holds the kernel when it is not named
        like the layout's leaf (``'kernel'``, ``'embedding'``): tunix's attention ``Einsum`` keeps
        it in ``w``. jpeft shows it to methods, and in its trees, under the layout's leaf name.
      place: ``place(module, d) -> y`` moves an array whose trailing axes are the layout's output
        axes (``x a b``, a per-output-feature scale) to where the module's output holds them
        (tunix Gemma 3's ``kv_einsum`` returns ``(2, B, T, K, H)``); ``None`` when they end it.

    Example:
      >>> import jpeft
      >>> jpeft.Linear(layout=jpeft.Layout("dense")).layout.kind  # what jpeft.register_linear(nn.Dense, ...) holds
      'dense'
    """

    layout: Layout | Callable[[nn.Module], Layout]
    down: Callable[[nn.Module, jax.Array, jax.Array], jax.Array] = _matmul_down
    inputs: Callable[[tuple[Any, ...], dict[str, Any]], Any] = _first_arg
    weight: str | None = None
    place: Callable[[nn.Module, jax.Array], jax.Array] | None = None

    def layout_of(self, module: nn.Module) -> Layout:
        return self.layout(module) if callable(self.layout) else self.layout

    def to_output(self, module: nn.Module, d: jax.Array) -> jax.Array:
        """``d`` (output axes last, in the layout's order) in the module's output order (see ``place``)."""
        return d if self.place is None else self.place(module, d)


_REGISTRY: dict[type, Linear] = {
    nn.Dense: Linear(Layout("dense")),
    nn.DenseGeneral: Linear(_general_layout, _general_down),
    nn.Embed: Linear(Layout("embed"), _embed_down),
    nn.Conv: Linear(_conv_layout, _conv_down),
}


def register_linear(module_type: type, linear: Linear) -> None:
    """Registers how jpeft treats a custom linear module type.

    Args:
      module_type: a ``flax.linen.Module`` or ``flax.nnx.Module`` subclass whose ``__call__`` is a
        linear map of its first argument through the leaf named by the layout (``kernel`` or
        ``embedding``; on NNX, or the attribute ``linear.weight`` names).
      linear: its :class:`Linear` record.

    Example:
      >>> import flax.linen as nn, jpeft
      >>> class MyDense(nn.Dense):
      ...   pass
      >>> jpeft.register_linear(MyDense, jpeft.Linear(jpeft.Layout("dense")))
    """
    from flax import nnx

    if not (isinstance(module_type, type) and issubclass(module_type, (nn.Module, nnx.Module))):
        raise JpeftError(
            f"register_linear expects a flax.linen.Module or flax.nnx.Module subclass; got {module_type!r}."
        )
    _REGISTRY[module_type] = linear


def _hf_types() -> dict[type, Linear]:
    """HF Flax GPT-2's Conv1D, whose kernel is stored (out, in), when transformers is installed."""
    import sys

    gpt2 = sys.modules.get("transformers.models.gpt2.modeling_flax_gpt2")
    return {gpt2.FlaxConv1D: Linear(Layout("transposed"))} if gpt2 is not None else {}


def linear_of(module: nn.Module) -> Linear:
    """Returns the registry record of a module, searching its type's MRO (an NNX view carries its own)."""
    own = getattr(module, "jpeft_linear", None)
    if isinstance(own, Linear):
        return own
    registry = {**_hf_types(), **_REGISTRY}
    for cls in type(module).__mro__:
        if cls in registry:
            return registry[cls]
    raise JpeftError(
        f"Module {join(module.path)!r} of type {type(module).__module__}.{type(module).__qualname__} "
        "holds jpeft deltas, but jpeft has no layout for this type. Register one with "
        "jpeft.register_linear(ModuleType, jpeft.Linear(jpeft.Layout('dense'), down=...)), or exclude "
        "the module from targets."
    )


Forward = Callable[[nn.Module, Callable[..., Any], tuple[Any, ...], dict[str, Any], Any], Any]
Base = Callable[[nn.Module, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


def _same_call(args: tuple, kwargs: dict, a: tuple, kw: dict) -> bool:
    """Whether ``(a, kw)`` are the very objects of ``(args, kwargs)`` (a method passed the input through)."""
    return (
        len(a) == len(args)
        and all(x is y for x, y in zip(a, args, strict=True))
        and kw.keys() == kwargs.keys()
        and all(kw[k] is kwargs[k] for k in kw)
    )


def _reuse(
    module: nn.Module, next_fun: Callable[..., Any], args: tuple, kwargs: dict, out: Any, reenter: bool = False
) -> Callable[..., Any]:
    """``next_fun`` that returns the precomputed ``out`` when called with the very same arguments.

    With ``reenter`` it never does: the method needs the module's own call to run again (parallel
    adapters intercept the projections inside it), so it always gets the real call.

    A method that changes the module's input (``(IA)^3``'s feed-forward ``l_ff`` scales it) calls
    ``next_fun`` with new arrays and gets the real module call on them: a second call inside one
    intercepted ``__call__``, for which Flax needs the scope's name reservations cleared (what it
    does itself after each compact call).
    """

    def fun(*a: Any, **kw: Any) -> Any:
        if not reenter and _same_call(args, kwargs, a, kw):
            return out
        if getattr(module, "scope", None) is None:  # an NNX view: a module object calls again freely
            return next_fun(*a, **kw)
        object.__setattr__(module, "scope", module.scope.rewound())
        state = getattr(module, "_state", None)
        if state is not None and hasattr(state, "autoname_cursor"):
            state.autoname_cursor = {}  # submodules of a registered custom layer keep their names
        return next_fun(*a, **kw)

    return fun


def site_call(
    module: Any,
    next_fun: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    store: Any,
    present: list[tuple[int, str]],
    forward_of: Callable[[str], Forward],
    index: Any = None,
    skip: Any = False,
    base: Base | None = None,
    reenter: bool = False,
) -> Any:
    """Runs one adapted module call: the backend-neutral core of both the linen and the NNX backend.

    ``module`` is the module view a method sees (a bound linen module, or ``jpeft._nnx.View``);
    ``store[name]`` its delta leaves per adapter, ``present`` the ``(position in active, name)``
    pairs it holds, and ``forward_of(name)`` the method ``forward`` of that adapter. See
    :func:`interceptor` for ``index``, ``skip`` (AdapterDrop), ``base`` and ``reenter``.
    """
    inner = next_fun if base is None else functools.partial(_base_call, base, module, next_fun)
    if skip is True:
        return inner(*args, **kwargs)
    if skip is not False:  # chosen at run time: compute the base once, then pick
        out = inner(*args, **kwargs)
        changed = _run(module, _reuse(module, inner, args, kwargs, out, reenter), args, kwargs, store, present, forward_of, None, reenter)
        return jax.tree.map(lambda o, c: jnp.where(skip, o, c), out, changed)
    return _run(module, inner, args, kwargs, store, present, forward_of, index, reenter)


def _base_call(base: Base, module: Any, next_fun: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    return base(module, next_fun, a, kw)


def _run(module, next_fun, args, kwargs, store, present, forward_of, index, reenter):
    if index is None:

        def run(k: int, *a: Any, **kw: Any) -> Any:
            if k == 0:
                return next_fun(*a, **kw)
            name = present[k - 1][1]
            return forward_of(name)(module, functools.partial(run, k - 1), a, kw, store[name])

        return run(len(present), *args, **kwargs)
    out = next_fun(*args, **kwargs)
    from jpeft import _gather  # one adapter's cost where the methods allow it

    gathered = _gather.mixed(module, out, args, kwargs, store, present, forward_of, index)
    if gathered is not None:
        return gathered
    reuse = _reuse(module, next_fun, args, kwargs, out, reenter)
    mixed = out
    for i, n in present:
        y = forward_of(n)(module, reuse, args, kwargs, store[n])
        # A block's output may be a tuple (hidden states, attention weights, ...): pick per leaf.
        mixed = jax.tree.map(
            lambda y, m, i=i: jnp.where((index == i).reshape((-1,) + (1,) * (y.ndim - 1)), y, m), y, mixed
        )
    return mixed


def interceptor(
    forward: Forward,
    active: str | tuple[str, ...],
    index: Any = None,
    drop: Callable[[nn.Module], Any] | None = None,
    base: Base | None = None,
    reenter: bool = False,
) -> Callable[..., Any]:
    """Returns an ``intercept_methods`` interceptor that runs ``forward`` on modules with deltas.

    ``forward(module, next_fun, args, kwargs, deltas)`` receives the intercepted module's own delta
    leaves (already sliced by any lifted transform). With several ``active`` names the adapters
    stack: each one's ``forward`` wraps the previous one's. With ``index`` (one int per example,
    ``-1`` for the base model) each row of the batch runs only adapter ``active[index[row]]``: the
    base output is computed once, and a ``forward`` that calls ``next_fun`` on the call's own
    arguments gets it back; one that changes the input gets the module run on the new input.
    Where the present adapters' methods share a ``gather_forward`` hook (the LoRA family), each row
    gathers its adapter's factors instead (``jpeft._gather``): one adapter's cost for any number.

    ``drop(module)`` (AdapterDrop) returns ``True`` to run the module without its deltas, ``False``
    to run them, or a traced bool to choose at run time.

    ``base(module, next_fun, args, kwargs)`` (by default ``next_fun(*args, **kwargs)``) is the
    module's output without the method's change; it is the innermost ``next_fun`` every
    ``forward`` sees and the output of skipped modules (QLoRA computes quantised layers there).

    ``reenter`` (``Method.reenters``): in the mixed-batch and runtime-drop paths, ``forward``'s
    ``next_fun`` always runs the module again instead of returning the precomputed base output.
    """
    names = (active,) if isinstance(active, str) else tuple(active)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (
            context.method_name != "__call__"
            or module.scope is None
            or not module.has_variable("params", RESERVED)
        ):
            return next_fun(*args, **kwargs)
        store = module.get_variable("params", RESERVED)
        present = [(i, n) for i, n in enumerate(names) if n in store]
        if not present:
            return next_fun(*args, **kwargs)
        skip = False if drop is None else drop(module)
        return site_call(module, next_fun, args, kwargs, store, present, lambda _: forward, index, skip, base, reenter)

    return intercept


Inner = Callable[[Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


@contextlib.contextmanager
def submodule_calls(module: Any, inner: Inner) -> Iterator[None]:
    """While active, each ``__call__`` of a submodule of ``module`` runs ``inner(sub, next_fun, args, kwargs)``.

    The backend-neutral seam for methods that re-enter the block they wrap (parallel adapters read
    one projection's input and add to another's output). ``sub`` is what a method sees of the
    submodule: a bound linen module, or on NNX a ``jpeft._nnx.View`` with its full path. Calls of
    ``module`` itself and of modules outside it run unchanged. Inner hooks run inside the method
    hooks of an adapted submodule (innermost, next to the module's own call), on both backends.
    """
    own = getattr(module, "submodule_calls", None)
    if own is not None:  # an NNX view brings its own hook
        with own(inner):
            yield
        return
    site = tuple(module.path)

    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or m.scope is None:
            return next_fun(*args, **kwargs)
        path = tuple(m.path)
        if path[: len(site)] != site or path == site:
            return next_fun(*args, **kwargs)
        return inner(m, next_fun, args, kwargs)

    with nn.intercept_methods(intercept):
        yield


def method_interceptor(
    method: Any, active: str | tuple[str, ...], index: Any = None, drop: Callable[[nn.Module], Any] | None = None
) -> Callable[..., Any]:
    """:func:`interceptor` for a ``jpeft.Method``: its ``forward``, ``base_forward`` and ``reenters``."""
    return interceptor(method.forward, active, index, drop, base=method.base_forward, reenter=method.reenters)
