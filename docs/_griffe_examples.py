"""A griffe extension for the documentation build: jpeft's docstrings title their doctests ``Example:``, which
griffe's Google parser reads as an admonition (its prose then turns ``peft["h"]["0"]`` into reference links);
``Examples:`` makes it the examples section, rendered as code."""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Renames each docstring's ``Example:`` section to ``Examples:``."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
