"""LoRA-drop: the importance pass against NumPy, the selection rule, and the shared-pair method.

The model is a small unscanned stack of blocks ``h <- h + v(tanh(q(h)))``, so a NumPy forward pass
can recompute every layer's input and LoRA output independently.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from tests import _hf_models as H
from tests import _models as M

BLOCKS, D, RANK, ALPHA = 4, 6, 2, 4.0
S = ALPHA / RANK
TARGETS = [f"block_{i}/{m}" for i in range(BLOCKS) for m in ("q", "v")]


class Block(nn.Module):
    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        return h + nn.Dense(D, name="v")(jnp.tanh(nn.Dense(D, name="q")(h)))


class Stack(nn.Module):
    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        for i in range(BLOCKS):
            h = Block(name=f"block_{i}")(h)
        return h


def batch(seed: int) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).standard_normal((2, 3, D)), jnp.float32)


@functools.cache
def params() -> dict[str, Any]:
    return jax.tree.map(lambda x: x, Stack().init(jax.random.key(0), batch(0))["params"])


def lora() -> jpeft.LoRA:
    return jpeft.LoRA(targets=("q", "v"), rank=RANK, alpha=ALPHA)


def randomize(tree: Any, seed: int, scales: dict[str, float] | None = None) -> Any:
    """Random delta leaves; ``scales`` multiplies the ``lora_b`` of some targets (0 switches them off)."""
    rng = np.random.RandomState(seed)

    def fill(path: Any, x: Any) -> Any:
        keys = [str(k.key) for k in path]
        if jpeft.RESERVED not in keys:
            return x
        value = 0.5 * rng.standard_normal(x.shape)
        module = "/".join(keys[: keys.index(jpeft.RESERVED)])
        if keys[-1] == "lora_b" and scales is not None:
            value = value * scales.get(module, 1.0)
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(fill, tree)


def f64(x: Any) -> np.ndarray:
    return np.asarray(x, np.float64)


def numpy_importance(peft: Any, xs: list[jax.Array]) -> dict[str, float]:
    """The model's forward pass in NumPy, summing ``||s x A B||^2`` at each target."""
    out = dict.fromkeys(TARGETS, 0.0)
    for x in xs:
        h = f64(x)
        for i in range(BLOCKS):
            block = peft[f"block_{i}"]
            inp = h
            for m in ("q", "v"):
                layer = block[m]
                d = layer[jpeft.RESERVED]["default"]
                delta = S * (inp @ f64(d["lora_a"])) @ f64(d["lora_b"])
                out[f"block_{i}/{m}"] += float(np.sum(delta**2))
                y = inp @ f64(layer["kernel"]) + f64(layer["bias"]) + delta
                inp = np.tanh(y) if m == "q" else y
            h = h + inp
    return out


def expected_keep(importance: dict[str, float], threshold: float) -> tuple[str, ...]:
    """The paper's rule, written plainly: most important first, until the kept share reaches T."""
    total = sum(importance.values())
    kept, share = [], 0.0
    for path in sorted(importance, key=lambda p: (-importance[p], p)):
        if share >= threshold * total:
            break
        kept.append(path)
        share += importance[path]
    return tuple(sorted(kept))


# --- stage 1: importance and selection ---------------------------------------------------------
def test_importance_matches_numpy():
    peft = randomize(jpeft.apply(lora(), params(), key=jax.random.key(1)), seed=2)
    xs = [batch(1), batch(2)]
    # One batch as a positional argument, one as a tuple of positional arguments.
    got = jpeft.lora_drop_importance(lora(), peft, Stack().apply, [xs[0], (xs[1],)])
    want = numpy_importance(peft, xs)
    assert list(got) == sorted(TARGETS)
    for path in TARGETS:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, err_msg=path)
    assert len({round(v, 3) for v in got.values()}) == len(TARGETS), "sanity: the importances differ"


@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
def test_selection_follows_the_cumulative_share(threshold):
    peft = randomize(jpeft.apply(lora(), params(), key=jax.random.key(1)), seed=3)
    xs = [batch(1)]
    new, _ = jpeft.lora_drop_select(lora(), peft, Stack().apply, xs, key=jax.random.key(4), threshold=threshold)
    assert new.keep == expected_keep(numpy_importance(peft, xs), threshold)
    assert 0 < len(new.keep) <= len(TARGETS)


def test_selection_on_a_constructed_case():
    # Only two layers have a non-zero LoRA output, one about a million times weaker (B x 1e-3).
    scales = {p: 0.0 for p in TARGETS} | {"block_2/v": 1.0, "block_0/q": 1e-3}
    peft = randomize(jpeft.apply(lora(), params(), key=jax.random.key(1)), seed=2, scales=scales)
    select = functools.partial(jpeft.lora_drop_select, lora(), peft, Stack().apply, [batch(1)], key=jax.random.key(4))
    assert select(threshold=0.9)[0].keep == ("block_2/v",)
    assert select(threshold=1.0)[0].keep == ("block_0/q", "block_2/v")


# --- stage 2: the LoRADrop method --------------------------------------------------------------
KEEP = ("block_0/q", "block_2/v")


def shared_tree(seed: int) -> tuple[jpeft.LoRADrop, Any]:
    method = jpeft.LoRADrop(targets=("q", "v"), rank=RANK, alpha=ALPHA, keep=KEEP)
    return method, randomize(jpeft.apply(method, params(), key=jax.random.key(1)), seed=seed)


def unshared(peft: Any) -> Any:
    """The same model as plain LoRA: every shared layer holds its own copy of its group's pair."""
    tree = jax.tree.map(lambda x: x, {k: v for k, v in peft.items() if k != jpeft.RESERVED})
    for path in TARGETS:
        block, m = path.split("/")
        if path not in KEEP:
            tree[block][m][jpeft.RESERVED] = {"default": dict(peft[jpeft.RESERVED]["default"][m])}
    return tree


def test_tree_layout_and_closed_form_count():
    method, peft = shared_tree(seed=2)
    root = peft[jpeft.RESERVED]["default"]
    assert sorted(root) == ["q", "v"]
    assert {k: v.shape for k, v in root["q"].items()} == {"lora_a": (D, RANK), "lora_b": (RANK, D)}
    for path in TARGETS:
        block, m = path.split("/")
        deltas = peft[block][m][jpeft.RESERVED]["default"]
        assert (sorted(deltas) == ["lora_a", "lora_b"]) if path in KEEP else (deltas == {}), path
    closed = RANK * (D + D) * (len(KEEP) + 2)  # two own pairs and one pair per group (q, v)
    labels = jax.tree.leaves(jpeft.labels(method, peft))
    counted = sum(int(np.size(x)) for x, label in zip(jax.tree.leaves(peft), labels, strict=True) if label != "frozen")
    assert counted == method.param_count(params()) == closed == 96
    assert f"trainable params: {counted:,} ||" in jpeft.summary(method, peft)


def test_shared_forward_merge_and_gradients_equal_plain_lora_copies():
    method, peft = shared_tree(seed=2)
    x = batch(5)
    weights = jax.random.normal(jax.random.key(6), (2, 3, D))
    drop_fn = jax.jit(lambda p: jpeft.wrap(Stack().apply, method)({"params": p}, x))
    lora_fn = jax.jit(lambda p: jpeft.wrap(Stack().apply, lora())({"params": p}, x))
    out = drop_fn(peft)
    np.testing.assert_allclose(out, lora_fn(unshared(peft)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, Stack().apply({"params": params()}, x), atol=1e-3)
    merged = jpeft.merge(method, peft)
    assert jax.tree.structure(merged) == jax.tree.structure(params())
    np.testing.assert_allclose(Stack().apply({"params": merged}, x), out, rtol=1e-5, atol=1e-5)
    # A group's gradient is the sum of the gradients its layers would get from their own copies.
    drop_grads = jax.grad(lambda p: jnp.sum(drop_fn(p) * weights))(peft)
    lora_grads = jax.grad(lambda p: jnp.sum(lora_fn(p) * weights))(unshared(peft))
    for m in ("q", "v"):
        for leaf in ("lora_a", "lora_b"):
            copies = [lora_grads[p.split("/")[0]][m][jpeft.RESERVED]["default"][leaf] for p in TARGETS
                      if p.endswith(m) and p not in KEEP]
            assert len(copies) == BLOCKS - 1
            np.testing.assert_allclose(drop_grads[jpeft.RESERVED]["default"][m][leaf], sum(copies), rtol=1e-4,
                                       atol=1e-6, err_msg=f"{m}/{leaf}")


def test_training_moves_exactly_the_trainable_leaves():
    method, peft = shared_tree(seed=2)
    x, target = batch(7), jnp.asarray(np.random.RandomState(8).standard_normal((2, 3, D)), jnp.float32)
    wrapped = jpeft.wrap(Stack().apply, method)
    tx = jpeft.optimizer(optax.adam(2e-2), method, peft)

    def loss(p):
        return jnp.mean((wrapped({"params": p}, x) - target) ** 2)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    state, start, losses = tx.init(peft), peft, []
    for _ in range(25):
        peft, state, value = step(peft, state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0], losses
    labels = jpeft.labels(method, start)
    for (path, before), after, label in zip(
        jax.tree_util.tree_flatten_with_path(start)[0], jax.tree.leaves(peft), jax.tree.leaves(labels), strict=True
    ):
        assert np.array_equal(before, after) == (label == "frozen"), jax.tree_util.keystr(path)


def test_on_tiny_bert_select_runs_and_merges():
    hf = H.make("bert")
    method = jpeft.LoRA(targets=("query", "value"), rank=RANK, alpha=ALPHA)
    peft = randomize(jpeft.apply(method, hf.params, key=jax.random.key(1)), seed=2)
    new, tree = jpeft.lora_drop_select(method, peft, hf.apply, [hf.inputs], key=jax.random.key(3), threshold=0.6)
    assert 0 < len(new.keep) < 2 * H.LAYERS and sorted(tree[jpeft.RESERVED]["default"]) in (
        ["query"], ["value"], ["query", "value"])
    tree = randomize(tree, seed=4)
    run = jax.jit(lambda fn, p: hf.logits(fn({"params": p}, **hf.inputs)), static_argnums=0)
    wrapped = run(jpeft.wrap(hf.apply, new), tree)
    merged = run(hf.apply, jpeft.merge(new, tree))
    np.testing.assert_allclose(wrapped, merged, rtol=1e-5, atol=1e-5)
    assert not np.allclose(wrapped, run(hf.apply, hf.params), atol=1e-3)


# --- errors ------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(jpeft.JpeftError, match=r"keep must be a sequence of '/'-joined module paths"):
        jpeft.LoRADrop(targets=("q",), keep="block_0/q")
    with pytest.raises(jpeft.JpeftError, match=r"DoRA is not supported"):
        jpeft.LoRADrop(targets=("q",), use_dora=True)
    with pytest.raises(jpeft.JpeftError, match=r"\['block_9/q'\] are not among the 8 targets"):
        jpeft.LoRADrop(targets=("q", "v"), keep=("block_9/q",)).param_count(params())
    with pytest.raises(jpeft.JpeftError, match=r"'layers/q' is a stack of layers \(kernel \(2, 8, 8\)\)"):
        jpeft.apply(jpeft.LoRADrop(targets=("layers/q",), rank=2), M.params(), key=jax.random.key(0))
    mixed = {"a": {"q": {"kernel": jnp.ones((4, 4))}}, "b": {"q": {"kernel": jnp.ones((4, 6))}}}
    with pytest.raises(jpeft.JpeftError, match=r"group 'q' mixes kernel shapes \(4, 4\) and \(4, 6\)"):
        jpeft.LoRADrop(targets=("q",), rank=2).param_count(mixed)
    peft = jpeft.apply(lora(), params(), key=jax.random.key(1))
    for bad in (jpeft.DoRA(targets=("q",)), jpeft.LoRADrop(targets=("q",))):
        with pytest.raises(jpeft.JpeftError, match=r"measures a trained plain LoRA"):
            jpeft.lora_drop_importance(bad, peft, Stack().apply, [batch(1)])
    for threshold in (0.0, 1.5):
        with pytest.raises(jpeft.JpeftError, match=r"threshold must be in \(0, 1\]"):
            jpeft.lora_drop_select(lora(), peft, Stack().apply, [batch(1)], key=jax.random.key(0), threshold=threshold)
    with pytest.raises(jpeft.JpeftError, match=r"every LoRA output is 0"):
        jpeft.lora_drop_select(lora(), peft, Stack().apply, [batch(1)], key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"never ran on the batches"):
        jpeft.lora_drop_importance(lora(), peft, Stack().apply, [])
    method, tree = shared_tree(seed=2)
    sub = jpeft.wrap(lambda v, x: Block().apply({"params": v["params"]["block_1"]}, x), method)
    with pytest.raises(jpeft.JpeftError, match=r"'q' shares the 'q' pair stored at the tree's root"):
        sub({"params": tree}, batch(1))
    two = jpeft.apply(method, tree, key=jax.random.key(2), name="two")
    with pytest.raises(jpeft.JpeftError, match=r"root holds 2 of them"):
        jpeft.merge(method, two)
    assert dataclasses.asdict(method)["keep"] == KEEP
