"""The public tree API, part one: apply, merge and regularizer (``jpeft._wrap`` has wrap; ``jpeft._train`` the rest).

All of it is plain Python over parameter trees; nothing here is jitted. Users choose where to jit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jpeft import _nnx, _nnx_apply, _tied, _tree
from jpeft._errors import JpeftError
from jpeft._method import Context, Method
from jpeft._tree import RESERVED, Path, PyTree, join


def _check_method(method: Any, where: str) -> None:
    if not isinstance(method, Method):
        raise JpeftError(
            f"{where} expects a jpeft method such as jpeft.LoRA(targets=...); got "
            f"{type(method).__name__}. Method objects come first: {where}(method, params, ...)."
        )


def _check_params(params: Any, where: str) -> None:
    if not isinstance(params, Mapping):
        raise JpeftError(
            f"{where} expects the 'params' collection as a nested mapping of arrays; got "
            f"{type(params).__name__}. Pass variables['params'] (for HF Flax models, model.params)."
        )
    if set(params) == {"params"} and isinstance(params["params"], Mapping):
        raise JpeftError(f"{where} got a variables dict {{'params': ...}}; pass variables['params'] instead.")


def _check_model_object(params: Any, where: str) -> None:
    """A model object that jpeft cannot adapt: an NNX class, a linen module, anything else not a mapping."""
    from flax import nnx

    if isinstance(params, type) and issubclass(params, nnx.Module):
        raise JpeftError(
            f"{where} got the NNX class {params.__name__}, not a model. Pass an instance, e.g. "
            f"{params.__name__}(..., rngs=nnx.Rngs(0))."
        )
    if isinstance(params, nn.Module):
        raise JpeftError(
            f"{where} got a flax.linen module object ({type(params).__name__}), which holds no weights. Pass its "
            "params, model.init(key, x)['params'], and run it with jpeft.wrap(model.apply, method)."
        )
    if not isinstance(params, Mapping):
        raise JpeftError(
            f"{where} expects the 'params' collection as a nested mapping of arrays; got {type(params).__name__}. "
            "Pass variables['params'] (for HF Flax models, model.params), or a flax.nnx.Module instance."
        )


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise JpeftError(f"Adapter name must be a non-empty str without '/'; got {name!r}.")


def _map(fn: Callable[[Path, Any], Any], tree: PyTree, path: Path = ()) -> PyTree:
    """Maps ``fn(path, leaf)`` over a nested mapping, keeping ``None`` holes; returns dicts."""
    if isinstance(tree, Mapping):
        return {k: _map(fn, v, path + (str(k),)) for k, v in tree.items()}
    return None if tree is None else fn(path, tree)


def _sites(tree: PyTree, path: Path = ()) -> list[Path]:
    """Paths of the modules whose node holds the reserved delta key."""
    if not isinstance(tree, Mapping):
        return []
    out = [path] if RESERVED in tree else []
    for k, v in tree.items():
        if k != RESERVED:
            out.extend(_sites(v, path + (str(k),)))
    return out


def _check_key(key: Any) -> None:
    if (
        key is None
        or not isinstance(key, jax.Array)
        or not (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.shape == (2,) and key.dtype == np.uint32))
    ):
        raise JpeftError(f"jpeft.apply(key={key!r}): key must be a jax.random key, e.g. key=jax.random.key(0).")


def apply(method: Method, params: PyTree, *, key: jax.Array, name: str = "default") -> PyTree:
    """Adds a method's delta leaves to a parameter tree, or to a ``flax.nnx`` model.

    Each target module gets ``<module>/__jpeft__/<name>/<leaf>`` beside its own leaves. The result
    shares every base leaf with ``params`` (the same array objects) and ``params`` is not mutated.

    Args:
      method: a jpeft method, e.g. ``jpeft.LoRA(targets=("query", "value"))``.
      params: the model's ``params`` collection, or an ``nnx.Module``. For an NNX model, ``apply``
        returns a *new* model object that shares every base array with ``model`` (nothing is
        copied, and ``model`` itself stays a plain base model): the same contract as for trees.
        Each target module gets ``<module>.__jpeft__[name][leaf]`` variables (``jpeft.Delta``;
        LoRA factors also ``nnx.LoRAParam``) and runs them when called; see
        ``jpeft.set_adapter`` and ``jpeft.call``.
      key: a ``jax.random`` key for the delta initialisation. It is required: jpeft never
        substitutes a seed.
      name: the adapter name; several named adapters can live on one tree.

    Returns:
      The tree with delta leaves added. Its base leaves *are* the caller's arrays: donating the
      whole tree (``jax.jit(step, donate_argnums=0)``) deletes ``params`` too. Donate the
      ``trainable`` half of :func:`split` instead, and pass the ``frozen`` half undonated.

    Raises:
      JpeftError: on a target that matches nothing, a rank too large for a layer, a missing key,
        or an adapter name that already exists at a target.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> class MLP(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
      >>> params = MLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
      >>> peft = jpeft.apply(jpeft.LoRA(targets=["hidden"], rank=2), params, key=jax.random.key(1))
      >>> jpeft.list_paths(peft)[:2]
      ['hidden/__jpeft__/default/lora_a', 'hidden/__jpeft__/default/lora_b']
      >>> peft["hidden"]["kernel"] is params["hidden"]["kernel"]
      True
    """
    _check_method(method, "jpeft.apply")
    if _nnx.is_model(params):
        _check_name(name)
        _check_key(key)
        return _nnx_apply.apply(method, params, key, name)
    _check_model_object(params, "jpeft.apply")
    _check_params(params, "jpeft.apply")
    _check_name(name)
    _check_key(key)
    targets = method.select(params)
    ctx = Context(params)
    out = _tree.as_dicts(params)
    if not method.has_deltas:  # BitFit, Freeze, Full: select() validated; the labels do the rest
        return out
    for i, path in enumerate(targets):
        node = _tree.get(out, path)
        store = node.get(RESERVED, {})
        if name in store:
            raise JpeftError(
                f"jpeft.apply: adapter {name!r} already exists at {join(path)!r}. Pass another "
                "name=..., or remove it first."
            )
        own = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        node[RESERVED] = {**store, name: method.init_module(jax.random.fold_in(key, i), path, own, ctx)}
    return out


def merge(method: Method, peft_params: PyTree, *, name: str = "default") -> PyTree:
    """Folds a mergeable method's deltas into the base weights.

    The result has exactly the structure, shapes and dtypes of the original ``params``: every delta
    subtree is removed, and leaves that no delta touches are the same objects.

    Args:
      method: the method that made the deltas.
      peft_params: the tree from :func:`apply`, after training.
      name: the adapter to fold in.

    Returns:
      Plain parameters for ``model.apply`` with zero inference overhead.

    Raises:
      JpeftError: if the method cannot be merged or the tree holds none of its deltas.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
      >>> model, x = nn.Dense(3), jnp.ones((2, 4))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> method = jpeft.LoRA(targets=".*", rank=2)
      >>> peft = jpeft.apply(method, params, key=jax.random.key(1))
      >>> merged = jpeft.merge(method, peft)
      >>> sorted(merged), merged["kernel"].shape
      (['bias', 'kernel'], (4, 3))
    """
    _check_method(method, "jpeft.merge")
    if _nnx.is_model(peft_params):
        _check_name(name)
        return _nnx_apply.merge(method, peft_params, name)
    _check_params(peft_params, "jpeft.merge")
    folded = method.merge_tree(peft_params, name)
    if folded is not None:  # a whole-tree fold, such as prefix tuning's MLP into plain prefixes
        return folded
    if not method.mergeable:
        method.merge_module((), {}, None, Context(peft_params))  # raises the method's own message
    if not method.has_deltas:  # the trained base leaves are already in place
        return _tree.as_dicts(peft_params)
    ctx = Context(peft_params)
    out = _tree.as_dicts(peft_params)
    merged = 0
    for path in _sites(out):
        node = _tree.get(out, path)
        store = node.pop(RESERVED)
        if name in store:
            own = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
            node.update(_tied.merge_module(method, path, own, store[name], ctx))  # refuses tied embeddings
            merged += 1
    if not merged:
        raise JpeftError(
            f"jpeft.merge({type(method).__name__}): the tree holds no deltas of adapter {name!r}. "
            "Pass the tree returned by jpeft.apply (and trained), not the base params."
        )
    return out


def regularizer(method: Method, peft_params: PyTree, *, name: str = "default") -> jax.Array:
    """The method's loss term summed over the tree: AdaLoRA's orthogonality, diff pruning's L0.

    Traceable; add it to the loss inside the training step. It is ``0.0`` for methods without one.
    ``peft_params`` may be an NNX model from ``jpeft.apply`` (inside ``nnx.grad`` or after
    ``nnx.merge`` in the lean step, so the term's gradient reaches its deltas).

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}}
      >>> method = jpeft.LoRA(targets=["q"], rank=2)
      >>> float(jpeft.regularizer(method, jpeft.apply(method, params, key=jax.random.key(0))))
      0.0
    """
    _check_method(method, "jpeft.regularizer")
    if _nnx.is_model(peft_params):
        _check_name(name)
        from jpeft import _nnx_train

        return _nnx_train.regularizer(method, peft_params, name)
    _check_params(peft_params, "jpeft.regularizer")
    whole = method.tree_penalty(peft_params, name)  # AdaLoRA's mean over all factor matrices
    if whole is not None:
        return whole
    terms = []
    for path in _sites(peft_params):
        node = _tree.get(peft_params, path)
        if name in node[RESERVED]:
            own = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
            term = method.penalty(path, own, node[RESERVED][name])
            if term is not None:
                terms.append(term)
    return functools.reduce(lambda a, b: a + b, terms) if terms else jax.numpy.zeros((), "float32")
