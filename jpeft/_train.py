"""The public tree API, part two: what trains. labels, optimizer, split, combine, summary and check.

All of it is plain Python over parameter trees; nothing here is jitted. Users choose where to jit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from jpeft import _nnx, _nnx_train, _tree
from jpeft._core import _check_method, _check_params, _map
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import RESERVED, Path, PyTree, join


def labels(method: Method, tree: PyTree) -> PyTree:
    """Returns a tree of optimizer labels, one str per leaf.

    ``'frozen'`` marks leaves that do not train (the base, and LoRA-FA's A); ``'trainable'`` marks
    the rest, with finer labels where a method needs them (``'lora_a'``/``'lora_b'`` for LoRA+).
    ``None`` holes (from :func:`split`) stay ``None``. On an NNX model (from ``jpeft.apply``) the
    labels cover its ``Param`` and frozen-delta variables, keyed as ``jpeft.list_paths(model)`` shows.

    Raises:
      JpeftError: on a variables dict ``{'params': ...}``; pass the ``params`` collection itself.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}}
      >>> method = jpeft.LoRA(targets=["q"], rank=2)
      >>> jpeft.labels(method, jpeft.apply(method, params, key=jax.random.key(0)))
      {'q': {'kernel': 'frozen', '__jpeft__': {'default': {'lora_a': 'trainable', 'lora_b': 'trainable'}}}}
    """
    _check_method(method, "jpeft.labels")
    if _nnx.is_model(tree):  # labels of the tree view, keyed as jpeft.list_paths(model) shows
        return _nnx_train.labels(method, tree)
    _check_params(tree, "jpeft.labels")
    label_of = _labeller(method, tree)
    return _map(lambda path, _: label_of(path), tree)


def _labeller(method: Method, tree: PyTree) -> Callable[[Path], str]:
    """``path -> label`` for every leaf path of ``tree`` (base leaves by the method's labeller)."""
    base_label = method.base_labeller(tree)
    return lambda path: method.delta_label_at(path) if RESERVED in path else base_label(path)


def optimizer(tx: optax.GradientTransformation, method: Method, peft_params: PyTree) -> optax.GradientTransformation:
    """Wraps an optax transform so that only the method's trainable leaves move.

    ``tx`` runs once over all trainable leaves together, so transforms that look at the whole
    tree (``optax.clip_by_global_norm``) see every trainable leaf. Frozen leaves get zero updates
    and keep no optimizer state. Per-label rules go around ``tx`` (see
    ``jpeft.Method.wrap_optimizer``): LoRA+ scales B's updates after it, Freeze masks the lower
    layers of a stack. Works on the full tree from :func:`apply` and on the ``trainable`` half of
    :func:`split`.

    Gradient accumulation: pass ``optax.MultiSteps(tx, k)`` as ``tx``; it then keeps accumulators
    for the trainable leaves only. (``optax.MultiSteps(jpeft.optimizer(...), k)`` works too, but on
    the full tree keeps an accumulator for every frozen leaf.)

    On an NNX model (from ``jpeft.apply``) it returns a transform over the ``State`` that
    ``nnx.Optimizer(model, tx, wrt=...)`` passes (or a half of ``jpeft.split(method, model)``), with
    the same rules: ``nnx.Optimizer(model, jpeft.optimizer(tx, method, model), wrt=jpeft.trainable(
    method, model))``. A ``wrt`` that also selects frozen variables (``nnx.Param`` with LoRA) is
    handled: they get zero updates and no state, though their gradients are still computed; a
    ``wrt`` that leaves out a variable the method trains (``jpeft.Delta`` with BitFit) is refused
    at ``init``.

    Args:
      tx: the optimizer for trainable leaves, e.g. ``optax.adamw(1e-3)``.
      method: the method.
      peft_params: a tree of the shape the optimizer will see (its paths give the labels).

    Raises:
      JpeftError: on a variables dict ``{'params': ...}``, or a tree with no trainable leaf; on NNX,
        at ``init``, for a state that leaves out a variable the method trains.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jpeft
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}}
      >>> method = jpeft.LoRA(targets=["q"], rank=2)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(0))
      >>> tx = jpeft.optimizer(optax.adam(1e-3), method, peft)
      >>> state = tx.init(peft)
      >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, peft), state, peft)
      >>> float(abs(updates["q"]["kernel"]).max())
      0.0
      >>> from flax import nnx
      >>> method = jpeft.LoRA(targets=".*", rank=2)
      >>> model = jpeft.apply(method, nnx.Linear(4, 3, rngs=nnx.Rngs(0)), key=jax.random.key(0))
      >>> opt = nnx.Optimizer(model, jpeft.optimizer(optax.adam(1e-3), method, model), wrt=jpeft.Delta)
    """
    _check_method(method, "jpeft.optimizer")
    if isinstance(tx, optax.MultiSteps):
        tx = tx.gradient_transformation()
    if not isinstance(tx, optax.GradientTransformation):
        raise JpeftError(
            f"jpeft.optimizer expects an optax.GradientTransformation first; got {type(tx).__name__}."
        )
    if _nnx.is_model(peft_params):
        return _nnx_train.optimizer(tx, method, peft_params)
    _check_params(peft_params, "jpeft.optimizer")
    label_of = _labeller(method, peft_params)
    used = {label_of(p) for p, _ in _tree.leaves(peft_params)}
    if not used - {"frozen"}:
        raise JpeftError(
            f"jpeft.optimizer({type(method).__name__}): no leaf of the tree is trainable. Pass the tree "
            "returned by jpeft.apply(method, params, key=...), not the base params."
        )

    def label_tree(tree: PyTree, fn: Callable[[str], Any]) -> PyTree:  # the pytree type of ``tree``
        _check_params(tree, "jpeft.optimizer(...).init/update")
        # A non-mapping node (a quantised kernel, optax's MaskedNode) is one labelled leaf, as in _tree.leaves.
        struct = jax.tree.structure(tree, is_leaf=lambda x: x is not None and not isinstance(x, Mapping))
        return jax.tree.unflatten(struct, [fn(label_of(p)) for p, _ in _tree.leaves(tree)])

    def only(label: str, t: optax.GradientTransformation) -> optax.GradientTransformation:
        return optax.masked(t, lambda tree: label_tree(tree, lambda lab: lab == label))

    inner = method.wrap_optimizer(tx, only)
    groups = {"frozen": optax.set_to_zero(), "trainable": inner}
    return optax.multi_transform(groups, lambda tree: label_tree(tree, lambda lab: lab if lab == "frozen" else "trainable"))


def split(method: Method, peft_params: PyTree) -> tuple[PyTree, PyTree]:
    """Splits a tree into ``(trainable, frozen)`` halves with ``None`` holes.

    Differentiating with respect to ``trainable`` alone is the lean path: XLA computes no weight
    gradient for frozen kernels. :func:`combine` puts the halves back together.

    On an NNX model (from ``jpeft.apply``) it returns ``nnx.split(model, jpeft.trainable(method,
    model), ...)``: ``(graphdef, trainable, rest)``. The lean step differentiates a loss of
    ``nnx.merge(graphdef, trainable, rest)`` with respect to ``trainable`` alone (for delta-only
    methods ``nnx.split(model, jpeft.Delta, ...)`` is the same split).

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}}
      >>> method = jpeft.LoRA(targets=["q"], rank=2)
      >>> trainable, frozen = jpeft.split(method, jpeft.apply(method, params, key=jax.random.key(0)))
      >>> trainable["q"]["kernel"] is None, frozen["q"]["__jpeft__"]["default"]["lora_a"] is None
      (True, True)
      >>> from flax import nnx
      >>> method = jpeft.LoRA(targets=".*", rank=2)
      >>> model = jpeft.apply(method, nnx.Linear(4, 3, rngs=nnx.Rngs(0)), key=jax.random.key(0))
      >>> graphdef, deltas, rest = jpeft.split(method, model)
      >>> sorted(k[-1] for k, _ in nnx.to_flat_state(deltas))
      ['lora_a', 'lora_b']
    """
    _check_method(method, "jpeft.split")
    if _nnx.is_model(peft_params):
        return _nnx_train.split(method, peft_params)
    _check_params(peft_params, "jpeft.split")
    lab = labels(method, peft_params)

    def pick(frozen: bool) -> PyTree:
        return _map(lambda p, x: x if (_tree.get(lab, p) == "frozen") == frozen else None, peft_params)

    return pick(False), pick(True)


def combine(trainable: PyTree, frozen: PyTree, *rest: PyTree) -> PyTree:
    """Combines the halves of :func:`split` into one tree.

    On NNX, ``jpeft.combine(graphdef, trainable, rest)`` is ``nnx.merge(graphdef, trainable, rest,
    copy=True)``: new ``Variable`` s at the current trace level (under ``jax.grad``, merging the split's
    own Variable objects fails inside ``nnx.scan``).

    Raises:
      JpeftError: when the halves do not come from one split (keys differ, or both hold a leaf).

    Example:
      >>> import jpeft
      >>> jpeft.combine({"a": 1, "b": None}, {"a": None, "b": 2})
      {'a': 1, 'b': 2}
    """

    if isinstance(trainable, nnx.GraphDef):
        return _nnx_train.combine(trainable, frozen, *rest)
    if rest:
        raise JpeftError(
            f"jpeft.combine takes two halves of a parameter tree (or an NNX graphdef and states); got {2 + len(rest)} "
            "trees. Pass jpeft.combine(trainable, frozen)."
        )

    def merge_nodes(t: Any, f: Any, path: Path) -> Any:
        if isinstance(t, Mapping) and isinstance(f, Mapping):
            if set(t) != set(f):
                raise JpeftError(
                    f"jpeft.combine: keys differ at {join(path) or '<root>'!r}: {sorted(set(t) ^ set(f))}. "
                    "Both halves must come from one jpeft.split call."
                )
            return {k: merge_nodes(t[k], f[k], path + (str(k),)) for k in t}
        if t is None:
            return f
        if f is None:
            return t
        raise JpeftError(
            f"jpeft.combine: both halves hold a leaf at {join(path)!r}; expected exactly one. "
            "Both halves must come from one jpeft.split call."
        )

    return merge_nodes(trainable, frozen, ())


def summary(method: Method, peft_params: PyTree) -> str:
    """Describes what trains: trainable, total and percentage, and a per-target table.

    Takes a tree from ``jpeft.apply`` or an NNX model from it (its ``Param`` and frozen deltas).

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}, "v": {"kernel": jnp.ones((4, 4))}}
      >>> method = jpeft.LoRA(targets=["q"], rank=2)
      >>> print(jpeft.summary(method, jpeft.apply(method, params, key=jax.random.key(0))))
      LoRA(targets=('q',), rank=2, alpha=8.0)
      trainable params: 16 || all params: 48 || trainable%: 33.3333
      target  shape   trainable
      q       (4, 4)  16
    """
    _check_method(method, "jpeft.summary")
    if _nnx.is_model(peft_params):
        return _nnx_train.summary(method, peft_params)
    _check_params(peft_params, "jpeft.summary")
    lab = labels(method, peft_params)
    rows: dict[Path, int] = {}
    total = trainable = 0
    for path, leaf in _tree.leaves(peft_params):
        n = _tree.size(leaf)
        total += n
        if _tree.get(lab, path) != "frozen":
            trainable += n
            module = path[: path.index(RESERVED)] if RESERVED in path else path[:-1]
            rows[module] = rows.get(module, 0) + n
    mods = _tree.modules(peft_params)

    def shape(module: Path) -> str:
        own = mods.get(module, {})
        leaf = own.get("kernel", own.get("embedding"))
        return str(tuple(leaf.shape)) if leaf is not None else ""

    fields = [
        f"{f.name}={getattr(method, f.name)!r}"
        for f in dataclasses.fields(method)
        if f.name in ("rank", "alpha", "targets") or getattr(method, f.name) != f.default
    ]
    table = [("target", "shape", "trainable")] + [(join(m), shape(m), f"{n:,}") for m, n in sorted(rows.items())]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    lines = [
        f"{type(method).__name__}({', '.join(fields)})",
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}",
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines)


def check(peft_params: PyTree) -> None:
    """Raises if any delta leaf holds NaN or infinity; call it eagerly (outside ``jit``).

    A diverged run shows up here with the paths of the bad leaves, before it is saved or merged.
    Takes a tree from ``jpeft.apply`` or an NNX model from it.

    Raises:
      JpeftError: naming up to five non-finite delta leaves, their shapes and how many bad values.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}}
      >>> peft = jpeft.apply(jpeft.LoRA(targets=["q"], rank=2), params, key=jax.random.key(0))
      >>> jpeft.check(peft)  # finite: returns None
    """
    if _nnx.is_model(peft_params):
        return _nnx_train.check(peft_params)
    _check_params(peft_params, "jpeft.check")
    bad = []
    for path, leaf in _tree.leaves(peft_params):
        if RESERVED not in path:
            continue
        if isinstance(leaf, jax.core.Tracer):
            raise JpeftError("jpeft.check inspects values; call it outside jax.jit / grad, on concrete arrays.")
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact):
            n = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if n:
                bad.append(f"{join(path)} {tuple(arr.shape)}: {n} non-finite of {arr.size}")
    if bad:
        raise JpeftError(
            f"jpeft.check: {len(bad)} delta leaves hold NaN or inf: " + "; ".join(bad[:5])
            + ". Training diverged: lower the learning rate, clip gradients (optax.clip_by_global_norm) or "
            "restore the last good checkpoint."
        )
