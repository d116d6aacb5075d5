"""The read side of :func:`jpeft.restore`: resolve a step, check it, load it, verify it is one save.

A read resolves the step and reads its metadata under a shared lock of the checkpoint root (never
in the middle of an ``overwrite=True`` swap), checks everything ``jpeft.io._checkpoint_check``
can before loading, loads the arrays, and verifies that every item carries the save id of the
metadata it read. A read that fails while the step changes under it (a concurrent overwrite, a new
latest step) is tried again, up to three times; then the error is a :class:`jpeft.JpeftError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.io import _checkpoint_check as check
from jpeft.io import _checkpoint_lock as lock
from jpeft.io._checkpoint import (
    _COMMIT,
    _ID,
    _LOOKS_LIKE_STEP,
    _STEP,
    Checkpoint,
    _base_leaves,
    _committed,
    _is_step,
    _not_a_file,
    _resolve,
    _root,
    _steps,
)

_ATTEMPTS = 3  # a read that fails while the step changes under it is tried again


def read(
    path: str | os.PathLike,
    params: PyTree,
    *,
    step: int | None,
    opt_state: Any,
    method: Method | None,
    save_id: str | None = None,
    applied: Callable[[Method, str], PyTree] | None = None,
) -> tuple[Checkpoint, str | None]:
    """:func:`restore` on a tree, with the save id it read; ``save_id``: refuse any other save;
    ``applied(method, adapter)``: the applied tree to check the saved leaves against (default:
    ``jax.eval_shape`` of ``jpeft.apply``)."""
    where = "jpeft.restore"
    if not isinstance(params, Mapping):
        raise JpeftError(f"{where}: params must be the base parameters, a nested mapping; got {type(params).__name__}.")
    if step is not None and not _is_step(step):
        raise JpeftError(f"{where}(step={step!r}): step must be an int >= 0, or None for the latest step.")
    root = _root(path)
    _not_a_file(root, where)
    for attempt in range(_ATTEMPTS):
        before = _snapshot(root, step)
        try:
            return _read_once(root, params, step, opt_state, method, save_id, applied)
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types on damaged files
            if attempt + 1 < _ATTEMPTS and _snapshot(root, step) != before:
                continue  # a concurrent save(overwrite=True) or a new step: read the new version
            if isinstance(e, JpeftError):
                raise
            raise JpeftError(
                f"{where}: reading the arrays of '{_snapshot(root, step)[1]}' failed: {type(e).__name__}: "
                f"{str(e)[:400]}. The array files are damaged (a bit flip or truncation fails tensorstore's "
                "checksum) or were removed; restore another step."
            ) from None
    raise AssertionError("unreachable")


def _snapshot(root: epath.Path, step: int | None) -> tuple[Any, ...]:
    """What identifies the version a read sees: the steps, the directory and its metadata's bytes."""
    with lock.locked(root, shared=True):
        available = _steps(root)
        chosen = step if step is not None else (available[-1] if available else None)
        if chosen is None:
            return (tuple(available), None, None)
        directory = _resolve(root, int(chosen))
        try:
            digest = hashlib.sha256(check.meta_file(directory).read_bytes()).hexdigest()
        except OSError:
            digest = None
        return (tuple(available), directory, digest)


def _read_once(
    root: epath.Path,
    params: PyTree,
    step: int | None,
    opt_state: Any,
    method: Method | None,
    expect: str | None,
    applied: Callable[[Method, str], PyTree] | None,
) -> tuple[Checkpoint, str | None]:
    import orbax.checkpoint as ocp

    where = "jpeft.restore"
    with lock.locked(root, shared=True):  # resolve the step and read its metadata outside any swap
        available = _steps(root)
        if step is None:
            if not available:
                raise JpeftError(
                    f"{where}: no complete checkpoint under '{root}'{_odd_names(root)}. Save one with jpeft.save(path, ...)."
                )
            step = available[-1]
        elif int(step) not in available:
            raise JpeftError(
                f"{where}(step={step!r}): no complete checkpoint of that step under '{root}'; found steps "
                f"{available}{_odd_names(root)}."
            )
        step = int(step)
        directory = _resolve(root, step)
        meta = check.read_meta(directory, step)
    file = check.meta_file(directory)
    stamped = meta["format"] >= 2
    if expect is not None and meta.get("save_id") != expect:
        raise JpeftError(f"{where}: step {step} at '{directory}' was replaced between two reads of it; restore again.")

    if method is None:
        saved_method = check.decode(meta["method"], meta["method"]["__dataclass__"].rpartition(":")[2])
    else:
        if check.encode(method, type(method).__name__) != meta["method"]:
            raise JpeftError(
                f"{where}(method={method!r}): the checkpoint was saved with a different method config:\n"
                f"  {meta['method']}"
            )
        saved_method = method
    if not isinstance(saved_method, Method):
        raise JpeftError(
            f"{where}: the checkpoint's method {meta['method']['__dataclass__']} is not a jpeft.Method ('{file}')."
        )

    base = [[join(p), *check.describe(x)] for p, x in _base_leaves(params)]
    if check.fingerprint(base) != meta["base"]["fingerprint"]:
        raise JpeftError(
            f"{where}: params is not the base tree this checkpoint was saved from ('{directory}'). "
            f"Paths that differ, with the saved shape and dtype first:\n{check.mismatch(meta['base']['leaves'], base)}\n"
            "Pass the parameters of the model the adapter was trained on."
        )
    name = meta["adapter"]
    for p, _ in _tree.leaves(params):
        if RESERVED in p and p[p.index(RESERVED) + 1] == name:
            raise JpeftError(
                f"{where}: params already holds adapter {name!r} at {join(p[: p.index(RESERVED)])!r}. "
                "Pass the base parameters the adapter was trained on, without its deltas."
            )
    check.against_method(saved_method, params, meta, directory, applied)
    check.stored_leaves(directory, "params", meta["params"], stamped)

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
        lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=delta_sharding(p)) if RESERVED in p else x,
        abstract,
    )

    def sharding_of(keys: Path) -> jax.sharding.Sharding:
        if RESERVED in keys:
            return delta_sharding(keys)
        s = getattr(_tree.get(params, keys), "sharding", None)
        return s if isinstance(s, jax.sharding.Sharding) else _default_sharding()

    stamp = {_ID: jax.ShapeDtypeStruct((16,), np.uint8, sharding=_default_sharding())} if stamped else {}
    targets = {
        f"{i:06d}": jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding_of(tuple(p.split("/"))))
        for i, (p, shape, dtype) in enumerate(meta["params"])
    }
    request = {"params": ocp.args.StandardRestore({**targets, **stamp})}

    out = _tree.as_dicts(params)
    _add_sites(out, meta, name)
    template = None
    if opt_state is not None:
        if meta["opt_state"] is None:
            raise JpeftError(
                f"{where}: step {step} was saved without an optimizer state; call restore without opt_state."
            )
        if callable(opt_state):  # traced on the abstract tree: only structure, shapes and dtypes count
            template = jax.eval_shape(lambda p: opt_state(saved_method, p), abstract)
        else:
            template = opt_state
        leaves, treedef = jax.tree.flatten(template)
        found = [check.describe(x) for x in leaves]
        if found != meta["opt_state"]:
            raise JpeftError(
                f"{where}: the opt_state template has {len(found)} leaves, the checkpoint {len(meta['opt_state'])}; "
                f"first difference at leaf {check.first_difference(meta['opt_state'], found)}. Build the template with "
                "the same optimizer and method, e.g. opt_state=lambda m, p: jpeft.optimizer(tx, m, p).init(p)."
            )
        if stamped and check.skeleton(template) != meta["opt_tree"]:
            raise JpeftError(
                f"{where}: the opt_state template's tree structure is not the saved one in '{file}' (another optimizer "
                f"with the same leaf shapes?): {check.skeleton_difference(meta['opt_tree'], check.skeleton(template))}. "
                "Build the template with the optimizer that made the state."
            )
        if leaves:
            check.stored_leaves(directory, "opt_state", meta["opt_state"], stamped)
            opt_sharding = _opt_sharding(params)
            request["opt_state"] = ocp.args.StandardRestore(
                {
                    **{
                        f"{i:06d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=opt_sharding(x))
                        for i, x in enumerate(leaves)
                    },
                    **stamp,
                }
            )
    arrays = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(directory, ocp.args.Composite(**request))
    if stamped:
        for item in request:
            got = bytes(np.asarray(arrays[item][_ID])).hex()
            if got != meta["save_id"]:
                raise JpeftError(
                    f"{where}: the item '{directory / item}' belongs to save {got}, the metadata to save "
                    f"{meta['save_id']}: the step was replaced while it was read (restore again), or the item was "
                    "copied from another checkpoint (the step is mixed: restore another step, or save it again)."
                )
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
    return Checkpoint(saved_method, out, restored_state, step), meta.get("save_id")


def _odd_names(root: epath.Path) -> str:
    """A note on directories that look like steps but are never read: ``step_007`` (save does not
    write leading zeros), and partial steps: a ``step_<n>`` without its commit marker, a temporary of
    a killed save (``step_<n>.jpeft-tmp-...``, ``step_<n>.orbax-checkpoint-tmp-...``)."""
    if not root.is_dir():
        return ""
    names = sorted(e.name for e in root.iterdir())
    odd = [n for n in names if _LOOKS_LIKE_STEP.fullmatch(n) and not _STEP.fullmatch(n)]
    partial = [  # a temporary (step_<n>.<suffix>) is partial even once orbax has committed it
        n
        for n in names
        if _STEP.fullmatch(n.partition(".")[0])
        and not n.endswith(lock.REPLACED)
        and ("." in n or not _committed(root / n))
    ]
    note = f" (ignored {odd[:3]}: jpeft.save writes step_<n> without leading zeros; rename them)" if odd else ""
    if partial:
        note += (
            f" (ignored {partial[:3]}: partial steps without {_COMMIT}, left by a save that was killed or failed, "
            "never read; delete them or save those steps again)"
        )
    return note


def _add_sites(tree: dict, meta: Mapping[str, Any], name: str) -> None:
    """Recreates the adapter's delta nodes, empty ones included, in ``tree`` (in place)."""
    for site in meta.get("sites", []):
        node = tree
        for k in tuple(site.split("/")) if site else ():
            node = node.setdefault(k, {})
        node.setdefault(RESERVED, {}).setdefault(name, {})


def _opt_sharding(params: PyTree) -> Callable[[Any], jax.sharding.Sharding]:
    """The sharding of a restored optimizer-state leaf: its template leaf's, else the default.

    With several processes, a leaf whose template is not global (no sharding, as from
    ``jax.eval_shape``, or one on this process's devices only, as an ``nnx.Optimizer``'s step count)
    is restored replicated over the base's mesh (every device when the base has none), so the state is
    global and the next multi-host ``jpeft.save`` can write it.
    """
    if jax.process_count() == 1:
        return _sharding_like
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = _base_mesh(params) or Mesh(np.asarray(jax.devices()), ("devices",))
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding(x: Any) -> jax.sharding.Sharding:
        s = getattr(x, "sharding", None)
        return s if isinstance(s, jax.sharding.Sharding) and not s.is_fully_addressable else replicated

    return sharding


def _sharding_like(x: Any) -> jax.sharding.Sharding:
    s = getattr(x, "sharding", None)
    return s if isinstance(s, jax.sharding.Sharding) else _default_sharding()


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _leaf_sharding(x: Any) -> Any:
    """A base leaf's sharding; an INT8/INT4 kernel's codes keep its axes, so theirs is the kernel's."""
    from jpeft.quant._int import IntArray

    return getattr(x.codes if isinstance(x, IntArray) else x, "sharding", None)


def _base_mesh(params: PyTree) -> Any:
    """The one mesh of the base leaves' NamedShardings, or None (no NamedSharding, or several meshes)."""
    from jax.sharding import NamedSharding

    meshes = {s.mesh for _, x in _base_leaves(params) if isinstance(s := _leaf_sharding(x), NamedSharding)}
    return next(iter(meshes)) if len(meshes) == 1 else None


def _delta_shardings(method: Method, abstract: PyTree, params: PyTree) -> Callable[[Path], jax.sharding.Sharding]:
    """Delta leaves follow the base's NamedSharding (via partition_specs) when it has one mesh."""
    from jax.sharding import NamedSharding

    from jpeft._sharding import partition_specs

    mesh = _base_mesh(params)
    if mesh is None:
        return lambda _: _default_sharding()

    def base_spec(_: Path, x: Any) -> Any:
        s = _leaf_sharding(x)
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
