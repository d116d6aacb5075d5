"""NNX reference models for the NNX backend's tests.

``Synthetic`` is the NNX twin of the linen ``tests/_models.Model``: the same modules under the same
names (``embed``, ``layers/{ln,q,k,v,o,dg_in,dg_out,conv}``, ``head``), its blocks made with
``nnx.vmap`` and run with ``nnx.scan``, so its state is the linen parameter tree leaf for leaf and
:func:`synthetic` loads the linen weights into it. ``Unrolled`` holds the same blocks in an
``nnx.List`` (``layers/0/...``) for the scan-vs-unrolled oracle.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests import _models as M

D, L = M.D, M.LAYERS


class Block(nnx.Module):
    """The linen ``Block`` (eval mode: its dropout is off) in NNX."""

    def __init__(self, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(D, epsilon=1e-6, rngs=rngs)
        self.q, self.k, self.v, self.o = (nnx.Linear(D, D, rngs=rngs) for _ in range(4))
        self.dg_in = nnx.LinearGeneral(D, M.DG_OUT, axis=-1, rngs=rngs)
        self.dg_out = nnx.LinearGeneral(M.DG_OUT, D, axis=(-2, -1), rngs=rngs)
        self.conv = nnx.Conv(D, D, (M.CONV_WINDOW,), padding="SAME", rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        x = self.ln(h)
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D).astype(h.dtype)
        h = h + self.o(jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, axis=-1), v))
        h = h + self.dg_out(jnp.tanh(self.dg_in(h)))
        return h + self.conv(h)


class Synthetic(nnx.Module):
    """Embedding, ``L`` blocks stacked by ``nnx.vmap`` and run by ``nnx.scan``, and a head."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(M.VOCAB, D, rngs=rngs)

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs: nnx.Rngs) -> Block:
            return Block(rngs)

        self.layers = blocks(rngs)
        self.head = nnx.Linear(D, M.VOCAB, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(h: jax.Array, block: Block) -> jax.Array:
            return block(h)

        return self.head(run(self.embed(ids), self.layers))


class Unrolled(nnx.Module):
    """The same model with its blocks in an ``nnx.List``, called in a Python loop."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(M.VOCAB, D, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(L)])
        self.head = nnx.Linear(D, M.VOCAB, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        h = self.embed(ids)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def load(model: nnx.Module, tree: dict[str, Any]) -> nnx.Module:
    """Writes a nested dict of arrays into the model's variables of the same paths (in place)."""
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        node = tree
        for k in path:
            node = node[str(k)]
        if not isinstance(var.value, jax.Array):  # a quantised kernel (NF4Array): copy it leaf by leaf
            var.value = jax.tree.map(lambda x, y: jnp.asarray(x, y.dtype), node, var.value)
            continue
        assert tuple(node.shape) == tuple(var.shape), (path, node.shape, var.shape)
        var[...] = jnp.asarray(node, var.dtype)
    nnx.update(model, state)
    return model


def synthetic() -> Synthetic:
    """``Synthetic`` holding the linen model's weights (``tests/_models.params()``)."""
    return load(_abstract(Synthetic), M.params())


def unrolled() -> Unrolled:
    """``Unrolled`` holding the same weights, layer ``i`` from slice ``i`` of the linen stack."""
    stacked = M.params()
    tree = {**stacked, "layers": {str(i): jax.tree.map(lambda x, i=i: x[i], stacked["layers"]) for i in range(L)}}
    return load(_abstract(Unrolled), tree)


@functools.cache
def _graph(cls: type) -> Any:
    return nnx.split(cls(nnx.Rngs(0)))


def _abstract(cls: type) -> nnx.Module:
    """A fresh model object of ``cls`` (built once per class, then copied; every call gets its own)."""
    graphdef, state = _graph(cls)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state), copy=True)
