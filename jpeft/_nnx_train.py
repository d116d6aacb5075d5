"""The training API on ``flax.nnx`` models: labels, optimizer, trainable, split, summary, check.

Every function here reads the model through its tree view (``_nnx.tree``: the ``Param`` and
frozen-delta arrays as the nested dict the linen functions take, base weights under linen's leaf
names) and hands it to the linen implementation in ``jpeft._train`` / ``jpeft._core``; nothing
about labels, LoRA+'s rates, AdaLoRA's schedule or Freeze's masks is written twice. What is NNX
here is the translation: :func:`trainable` turns the labels into an NNX filter, and
:func:`optimizer` maps the ``State`` that ``nnx.Optimizer`` passes onto the tree view and back.

The public functions (``jpeft.labels``, ``jpeft.optimizer``, ...) dispatch to these when given an
``nnx.Module``; ``jpeft.trainable`` is the one name that exists for NNX only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import optax
from flax import nnx

from jpeft import _nnx, _tree
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import Path, PyTree, join


# --- paths: NNX state paths vs the tree view -----------------------------------------------------
def _names(keypath: Any) -> Path:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)


def _is_leaf(x: Any) -> bool:  # as in _tree.leaves: every non-mapping node (a Variable, an NF4Array) is a leaf
    return x is not None and not isinstance(x, Mapping)


def _value(leaf: Any) -> Any:
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


class _View:
    """The tree view of one model: its labels by tree path, and the map from state paths."""

    def __init__(self, method: Method, model: nnx.Module, where: str):
        from jpeft._train import _labeller

        self.where = where
        self.tree = _nnx.tree(model)
        self.renames = _nnx.renames(model)
        label_of = _labeller(method, self.tree)
        self.labels = {p: label_of(p) for p, _ in _tree.leaves(self.tree)}
        state_paths = [tuple(str(k) for k in p) for p, _ in nnx.to_flat_state(nnx.state(model, _nnx.TREE_TYPES))]
        self.trainable_state_paths = frozenset(p for p in state_paths if self.labels.get(self.rename(p)) != "frozen")

    def rename(self, path: Path) -> Path:
        return self.renames.get(path, path)

    def flat(self, tree: PyTree) -> tuple[list[tuple[Path, Any]], Any]:
        """The leaves of a ``State`` (of Variables or arrays) or nested dict by tree path, and its treedef."""
        pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
        return [(self.rename(_names(kp)), _value(leaf)) for kp, leaf in pairs], treedef

    def to_tree(self, tree: PyTree) -> tuple[dict[str, Any], list[Path], Any]:
        pairs, treedef = self.flat(tree)
        out: dict[str, Any] = {}
        for path, leaf in pairs:
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = leaf
        return out, [p for p, _ in pairs], treedef


# --- the filter ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Trainable:
    """An NNX filter selecting the variables a method trains (see :func:`trainable`); hashable."""

    method_name: str
    paths: frozenset[Path]

    def __call__(self, path: tuple[Any, ...], value: Any) -> bool:
        return tuple(str(k) for k in path) in self.paths

    def __repr__(self) -> str:
        return f"jpeft.trainable({self.method_name}, {len(self.paths)} variables)"


def check_model(model: Any, where: str) -> None:
    if not _nnx.is_model(model):
        raise JpeftError(f"{where} expects a flax.nnx.Module; got {type(model).__name__}.")


def trainable(method: Method, model: Any) -> Trainable:
    """The NNX filter of the variables ``method`` trains in ``model``: ``wrt=`` for optimizers and grads.

    It selects the delta variables that train (not LoRA-FA's frozen ``A``) and the base variables
    the method trains (BitFit's biases, Freeze's and Full's layers, ``extra_trainable``), by their
    state paths, so it is fixed when it is made: make it again after applying or removing an
    adapter. For the LoRA family and other delta-only methods it selects what ``jpeft.Delta``
    selects; BitFit, Freeze and Full train base ``nnx.Param`` s, which only this filter picks out.

    Use it as ``nnx.Optimizer(model, jpeft.optimizer(tx, method, model), wrt=f)``, ``nnx.grad(loss,
    argnums=nnx.DiffState(0, f))`` or ``nnx.split(model, f, ...)`` (what ``jpeft.split`` returns).

    Raises:
      JpeftError: if ``model`` is not an ``nnx.Module``, or the method trains none of its variables.

    Example:
      >>> import jax, jpeft
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> f = jpeft.trainable(jpeft.BitFit(), model)
      >>> [k for k, _ in nnx.to_flat_state(nnx.state(model, f))]
      [('bias',)]
    """
    from jpeft._core import _check_method

    _check_method(method, "jpeft.trainable")
    check_model(model, "jpeft.trainable")
    view = _View(method, model, "jpeft.trainable")
    if not view.trainable_state_paths:
        raise JpeftError(
            f"jpeft.trainable({type(method).__name__}): the method trains no variable of this NNX model. Pass the "
            "model returned by jpeft.apply(method, model, key=...), not the base model."
        )
    return Trainable(type(method).__name__, view.trainable_state_paths)


# --- the tree functions, on the tree view ------------------------------------------------------------
def labels(method: Method, model: nnx.Module) -> PyTree:
    from jpeft._train import labels as tree_labels

    return tree_labels(method, _nnx.tree(model))


def summary(method: Method, model: nnx.Module) -> str:
    from jpeft._train import summary as tree_summary

    return tree_summary(method, _nnx.tree(model))


def check(model: nnx.Module) -> None:
    from jpeft._train import check as tree_check

    tree_check(_nnx.tree(model))


def list_paths(model: nnx.Module) -> list[str]:
    return _tree.list_paths(_nnx.tree(model))


def regularizer(method: Method, model: nnx.Module, name: str) -> jax.Array:
    from jpeft._core import regularizer as tree_regularizer

    return tree_regularizer(method, _nnx.tree(model), name=name)


def split(method: Method, model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    return nnx.split(model, trainable(method, model), ...)


def combine(graphdef: nnx.GraphDef, *states: nnx.State) -> nnx.Module:
    # copy=True: new Variables at the caller's trace level. Reusing the split's Variable objects inside
    # jax.grad fails in nnx.scan ("Cannot extract graph node from different trace level").
    return nnx.merge(graphdef, *states, copy=True)


# --- the optimizer -------------------------------------------------------------------------------
def optimizer(tx: optax.GradientTransformation, method: Method, model: nnx.Module) -> optax.GradientTransformation:
    """``jpeft.optimizer`` for an NNX model: the linen transform, run on the tree view of each state."""
    from jpeft._train import optimizer as tree_optimizer

    view = _View(method, model, "jpeft.optimizer")
    if not view.trainable_state_paths:
        raise JpeftError(
            f"jpeft.optimizer({type(method).__name__}): no variable of the NNX model trains. Pass the model "
            "returned by jpeft.apply(method, model, key=...), not the base model."
        )
    inner = tree_optimizer(tx, method, view.tree)
    wanted = {view.rename(p) for p in view.trainable_state_paths}

    def init(params: PyTree) -> optax.OptState:
        tree, paths, _ = view.to_tree(params)
        missing = sorted(wanted - set(paths))
        if missing:
            shown = ", ".join(repr(join(p)) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise JpeftError(
                f"jpeft.optimizer({type(method).__name__}): the state it got (nnx.Optimizer's wrt= filter) leaves out "
                f"{len(missing)} of the {len(wanted)} variables the method trains, e.g. {shown}; they would never "
                "update. Pass wrt=jpeft.trainable(method, model) (or jpeft.Delta for delta-only methods)."
            )
        return inner.init(tree)

    def update(updates: PyTree, state: optax.OptState, params: PyTree | None = None) -> tuple[PyTree, optax.OptState]:
        tree, paths, treedef = view.to_tree(updates)
        new, state = inner.update(tree, state, None if params is None else view.to_tree(params)[0])
        like = jax.tree_util.tree_leaves(updates, is_leaf=_is_leaf)  # Variables stay Variables (nnx.split's states)
        out = [
            x.replace(_tree.get(new, p)) if isinstance(x, nnx.Variable) else _tree.get(new, p)
            for x, p in zip(like, paths, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(init, update)
