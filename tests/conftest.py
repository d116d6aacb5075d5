"""Test settings: implicit rank promotion raises, float32 matmuls at full precision, a `key` fixture."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "float32")


@pytest.fixture
def key() -> jax.Array:
    """A fixed ``jax.random`` key; tests that need several split or fold it in."""
    return jax.random.key(0)
