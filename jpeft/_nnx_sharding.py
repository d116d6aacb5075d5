"""Sharding of jpeft deltas on NNX models: derived specs, and sharding metadata on the delta Variables.

Two ways to shard an NNX model from ``jpeft.apply``, with the same rules as on linen (deltas follow
their base weight: LoRA's ``A`` the weight's input axes, ``B`` its output axes, the stacked layer
axis of ``nnx.vmap`` included, the rank axis replicated; see ``jpeft._sharding``):

* **Derived specs.** ``jpeft.partition_specs(method, model, base_specs)`` with ``base_specs`` the
  base model's specs, an ``nnx.State`` (``nnx.get_partition_spec(nnx.state(base_model))``) or a
  nested dict by state path, returns an ``nnx.State`` of ``PartitionSpec`` with the structure of
  ``nnx.state(model)``: map it to ``NamedSharding`` s and ``jax.device_put`` the state.
* **Metadata (NNX-idiomatic).** When a target module's weight ``Variable`` carries sharding
  metadata (``out_sharding``, e.g. from ``nnx.with_partitioning``; logical names and
  ``sharding_rules`` included), ``jpeft.apply`` gives each delta ``Variable`` the ``out_sharding``
  derived from it (same vocabulary: mesh or logical axis names; ``sharding_rules`` and ``mesh``
  copied), so ``nnx.get_partition_spec(nnx.state(model))`` covers the deltas and the usual
  ``nnx.jit`` + ``with_sharding_constraint`` recipe shards them. Deltas are sharded eagerly at
  creation only when the weight was (``eager_sharding``) and a mesh is known (the ``mesh``
  metadata or ``jax.set_mesh``); otherwise ``apply`` works anywhere and sharding happens when you
  place the state.

Quantised kernels (``jpeft.quantize``: ``NF4Array``, ``IntArray``) get the derived specs of their
codes and scales from ``jpeft.partition_specs`` (an ``IntArray`` / ``NF4Array`` of specs inside the
kernel's ``Variable``; see ``jpeft._sharding``), exactly as on linen, and their deltas follow the
logical kernel in both routes. The kernel ``Variable`` itself keeps the float kernel's
``out_sharding`` metadata, one spec for the whole quantised node, which the codes and scales do
not all share: place a quantised model through the derived specs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx
from jax.sharding import PartitionSpec

from jpeft import _nnx, _nnx_linear, _tree
from jpeft._errors import JpeftError
from jpeft._method import Context, Method
from jpeft._sharding import derive
from jpeft._tree import RESERVED, Path, join

_TREE = (nnx.Param, _nnx.FrozenDelta)  # the variables of jpeft's tree view (``_nnx.tree``)


def _given(base_specs: Any) -> dict[Path, Any]:
    """``base_specs`` (an ``nnx.State`` of specs or a nested dict) flattened to {str path: spec}."""
    if isinstance(base_specs, nnx.State):
        return {
            tuple(str(k) for k in p): (v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(base_specs)
        }
    if isinstance(base_specs, Mapping):
        return dict(_flatten(base_specs, ()))
    raise JpeftError(
        f"jpeft.partition_specs: base_specs for an NNX model must be an nnx.State of specs "
        f"(nnx.get_partition_spec(nnx.state(base_model))) or a nested dict by state path; got {type(base_specs).__name__}."
    )


def _flatten(tree: Mapping[str, Any], path: Path) -> list[tuple[Path, Any]]:
    out: list[tuple[Path, Any]] = []
    for k, v in tree.items():
        out.extend(_flatten(v, path + (str(k),)) if isinstance(v, Mapping) else [(path + (str(k),), v)])
    return out


def partition_specs(method: Method, model: nnx.Module, base_specs: Any, *, mesh: Any = None) -> nnx.State:
    """``jpeft.partition_specs`` for an NNX model: an ``nnx.State`` of ``PartitionSpec``.

    Every ``nnx.Param`` of the base (non-delta) must have an entry in ``base_specs`` (``None`` or
    ``PartitionSpec()``: replicated); other base variables (rng counts, batch statistics, caches)
    take theirs when given and are otherwise replicated. Delta entries in ``base_specs`` are
    ignored. Paths are state paths (a weight kept as ``w`` is ``w`` here).

    Example:
      >>> import jax, jpeft
      >>> from flax import nnx
      >>> from jax.sharding import PartitionSpec as P
      >>> model = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
      >>> method = jpeft.LoRA(targets=".*", rank=2)
      >>> peft = jpeft.apply(method, model, key=jax.random.key(0))
      >>> specs = jpeft.partition_specs(method, peft, {"kernel": P("data", "model"), "bias": None})
      >>> specs["__jpeft__"]["default"]["lora_a"].get_value(), specs["__jpeft__"]["default"]["lora_b"].get_value()
      (P('data', None), P(None, 'model'))
    """
    where = f"jpeft.partition_specs({type(method).__name__})"
    if not isinstance(method, Method):
        raise JpeftError(
            f"jpeft.partition_specs expects a jpeft method first; got {type(method).__name__}. "
            "Call jpeft.partition_specs(method, model, base_specs)."
        )
    given = _given(base_specs)
    renames = _nnx.renames(model)
    state = nnx.state(model)
    flat = [(p, tuple(str(k) for k in p), v) for p, v in nnx.to_flat_state(state)]
    view_specs: dict[str, Any] = {}
    for _, p, var in flat:
        if RESERVED in p or not isinstance(var, _TREE):
            continue
        if p not in given:
            raise JpeftError(
                f"{where}: base_specs has no entry for the base variable {join(p)!r} ({type(var).__name__}, "
                f"shape {tuple(var.shape)}). Pass nnx.get_partition_spec(nnx.state(base_model)), or a dict by "
                "state path with None for replicated leaves."
            )
        _set(view_specs, renames.get(p, p), given[p])
    view = _nnx.tree(model)
    out = derive(method, view, view_specs, mesh, _nnx.NnxContext(view, _nnx.modules(model)))
    specs = []
    for key, p, var in flat:
        if isinstance(var, _TREE):
            spec = _tree.get(out, renames.get(p, p))
        else:
            spec = given.get(p)
            spec = PartitionSpec() if spec is None else spec
        specs.append((key, var.replace(spec)))
    return nnx.from_flat_state(specs)


def _set(tree: dict[str, Any], path: Path, value: Any) -> None:
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value


# --- metadata on the delta Variables -------------------------------------------------------------
def delta_metadata(
    method: Method, module: nnx.Module, path: Path, own: Mapping[str, Any], deltas: Any, ctx: Context, name: str
) -> Any:
    """Per delta leaf, the Variable metadata (``out_sharding`` ...) derived from the module's weights.

    ``None`` when no variable of the module carries ``out_sharding`` metadata.
    """
    linear = _nnx_linear.record(module)
    variables = {leaf: vars(module).get(_nnx_linear.weight_attr(linear, leaf)) for leaf in own}
    annotated = {
        leaf: var
        for leaf, var in variables.items()
        if isinstance(var, nnx.Variable) and var.get_metadata().get("out_sharding")
    }
    if not annotated:
        return None
    kernel = annotated.get("kernel", annotated.get("embedding", next(iter(annotated.values()))))
    meta = kernel.get_metadata()
    base = {
        leaf: PartitionSpec(*annotated[leaf].get_metadata()["out_sharding"]) if leaf in annotated else None
        for leaf in own
    }
    mini_tree: dict[str, Any] = {}
    mini_specs: dict[str, Any] = {}
    for leaf, x in own.items():
        _set(mini_tree, tuple(path) + (leaf,), x)
        _set(mini_specs, tuple(path) + (leaf,), base[leaf])
    _set(mini_tree, tuple(path) + (RESERVED, name), deltas)
    specs = _tree.get(derive(method, mini_tree, mini_specs, None, ctx), tuple(path) + (RESERVED, name))
    extra = {k: meta[k] for k in ("sharding_rules", "mesh") if meta.get(k) is not None}
    mesh = meta.get("mesh") or _global_mesh()
    extra["eager_sharding"] = bool(meta.get("eager_sharding")) and mesh is not None

    def to_metadata(spec: Any) -> Any:
        if isinstance(spec, Mapping):
            return {k: to_metadata(v) for k, v in spec.items()}
        return {"out_sharding": tuple(spec), **extra}

    return to_metadata(specs)


def _global_mesh() -> Any:
    """The mesh set by ``jax.set_mesh`` (or ``with mesh:``), or None."""
    from flax.core import meta

    mesh = meta.get_global_mesh()
    if mesh is None or getattr(mesh, "empty", False):
        return None
    return mesh
