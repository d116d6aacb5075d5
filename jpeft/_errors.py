"""The error type of jpeft and the validators that methods share.

Every message says what was received, what was expected and how to fix it, so that a user can act
on it without reading jpeft's source.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax.numpy as jnp


class JpeftError(ValueError):
    """Raised for bad input to jpeft, before any tracing.

    Example:
        >>> import jpeft
        >>> try:
        ...   jpeft.LoRA(targets="q", rank=0)
        ... except jpeft.JpeftError as e:
        ...   print(str(e).splitlines()[0])
        LoRA(rank=0): rank must be a positive int; got 0.
    """


def positive_int(owner: str, field: str, value: Any) -> None:
    """Raises unless ``value`` is an int > 0 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise JpeftError(
                f"{owner}({field}={value!r}): {field} must be a positive int; got {value!r}."
        )


def positive_number(owner: str, field: str, value: Any) -> None:
    """Raises unless ``value`` is a finite real number > 0 (``inf`` would make every output inf or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise JpeftError(
                f"{owner}({field}={value!r}): {field} must be a number > 0; got {value!r}. It must be finite, too."
        )


def probability(owner: str, field: str, value: Any) -> None:
    """Raises unless ``0 <= value < 1``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise JpeftError(
                f"{owner}({field}={value!r}): {field} must be a float in [0, 1); got {value!r}."
        )


def one_of(owner: str, field: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raises unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise JpeftError(
                f"{owner}({field}={value!r}): {field} must be one of {choices}; got {value!r}."
        )


def regex(owner: str, field: str, value: Any) -> None:
    """Raises unless ``value`` is a str that compiles as a regular expression."""
    if not isinstance(value, str):
        raise JpeftError(
                f"{owner}({field}={value!r}): {field} must be a regex str; got {type(value).__name__}."
        )
    try:
        re.compile(value)
    except re.error as e:
        raise JpeftError(
                f"{owner}({field}={value!r}): not a valid regular expression ({e}). "
                "Escape literal characters with re.escape()."
        ) from None


def float_dtype(owner: str, field: str, value: Any) -> str | None:
    """Returns the name of a float dtype (``None`` stays ``None``); raises for anything else."""
    if value is None:
        return None
    try:
        dt = jnp.dtype(value)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise JpeftError(f"{owner}({field}={value!r}): {field} must name a float dtype, e.g. 'float32'.")
    return dt.name
