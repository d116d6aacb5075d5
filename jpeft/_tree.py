"""Parameter-tree helpers: '/'-joined paths, target matching and the reserved delta key.

Delta leaves live inside the parameter tree, next to what they modify, under one reserved key:
``<module path>/__jpeft__/<adapter name>/<leaf>``. Everything here is plain Python over nested
mappings; nothing is traced.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jpeft._errors import JpeftError

PyTree = Any
Path = tuple[str, ...]

RESERVED = "__jpeft__"
"""The key under which a module's delta leaves are stored."""


def join(path: Sequence[Any]) -> str:
    """Returns the '/'-joined form of a path of keys."""
    return "/".join(str(k) for k in path)


def leaves(tree: PyTree, prefix: Path = ()) -> list[tuple[Path, Any]]:
    """Returns ``(path, leaf)`` pairs of a nested mapping, in sorted key order.

    ``None`` entries (the holes of :func:`jpeft.split`) are skipped.
    """
    out: list[tuple[Path, Any]] = []
    if isinstance(tree, Mapping):
        for k in sorted(tree, key=str):
            out.extend(leaves(tree[k], prefix + (str(k),)))
    elif tree is not None:
        out.append((prefix, tree))
    return out


def all_paths(tree: PyTree, prefix: Path = ()) -> list[Path]:
    """Like :func:`leaves`, but returns only paths and keeps those of ``None`` holes.

    A half of :func:`jpeft.split` keeps the whole structure, so methods that label by the whole
    tree (how many layers, which family) see the same paths on it as on the full tree.
    """
    if isinstance(tree, Mapping):
        return [p for k in sorted(tree, key=str) for p in all_paths(tree[k], prefix + (str(k),))]
    return [prefix]


def list_paths(params: PyTree) -> list[str]:
    """Lists the '/'-joined path of every leaf of a parameter tree.

    Args:
        params: a nested mapping of arrays, such as a Flax ``params`` collection, or an NNX model
            (its ``Param`` and frozen-delta variables, with weights under linen's leaf names).

    Returns:
        The paths, sorted, one per leaf, such as ``'layers/query/kernel'``.

    Example:
        >>> import jax.numpy as jnp, jpeft
        >>> jpeft.list_paths({"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}})
        ['dense/bias', 'dense/kernel']
    """
    if not isinstance(params, Mapping):
        from jpeft import _nnx, _nnx_train  # lazily: _tree is imported by both

        if _nnx.is_model(params):
            return _nnx_train.list_paths(params)
        raise JpeftError(
                f"list_paths expects a nested mapping of arrays; got {type(params).__name__}. "
                "Pass variables['params'], not the variables dict or a model object."
        )
    return [join(p) for p, _ in leaves(params)]


def size(leaf: Any) -> int:
    """The number of elements of an array leaf."""
    return int(math.prod(getattr(leaf, "shape", ())))


def get(tree: PyTree, path: Path) -> Any:
    """Returns the subtree at ``path``."""
    for k in path:
        tree = tree[k]
    return tree


def as_dicts(tree: PyTree) -> PyTree:
    """Rebuilds every mapping of ``tree`` as a fresh dict; the leaves are the same objects."""
    if isinstance(tree, Mapping):
        return {k: as_dicts(v) for k, v in tree.items()}
    return tree


def modules(params: PyTree) -> dict[Path, Mapping[str, Any]]:
    """Maps each module path (a node with at least one array leaf) to its own leaves.

    Reserved delta subtrees are not modules.
    """
    out: dict[Path, Mapping[str, Any]] = {}

    def visit(node: Mapping[str, Any], path: Path) -> None:
        own = {k: v for k, v in node.items() if not isinstance(v, Mapping) and v is not None}
        if own:
            out[path] = own
        for k, v in node.items():
            if isinstance(v, Mapping) and k != RESERVED:
                visit(v, path + (str(k),))

    if isinstance(params, Mapping):
        visit(params, ())
    return out


def normalize_targets(owner: str, targets: Any) -> str | tuple[str, ...]:
    """Validates a ``targets`` field: a regex str, or a non-empty sequence of name suffixes."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise JpeftError(
                    f"{owner}(targets={targets!r}): not a valid regular expression ({e}). "
                    "Pass a regex over '/'-joined module paths, or a list of module names like ['query', 'value']."
            ) from None
        return targets
    if isinstance(targets, Sequence) and targets and all(isinstance(t, str) and t for t in targets):
        return tuple(targets)
    raise JpeftError(
            f"{owner}(targets={targets!r}): targets must be a regex str over '/'-joined module paths "
            "(e.g. r'.*/(query|value)') or a non-empty list of module-name suffixes (e.g. ['query', 'value'])."
    )


def matches(targets: str | tuple[str, ...], path: Path) -> bool:
    """Whether a module path is selected by ``targets``.

    A str is a regex that must match the whole '/'-joined path. A tuple holds name suffixes: the path
    matches when it ends with one of them at a '/' boundary (like HF PEFT's ``target_modules``).
    """
    joined = join(path)
    if isinstance(targets, str):
        return re.fullmatch(targets, joined) is not None
    return any(joined == t or joined.endswith("/" + t) for t in targets)


def select(owner: str, targets: str | tuple[str, ...], params: PyTree) -> list[Path]:
    """Returns the module paths selected by ``targets``; raises if there are none."""
    mods = modules(params)
    hit = [p for p in mods if matches(targets, p)]
    if not hit:
        example = join(next(iter(mods))) if mods else "<no modules>"
        raise JpeftError(
                f"{owner}(targets={targets!r}) matched 0 of {len(mods)} module paths.\n"
                f"Module paths look like {example!r}; see jpeft.list_paths(params). Regex targets must "
                "match the whole path (use '.*/query'), suffix targets must be whole path components."
        )
    return sorted(hit)
