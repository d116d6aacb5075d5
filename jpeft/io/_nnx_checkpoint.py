"""``jpeft.save`` / ``jpeft.restore`` on NNX models: the same checkpoint format as on linen.

An NNX model is saved through its tree view (``_nnx.tree``: the ``Param`` and frozen-delta arrays
as a nested dict, under linen's leaf names), so the checkpoint is the linen one (see
``jpeft.io._checkpoint``): the deltas of one adapter, the trainable base leaves, optionally the
optimizer state, the method as JSON and the fingerprint of the base. A linen model and its NNX twin
with the same state paths can read each other's checkpoints.

``restore(path, base_model)`` returns a *new* model, as ``jpeft.apply`` does (the base model is
not modified; its arrays are shared): ``jpeft.apply(method, base_model)`` builds the delta
Variables (with their types and sharding metadata), and the saved arrays replace their values. The
optimizer state cannot be rebuilt without the model it trains, so ``opt_state=`` takes a function
``(method, model) -> nnx.Optimizer`` called on the restored model; the saved state is loaded into
the optimizer it returns (``Checkpoint.opt_state``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from jpeft import _nnx, _nnx_apply, _tree
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._nnx import is_model as is_model
from jpeft._tree import RESERVED, Path, join
from jpeft.io import _checkpoint, _checkpoint_read
from jpeft.io._checkpoint import Checkpoint


def _state(opt_state: Any) -> Any:
    """An ``nnx.Optimizer`` (or any NNX object) as its ``nnx.State``; other trees as they are."""
    return nnx.state(opt_state) if isinstance(opt_state, nnx.Pytree) else opt_state


def save(
    path: str | os.PathLike,
    method: Method,
    model: nnx.Module,
    *,
    step: int,
    opt_state: Any = None,
    name: str = "default",
    overwrite: bool = False,
) -> str:
    """``jpeft.save`` for an NNX model from ``jpeft.apply``; ``opt_state`` may be an ``nnx.Optimizer``.

    Example:
      >>> import jax, jpeft, optax, tempfile
      >>> from flax import nnx
      >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> method = jpeft.LoRA(targets=".*", rank=2)
      >>> model = jpeft.apply(method, base, key=jax.random.key(1))
      >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=jpeft.Delta)
      >>> path = tempfile.mkdtemp()
      >>> _ = jpeft.save(path, method, model, step=3, opt_state=optimizer)
      >>> tx = lambda m, model: nnx.Optimizer(model, optax.adam(1e-3), wrt=jpeft.Delta)
      >>> method2, restored, optimizer2, step = jpeft.restore(path, base, opt_state=tx)
      >>> step, bool((restored.__jpeft__["default"]["lora_a"][...] == model.__jpeft__["default"]["lora_a"][...]).all())
      (3, True)
    """
    if not isinstance(method, Method):
        raise JpeftError(
            f"jpeft.save expects a jpeft method; got {type(method).__name__}. Call jpeft.save(path, method, model, step=...)."
        )
    return _checkpoint.save(
        path, method, _nnx.tree(model), step=step, opt_state=_state(opt_state), name=name, overwrite=overwrite
    )


def restore(
    path: str | os.PathLike,
    model: nnx.Module,
    *,
    step: int | None = None,
    opt_state: Callable[[Method, nnx.Module], Any] | Any = None,
    method: Method | None = None,
) -> Checkpoint:
    """``jpeft.restore`` onto an NNX base model: ``Checkpoint(method, new_model, optimizer, step)``.

    ``model`` is the base the adapter was trained on (it may hold other adapters, not this one). The
    returned model is ``jpeft.apply(method, model, name=<saved adapter>)`` with the saved arrays.
    Restored deltas follow their weights' ``NamedSharding`` (``jpeft.partition_specs``) when the
    base is sharded on one mesh. ``opt_state``: a function ``(method, model) -> nnx.Optimizer`` (or
    another NNX object or tree) called on the restored model; the saved state is loaded into what
    it returns. An ``nnx.State`` or tree template is also accepted and returned filled.

    Raises:
      JpeftError: as the linen ``jpeft.restore`` (no checkpoint, another base, a template that does
        not match), and when the deltas ``jpeft.apply`` makes on ``model`` do not have the saved
        shapes (a method whose structure changed during training).
    """
    where = "jpeft.restore"
    view = _nnx.tree(model)
    for attempt in range(2):  # the step may be replaced between the two reads: read both again once
        made: dict[str, Any] = {}

        def applied(method: Method, name: str, made: dict[str, Any] = made) -> Any:
            # The deltas jpeft.apply makes on this model are what the checkpoint must hold.
            made["peft"], made["name"] = _nnx_apply.apply(method, model, jax.random.key(0), name), name
            return _nnx.tree(made["peft"])

        ck, save_id = _checkpoint_read.read(path, view, step=step, opt_state=None, method=method, applied=applied)
        peft, name = made["peft"], made["name"]
        _load(peft, view, ck.params, name, where)
        _place(ck.method, peft)
        if opt_state is None:
            return Checkpoint(ck.method, peft, None, ck.step)
        target = opt_state(ck.method, peft) if callable(opt_state) else opt_state
        try:
            with_opt, _ = _checkpoint_read.read(
                path,
                view,
                step=ck.step,
                opt_state=_state(target),
                method=ck.method,
                save_id=save_id,
                applied=lambda _m, _n, peft=peft: _nnx.tree(peft),
            )
        except JpeftError as e:
            if attempt == 0 and "replaced between two reads" in str(e):
                continue
            raise
        restored_opt = with_opt.opt_state
        if isinstance(target, nnx.Pytree):
            nnx.update(target, restored_opt)
            restored_opt = target
        return Checkpoint(ck.method, peft, restored_opt, ck.step)
    raise AssertionError("unreachable")


def _adapters(tree: Any) -> set[str]:
    """The adapter names under every ``__jpeft__`` node of a nested dict."""
    out: set[str] = set()
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if k == RESERVED and isinstance(v, Mapping):
                out |= set(v)
            else:
                out |= _adapters(v)
    return out


def _load(peft: nnx.Module, view: Mapping[str, Any], restored: Mapping[str, Any], name: str, where: str) -> None:
    """Writes the restored delta arrays and the restored (trainable) base arrays into ``peft``'s Variables."""
    variables = _nnx.variables(peft)
    saved = dict(_tree.leaves(restored))
    made = {p for p in variables if RESERVED in p and p[p.index(RESERVED) + 1] == name}
    deltas = {p for p in saved if RESERVED in p and p[p.index(RESERVED) + 1] == name}
    wrong = sorted(
        join(p)
        for p in made | deltas
        if p not in made or p not in deltas or tuple(variables[p].shape) != tuple(saved[p].shape)
    )
    if wrong:
        shown = ", ".join(
            f"{p} (model {tuple(variables[k].shape) if k in variables else 'missing'}, "
            f"checkpoint {tuple(saved[k].shape) if k in saved else 'missing'})"
            for p in wrong[:5]
            for k in [tuple(p.split("/"))]
        )
        raise JpeftError(
            f"{where}: the deltas jpeft.apply makes on this model do not match the checkpoint's: {shown}. Restore "
            "onto the base the adapter was trained on, with the method it was saved with."
        )
    for p, x in saved.items():
        if p in deltas or (RESERVED not in p and x is not _tree.get(view, p)):  # saved base leaves are new arrays
            variables[p].set_value(x)


def _place(method: Method, peft: nnx.Module) -> None:
    """Puts the deltas on their derived ``NamedSharding`` when the base is sharded on one mesh."""
    from jax.sharding import NamedSharding

    from jpeft._nnx_sharding import partition_specs

    state = nnx.state(peft)
    flat = list(nnx.to_flat_state(state))
    base = [v for p, v in flat if RESERVED not in p]
    meshes = {
        v.get_value().sharding.mesh for v in base if isinstance(getattr(v.get_value(), "sharding", None), NamedSharding)
    }
    if len(meshes) != 1:
        return
    (mesh,) = meshes

    def spec(v: nnx.Variable) -> Any:
        s = getattr(v.get_value(), "sharding", None)
        return s.spec if isinstance(s, NamedSharding) and s.mesh == mesh else None

    given = {tuple(str(k) for k in p): spec(v) for p, v in flat if RESERVED not in p}
    specs = dict(nnx.to_flat_state(partition_specs(method, peft, _nest(given))))
    for p, v in flat:
        if RESERVED in p:
            target = NamedSharding(mesh, specs[p].get_value())
            if v.get_value().sharding != target:
                v.set_value(jax.device_put(v.get_value(), target))


def _nest(flat: Mapping[Path, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p, x in flat.items():
        node = out
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = x
    return out
