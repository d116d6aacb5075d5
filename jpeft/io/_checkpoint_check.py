"""What :func:`jpeft.restore` checks before it loads a byte of array data, and the method as JSON.

A checkpoint is read only if its ``meta`` JSON parses and has every key with the right type, the
arrays orbax stored have the shapes and dtypes ``meta`` claims, and those are exactly the leaves
``jpeft.apply(method, params)`` makes (computed with ``jax.eval_shape``: nothing is allocated) plus
the base leaves the method trains. So an edited method (rank 2 -> 4, other targets), an edited
dtype or an edited path (onto a frozen base leaf) is refused instead of loaded. Every refusal is a
:class:`jpeft.JpeftError` naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from jpeft import _tree
from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft._tree import RESERVED, Path, PyTree, join

FORMAT = 2
"""The version of the checkpoint layout written by :func:`jpeft.save` (2: a save id in every item
and the optimizer state's tree structure; format 1 is still read)."""
READS = (1, 2)


# --- the method as JSON ----------------------------------------------------------------------------
def encode(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "__dataclass__": f"{type(value).__module__}:{type(value).__qualname__}",
            "fields": {f.name: encode(getattr(value, f.name), f"{where}.{f.name}") for f in _init_fields(value)},
        }
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {"__mapping__": {k: encode(v, f"{where}[{k!r}]") for k, v in value.items()}}
    raise JpeftError(
        f"jpeft.save: the method field {where} = {value!r} ({type(value).__name__}) cannot be written as "
        "JSON. Method fields must be None, bool, int, float, str, tuples, str-keyed mappings or jpeft "
        "dataclasses of those."
    )


def _init_fields(obj: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(obj) if f.init]


def decode(value: Any, where: str) -> Any:
    if isinstance(value, list):  # frozen, hashable dataclasses hold tuples, never lists
        return tuple(decode(v, where) for v in value)
    if isinstance(value, dict) and "__mapping__" in value:
        return {k: decode(v, where) for k, v in value["__mapping__"].items()}
    if isinstance(value, dict) and "__dataclass__" in value:
        if not isinstance(value["__dataclass__"], str) or not isinstance(value.get("fields"), dict):
            raise JpeftError(
                f"jpeft.restore: the checkpoint's {where} is not a {{'__dataclass__': str, 'fields': {{}}}}: {value!r}."
            )
        module, _, qualname = value["__dataclass__"].partition(":")
        cls = _jpeft_class(module, qualname, where)
        fields = {k: decode(v, f"{where}.{k}") for k, v in value["fields"].items()}
        try:
            return cls(**fields)
        except (TypeError, ValueError, JpeftError) as e:  # a field this version no longer has, or a bad value
            raise JpeftError(
                f"jpeft.restore: cannot rebuild the checkpoint's {where} as {qualname}(**{fields!r}): {e}. "
                "Pass the method yourself: jpeft.restore(path, params, method=...)."
            ) from None
    return value


def _jpeft_class(module: str, qualname: str, where: str) -> type:
    import jpeft

    cls = getattr(jpeft, qualname, None)
    if cls is None and (module == "jpeft" or module.startswith("jpeft.")) and "." not in qualname:
        try:
            cls = getattr(importlib.import_module(module), qualname, None)
        except ImportError:  # a module this jpeft does not have
            cls = None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise JpeftError(
            f"jpeft.restore: the checkpoint's {where} is a {module}.{qualname}, which jpeft "
            f"{jpeft.__version__} does not define. For a method of your own, pass it: "
            "jpeft.restore(path, params, method=MyMethod(...))."
        )
    return cls


def method_json(method: Method) -> dict[str, Any]:
    """The method as JSON, checked to come back equal (methods defined outside jpeft are not rebuilt by
    name; :func:`jpeft.restore` takes them as ``method=``)."""
    config = encode(method, type(method).__name__)
    try:
        back = decode(config, type(method).__name__)
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


# --- trees -----------------------------------------------------------------------------------------
def describe(x: Any) -> list[Any]:
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype  # Python scalars in some optax states
    return [list(np.shape(x)), str(np.dtype(dtype))]


def fingerprint(leaves: list[list[Any]]) -> str:
    return hashlib.sha256(json.dumps(leaves, separators=(",", ":")).encode()).hexdigest()


def skeleton(tree: Any) -> str:
    """The tree's structure with its node types: ``ScaleByAdamState(...)`` differs from ``ScaleByBeliefState``."""

    def walk(treedef: Any) -> str:
        data = treedef.node_data()
        if data is None:
            return "*"
        kind, aux = data
        keys = f"{list(aux)}" if isinstance(aux, (list, tuple)) and all(isinstance(k, str) for k in aux) else ""
        return f"{kind.__module__}.{kind.__qualname__}{keys}(" + ",".join(walk(c) for c in treedef.children()) + ")"

    return walk(jax.tree.structure(tree))


def skeleton_difference(saved: str, found: str) -> str:
    i = next((i for i, (a, b) in enumerate(zip(saved, found, strict=False)) if a != b), min(len(saved), len(found)))
    lo = max(0, i - 60)
    return f"saved ...{saved[lo : i + 60]}..., template ...{found[lo : i + 60]}..."


def mismatch(expected: list[list[Any]], found: list[list[Any]]) -> str:
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


def first_difference(want: list[Any], found: list[Any]) -> str:
    for i in range(max(len(want), len(found))):
        w = want[i] if i < len(want) else "none"
        f = found[i] if i < len(found) else "none"
        if w != f:
            return f"{i}: saved {w}, template {f}"
    return "none"


# --- meta ------------------------------------------------------------------------------------------
def _is_dtype(x: Any) -> bool:
    try:
        return isinstance(x, str) and str(np.dtype(x)) == x
    except (TypeError, ValueError):
        return False


def _is_shape(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in x)


def _is_leaf(x: Any, with_path: bool) -> bool:
    if not isinstance(x, list) or len(x) != 2 + with_path:
        return False
    return (not with_path or isinstance(x[0], str)) and _is_shape(x[-2]) and _is_dtype(x[-1])


_KEYS: dict[str, tuple[str, Any]] = {
    "format": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "method": (
        "a {'__dataclass__': str, 'fields': {...}} object",
        lambda v: isinstance(v, dict) and isinstance(v.get("__dataclass__"), str) and isinstance(v.get("fields"), dict),
    ),
    "adapter": ("a str", lambda v: isinstance(v, str)),
    "step": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "params": ("a list of [path, shape, dtype]", lambda v: isinstance(v, list) and all(_is_leaf(x, True) for x in v)),
    "sites": ("a list of str", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "opt_state": (
        "null or a list of [shape, dtype]",
        lambda v: v is None or (isinstance(v, list) and all(_is_leaf(x, False) for x in v)),
    ),
    "base": (
        "a {'fingerprint': str, 'leaves': [[path, shape, dtype], ...]} object",
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("fingerprint"), str)
            and isinstance(v.get("leaves"), list)
            and all(_is_leaf(x, True) for x in v["leaves"])
        ),
    ),
}
_KEYS_2: dict[str, tuple[str, Any]] = {
    "save_id": ("a str", lambda v: isinstance(v, str) and len(v) > 0),
    "opt_tree": ("null or a str", lambda v: v is None or isinstance(v, str)),
}


def meta_file(directory: epath.Path) -> epath.Path:
    return directory / "meta" / "metadata"


def read_meta(directory: epath.Path, step: int) -> dict[str, Any]:
    """The checkpoint's ``meta`` JSON, every key checked."""
    file = meta_file(directory)
    where = f"jpeft.restore: the checkpoint metadata '{file}'"
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise JpeftError(
            f"{where} is missing: the checkpoint is incomplete or was edited. Restore another step."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise JpeftError(f"{where} cannot be read: {e}.") from None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise JpeftError(
            f"{where} is not valid JSON ({e}); it was truncated or edited. Restore another step."
        ) from None
    if not isinstance(meta, dict):
        raise JpeftError(f"{where} holds a {type(meta).__name__}, not a JSON object.")
    if meta.get("format") not in READS:
        raise JpeftError(
            f"{where} has checkpoint format {meta.get('format')!r}; this jpeft reads formats {list(READS)}."
        )
    for key, (what, ok) in (_KEYS | (_KEYS_2 if meta["format"] >= 2 else {})).items():
        if key not in meta:
            raise JpeftError(f"{where} has no {key!r} key; it was edited or written by another program.")
        if not ok(meta[key]):
            raise JpeftError(f"{where}: {key!r} must be {what}; found {json.dumps(meta[key])[:200]}.")
    if meta["step"] != step:
        raise JpeftError(f"{where} says step {meta['step']}, but it is in the directory of step {step}.")
    for p, *_ in meta["params"]:
        if "" in p.split("/"):
            raise JpeftError(f"{where}: the saved path {p!r} has an empty key.")
    return meta


def stored_leaves(directory: epath.Path, item: str, meta_leaves: list[list[Any]], save_id: bool) -> None:
    """Checks that orbax's stored arrays of ``item`` have the keys, shapes and dtypes ``meta`` claims."""
    import orbax.checkpoint as ocp

    folder = directory / item
    where = f"jpeft.restore: the checkpoint item '{folder}'"
    if not folder.is_dir():
        raise JpeftError(f"{where} is missing, though the metadata lists {len(meta_leaves)} leaves in it.")
    try:
        tree = ocp.StandardCheckpointHandler().metadata(folder).tree
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types on damaged files
        raise JpeftError(f"{where} has damaged or missing metadata: {type(e).__name__}: {str(e)[:300]}.") from None
    want = {f"{i:06d}": (tuple(s), d) for i, (*_, s, d) in enumerate(meta_leaves)}
    if save_id:
        want["save_id"] = ((16,), "uint8")
    have = {}
    for k, v in tree.items() if isinstance(tree, Mapping) else ():
        have[k] = (tuple(getattr(v, "shape", ())), str(np.dtype(getattr(v, "dtype", "object"))))
    if want != have:
        diff = [
            f"{k}: metadata says {want.get(k, 'missing')}, stored {have.get(k, 'missing')}"
            for k in sorted(want.keys() | have.keys())
            if want.get(k) != have.get(k)
        ]
        raise JpeftError(f"{where} does not hold the arrays its metadata lists: {'; '.join(diff[:5])}.")


def against_method(
    method: Method, params: PyTree, meta: Mapping[str, Any], directory: epath.Path, applied: Any = None
) -> None:
    """Checks the saved leaves against ``jax.eval_shape(jpeft.apply(method, params))``, or against
    ``applied(method, adapter)`` (the NNX backend: the tree view of the model it applied)."""
    import jpeft

    name = meta["adapter"]
    file = meta_file(directory)
    try:
        if applied is not None:
            expected = applied(method, name)
        else:
            expected = jax.eval_shape(lambda p: jpeft.apply(method, p, key=jax.random.key(0), name=name), params)
    except JpeftError as e:
        raise JpeftError(f"jpeft.restore: the method of '{file}' does not apply to params: {e}") from None
    labels = jpeft.labels(method, expected)
    want = []
    for p, x in _tree.leaves(expected):
        delta = RESERVED in p and p[p.index(RESERVED) + 1] == name
        if delta or (RESERVED not in p and _tree.get(labels, p) != "frozen"):
            want.append([join(p), *describe(x)])
    if sorted(want) != sorted(meta["params"]):
        raise JpeftError(
            f"jpeft.restore: the leaves listed in '{file}' are not those {type(method).__name__} makes and trains on "
            f"params (jpeft.apply's shapes first):\n{mismatch(want, meta['params'])}\nThe method or the leaf list was "
            "edited, or the checkpoint belongs to another method; nothing was loaded."
        )
    sites = sorted(join(p) for p in adapter_sites(_tree.as_dicts(expected), name))
    if sorted(meta["sites"]) != sites:
        raise JpeftError(
            f"jpeft.restore: the adapter sites listed in '{file}' ({sorted(meta['sites'])[:5]}) are not those "
            f"{type(method).__name__} makes on params ({sites[:5]}); nothing was loaded."
        )


def adapter_sites(tree: PyTree, name: str, path: Path = ()) -> list[Path]:
    """Paths of the modules whose delta store holds adapter ``name`` (empty stores included)."""
    if not isinstance(tree, Mapping):
        return []
    out = [path] if isinstance(tree.get(RESERVED), Mapping) and name in tree[RESERVED] else []
    for k, v in tree.items():
        if k != RESERVED:
            out.extend(adapter_sites(v, name, path + (str(k),)))
    return out
