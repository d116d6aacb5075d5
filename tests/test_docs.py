"""The documentation site (docs/, built by ``mkdocs build --strict``): its snippets run, and nothing public is left out.

Every fenced ```` ```python ```` block of every page under docs/ is executed: a page's blocks in order, in one
namespace, in a temporary working directory, with JAX's default rank promotion (what a reader has; the suite's
conftest makes it raise). A block that cannot run here carries ``title="not run: <reason>"`` on its fence, and
:data:`NOT_RUN` lists every such block, so none is skipped silently.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import pathlib
import re

import jax
import pytest

import jpeft

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
FENCE = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
NOT_RUN_TITLE = re.compile(r'title="not run: (?P<reason>[^"]+)"')

#: (page, reason) of every block marked ``title="not run: ..."``.
NOT_RUN = {
    ("sharding.md", "needs one process per host of a multi-host slice"),
}

#: Method classes documented on a guide page rather than on a page of their own under docs/methods/.
GUIDE_PAGES = {"Compose": "composition.md", "OnQuantized": "quantization.md"}


def blocks(page: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, not-run reason or None)`` of each ```python block of a page, in order."""
    text = (DOCS / page).read_text()
    out = []
    for m in FENCE.finditer(text):
        reason = NOT_RUN_TITLE.search(m.group("info"))
        out.append((text.count("\n", 0, m.start()) + 2, m.group("code"), reason and reason.group("reason")))
    return out


def test_every_python_fence_is_found() -> None:
    """An indented or oddly closed ```python fence would escape the parser: every one must be a found block."""
    for page in PAGES:
        text = (DOCS / page).read_text()
        assert text.count("```python") == len(blocks(page)), f"docs/{page}: a ```python fence not at column 0"


def test_not_run_blocks_are_listed() -> None:
    marked = {(page, reason) for page in PAGES for _, _, reason in blocks(page) if reason}
    counts = {page: sum(r is None for _, _, r in blocks(page)) for page in PAGES}
    print(f"{sum(counts.values())} snippets run on {sum(n > 0 for n in counts.values())} pages; not run: {marked}")
    assert marked == NOT_RUN


@pytest.mark.parametrize("page", [p for p in PAGES if any(r is None for _, _, r in blocks(p))])
def test_page_snippets_run(page: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    with jax.numpy_rank_promotion("allow"):
        for line, code, reason in blocks(page):
            if reason is None:
                exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)


def _api_text() -> str:
    return "".join(p.read_text() for p in sorted((DOCS / "api").glob("*.md")))


def test_every_public_name_is_in_the_api_reference() -> None:
    text = _api_text()
    assert not [n for n in jpeft.__all__ if f"::: jpeft.{n}\n" not in text]


@pytest.mark.parametrize("module", ["io", "methods", "models", "profiles", "quant"])
def test_public_submodules_are_in_the_api_reference(module: str) -> None:
    """A submodule's public names appear re-exported (``jpeft.X``), one by one, or as the whole module."""
    text = _api_text()
    names = getattr(importlib.import_module(f"jpeft.{module}"), "__all__", [])
    if f"::: jpeft.{module}\n" in text:
        return
    missing = [n for n in names if f"::: jpeft.{n}\n" not in text and f"::: jpeft.{module}.{n}\n" not in text]
    assert not missing


def test_every_method_has_a_page() -> None:
    """Each ``jpeft.Method`` class of ``jpeft.__all__`` has its page (docs/methods/<name>.md or a guide) naming it."""
    methods = [
        n for n in jpeft.__all__ if inspect.isclass(getattr(jpeft, n)) and issubclass(getattr(jpeft, n), jpeft.Method)
    ]
    for name in methods:
        if name == "Method":
            continue
        page = GUIDE_PAGES.get(name, f"methods/{name.lower()}.md")
        assert page in PAGES, f"no page docs/{page} for jpeft.{name}"
        assert f"jpeft.{name}" in (DOCS / page).read_text(), f"docs/{page} does not name jpeft.{name}"
        if page.startswith("methods/"):
            assert any(r is None for _, _, r in blocks(page)), f"docs/{page} has no runnable snippet"


def test_comparison_rows_match_the_committed_results() -> None:
    """Every ``<!-- compare: ... -->`` block equals what docs/compare_rows.py writes from the committed compare.json."""
    spec = importlib.util.spec_from_file_location("compare_rows", DOCS / "compare_rows.py")
    rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rows)
    results = json.loads((DOCS.parent / rows.RESULTS).read_text())
    assert rows.rewrite(results, check=True) == [], "run `python docs/compare_rows.py` and commit the pages"
    assert "MAM" in rows.table(results, ["mam"]) and "Linear probe" in rows.table(results, ["lora"])


@pytest.mark.parametrize(
    "module", ["jpeft", "jpeft.io", "jpeft.methods", "jpeft.models", "jpeft.profiles", "jpeft.quant"]
)
def test_every_public_callable_has_an_example(module: str) -> None:
    """Each public class and function shows a runnable ``>>>`` example (pytest's --doctest-modules runs them)."""
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
    objs = {n: getattr(mod, n) for n in names}
    missing = [
        n
        for n, o in objs.items()
        if (inspect.isclass(o) or inspect.isfunction(o)) and ">>>" not in (inspect.getdoc(o) or "")
    ]
    assert not missing, f"{module}: no docstring example for {missing}"
