"""Checkpoints of the deltas only: orbax-checkpoint arrays plus the method config as JSON.

A checkpoint directory holds one sub-directory per step, ``<path>/step_<n>``, written by orbax as
one composite checkpoint with three items:

* ``params``: the delta leaves of one adapter and the trainable base leaves (``jpeft.labels`` not
  ``'frozen'``: BitFit biases, ``extra_trainable`` heads), keyed by index, and the save id;
* ``opt_state``: the leaves of the optimizer state, if one was given, keyed by index, and the save id;
* ``meta``: JSON with the format version, the jpeft version, the method (class name and fields),
  the adapter name, the step, the '/'-joined paths, shapes and dtypes of the saved leaves, the
  fingerprint of the *base* tree (the path, shape and dtype of every base leaf), the optimizer
  state's tree structure with its node types, and the save id.

Saving is atomic and safe against other writers: each save writes a directory of its own and then
claims ``step_<n>`` by a rename under a lock (``jpeft.io._checkpoint_lock``), so a killed save
leaves a temporary that :func:`steps` and :func:`restore` never pick up, and of two processes
saving one step one wins whole and the other gets an error. :func:`restore` checks everything it
can before loading (``jpeft.io._checkpoint_check``) and that every item carries the save id of the
metadata it read. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
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
from jpeft.io import _checkpoint_check as check
from jpeft.io import _checkpoint_lock as lock
from jpeft.io._checkpoint_check import FORMAT as FORMAT

_method_json = check.method_json  # jpeft.method_to_dict / method_from_dict use the checkpoint's encoder
_decode = check.decode

_STEP = re.compile(r"step_(0|[1-9][0-9]*)")  # the names save writes: no 'step_007'
_LOOKS_LIKE_STEP = re.compile(r"step_\d+")
_COMMIT = "commit_success.txt"
_ID = "save_id"  # the leaf holding the save id in every array item


def _root(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute, or a remote one (``gs://...``) as it is."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _not_a_file(root: epath.Path, where: str) -> None:
    if root.exists() and not root.is_dir():
        raise JpeftError(
            f"{where}: the checkpoint root '{root}' is a file, not a directory. Pass a directory (it is created if missing)."
        )


class Checkpoint(NamedTuple):
    """What :func:`restore` returns; it unpacks as ``method, params, opt_state, step``.

    Attributes:
      method: the method rebuilt from the saved config.
      params: the base tree with the saved delta and trainable leaves attached.
      opt_state: the optimizer state, or ``None`` when no ``opt_state`` template was passed.
      step: the restored step.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft, tempfile
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}}
      >>> method = jpeft.LoRA(targets=["q"], rank=2)
      >>> path = tempfile.mkdtemp()
      >>> _ = jpeft.save(path, method, jpeft.apply(method, params, key=jax.random.key(0)), step=3)
      >>> ckpt = jpeft.restore(path, params)
      >>> type(ckpt).__name__, ckpt.step, ckpt.opt_state is None, ckpt.method == method
      ('Checkpoint', 3, True, True)
    """

    method: Method
    params: PyTree
    opt_state: PyTree | None
    step: int


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
    with lock.locked(root, shared=True):  # not in the middle of an overwrite's swap
        return _steps(root)


def _steps(root: epath.Path) -> list[int]:
    if not root.is_dir():
        return []
    found = set()
    for entry in root.iterdir():
        m = _STEP.fullmatch(entry.name.removesuffix(lock.REPLACED))
        if m and _committed(entry):
            found.add(int(m.group(1)))
    return sorted(found)


def _resolve(root: epath.Path, step: int) -> epath.Path:
    final = _step_dir(root, step)
    return final if _committed(final) else lock.with_suffix(final, lock.REPLACED)


def _is_step(step: Any) -> bool:
    return not isinstance(step, bool) and isinstance(step, (int, np.integer)) and step >= 0


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
        first and then swapped in by renames under a lock; an existing step is never written in
        place, and a concurrent :func:`restore` reads the old or the new one, never a mix.

    Returns:
      The directory of the new checkpoint.

    Raises:
      JpeftError: if the step exists and ``overwrite`` is False (also when another process saved
        it while this save ran: the loser's copy is discarded), the tree holds no deltas of adapter
        ``name`` or a saved key contains '/', ``step`` is not an int >= 0, the method's fields
        cannot be JSON, the root is a file, or writing fails (disk full: one error, nothing kept).

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
        raise JpeftError(
            f"{where} expects a jpeft method; got {type(method).__name__}. Call {where}(path, method, peft_params, step=...)."
        )
    if not isinstance(peft_params, Mapping):
        raise JpeftError(
            f"{where}: peft_params must be the nested mapping from jpeft.apply; got {type(peft_params).__name__}."
        )
    if not _is_step(step):
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
    sites = check.adapter_sites(peft_params, name)
    for p in [p for p, _ in saved] + sites:
        if any("/" in str(k) or str(k) == "" for k in p):
            raise JpeftError(
                f"{where}: the key path {list(map(str, p))} has an empty key or a key containing '/', which the "
                "checkpoint's '/'-joined paths cannot hold (it would restore into another subtree). Rename the key."
            )
    base = [[join(p), *check.describe(x)] for p, x in _base_leaves(peft_params)]
    opt_leaves = None if opt_state is None else jax.tree.leaves(opt_state)
    tag = lock.token()
    save_id = hashlib.sha256(tag.encode()).hexdigest()[:32]
    stamp = np.frombuffer(bytes.fromhex(save_id), np.uint8).copy()
    meta = {
        "format": FORMAT,
        "jpeft_version": jpeft.__version__,
        "save_id": save_id,
        "method": check.method_json(method),
        "adapter": name,
        "step": step,
        "params": [[join(p), *check.describe(x)] for p, x in saved],
        # Every module that holds the adapter, including empty delta nodes (QLoRA's quantised but
        # untargeted modules, LoRA-drop's markers of layers that share the root pair): restore
        # recreates them, since they have no leaf to carry them.
        "sites": [join(p) for p in sites],
        "opt_state": None if opt_leaves is None else [check.describe(x) for x in opt_leaves],
        "opt_tree": None if opt_state is None else check.skeleton(opt_state),
        "base": {"fingerprint": check.fingerprint(base), "leaves": base},
    }
    items = {
        "params": ocp.args.StandardSave({**{f"{i:06d}": x for i, (_, x) in enumerate(saved)}, _ID: stamp}),
        "meta": ocp.args.JsonSave(meta),
    }
    if opt_leaves:
        items["opt_state"] = ocp.args.StandardSave({**{f"{i:06d}": x for i, x in enumerate(opt_leaves)}, _ID: stamp})

    root = _root(path)
    _not_a_file(root, where)
    final = _step_dir(root, step)
    if (final.exists() or lock.with_suffix(final, lock.REPLACED).exists()) and not overwrite:
        raise JpeftError(
            f"{where}: a checkpoint of step {step} already exists at '{final}'. Save under another step, "
            "or pass overwrite=True to replace it (the new one is written first, then swapped in)."
        )
    primary = jax.process_index() == 0
    tmp = lock.temporary(final, tag)
    if primary:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JpeftError(f"{where}: cannot create the checkpoint root '{root}': {e}.") from None
    _barrier("jpeft.save:prepare")
    try:
        ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(tmp, ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - disk full comes as OSError or as tensorstore's ValueError
        raise lock.write_failed(e, step, tmp) from None
    if primary:
        lock.claim(root, tmp, final, step, overwrite, tag)
    _barrier("jpeft.save:done")
    return str(final)


def _base_leaves(params: PyTree) -> list[tuple[Path, Any]]:
    return [(p, x) for p, x in _tree.leaves(params) if RESERVED not in p]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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
        dtypes), the template does not match the saved optimizer state (leaf shapes, dtypes and
        node types: an RMSProp template for SGD-momentum state), the method is unknown, the saved
        leaves are not the ones ``jpeft.apply(method, params)`` makes (an edited rank, target,
        dtype or path), or a file is damaged or missing; each message names the file. A step
        replaced by a concurrent ``save(overwrite=True)`` while it was read is read again.

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
    from jpeft.io._checkpoint_read import read

    return read(path, params, step=step, opt_state=opt_state, method=method)[0]
