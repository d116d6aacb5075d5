"""Checkpoints of the deltas only: orbax-checkpoint arrays plus the method config as JSON.

A checkpoint directory holds one sub-directory per step, ``<path>/step_<n>``, written by orbax as
one composite checkpoint with three items:

* ``params``: the delta leaves of one adapter and the trainable base leaves (``jpeft.labels`` not
  ``'frozen'``: BitFit biases, ``extra_trainable`` heads), keyed by index;
* ``opt_state``: the leaves of the optimizer state, if one was given, keyed by index;
* ``meta``: JSON with the format version, the jpeft version, the method (class name and fields),
  the adapter name, the step, the '/'-joined paths, shapes and dtypes of the saved leaves, and the
  fingerprint of the *base* tree (the path, shape and dtype of every base leaf).

Saving is atomic: orbax writes into ``step_<n>.orbax-checkpoint-tmp-<t>`` and renames it to
``step_<n>`` only when everything is written, so a killed save leaves a temporary that
:func:`steps` and :func:`restore` never pick up. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from etils import epath

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import RESERVED, Path, PyTree, join

FORMAT = 1
"""The version of the checkpoint layout written by :func:`save`."""

_STEP = re.compile(r"step_(\d+)")
_COMMIT = "commit_success.txt"
_REPLACED = ".replaced"  # the old checkpoint while overwrite=True swaps in the new one
_REPLACEMENT = ".replacement"  # the new checkpoint while overwrite=True writes it

def _rename(src: epath.Path, dst: epath.Path) -> None:
    """The swap's renames go through here, so that a test can interrupt them."""
    src.rename(dst)


def _root(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute, or a remote one (``gs://...``) as it is."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpoint(NamedTuple):
    """What :func:`restore` returns; it unpacks as ``method, params, opt_state, step``.

    Attributes:
      method: the method rebuilt from the saved config.
      params: the base tree with the saved delta and trainable leaves attached.
      opt_state: the optimizer state, or ``None`` when no ``opt_state`` template was passed.
      step: the restored step.
    """

    method: Method
    params: PyTree
    opt_state: PyTree | None
    step: int


# --- the method as JSON ----------------------------------------------------------------------------
def _encode(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "__dataclass__": f"{type(value).__module__}:{type(value).__qualname__}",
            "fields": {f.name: _encode(getattr(value, f.name), f"{where}.{f.name}") for f in _init_fields(value)},
        }
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {"__mapping__": {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}}
    raise JpeftError(
        f"jpeft.save: the method field {where} = {value!r} ({type(value).__name__}) cannot be written as "
        "JSON. Method fields must be None, bool, int, float, str, tuples, str-keyed mappings or jpeft "
        "dataclasses of those."
    )


def _init_fields(obj: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(obj) if f.init]


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, list):  # frozen, hashable dataclasses hold tuples, never lists
        return tuple(_decode(v, where) for v in value)
    if isinstance(value, dict) and "__mapping__" in value:
        return {k: _decode(v, where) for k, v in value["__mapping__"].items()}
    if isinstance(value, dict) and "__dataclass__" in value:
        module, _, qualname = value["__dataclass__"].partition(":")
        cls = _jpeft_class(module, qualname, where)
        fields = {k: _decode(v, f"{where}.{k}") for k, v in value["fields"].items()}
        try:
            return cls(**fields)
        except TypeError as e:  # e.g. a field that this version of the class no longer has
            raise JpeftError(
                f"jpeft.restore: cannot rebuild the checkpoint's {where} as {qualname}(**{fields!r}): {e}. "
                "Pass the method yourself: jpeft.restore(path, params, method=...)."
            ) from None
    return value


def _jpeft_class(module: str, qualname: str, where: str) -> type:
    import importlib

    import jpeft

    cls = getattr(jpeft, qualname, None)
    if cls is None and (module == "jpeft" or module.startswith("jpeft.")) and "." not in qualname:
        cls = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise JpeftError(
            f"jpeft.restore: the checkpoint's {where} is a {module}.{qualname}, which jpeft "
            f"{jpeft.__version__} does not define. For a method of your own, pass it: "
            "jpeft.restore(path, params, method=MyMethod(...))."
        )
    return cls


def _method_json(method: Method) -> dict[str, Any]:
    """The method as JSON, checked to come back equal (methods defined outside jpeft are not rebuilt by
    name; :func:`restore` takes them as ``method=``)."""
    config = _encode(method, type(method).__name__)
    try:
        back = _decode(config, type(method).__name__)
    except JpeftError:  # not a jpeft class
        return config
    except (TypeError, ValueError):
        back = None
    if back != method:
        raise JpeftError(
            f"jpeft.save: {type(method).__name__} does not survive a JSON round trip (it came back as "
            f"{back!r}). Its fields must be None, bool, int, float, str, tuples, str-keyed mappings or jpeft "
            "dataclasses of those, and its __post_init__ must accept the values it stores."
        )
    return config


# --- the trees -------------------------------------------------------------------------------------
def _describe(x: Any) -> list[Any]:
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype  # Python scalars in some optax states
    return [list(np.shape(x)), str(np.dtype(dtype))]


def _base_leaves(params: PyTree) -> list[tuple[Path, Any]]:
    return [(p, x) for p, x in _tree.leaves(params) if RESERVED not in p]


def _fingerprint(leaves: list[list[Any]]) -> str:
    return hashlib.sha256(json.dumps(leaves, separators=(",", ":")).encode()).hexdigest()


def _step_dir(root: epath.Path, step: int) -> epath.Path:
    return root / f"step_{step}"


def _committed(directory: epath.Path) -> bool:
    return (directory / _COMMIT).is_file()


def steps(path: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints under ``path``, ascending.

    Temporaries of unfinished saves are ignored. A checkpoint that an interrupted ``overwrite=True``
    save had moved aside (``step_<n>.replaced``) counts as step ``n`` when ``step_<n>`` is missing.

    Example:
      >>> import jpeft.io, tempfile
      >>> jpeft.io.steps(tempfile.mkdtemp())
      []
    """
    root = _root(path)
    if not root.is_dir():
        return []
    found = set()
    for entry in root.iterdir():
        m = _STEP.fullmatch(entry.name.removesuffix(_REPLACED))
        if m and _committed(entry):
            found.add(int(m.group(1)))
    return sorted(found)


def _resolve(root: epath.Path, step: int) -> epath.Path:
    final = _step_dir(root, step)
    return final if _committed(final) else _with(final, _REPLACED)


def _with(path: epath.Path, suffix: str) -> epath.Path:
    return path.parent / (path.name + suffix)


def save(
    path: str | os.PathLike,
    method: Method,
    peft_params: PyTree,
    *,
    step: int,
    opt_state: PyTree | None = None,
    name: str = "default",
    overwrite: bool = False,
) -> str:
    """Saves one adapter's deltas, the trainable base leaves and (optionally) the optimizer state.

    Frozen base leaves are not written: a checkpoint is as small as what trains. The base tree's
    fingerprint (every base leaf's path, shape and dtype) is recorded so that :func:`restore`
    refuses another model. Call it outside ``jit``; in a multi-host run, call it on every process.

    Args:
      path: the checkpoint directory; step ``n`` goes to ``<path>/step_<n>``.
      method: the method that made the deltas; saved as JSON (class name and fields).
      peft_params: the tree from :func:`jpeft.apply`, after training.
      step: the training step, an int >= 0.
      opt_state: the optimizer state to save with it, e.g. from ``jpeft.optimizer(...).init``.
      name: the adapter to save.
      overwrite: replace an existing checkpoint of this step. The new one is written completely
        first and then swapped in by two renames; an existing step is never written in place.

    Returns:
      The directory of the new checkpoint.

    Raises:
      JpeftError: if the step exists and ``overwrite`` is False, the tree holds no deltas of
        adapter ``name``, ``step`` is not an int >= 0, or the method's fields cannot be JSON.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft, tempfile
      >>> params = {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
      >>> method = jpeft.LoRA(targets=["q"], rank=2)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> path = tempfile.mkdtemp()
      >>> _ = jpeft.save(path, method, peft, step=10)
      >>> restored = jpeft.restore(path, params)
      >>> restored.method == method, restored.step
      (True, 10)
      >>> bool((restored.params["q"]["__jpeft__"]["default"]["lora_a"] == peft["q"]["__jpeft__"]["default"]["lora_a"]).all())
      True

    References:
      orbax-checkpoint, https://orbax.readthedocs.io.
    """
    from jpeft.io import _nnx_checkpoint as nnx_io  # an NNX model: saved through its tree view

    if nnx_io.is_model(peft_params):
        return nnx_io.save(path, method, peft_params, step=step, opt_state=opt_state, name=name, overwrite=overwrite)
    import orbax.checkpoint as ocp

    import jpeft

    where = "jpeft.save"
    if not isinstance(method, Method):
        raise JpeftError(f"{where} expects a jpeft method; got {type(method).__name__}. Call {where}(path, method, peft_params, step=...).")
    if not isinstance(peft_params, Mapping):
        raise JpeftError(f"{where}: peft_params must be the nested mapping from jpeft.apply; got {type(peft_params).__name__}.")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise JpeftError(f"{where}(step={step!r}): step must be an int >= 0.")
    step = int(step)
    labels = jpeft.labels(method, peft_params)
    saved: list[tuple[Path, Any]] = []
    for p, x in _tree.leaves(peft_params):
        if RESERVED in p:
            if p[p.index(RESERVED) + 1] == name:
                saved.append((p, x))
        elif _tree.get(labels, p) != "frozen":
            saved.append((p, x))
    if method.has_deltas and not any(RESERVED in p for p, _ in saved):
        raise JpeftError(
            f"{where}({type(method).__name__}): the tree holds no deltas of adapter {name!r}. Pass the "
            "tree returned by jpeft.apply (and trained), and the adapter name it was made with."
        )
    if not saved:
        raise JpeftError(f"{where}({type(method).__name__}): no leaf of the tree trains, so there is nothing to save.")
    base = [[join(p), *_describe(x)] for p, x in _base_leaves(peft_params)]
    opt_leaves = None if opt_state is None else jax.tree.leaves(opt_state)
    meta = {
        "format": FORMAT,
        "jpeft_version": jpeft.__version__,
        "method": _method_json(method),
        "adapter": name,
        "step": step,
        "params": [[join(p), *_describe(x)] for p, x in saved],
        # Every module that holds the adapter, including empty delta nodes (QLoRA's quantised but
        # untargeted modules, LoRA-drop's markers of layers that share the root pair): restore
        # recreates them, since they have no leaf to carry them.
        "sites": [join(p) for p in _adapter_sites(peft_params, name)],
        "opt_state": None if opt_leaves is None else [_describe(x) for x in opt_leaves],
        "base": {"fingerprint": _fingerprint(base), "leaves": base},
    }
    items = {
        "params": ocp.args.StandardSave({f"{i:06d}": x for i, (_, x) in enumerate(saved)}),
        "meta": ocp.args.JsonSave(meta),
    }
    if opt_leaves:
        items["opt_state"] = ocp.args.StandardSave({f"{i:06d}": x for i, x in enumerate(opt_leaves)})

    root = _root(path)
    final = _step_dir(root, step)
    replaced, replacement = _with(final, _REPLACED), _with(final, _REPLACEMENT)
    exists = final.exists() or replaced.exists()
    if exists and not overwrite:
        raise JpeftError(
            f"{where}: a checkpoint of step {step} already exists at '{final}'. Save under another step, "
            "or pass overwrite=True to replace it (the new one is written first, then swapped in)."
        )
    primary = jax.process_index() == 0
    target = replacement if exists else final
    if primary:
        root.mkdir(parents=True, exist_ok=True)
        if target.exists():  # left by a save interrupted before it committed
            target.rmtree()
    _barrier("jpeft.save:prepare")
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(target, ocp.args.Composite(**items))
    if exists and primary:
        if final.exists():  # else an interrupted overwrite already moved it aside
            if replaced.exists():
                replaced.rmtree()
            _rename(final, replaced)
        _rename(target, final)
        replaced.rmtree()
    _barrier("jpeft.save:done")
    return str(final)


def _adapter_sites(tree: PyTree, name: str, path: Path = ()) -> list[Path]:
    """Paths of the modules whose delta store holds adapter ``name`` (empty stores included)."""
    if not isinstance(tree, Mapping):
        return []
    out = [path] if isinstance(tree.get(RESERVED), Mapping) and name in tree[RESERVED] else []
    for k, v in tree.items():
        if k != RESERVED:
            out.extend(_adapter_sites(v, name, path + (str(k),)))
    return out


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _mismatch(expected: list[list[Any]], found: list[list[Any]]) -> str:
    want = {p: (tuple(s), d) for p, s, d in expected}
    have = {p: (tuple(s), d) for p, s, d in found}
    lines = []
    for p in sorted(want.keys() | have.keys()):
        if want.get(p) != have.get(p):
            w = "missing" if p not in want else f"{want[p][0]} {want[p][1]}"
            h = "missing" if p not in have else f"{have[p][0]} {have[p][1]}"
            lines.append(f"  {p}: expected {w}, found {h}")
    more = f"\n  ... and {len(lines) - 5} more" if len(lines) > 5 else ""
    return "\n".join(lines[:5]) + more


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _delta_shardings(method: Method, abstract: PyTree, params: PyTree) -> Callable[[Path], jax.sharding.Sharding]:
    """Delta leaves follow the base's NamedSharding (via partition_specs) when it has one mesh."""
    from jax.sharding import NamedSharding

    from jpeft._sharding import partition_specs
    from jpeft.quant._int import IntArray

    def sharding(x: Any) -> Any:  # an INT8/INT4 kernel's codes keep its axes: their spec is the kernel's
        return getattr(x.codes if isinstance(x, IntArray) else x, "sharding", None)

    named = [sharding(x) for _, x in _base_leaves(params) if isinstance(sharding(x), NamedSharding)]
    meshes = {s.mesh for s in named}
    if len(meshes) != 1:
        return lambda _: _default_sharding()
    (mesh,) = meshes

    def base_spec(_: Path, x: Any) -> Any:
        s = sharding(x)
        return s.spec if isinstance(s, NamedSharding) and s.mesh == mesh else None

    specs = partition_specs(method, abstract, _map_leaves(base_spec, params))
    return lambda p: NamedSharding(mesh, _tree.get(specs, p))


def _map_all(fn: Callable[[Path, Any], Any], tree: PyTree, path: Path = ()) -> PyTree:
    if isinstance(tree, Mapping):
        return {k: _map_all(fn, v, path + (str(k),)) for k, v in tree.items()}
    return fn(path, tree)


def _map_leaves(fn: Callable[[Path, Any], Any], tree: PyTree, path: Path = ()) -> PyTree:
    if isinstance(tree, Mapping):
        return {k: _map_leaves(fn, v, path + (str(k),)) for k, v in tree.items() if k != RESERVED}
    return fn(path, tree)


def restore(
    path: str | os.PathLike,
    params: PyTree,
    *,
    step: int | None = None,
    opt_state: PyTree | Callable[[Method, PyTree], PyTree] | None = None,
    method: Method | None = None,
) -> Checkpoint:
    """Restores a checkpoint of :func:`save` onto a base tree.

    The saved delta leaves are attached under ``__jpeft__/<adapter>`` and the saved trainable base
    leaves replace theirs; every other leaf of ``params`` is kept as the same object. Restored
    arrays take the sharding of the base leaf they replace; delta leaves follow their kernel's
    ``NamedSharding`` (through :func:`jpeft.partition_specs`) when the base is sharded on one mesh,
    and otherwise land on the first local device.

    Args:
      path: the checkpoint directory given to :func:`save`.
      params: the base parameters the deltas were trained on (frozen leaves are read from here).
      step: the step to restore; by default the latest complete one.
      opt_state: a template of the optimizer state (its structure cannot be stored without
        pickle): a tree like ``tx.init(peft_params)``, or a function ``(method, peft_params) ->
        template`` called with the restored method and tree, e.g.
        ``lambda m, p: jpeft.optimizer(optax.adam(1e-3), m, p).init(p)``. Only its structure,
        shapes, dtypes and shardings are used. ``None`` restores no optimizer state.
      method: the method, for methods jpeft cannot rebuild by name (defined outside jpeft). Its
        config must equal the saved one.

    Returns:
      A :class:`Checkpoint` ``(method, params, opt_state, step)``.

    Raises:
      JpeftError: if there is no checkpoint (of ``step``), the base tree differs from the one saved
        (the message lists the first differing paths with the expected and found shapes and
        dtypes), the template does not match the saved optimizer state, or the method is unknown.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft, tempfile
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}}
      >>> method = jpeft.LoRA(targets=["q"], rank=2)
      >>> path = tempfile.mkdtemp()
      >>> _ = jpeft.save(path, method, jpeft.apply(method, params, key=jax.random.key(0)), step=1)
      >>> method2, peft, opt_state, step = jpeft.restore(path, params)
      >>> jpeft.list_paths(peft), opt_state, step
      (['q/__jpeft__/default/lora_a', 'q/__jpeft__/default/lora_b', 'q/kernel'], None, 1)
    """
    from jpeft.io import _nnx_checkpoint as nnx_io  # an NNX base model: returns a new peft model

    if nnx_io.is_model(params):
        return nnx_io.restore(path, params, step=step, opt_state=opt_state, method=method)
    import orbax.checkpoint as ocp

    where = "jpeft.restore"
    if not isinstance(params, Mapping):
        raise JpeftError(f"{where}: params must be the base parameters, a nested mapping; got {type(params).__name__}.")
    root = _root(path)
    available = steps(root)
    if step is None:
        if not available:
            raise JpeftError(f"{where}: no complete checkpoint under '{root}'. Save one with jpeft.save(path, ...).")
        step = available[-1]
    elif step not in available:
        raise JpeftError(f"{where}(step={step!r}): no complete checkpoint of that step under '{root}'; found steps {available}.")
    directory = _resolve(root, step)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    meta = checkpointer.restore(directory, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("format") != FORMAT:
        raise JpeftError(f"{where}: '{directory}' has checkpoint format {meta.get('format')!r}; this jpeft reads format {FORMAT}.")

    saved_method = _decode(meta["method"], meta["method"]["__dataclass__"].rpartition(":")[2]) if method is None else None
    if method is not None:
        if _encode(method, type(method).__name__) != meta["method"]:
            raise JpeftError(
                f"{where}(method={method!r}): the checkpoint was saved with a different method config:\n"
                f"  {json.dumps(meta['method'])}"
            )
        saved_method = method
    if not isinstance(saved_method, Method):
        raise JpeftError(f"{where}: the checkpoint's method {meta['method']['__dataclass__']} is not a jpeft.Method.")

    base = [[join(p), *_describe(x)] for p, x in _base_leaves(params)]
    if _fingerprint(base) != meta["base"]["fingerprint"]:
        raise JpeftError(
            f"{where}: params is not the base tree this checkpoint was saved from ('{directory}'). "
            f"Paths that differ, with the saved shape and dtype first:\n{_mismatch(meta['base']['leaves'], base)}\n"
            "Pass the parameters of the model the adapter was trained on."
        )

    name = meta["adapter"]
    for p, _ in _tree.leaves(params):
        if RESERVED in p and p[p.index(RESERVED) + 1] == name:
            raise JpeftError(
                f"{where}: params already holds adapter {name!r} at {join(p[: p.index(RESERVED)])!r}. "
                "Pass the base parameters the adapter was trained on, without its deltas."
            )
    abstract = _tree.as_dicts(params)
    _add_sites(abstract, meta, name)
    for p, shape, dtype in meta["params"]:
        keys = tuple(p.split("/"))
        if RESERVED in keys:
            node = abstract
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
    delta_sharding = _delta_shardings(saved_method, abstract, params)
    abstract = _map_all(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=delta_sharding(p)) if RESERVED in p else x, abstract
    )

    def sharding_of(keys: Path) -> jax.sharding.Sharding:
        if RESERVED in keys:
            return delta_sharding(keys)
        s = getattr(_tree.get(params, keys), "sharding", None)
        return s if isinstance(s, jax.sharding.Sharding) else _default_sharding()

    targets = {
        f"{i:06d}": jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding_of(tuple(p.split("/"))))
        for i, (p, shape, dtype) in enumerate(meta["params"])
    }
    request = {"params": ocp.args.StandardRestore(targets)}

    out = _tree.as_dicts(params)
    _add_sites(out, meta, name)
    template = None
    if opt_state is not None:
        if meta["opt_state"] is None:
            raise JpeftError(f"{where}: step {step} was saved without an optimizer state; call restore without opt_state.")
        if callable(opt_state):  # traced on the abstract tree: only structure, shapes and dtypes count
            template = jax.eval_shape(lambda p: opt_state(saved_method, p), abstract)
        else:
            template = opt_state
        leaves, treedef = jax.tree.flatten(template)
        found = [_describe(x) for x in leaves]
        if found != meta["opt_state"]:
            raise JpeftError(
                f"{where}: the opt_state template has {len(found)} leaves, the checkpoint {len(meta['opt_state'])}; "
                f"first difference at leaf {_first_difference(meta['opt_state'], found)}. Build the template with "
                "the same optimizer and method, e.g. opt_state=lambda m, p: jpeft.optimizer(tx, m, p).init(p)."
            )
        if leaves:
            request["opt_state"] = ocp.args.StandardRestore(
                {
                    f"{i:06d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding_like(x))
                    for i, x in enumerate(leaves)
                }
            )
    arrays = checkpointer.restore(directory, ocp.args.Composite(**request))
    for i, (p, _, _) in enumerate(meta["params"]):
        keys = tuple(p.split("/"))
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = arrays["params"][f"{i:06d}"]
    restored_state = None
    if template is not None:
        values = [arrays["opt_state"][f"{i:06d}"] for i in range(len(leaves))] if leaves else []
        restored_state = jax.tree.unflatten(treedef, values)
    return Checkpoint(saved_method, out, restored_state, step)


def _add_sites(tree: dict, meta: Mapping[str, Any], name: str) -> None:
    """Recreates the adapter's delta nodes, empty ones included, in ``tree`` (in place)."""
    for site in meta.get("sites", []):
        node = tree
        for k in (tuple(site.split("/")) if site else ()):
            node = node.setdefault(k, {})
        node.setdefault(RESERVED, {}).setdefault(name, {})


def _sharding_like(x: Any) -> jax.sharding.Sharding:
    s = getattr(x, "sharding", None)
    return s if isinstance(s, jax.sharding.Sharding) else _default_sharding()


def _first_difference(want: list[Any], found: list[Any]) -> str:
    for i in range(max(len(want), len(found))):
        w = want[i] if i < len(want) else "none"
        f = found[i] if i < len(found) else "none"
        if w != f:
            return f"{i}: saved {w}, template {f}"
    return "none"
