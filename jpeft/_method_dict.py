"""Methods to and from plain, JSON-ready dicts: the format that :func:`jpeft.save` writes into a checkpoint.

One format, one serialiser: :func:`method_to_dict` is the checkpoint's own encoder
(``jpeft/io/_checkpoint.py``), and :func:`method_from_dict` checks a dict against the jpeft classes
(name, fields, field types) before the checkpoint's decoder rebuilds it, so that a hand-written dict
(a search space, a config file) fails with a message that names the bad entry. The format::

    {"__dataclass__": "jpeft:LoRA", "fields": {"targets": ["query", "value"], "rank": 8, ...}}

Nested dataclasses (the methods of a composition, a profile) are dicts of the same shape, tuples are
JSON lists, str-keyed mappings are ``{"__mapping__": {...}}``. A class is looked up by name in
``jpeft`` (``"jpeft:LoRA"``; a bare ``"LoRA"`` is accepted too).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from jpeft._errors import JpeftError
from jpeft._method import Method
from jpeft.io import _checkpoint

__all__ = ["method_from_dict", "method_to_dict"]

_WHO = "jpeft.method_from_dict"


def method_to_dict(method: Method) -> dict[str, Any]:
    """``method`` as a JSON-ready dict, checked to come back equal through :func:`method_from_dict`.

    Example:
      >>> import json, jpeft
      >>> d = jpeft.method_to_dict(jpeft.LoRA(targets=("query", "value"), rank=4))
      >>> d["__dataclass__"], d["fields"]["rank"], d["fields"]["targets"]
      ('jpeft.methods._lora:LoRA', 4, ['query', 'value'])
      >>> jpeft.method_from_dict(json.loads(json.dumps(d))) == jpeft.LoRA(targets=("query", "value"), rank=4)
      True
    """
    if not isinstance(method, Method):
        raise JpeftError(
            f"jpeft.method_to_dict: expected a jpeft.Method (e.g. jpeft.LoRA(...)), got {type(method).__name__} "
            f"{method!r}."
        )
    cls = type(method)
    try:
        found = _class(cls.__qualname__, cls.__qualname__, "jpeft.method_to_dict", cls.__module__)
    except JpeftError:
        found = None
    if found is not cls:
        raise JpeftError(
            f"jpeft.method_to_dict: {cls.__module__}.{cls.__qualname__} is not a jpeft class, so "
            "jpeft.method_from_dict could not rebuild it by name. Serialise your own method yourself, or build "
            "it from a jpeft method's dict."
        )
    return _checkpoint._method_json(method)  # the checkpoint's encoder, with its round-trip check


def method_from_dict(d: Mapping[str, Any]) -> Method:
    """The method that ``d`` (from :func:`method_to_dict`, a checkpoint or by hand) describes.

    Raises a :class:`jpeft.JpeftError` naming the entry for a class jpeft does not define, a field
    the class does not have, a missing required field, or a value of the wrong type.

    Example:
      >>> import jpeft
      >>> jpeft.method_from_dict({"__dataclass__": "jpeft:IA3", "fields": {"targets": ["key", "value"]}})
      IA3(extra_trainable=None, targets=('key', 'value'), feedforward=None, layouts=(), dtype=None)
      >>> jpeft.method_from_dict({"__dataclass__": "LoRA", "fields": {"targets": "query", "rnak": 4}})
      Traceback (most recent call last):
      ...
      jpeft._errors.JpeftError: jpeft.method_from_dict: LoRA has no field 'rnak' (at LoRA.rnak). ...
    """
    if not (isinstance(d, Mapping) and "__dataclass__" in d):
        raise JpeftError(
            f"{_WHO}: expected a dict like {{'__dataclass__': 'jpeft:LoRA', 'fields': {{'rank': 8, ...}}}} "
            f"(what jpeft.method_to_dict returns), got {type(d).__name__} {d!r}."
        )
    root = _name(d)
    _check(d, root)
    cls = _class(root, root, _WHO, _module(d))
    if not issubclass(cls, Method):
        raise JpeftError(f"{_WHO}: {root} is a jpeft class but not a method (jpeft.Method); pass a method's dict.")
    try:
        method = _checkpoint._decode(_canonical(d), root)
    except JpeftError as e:  # the class's own validation (__post_init__), which names the field
        raise JpeftError(f"{_WHO}: {e}") from None
    except (TypeError, ValueError) as e:
        raise JpeftError(f"{_WHO}: cannot build {root} from {dict(d['fields'])!r}: {e}") from None
    return method


# --- checks ------------------------------------------------------------------------------------------
def _name(d: Mapping[str, Any]) -> str:
    return str(d["__dataclass__"]).rpartition(":")[2]


def _module(d: Mapping[str, Any]) -> str:
    module, colon, _ = str(d["__dataclass__"]).rpartition(":")
    return module if colon else "jpeft"


def _class(qualname: str, where: str, who: str, module: str = "jpeft") -> type:
    """The jpeft class ``qualname``: exported by ``jpeft``, or defined in the jpeft module ``module`` (the
    parts of a composition, e.g. UniPELT's gated LoRA, are not exported)."""
    import importlib

    import jpeft

    cls = getattr(jpeft, qualname, None)
    if cls is None and (module == "jpeft" or module.startswith("jpeft.")) and qualname.isidentifier():
        try:
            cls = getattr(importlib.import_module(module), qualname, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        methods = sorted(
            n
            for n in jpeft.__all__
            if isinstance(getattr(jpeft, n), type) and issubclass(getattr(jpeft, n), Method) and n != "Method"
        )
        raise JpeftError(
            f"{who}: unknown method or class {qualname!r} at {where}; jpeft {jpeft.__version__} defines "
            f"the methods {', '.join(methods)}. Spell the class as jpeft exports it (e.g. 'LoRA')."
        )
    return cls


def _check(d: Mapping[str, Any], where: str) -> None:
    """Class, fields and field types of one dataclass dict, recursively."""
    qualname = _name(d)
    cls = _class(qualname, where, _WHO, _module(d))
    extra = set(d) - {"__dataclass__", "fields"}
    fields = d.get("fields", {})
    if extra or not isinstance(fields, Mapping):
        raise JpeftError(
            f"{_WHO}: {where} must be {{'__dataclass__': ..., 'fields': {{...}}}}; got keys {sorted(d)} and "
            f"fields {fields!r}."
        )
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for name, value in fields.items():
        if name not in known:
            raise JpeftError(
                f"{_WHO}: {qualname} has no field {name!r} (at {where}.{name}). Its fields are {', '.join(known)}."
            )
        _check_value(value, hints.get(name, Any), f"{where}.{name}")
    missing = [
        n for n, f in known.items()
        if n not in fields and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        raise JpeftError(f"{_WHO}: {where} ({qualname}) needs the field(s) {', '.join(missing)}, which are missing.")


def _check_value(value: Any, hint: Any, where: str) -> None:
    if _fits(value, hint, where):
        return
    raise JpeftError(
        f"{_WHO}: {where} = {value!r} ({type(value).__name__}) has the wrong type; expected {_show(hint)}."
    )


def _fits(value: Any, hint: Any, where: str) -> bool:
    """Whether the JSON ``value`` can stand for ``hint``; nested dataclass dicts are checked (and raise) here."""
    if hint is Any or isinstance(hint, (typing.TypeVar, str)):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a, where) for a in args)
    if hint is type(None):
        return value is None
    if isinstance(value, Mapping) and "__dataclass__" in value:
        if isinstance(hint, type) and not dataclasses.is_dataclass(hint):
            return False
        _check(value, where)
        return isinstance(hint, type) and issubclass(_class(_name(value), where, _WHO, _module(value)), hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        return len(args) == len(value) and all(
            _fits(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False))
        )
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return isinstance(value, Mapping)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return False  # a dataclass field given something other than a dataclass dict
    return True  # callables and other hints that JSON cannot carry: the class's own checks decide


def _show(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _canonical(d: Any) -> Any:
    """``d`` with bare class names written as ``jpeft:<name>``, the form the checkpoint decoder resolves."""
    if isinstance(d, Mapping) and "__dataclass__" in d:
        name = str(d["__dataclass__"])
        return {
            "__dataclass__": name if ":" in name else f"jpeft:{name}",
            "fields": {k: _canonical(v) for k, v in d.get("fields", {}).items()},
        }
    if isinstance(d, Mapping) and "__mapping__" in d:
        return {"__mapping__": {k: _canonical(v) for k, v in d["__mapping__"].items()}}
    if isinstance(d, (list, tuple)):
        return [_canonical(v) for v in d]
    return d
