"""The colab/ notebooks: up to date with their sources, and they run top to bottom on CPU."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = sorted(p.stem for p in (COLAB / "src").glob("*.py"))
FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)


def _build():
    sys.path.insert(0, str(COLAB))
    try:
        import build
    finally:
        sys.path.pop(0)
    return build


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_built_from_its_source(name):
    build = _build()
    want = build.notebook(COLAB / "src" / f"{name}.py")
    assert (COLAB / f"{name}.ipynb").read_text() == want, f"run `python colab/build.py` to rebuild {name}.ipynb"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("JPEFT_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The kernels compile with LLVM optimisation and XLA:CPU's fusion emitters off: about a third of the
    # compile time (04 appends its 8-device flag to these).
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip())
    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
