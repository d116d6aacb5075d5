"""Builds the notebooks in ``colab/`` from their sources in ``colab/src/``.

A source is a Python file whose cells start with ``# %%`` (code) or ``# %% [markdown]`` (markdown,
each line commented with ``# ``). Run ``python colab/build.py`` after editing a source; the test
suite fails when a notebook is stale.
"""

from __future__ import annotations

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).parent
REPO = "jpeft/jpeft"


def cells(source: str) -> list[dict]:
    out: list[dict] = []
    kind, lines = None, []

    def flush() -> None:
        if kind is None:
            return
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.splitlines())
            out.append({"cell_type": "markdown", "metadata": {}, "source": text.splitlines(keepends=True)})
        else:
            out.append(
                {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                 "source": text.splitlines(keepends=True)}
            )

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return out


def notebook(src: pathlib.Path) -> str:
    body = cells(src.read_text())
    badge = (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{REPO}/blob/main/colab/{src.stem}.ipynb)"
    )
    body.insert(0, {"cell_type": "markdown", "metadata": {}, "source": [badge]})
    for i, cell in enumerate(body):
        cell["id"] = f"cell-{i}"
    nb = {
        "cells": body,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(nb, indent=1) + "\n"


def main() -> int:
    for src in sorted((HERE / "src").glob("*.py")):
        (HERE / f"{src.stem}.ipynb").write_text(notebook(src))
        print(f"wrote colab/{src.stem}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
