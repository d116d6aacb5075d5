"""Checks shared by the tests of BitFit, Freeze, Full, (IA)^3 and diff pruning.

The models are those of ``tests/test_conformance.py``: ``'synthetic'`` (nn.scan + nn.remat) and
the tiny HF families, each as ``(params, apply)`` with ``apply(variables, **kw) -> array``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from tests import test_conformance as C

TOL = C.TOL
flat, get = C.flat, C.get


def model(name: str) -> tuple[dict[str, Any], Callable[..., jax.Array]]:
    """The model's params (a fresh dict tree) and its ``apply(variables, **kw)``.

    ``'mlp'`` is test_conformance's three-layer MLP on a fixed batch; the rest are its cases.
    """
    if name == "mlp":
        return jax.tree.map(lambda x: x, C.mlp_params()), lambda v, **kw: C.MLP().apply(v, C.MLP_X, **kw)
    c = C.case(name, "lora")
    return jax.tree.map(lambda x: x, c.params), c.apply


@functools.cache
def base_fn(name: str) -> Callable[[Any], jax.Array]:
    """The base model as a function of ``params``, jitted once."""
    apply = model(name)[1]
    return jax.jit(lambda params: apply({"params": params}))


@functools.cache
def base_output(name: str) -> np.ndarray:
    return np.asarray(base_fn(name)(model(name)[0]))


@functools.cache
def jitted(name: str, method: jpeft.Method) -> tuple[Callable[[Any], jax.Array], list[None]]:
    """The jitted wrapped model and the list its Python body appends to on each trace."""
    traces: list[None] = []
    wrapped = jpeft.wrap(model(name)[1], method)

    @jax.jit
    def run(params: Any) -> jax.Array:
        traces.append(None)
        return wrapped({"params": params})

    return run, traces


def trainable_paths(method: jpeft.Method, tree: Any) -> set[tuple[str, ...]]:
    return {p for p, label in flat(jpeft.labels(method, tree)).items() if label != "frozen"}


def check_identity(name: str, method: jpeft.Method, peft: Any) -> None:
    run, _ = jitted(name, method)
    np.testing.assert_allclose(np.asarray(run(peft)), base_output(name), rtol=1e-6, atol=1e-6)


def check_merge(name: str, method: jpeft.Method, peft: Any, touched: set[tuple[str, ...]]) -> None:
    """``apply(merge(p)) == wrap(apply)(p)``; merge keeps structure and dtypes, and only ``touched``
    leaves are new objects (and differ)."""
    params, apply = model(name)
    structure = jax.tree.structure(peft)
    wrapped = np.asarray(jpeft.wrap(apply, method)({"params": peft}))
    merged = jpeft.merge(method, peft)
    assert jax.tree.structure(peft) == structure, "merge mutated its input"
    np.testing.assert_allclose(np.asarray(base_fn(name)(merged)), wrapped, **TOL)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    base, out = flat(params), flat(merged)
    assert base.keys() == out.keys()
    for path, leaf in base.items():
        new = out[path]
        assert (new.shape, new.dtype) == (leaf.shape, leaf.dtype), path
        if path in touched:
            assert new is not leaf, path
            # HF initialises biases to zero, and a scaled zero is zero.
            assert not np.array_equal(new, leaf) or not np.any(leaf), path
        else:
            assert new is leaf, f"{path}: an untouched leaf must be the same object"


def check_grads(
    name: str, method: jpeft.Method, peft: Any, *, zero_ok: set[tuple[str, ...]] = frozenset()
) -> dict[tuple[str, ...], Any]:
    """Gradients through the split path reach exactly the non-'frozen' leaves, finite and non-zero.

    Leaves in ``zero_ok`` must instead get a (numerically) zero gradient: an attention key bias
    adds ``q . b_k`` to every score of a row, which the softmax ignores.
    """
    apply = model(name)[1]
    trainable, frozen = jpeft.split(method, peft)
    weights = C.loss_weights(base_output(name).shape)
    wrapped = jpeft.wrap(apply, method)
    grads = flat(jax.grad(lambda t: jnp.sum(wrapped({"params": jpeft.combine(t, frozen)}) * weights))(trainable))
    want = trainable_paths(method, peft)
    assert want and grads.keys() == want == flat(trainable).keys()
    # Either half of split gets the labels the whole tree gives (the holes keep the structure).
    full = flat(jpeft.labels(method, peft))
    for half in (trainable, frozen):
        labels = flat(jpeft.labels(method, half))
        assert labels.keys() == flat(half).keys() and all(full[p] == v for p, v in labels.items())
    scale = max(float(np.abs(np.asarray(g)).max()) for g in grads.values())
    for path, g in grads.items():
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        if path in zero_ok:
            assert np.abs(g).max() <= 1e-5 * scale, f"{path}: expected a zero gradient"
        else:
            assert np.any(g != 0), f"{path}: zero gradient"
    return grads


def check_jit(name: str, method: jpeft.Method, peft: Any, peft_random: Any) -> None:
    run, traces = jitted(name, method)
    eager = np.asarray(jpeft.wrap(model(name)[1], method)({"params": peft_random}))
    assert not np.allclose(eager, base_output(name), **TOL), "random deltas must change the output"
    np.testing.assert_allclose(np.asarray(run(peft_random)), eager, **TOL)
    np.testing.assert_allclose(np.asarray(run(peft)), base_output(name), rtol=1e-6, atol=1e-6)
    assert len(traces) == 1, f"traced {len(traces)} times; a second call must reuse the compilation"


def count(method: jpeft.Method, tree: Any) -> int:
    """The number of trainable elements by the labels; also checks summary prints it."""
    labels = flat(jpeft.labels(method, tree))
    n = sum(int(np.size(x)) for p, x in flat(tree).items() if labels[p] != "frozen")
    assert f"trainable params: {n:,} ||" in jpeft.summary(method, tree)
    return n


def perturb(method: jpeft.Method, tree: Any, *, seed: int, scale: float = 0.3) -> Any:
    """``tree`` with ``scale * N(0, 1)`` added to every trainable leaf; the rest are the same objects."""
    rng = np.random.RandomState(seed)
    trainable = trainable_paths(method, tree)

    def new(path: Any, x: Any) -> Any:
        key = tuple(str(k.key) for k in path)
        return jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype) if key in trainable else x

    return jax.tree_util.tree_map_with_path(new, tree)


def train(
    name: str,
    method: jpeft.Method,
    peft: Any,
    *,
    steps: int,
    lr: float,
    penalty: float = 0.0,
    sample: bool = False,
) -> tuple[list[float], Any]:
    """Adam on the split path towards the outputs of a perturbed tree; returns the losses and the trained tree.

    ``penalty`` weighs ``jpeft.regularizer``; ``sample`` passes a fresh ``'dropout'`` rng each step.
    """
    apply = model(name)[1]
    wrapped = jpeft.wrap(apply, method)
    # A reachable target: the model with every trainable leaf perturbed.
    target = jax.jit(lambda t: wrapped({"params": t}))(perturb(method, peft, seed=11))
    trainable, frozen = jpeft.split(method, peft)
    tx = jpeft.optimizer(optax.adam(lr), method, trainable)
    state = tx.init(trainable)

    def loss_fn(t: Any, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        tree = jpeft.combine(t, frozen)
        kw = {"rngs": {"dropout": key}} if sample else {}
        fit = jnp.mean((wrapped({"params": tree}, **kw) - target) ** 2)
        return fit + penalty * jpeft.regularizer(method, tree), fit

    @jax.jit
    def step(t: Any, state: Any, key: jax.Array) -> tuple[Any, Any, jax.Array]:
        (_, fit), grads = jax.value_and_grad(loss_fn, has_aux=True)(t, key)
        updates, state = tx.update(grads, state, t)
        return optax.apply_updates(t, updates), state, fit

    losses = []
    for i in range(steps):
        trainable, state, fit = step(trainable, state, jax.random.key(i))
        losses.append(float(fit))
    return losses, jpeft.combine(trainable, frozen)


def check_training(name: str, method: jpeft.Method, peft: Any, *, steps: int = 40, lr: float = 1e-2, **kw: Any) -> Any:
    """Training lowers the loss; frozen leaves stay bit-identical and every trainable leaf moves."""
    before = {p: np.array(x, copy=True) for p, x in flat(peft).items()}
    losses, trained = train(name, method, peft, steps=steps, lr=lr, **kw)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    after = flat(trained)
    assert after.keys() == before.keys()
    moved = {p for p in before if not np.array_equal(np.asarray(after[p]), before[p])}
    assert moved == trainable_paths(method, peft), sorted(moved ^ trainable_paths(method, peft))[:5]
    return trained
