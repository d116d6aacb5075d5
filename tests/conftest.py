"""Test settings: implicit rank promotion raises, float32 matmuls at full precision, a `key` fixture.

Under ``pytest -n N`` the conformance tests of one model run on one worker, so each worker builds
and compiles a model at most once (see :func:`pytest_xdist_make_scheduler`).
"""

import re

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "float32")


@pytest.fixture
def key() -> jax.Array:
    """A fixed ``jax.random`` key; tests that need several split or fold it in."""
    return jax.random.key(0)


_MODEL = re.compile(r"test_conformance\.py::test_\d_\w+\[(\w+)-\w+\]$")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's ``load`` scheduling, except that the numbered conformance checks of one model form a
    single unit of work. Other ``--dist`` modes are left alone."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModel(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            match = _MODEL.search(nodeid)
            return match.group(1) if match else nodeid

    return ByModel(config, log)
