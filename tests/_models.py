"""A tiny synthetic linen model that exercises every layout jpeft knows, under nn.scan and nn.remat.

``Model`` embeds token ids (``nn.Embed``), runs ``LAYERS`` scanned, rematerialised ``Block`` s and
projects to the vocabulary with an untargeted ``head``. Each block holds Dense q/k/v/o attention
projections, a LayerNorm, dropout, a ``DenseGeneral`` with a multi-axis output (``dg_in``, kernel
``(D, 2, 4)``), one with a multi-axis input (``dg_out``, kernel ``(2, 4, D)``) and a 1-D ``nn.Conv``
over the sequence axis.

Stacked kernels carry a leading layer axis, so a multi-axis kernel cannot be told from a stacked
one by shape: methods that target ``dg_in``, ``dg_out`` or ``conv`` pass :data:`LAYOUTS`.

The scan also stacks the ``'intermediates'`` collection, so tests can ``sow`` per-layer inputs
and outputs (see :func:`capture`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BATCH, SEQ, VOCAB, D, LAYERS = 2, 5, 11, 8, 2
DG_OUT = (2, 4)
CONV_WINDOW = 3

LAYOUTS = (
    (r"layers/dg_in", "dense_general:1,2"),
    (r"layers/dg_out", "dense_general:2,1"),
    (r"layers/conv", "conv:1"),
)
"""The layout overrides the synthetic model's multi-axis kernels need."""

LINEAR_TARGETS = r"layers/(q|v|o|dg_in|dg_out|conv)"
"""Every stacked linear module of the model, as a regex."""

ALL_TARGETS = r"embed|" + LINEAR_TARGETS
"""The stacked linear modules plus the token embedding."""


class Block(nn.Module):
    """One pre-LN block: attention, a DenseGeneral pair and a 1-D convolution, with dropout."""

    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
        dense = functools.partial(nn.Dense, D, dtype=self.dtype, param_dtype=self.dtype)
        x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype, name="ln")(h)
        q, k, v = dense(name="q")(x), dense(name="k")(x), dense(name="v")(x)
        scores = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D).astype(self.dtype)
        att = jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, axis=-1), v)
        o = dense(name="o")(att)
        h = h + nn.Dropout(0.1, deterministic=not self.train)(o)
        g = nn.DenseGeneral(DG_OUT, axis=-1, dtype=self.dtype, param_dtype=self.dtype, name="dg_in")(h)
        h = h + nn.DenseGeneral(D, axis=(-2, -1), dtype=self.dtype, param_dtype=self.dtype, name="dg_out")(jnp.tanh(g))
        conv = nn.Conv(D, (CONV_WINDOW,), padding="SAME", dtype=self.dtype, param_dtype=self.dtype, name="conv")
        return h + conv(h), None


class Model(nn.Module):
    """Embedding, ``LAYERS`` scanned and rematerialised blocks, and an untargeted head."""

    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        h = nn.Embed(VOCAB, D, dtype=self.dtype, param_dtype=self.dtype, name="embed")(ids)
        stack = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            length=LAYERS,
        )
        h, _ = stack(train=self.train, dtype=self.dtype, name="layers")(h, None)
        return nn.Dense(VOCAB, dtype=self.dtype, param_dtype=self.dtype, name="head")(h)


def inputs(seed: int = 0) -> jax.Array:
    """Token ids of shape ``(BATCH, SEQ)``."""
    return jnp.asarray(np.random.RandomState(seed).randint(0, VOCAB, (BATCH, SEQ)), jnp.int32)


@functools.cache
def _init(dtype_name: str) -> dict[str, Any]:
    # The shapes come from tracing Model.init; the values from NumPy, which compiles nothing.
    dtype = jnp.dtype(dtype_name)
    shapes = jax.eval_shape(Model(dtype=dtype).init, jax.random.key(0), inputs())["params"]
    rng = np.random.RandomState(0)

    def fill(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape)
        # Non-zero biases and non-unit LayerNorm scales, so that tests see them.
        value = {"scale": 1 + 0.1 * noise, "bias": 0.1 * noise, "embedding": noise}.get(name, 0.3 * noise)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def params(dtype: Any = jnp.float32) -> dict[str, Any]:
    """The model's parameters (a fresh dict tree each call; the arrays are shared)."""
    return jax.tree.map(lambda x: x, _init(jnp.dtype(dtype).name))


def capture(names: tuple[str, ...]) -> Callable[..., Any]:
    """An interceptor that sows the input and output of each module whose name is in ``names``.

    Enter it *outside* ``jpeft.wrap``'s own interceptor (call the wrapped function inside the
    ``with`` block) so that it sees the adapted output, and apply with ``mutable=['intermediates']``.
    """

    def intercept(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.name in names and module.scope is not None:
            module.sow("intermediates", "x", args[0])
            module.sow("intermediates", "y", out)
        return out

    return intercept


def random_deltas(tree: Any, seed: int, scale: float = 0.1, adapters: tuple[str, ...] | None = None) -> Any:
    """Every delta leaf (of ``adapters``, or of all) replaced by ``N(0, scale^2)`` NumPy noise.

    Base leaves stay the same objects. NumPy, not ``jax.random``, so no kernel compiles per shape.
    """
    import jpeft

    rng = np.random.RandomState(seed)

    def fill(path: Any, x: Any) -> Any:
        keys = [getattr(k, "key", None) for k in path]
        if jpeft.RESERVED not in keys or (adapters is not None and keys[keys.index(jpeft.RESERVED) + 1] not in adapters):
            return x
        return jnp.asarray(rng.normal(0, scale, x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, tree)
