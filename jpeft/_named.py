"""Named adapters on one tree: removing one, and combining LoRA adapters into a new one.

Every delta leaf sits at ``<module>/__jpeft__/<name>/<leaf>``, so these are plain tree edits: the
base leaves are the same objects in the result, and the input tree is never mutated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._method import Context
from jpeft._tree import RESERVED, Path, PyTree, join
from jpeft.methods._lora import LoRA

COMBINATIONS = ("linear", "cat", "svd")


def _names(tree: PyTree, path: Path = ()) -> dict[str, list[Path]]:
    """Adapter name -> the module paths that hold its deltas."""
    out: dict[str, list[Path]] = {}
    if not isinstance(tree, Mapping):
        return out
    for name in tree.get(RESERVED, {}):
        out.setdefault(name, []).append(path)
    for k, v in tree.items():
        if k != RESERVED:
            for name, paths in _names(v, path + (str(k),)).items():
                out.setdefault(name, []).extend(paths)
    return out


def adapters(peft_params: PyTree) -> list[str]:
    """The names of the adapters a tree holds, sorted.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}}
      >>> m = jpeft.LoRA(targets=["q"], rank=2)
      >>> peft = jpeft.apply(m, jpeft.apply(m, params, key=jax.random.key(0), name="fr"), key=jax.random.key(1))
      >>> jpeft.adapters(peft)
      ['default', 'fr']
    """
    return sorted(_names(peft_params))


def remove(peft_params: PyTree, name: str) -> PyTree:
    """Returns the tree without adapter ``name``; the other adapters and the base are untouched.

    A module left with no adapter loses its reserved key, so removing the last adapter gives back
    exactly the base structure.

    Raises:
      JpeftError: if the tree holds no adapter called ``name``.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}}
      >>> m = jpeft.LoRA(targets=["q"], rank=2)
      >>> jpeft.remove(jpeft.apply(m, params, key=jax.random.key(0)), "default") == params
      True
    """
    found = _names(peft_params)
    if name not in found:
        raise JpeftError(
            f"jpeft.remove: the tree holds no adapter {name!r}; it holds {sorted(found) or 'none'}. "
            "Pass one of those names (see jpeft.adapters(tree))."
        )

    def strip(tree: Any) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        out = {k: strip(v) for k, v in tree.items() if k != RESERVED}
        if RESERVED in tree:
            rest = {n: d for n, d in tree[RESERVED].items() if n != name}
            if rest:
                out[RESERVED] = rest
        return out

    return strip(peft_params)


def add_weighted(
    peft_params: PyTree,
    weights: Mapping[str, float],
    *,
    method: LoRA | Mapping[str, LoRA],
    combination: str = "linear",
    name: str = "weighted",
    svd_rank: int | None = None,
) -> tuple[LoRA, PyTree]:
    """Adds a new LoRA adapter that combines named ones, as HF PEFT's ``add_weighted_adapter``.

    With ``a_i: (in, r_i)``, ``b_i: (r_i, out)``, scales ``s_i`` and weights ``w_i``:

    * ``"linear"`` (equal ranks): ``a = sum_i sqrt(w_i s_i) a_i`` and ``b = sum_i sqrt(w_i s_i) b_i``.
      This is HF PEFT's rule; for one adapter it is exact, for several it adds cross terms.
    * ``"cat"``: ``a = [w_1 s_1 a_1, ...]`` and ``b = [b_1; ...]`` stacked along the rank axis, so
      ``a b = sum_i w_i s_i a_i b_i`` exactly, at rank ``sum_i r_i``.
    * ``"svd"``: the truncated SVD (rank ``svd_rank``, default ``max_i r_i``) of
      ``sum_i w_i s_i a_i b_i``, per module and per stacked layer; ``a = U``, ``b = S V^T``.

    The new adapter has scale 1 (``alpha = rank``) because the old scales are folded into ``a``.
    Stacked (``nn.scan``) factors combine per layer.

    Args:
      peft_params: a tree holding the adapters named in ``weights``.
      weights: adapter name -> weight.
      method: the LoRA method of the adapters (one for all, or one per name).
      combination: ``"linear"``, ``"cat"`` or ``"svd"``.
      name: the new adapter's name.
      svd_rank: the rank of ``"svd"``.

    Returns:
      ``(new_method, tree)``: run the new adapter with ``jpeft.wrap(apply_fn, new_method,
      active=name)``.

    Raises:
      JpeftError: for an unknown name or combination, unequal ranks with ``"linear"``, DoRA
        adapters, adapters on different modules, or a name that exists already.

    Example:
      >>> import jax, jax.numpy as jnp, jpeft
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}}
      >>> m = jpeft.LoRA(targets=["q"], rank=2)
      >>> peft = jpeft.apply(m, jpeft.apply(m, params, key=jax.random.key(0), name="a"), key=jax.random.key(1), name="b")
      >>> new, peft = jpeft.add_weighted(peft, {"a": 0.5, "b": 0.5}, method=m, combination="cat")
      >>> new.rank, peft["q"]["__jpeft__"]["weighted"]["lora_a"].shape
      (4, (4, 4))
    """
    where = "jpeft.add_weighted"
    if combination not in COMBINATIONS:
        raise JpeftError(f"{where}(combination={combination!r}): expected one of {COMBINATIONS}.")
    if not isinstance(weights, Mapping) or not weights:
        raise JpeftError(f"{where}: weights must be a non-empty mapping of adapter name -> weight; got {weights!r}.")
    found = _names(peft_params)
    if name in found:
        raise JpeftError(f"{where}: adapter {name!r} exists already. Pass another name=..., or jpeft.remove it first.")
    methods = dict(method) if isinstance(method, Mapping) else {n: method for n in weights}
    for n, w in weights.items():
        if n not in found:
            raise JpeftError(f"{where}: the tree holds no adapter {n!r}; it holds {sorted(found) or 'none'}.")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise JpeftError(f"{where}: weight of {n!r} must be a finite number; got {w!r}.")
        m = methods.get(n)
        if not isinstance(m, LoRA):
            raise JpeftError(f"{where}: adapter {n!r} needs its LoRA method in method=...; got {type(m).__name__}.")
        if m.use_dora:
            raise JpeftError(
                f"{where}: adapter {n!r} uses DoRA; its magnitude vector does not combine linearly. "
                "Merge DoRA adapters with jpeft.merge one at a time instead."
            )
        if combination == "linear" and w < 0:
            raise JpeftError(f"{where}: 'linear' takes sqrt(weight); weight of {n!r} is {w}. Use 'cat' or 'svd'.")
    names = list(weights)
    sites = {tuple(p) for p in found[names[0]]}
    for n in names[1:]:
        if {tuple(p) for p in found[n]} != sites:
            raise JpeftError(
                f"{where}: adapters {names[0]!r} and {n!r} sit on different modules "
                f"({sorted(join(p) for p in sites ^ {tuple(q) for q in found[n]})[:3]} ...); "
                "combine adapters with the same targets."
            )
    ranks = {n: methods[n].rank for n in names}
    if combination == "linear" and len(set(ranks.values())) > 1:
        raise JpeftError(f"{where}: 'linear' needs equal ranks; got {ranks}. Use 'cat' or 'svd'.")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise JpeftError(f"{where}(svd_rank={svd_rank!r}): svd_rank must be a positive int.")
    new_rank = {"linear": ranks[names[0]], "cat": sum(ranks.values()), "svd": svd_rank or max(ranks.values())}[
        combination
    ]
    base = methods[names[0]]
    new = dataclasses.replace(base, rank=new_rank, alpha=float(new_rank), use_rslora=False)
    ctx = Context(peft_params)
    out = _tree.as_dicts(peft_params)
    for path in sorted(sites):
        node = _tree.get(out, path)
        own = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        layout = ctx.layout(where, path, own, base.layouts)
        store = node[RESERVED]
        parts = [(store[n]["lora_a"], store[n]["lora_b"], weights[n], methods[n].scale) for n in names]
        b_rank_axis = parts[0][1].ndim - layout.n_out - 1
        if combination == "linear":
            a = sum(math.sqrt(w * s) * a for a, _, w, s in parts)
            b = sum(math.sqrt(w * s) * b for _, b, w, s in parts)
        elif combination == "cat":
            a = jnp.concatenate([w * s * a for a, _, w, s in parts], axis=-1)
            b = jnp.concatenate([b for _, b, _, _ in parts], axis=b_rank_axis)
        else:
            a, b = _svd(parts, b_rank_axis, new_rank, path, own[layout.leaf].shape)
        dtype = parts[0][0].dtype
        node[RESERVED] = {**store, name: {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype)}}
    return new, out


def _svd(parts: list[tuple[Any, Any, float, float]], b_rank_axis: int, rank: int, path: Path, shape: Any) -> tuple:
    a0, b0 = parts[0][0], parts[0][1]
    stack = b0.shape[:b_rank_axis]
    d_in, d_out = a0.shape[len(stack) : -1], b0.shape[b_rank_axis + 1 :]
    n_in, n_out = math.prod(d_in), math.prod(d_out)
    if rank > min(n_in, n_out):
        raise JpeftError(
            f"jpeft.add_weighted: svd rank {rank} exceeds min(in, out) = {min(n_in, n_out)} at {join(path)!r} "
            f"(kernel {tuple(shape)}). Pass a smaller svd_rank."
        )
    delta = sum(
        w * s * jnp.matmul(a.reshape(stack + (n_in, -1)), b.reshape(stack + (-1, n_out)))
        for a, b, w, s in parts
    )
    u, sv, vt = jnp.linalg.svd(delta.astype(jnp.float32), full_matrices=False)
    a = u[..., :rank].reshape(stack + d_in + (rank,))
    b = (sv[..., :rank, None] * vt[..., :rank, :]).reshape(stack + (rank,) + d_out)
    return a, b
