"""Sharding specs for delta leaves, derived from the specs of the base leaves beside them.

A delta leaf sits next to the kernel it modifies, so its sharding follows from the kernel's:

* LoRA factors (``lora_a: (*S, *in, r)``, ``lora_b: (*S, r, *out)``) take the kernel's stack axes
  ``S`` (the layer axis of ``nn.scan``), ``a`` its input-axis sharding and ``b`` its output-axis
  sharding; the rank axis is replicated. Per-output-feature vectors (DoRA's ``magnitude``,
  ``(*S, *out)``) follow the output axes. The kernel layout (transposed GPT-2 ``Conv1D``,
  multi-axis ``DenseGeneral``, ``Conv``) comes from the layout registry, as in ``jpeft.apply``.
* Any other delta leaf, unless its method overrides :meth:`jpeft.Method.partition_spec`, is
  replicated, except for leading axes that equal the kernel's stack axes, which keep their
  sharding.

A composition (``jpeft.compose``) nests each component's leaves under the component's key; each
component's leaves follow its own layouts and hook.

A quantised base kernel (any ``jpeft.quant._nf4.QuantizedArray``: :class:`jpeft.NF4Array` or
:class:`jpeft.IntArray`, from ``jpeft.quantize``) takes its spec in ``base_specs`` as for the float
kernel it stands for (its logical shape ``(*S, d0, d1)``, spec ``(s, e0, e1)``); its children get
specs derived from it:

* NF4: ``codes: (*S, d0 d1 / 2)`` holds the kernel row-major, so splitting its last axis like
  ``d0`` (``e0``) gives each device whole rows: ``(s, e0)``. A split of ``d1`` cannot be expressed
  on the flat axis and is dropped (replicated). The scale arrays (``absmax``, ``absmax_scale``,
  about 1/32 of the codes) keep only ``s``.
* INT8 / INT4: ``codes: (*S, d0, d1)`` (INT4: ``(*S, d0 / 2, d1)``, two rows a byte) keep the
  kernel's spec ``(s, e0, e1)``; ``scales: (*S, d0 / block, d1)`` are split like the columns only,
  ``(s, None, e1)``: every device holds the scales of its columns' blocks, so dequantising its
  rows needs no communication whatever the block size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jax.sharding import PartitionSpec

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._layout import Layout
from jpeft._method import Context, Method
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.quant._int import IntArray
from jpeft.quant._nf4 import NF4Array, QuantizedArray

Spec = tuple[Any, ...]
"""A partition spec as a tuple with one entry per array axis: ``None``, a mesh axis or a tuple of them."""


def _normalize(where: str, path: Path, spec: Any, shape: tuple[int, ...]) -> Spec:
    if spec is None:
        return (None,) * len(shape)
    if not isinstance(spec, PartitionSpec):
        raise JpeftError(
            f"{where}: base_specs at {join(path)!r} is {spec!r} ({type(spec).__name__}); expected a "
            "jax.sharding.PartitionSpec or None (replicated), e.g. PartitionSpec(None, 'model')."
        )
    entries = tuple(spec)
    if len(entries) > len(shape):
        raise JpeftError(
            f"{where}: base_specs at {join(path)!r} is {spec} with {len(entries)} entries, but the leaf "
            f"has shape {shape} ({len(shape)} axes). Give at most one entry per axis."
        )
    axes = [a for e in entries for a in (e if isinstance(e, tuple) else (e,)) if a is not None]
    if len(set(axes)) != len(axes):
        raise JpeftError(
            f"{where}: base_specs at {join(path)!r} is {spec}, which names a mesh axis more than once; "
            "a mesh axis can split at most one array axis. Use each mesh axis once, e.g. P('data', 'model')."
        )
    return entries + (None,) * (len(shape) - len(entries))


def _kernel_layout(method: Method, path: Path, own: Mapping[str, Any], ctx: Context) -> Layout | None:
    """The layout of the module's kernel, or None when the module is not a linear module."""
    if "kernel" not in own and "embedding" not in own:
        return None
    try:
        return ctx.layout(method._name(), path, own, tuple(getattr(method, "layouts", ())))
    except JpeftError:
        return None


def _lora_rule(leaf: str, shape: tuple[int, ...], kernel_shape: tuple[int, ...], kspec: Spec, layout: Layout) -> Spec | None:
    """The spec of a LoRA-family leaf, or None when ``leaf``/``shape`` is not one."""
    stack, d_in, d_out = layout.split(kernel_shape)
    n = len(stack)
    core = kspec[n:]
    if layout.kind == "transposed":
        in_spec, out_spec = core[1:], core[:1]
    else:
        in_spec, out_spec = core[: len(d_in)], core[len(d_in) :]
    s = kspec[:n]
    if leaf == "lora_a" and len(shape) == n + len(d_in) + 1 and shape[:-1] == stack + d_in:
        return s + in_spec + (None,)
    if leaf == "lora_b" and len(shape) == n + 1 + len(d_out) and shape[:n] + shape[n + 1 :] == stack + d_out:
        return s + (None,) + out_spec
    if leaf == "magnitude" and shape == stack + d_out:
        return s + out_spec
    return None


def _default_rule(shape: tuple[int, ...], kernel_shape: tuple[int, ...] | None, kspec: Spec | None, n_stack: int) -> Spec:
    """Replicated, except leading axes equal to the kernel's stack axes, which keep their sharding."""
    if kernel_shape is None or kspec is None or n_stack == 0 or shape[:n_stack] != kernel_shape[:n_stack]:
        return (None,) * len(shape)
    return kspec[:n_stack] + (None,) * (len(shape) - n_stack)


CHILDREN = {NF4Array: ("codes", "absmax", "absmax_scale", "absmax_offset"), IntArray: ("codes", "scales")}
"""The array children of each quantised kernel type, which get specs of their own."""


def _quantised_specs(kspec: Spec, q: QuantizedArray) -> QuantizedArray:
    """The specs of a quantised kernel's children, from the spec of its logical shape ``(*S, d0, d1)``."""
    s = kspec[:-2]

    def of(child: Any, spec: Spec) -> PartitionSpec | None:
        return None if child is None else PartitionSpec(*spec)

    if isinstance(q, IntArray):  # codes keep the kernel's axes; scales follow its columns
        return dataclasses.replace(q, codes=of(q.codes, kspec), scales=of(q.scales, s + (None,) + kspec[-1:]))
    assert isinstance(q, NF4Array), type(q)  # CHILDREN names every QuantizedArray type
    return dataclasses.replace(
        q,
        codes=of(q.codes, s + kspec[-2:-1]),
        absmax=of(q.absmax, s + (None,)),
        absmax_scale=of(q.absmax_scale, s + (None,)),
        absmax_offset=of(q.absmax_offset, s),
    )


def _component(method: Method, key: str) -> Method:
    """The component of a composition (``jpeft.compose``) stored under ``key``, else ``method``."""
    keys, methods = getattr(method, "keys", None), getattr(method, "methods", None)
    if isinstance(keys, tuple) and isinstance(methods, tuple) and key in keys:
        return methods[keys.index(key)]
    return method


def _axis_size(mesh_shape: Mapping[str, int], entry: Any) -> tuple[int, tuple[str, ...]]:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh_shape[a] for a in names), names


def _validate(
    where: str, path: Path, shape: tuple[int, ...], spec: Spec, mesh_shape: Mapping[str, int], note: str = ""
) -> None:
    for axis, (dim, entry) in enumerate(zip(shape, spec, strict=True)):
        if entry is None or entry is PartitionSpec.UNCONSTRAINED:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        unknown = [a for a in names if a not in mesh_shape]
        if unknown:
            raise JpeftError(
                f"{where}: {join(path)!r} (shape {shape}) has spec {PartitionSpec(*spec)}, whose axis {axis} "
                f"names mesh axis {unknown[0]!r}; the mesh has axes {dict(mesh_shape)}. Use one of those names."
            )
        size, _ = _axis_size(mesh_shape, entry)
        if dim % size:
            raise JpeftError(
                f"{where}: {join(path)!r} has shape {shape} and spec {PartitionSpec(*spec)}: axis {axis} "
                f"(size {dim}) is split over mesh axis {entry!r} of size {size}, which does not divide it. "
                "Shard another axis, use a mesh axis whose size divides it, or replicate (None)." + note
            )


def partition_specs(method: Method, peft_params: PyTree, base_specs: PyTree, *, mesh: Any = None) -> PyTree:
    """Derives a ``PartitionSpec`` for every leaf of a tree from :func:`jpeft.apply`.

    Base leaves keep their spec from ``base_specs``. Delta leaves follow the kernel of their module
    (kernel ``(*S, *in, *out)`` with spec ``(s, i, o)``, or ``(*S, out, in)`` for transposed
    layouts):

    * ``lora_a: (*S, *in, r)`` gets ``(s, i, None)`` and ``lora_b: (*S, r, *out)`` gets
      ``(s, None, o)``: the rank axis is replicated;
    * per-output-feature vectors ``magnitude: (*S, *out)`` (DoRA) get ``(s, o)``;
    * other delta leaves get what their method's :meth:`jpeft.Method.partition_spec` returns, and by
      default are replicated, except leading axes equal to the kernel's stack axes ``S``, which
      keep ``s``.

    A quantised kernel takes the spec of its logical shape ``(*S, d0, d1)`` in ``base_specs``,
    ``(s, e0, e1)``. A :class:`jpeft.NF4Array`'s children get ``codes: (s, e0)`` (the codes are the
    kernel's rows, flattened) and ``absmax``, ``absmax_scale``: ``(s, None)``, ``absmax_offset:
    (s,)``: ``e1`` and the small scale arrays are not split. A :class:`jpeft.IntArray` (INT8 /
    INT4) keeps ``codes: (s, e0, e1)`` and gets ``scales: (s, None, e1)``.

    Args:
      method: the method that made the deltas.
      peft_params: the tree from :func:`jpeft.apply` (arrays or ``jax.ShapeDtypeStruct`` leaves).
      base_specs: a tree with the structure of the *base* params whose leaves are
        ``PartitionSpec`` or ``None`` (replicated), e.g. from ``nn.get_partition_spec`` or made by
        hand. Delta subtrees in it, if any, are ignored.
      mesh: an optional ``jax.sharding.Mesh`` (or ``AbstractMesh``) to validate every spec against:
        known axis names, and mesh axis sizes that divide the dimensions they split.

    Returns:
      A tree of ``PartitionSpec`` with the structure of ``peft_params`` (as plain dicts, and an
      ``NF4Array`` / ``IntArray`` of specs for each quantised kernel), one entry per array axis. Wrap it with
      ``jax.tree.map(lambda s: NamedSharding(mesh, s), specs)`` for ``jax.jit`` or
      ``jax.device_put``.

    Raises:
      JpeftError: if ``base_specs`` misses a base leaf or holds something other than a
        ``PartitionSpec``, a spec has more entries than its leaf has axes, or (with ``mesh``) a spec
        names an unknown mesh axis or a mesh axis whose size does not divide the dimension.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> from jax.sharding import PartitionSpec as P
      >>> params = {"q": {"kernel": jnp.ones((8, 16)), "bias": jnp.ones(16)}}
      >>> method = jpeft.LoRA(targets=["q"], rank=2)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> specs = jpeft.partition_specs(method, peft, {"q": {"kernel": P("data", "model"), "bias": None}})
      >>> specs["q"]["__jpeft__"]["default"]
      {'lora_a': P('data', None), 'lora_b': P(None, 'model')}

    On an NNX model (``jpeft.apply`` of an ``nnx.Module``), ``base_specs`` is an ``nnx.State`` of
    specs (``nnx.get_partition_spec(nnx.state(base_model))``) or a nested dict by state path, and the
    result is an ``nnx.State`` of specs with the structure of ``nnx.state(model)``; see
    ``jpeft._nnx_sharding``.
    """
    from jpeft import _nnx

    if _nnx.is_model(peft_params):
        from jpeft import _nnx_sharding

        return _nnx_sharding.partition_specs(method, peft_params, base_specs, mesh=mesh)
    return derive(method, peft_params, base_specs, mesh, None)


def derive(method: Method, peft_params: PyTree, base_specs: PyTree, mesh: Any, ctx: Context | None) -> PyTree:
    """:func:`partition_specs` on a tree, with the layouts of ``ctx`` (default: ``Context(peft_params)``)."""
    where = f"jpeft.partition_specs({type(method).__name__})"
    if not isinstance(method, Method):
        raise JpeftError(
            f"jpeft.partition_specs expects a jpeft method first; got {type(method).__name__}. "
            "Call jpeft.partition_specs(method, peft_params, base_specs)."
        )
    for arg, tree in (("peft_params", peft_params), ("base_specs", base_specs)):
        if not isinstance(tree, Mapping):
            raise JpeftError(f"{where}: {arg} must be a nested mapping; got {type(tree).__name__}.")
    mesh_shape = None if mesh is None else dict(mesh.shape)
    ctx = Context(peft_params) if ctx is None else ctx
    specs: dict[Path, Spec] = {}

    def spec_of(path: Path, leaf: Any) -> Spec:
        if path not in specs:
            try:
                given = _tree.get(base_specs, path)
            except (KeyError, TypeError):
                raise JpeftError(
                    f"{where}: base_specs has no entry for the base leaf {join(path)!r} "
                    f"(shape {tuple(leaf.shape)}). base_specs must have the structure of the base params, "
                    "e.g. nn.get_partition_spec(variables)['params'], with None for replicated leaves."
                ) from None
            if isinstance(given, Mapping):
                raise JpeftError(
                    f"{where}: base_specs at {join(path)!r} is a subtree, but the params hold a leaf of "
                    f"shape {tuple(leaf.shape)} there. base_specs must have the structure of the base params."
                )
            specs[path] = _normalize(where, path, given, tuple(leaf.shape))
        return specs[path]

    def visit(node: Mapping[str, Any], path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        own = {k: v for k, v in node.items() if not isinstance(v, Mapping) and v is not None}
        for k, v in node.items():
            if k == RESERVED:
                out[k] = {name: store_specs(path, own, method, store) for name, store in v.items()}
            elif isinstance(v, Mapping):
                out[k] = visit(v, path + (str(k),))
            elif isinstance(v, QuantizedArray):
                out[k] = _quantised_specs(spec_of(path + (str(k),), v), v)
            elif v is not None:
                out[k] = spec_of(path + (str(k),), v)
        return out

    def store_specs(path: Path, own: Mapping[str, Any], method: Method, store: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for leaf, x in store.items():
            if isinstance(x, Mapping):  # a composition keeps each component's leaves under its key
                out[leaf] = store_specs(path, own, _component(method, leaf), x)
            elif x is not None:
                out[leaf] = _delta(path, own, method, leaf, x)
        return out

    def _delta(path: Path, own: Mapping[str, Any], method: Method, leaf: str, x: Any) -> Spec:
        shape = tuple(x.shape)
        layout = _kernel_layout(method, path, own, ctx)
        kernel_shape = kspec = None
        n_stack = 0
        if layout is not None:
            kernel_shape = tuple(own[layout.leaf].shape)
            kspec = spec_of(path + (layout.leaf,), own[layout.leaf])
            n_stack = len(kernel_shape) - layout.core_ndim
        module_specs = {k: spec_of(path + (k,), v) for k, v in own.items()}
        spec = method.partition_spec(path, leaf, shape, own, module_specs, ctx)
        if spec is None and layout is not None:
            spec = _lora_rule(leaf, shape, kernel_shape, kspec, layout)
        if spec is None:
            spec = _default_rule(shape, kernel_shape, kspec, n_stack)
        spec = tuple(spec)
        if len(spec) != len(shape):
            raise JpeftError(
                f"{where}: {type(method).__name__}.partition_spec gave {spec} for "
                f"{join(path + (RESERVED, leaf))!r} of shape {shape}; expected one entry per axis."
            )
        return spec

    tree = visit(peft_params, ())
    out = _to_partition_specs(tree)
    if mesh_shape is not None:
        # Base leaves first: their specs are the user's, and the delta specs derive from them.
        for path, x in sorted(_tree.leaves(peft_params), key=lambda px: RESERVED in px[0]):
            if isinstance(x, QuantizedArray):  # the given logical spec, then the derived children
                _validate(where, path, tuple(x.shape), specs[path], mesh_shape)
                how = "second-to-last axis" if isinstance(x, NF4Array) else "axes (4-bit codes: two rows a byte)"
                for field in CHILDREN[type(x)]:
                    child = getattr(x, field)
                    if child is not None:
                        spec = tuple(getattr(_tree.get(out, path), field))
                        note = (
                            f" The spec is derived from {PartitionSpec(*specs[path])}, given for the quantised "
                            f"kernel {join(path)!r} of shape {tuple(x.shape)}: its codes are split like its {how}."
                        )
                        _validate(where, path + (field,), tuple(child.shape), spec, mesh_shape, note)
                continue
            _validate(where, path, tuple(x.shape), tuple(_tree.get(out, path)), mesh_shape)
    return out


def _to_partition_specs(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_partition_specs(v) for k, v in tree.items()}
    if isinstance(tree, QuantizedArray):  # its children hold PartitionSpecs already
        return tree
    return PartitionSpec(*tree)
