"""LoRA-drop: the importance pass against NumPy, the selection rule, and the shared-pair method.

The model is a small unscanned stack of blocks ``h <- h + v(tanh(q(h)))``, so a NumPy forward pass
can recompute every layer's input and LoRA output independently. The ``nn.scan`` section uses the
synthetic scan model (tests/_models.py): per-layer importance from the captured per-layer inputs,
kept and tied slices of a stacked target, the tied gradient, training and merge.
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


# --- LoRA-FA and LoRA+ inputs keep their rules (issue 10, finding 12) --------------------------
def variant_select(method: jpeft.LoRA) -> tuple[jpeft.LoRADrop, Any]:
    peft = randomize(jpeft.apply(method, params(), key=jax.random.key(1)), seed=3)
    return jpeft.lora_drop_select(method, peft, Stack().apply, [batch(1)], key=jax.random.key(4), threshold=0.6)


def sgd_step(method: jpeft.LoRADrop, tree: Any) -> tuple[Any, Any]:
    """One ``jpeft.optimizer(optax.sgd(1))`` step on the MSE of the wrapped model: (updates, grads)."""

    def loss(t: Any) -> jax.Array:
        return jnp.mean(jpeft.wrap(Stack().apply, method)({"params": t}, batch(2)) ** 2)

    grads = jax.grad(loss)(tree)
    tx = jpeft.optimizer(optax.sgd(1.0), method, tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    return updates, grads


def delta_leaves(tree: Any) -> dict[str, Any]:
    return {p: x for p, x in zip(jpeft.list_paths(tree), jax.tree.leaves(tree), strict=True) if jpeft.RESERVED in p}


def test_select_from_lora_fa_keeps_a_frozen():
    new, tree = variant_select(jpeft.LoRAFA(targets=("q", "v"), rank=RANK, alpha=ALPHA))
    assert type(new) is jpeft.LoRADrop and new.freeze_a and new.lr_ratio is None
    assert 0 < len(new.keep) < len(TARGETS)  # kept pairs and shared pairs both exist
    labels = delta_leaves(jpeft.labels(new, tree))
    assert {p: lab for p, lab in labels.items() if p.endswith("lora_a")} == {
        p: "frozen" for p in labels if p.endswith("lora_a")
    }
    assert {labels[p] for p in labels if p.endswith("lora_b")} == {"trainable"}
    trainable = sum(x.size for p, x in delta_leaves(tree).items() if p.endswith("lora_b"))
    assert new.param_count(params()) == trainable
    updates, grads = sgd_step(new, randomize(tree, seed=5))
    for p, u in delta_leaves(updates).items():
        g = delta_leaves(grads)[p]
        want = np.zeros_like(g) if p.endswith("lora_a") else -np.asarray(g)
        np.testing.assert_allclose(u, want, rtol=1e-6, err_msg=p)
    assert any(np.abs(np.asarray(g)).max() > 0 for p, g in delta_leaves(grads).items() if p.endswith("lora_a"))


def test_select_from_lora_plus_keeps_the_ratio():
    new, tree = variant_select(jpeft.LoRAPlus(targets=("q", "v"), rank=RANK, alpha=ALPHA, lr_ratio=4.0))
    assert type(new) is jpeft.LoRADrop and new.lr_ratio == 4.0 and not new.freeze_a
    updates, grads = sgd_step(new, randomize(tree, seed=5))
    for p, u in delta_leaves(updates).items():
        ratio = 4.0 if p.endswith("lora_b") else 1.0
        np.testing.assert_allclose(u, -ratio * np.asarray(delta_leaves(grads)[p]), rtol=1e-6, err_msg=p)
    assert jpeft.LoRADrop(targets=("q",), keep=(), lr_ratio=2.0).delta_label("lora_b") == "lora_b"


def test_select_refuses_other_lora_variants_and_bad_fields():
    qlora = jpeft.QLoRA(targets=("q", "v"), rank=RANK)
    with pytest.raises(jpeft.JpeftError, match="plain LoRA.*QLoRA"):
        jpeft.lora_drop_select(qlora, params(), Stack().apply, [batch(1)], key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"freeze_a=True, lr_ratio=2.0.*Pass one of them"):
        jpeft.LoRADrop(targets=("q",), freeze_a=True, lr_ratio=2.0)
    with pytest.raises(jpeft.JpeftError, match="freeze_a must be a bool"):
        jpeft.LoRADrop(targets=("q",), freeze_a=1)


# --- nn.scan-stacked targets: per-layer importance, kept slices and tied slices ----------------
SCAN_TARGETS = r"layers/(q|v)"
SCAN_KEEP = ("layers/q[1]",)  # layer 0 of q is tied alone; both layers of v are tied


def scan_lora() -> jpeft.LoRA:
    return jpeft.LoRA(targets=SCAN_TARGETS, rank=RANK, alpha=ALPHA)


def scan_method() -> jpeft.LoRADrop:
    return jpeft.LoRADrop(targets=SCAN_TARGETS, rank=RANK, alpha=ALPHA, keep=SCAN_KEEP, scan_layers=SCAN_TARGETS)


def numpy_scan_importance(peft: Any, ids: list[jax.Array]) -> dict[str, float]:
    """``sum ||s x_l A_l B_l||^2`` per layer, from the inputs that M.capture sows under nn.scan."""
    wrapped = jpeft.wrap(M.Model().apply, scan_lora())
    out = {f"layers/{m}[{i}]": 0.0 for m in ("q", "v") for i in range(M.LAYERS)}
    for x in ids:
        with nn.intercept_methods(M.capture(("q", "v"))):
            _, state = wrapped({"params": peft}, x, mutable=["intermediates"])
        for m in ("q", "v"):
            inputs = f64(state["intermediates"]["layers"][m]["x"][0])  # (L, batch, seq, d)
            assert inputs.shape[0] == M.LAYERS
            d = peft["layers"][m][jpeft.RESERVED]["default"]
            for i in range(M.LAYERS):
                delta = S * (inputs[i] @ f64(d["lora_a"][i])) @ f64(d["lora_b"][i])
                out[f"layers/{m}[{i}]"] += float(np.sum(delta**2))
    return out


def tied_random(method: jpeft.LoRADrop, seed: int) -> Any:
    """A random stage-2 tree whose tied slices are equal again (randomize fills every slice)."""
    tree = randomize(jpeft.apply(method, M.params(), key=jax.random.key(1)), seed=seed)
    for m, tied in (("v", [0, 1]), ("q", [0])):
        store = tree["layers"][m][jpeft.RESERVED]["default"]
        for leaf in ("lora_a", "lora_b"):
            store[leaf] = store[leaf].at[jnp.asarray(tied)].set(store[leaf][tied[0]])
    return tree


def test_scan_importance_is_per_layer_and_matches_numpy():
    peft = randomize(jpeft.apply(scan_lora(), M.params(), key=jax.random.key(1)), seed=2)
    ids = [M.inputs(1), M.inputs(2)]
    got = jpeft.lora_drop_importance(scan_lora(), peft, M.Model().apply, ids)
    want = numpy_scan_importance(peft, ids)
    assert list(got) == ["layers/q[0]", "layers/q[1]", "layers/v[0]", "layers/v[1]"]
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
    assert len({round(v, 4) for v in got.values()}) == 4, "sanity: the layers differ"
    new, tree = jpeft.lora_drop_select(scan_lora(), peft, M.Model().apply, ids, key=jax.random.key(4), threshold=0.6)
    assert new.keep == expected_keep(want, 0.6) and new.scan_layers == "layers/q|layers/v"
    assert 0 < len(new.keep) < 2 * M.LAYERS
    for m in ("q", "v"):  # the non-kept layers start tied
        tied = [i for i in range(M.LAYERS) if f"layers/{m}[{i}]" not in new.keep]
        for x in tree["layers"][m][jpeft.RESERVED]["default"].values():
            assert all(np.array_equal(x[i], x[tied[0]]) for i in tied)


def test_scan_tree_labels_and_closed_form_count():
    method = scan_method()
    peft = jpeft.apply(method, M.params(), key=jax.random.key(1))
    assert jpeft.RESERVED not in peft  # a stack is its own group: nothing at the root
    v = peft["layers"]["v"][jpeft.RESERVED]["default"]
    assert {k: x.shape for k, x in v.items()} == {"lora_a": (M.LAYERS, M.D, RANK), "lora_b": (M.LAYERS, RANK, M.D)}
    assert np.array_equal(v["lora_a"][0], v["lora_a"][1]) and np.any(v["lora_a"][0])
    q = peft["layers"]["q"][jpeft.RESERVED]["default"]["lora_a"]
    assert not np.array_equal(q[0], q[1])
    labels = {p: x for p, x in jax.tree_util.tree_flatten_with_path(jpeft.labels(method, peft))[0]}
    assert sorted(set(labels.values())) == ["frozen", "lora_drop_tied"]
    # q: its kept layer 1 and its tied layer 0; v: one tied pair for both layers.
    assert method.param_count(M.params()) == RANK * (M.D + M.D) * 3
    # Identity at init (B = 0), through nn.scan.
    run = jax.jit(lambda fn, p: fn({"params": p}, M.inputs(1)), static_argnums=0)
    np.testing.assert_allclose(run(jpeft.wrap(M.Model().apply, method), peft), run(M.Model().apply, M.params()),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lr_ratio", [None, 3.0])
def test_scan_tied_slices_get_the_shared_gradient(lr_ratio):
    method = dataclasses.replace(scan_method(), lr_ratio=lr_ratio)  # LoRA+ scales kept and tied B alike
    tree = tied_random(method, seed=3)
    wrapped = jpeft.wrap(M.Model().apply, method)
    target = jax.random.normal(jax.random.key(5), (M.BATCH, M.SEQ, M.VOCAB))

    def loss(p):
        return jnp.mean((wrapped({"params": p}, M.inputs(1)) - target) ** 2)

    grads = jax.jit(jax.grad(loss))(tree)
    lr = 0.1
    tx = jpeft.optimizer(optax.sgd(lr), method, tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    stepped = optax.apply_updates(tree, updates)
    for m, tied in (("v", [0, 1]), ("q", [0])):
        for leaf in ("lora_a", "lora_b"):
            old = f64(tree["layers"][m][jpeft.RESERVED]["default"][leaf])
            g = f64(grads["layers"][m][jpeft.RESERVED]["default"][leaf])
            new = f64(stepped["layers"][m][jpeft.RESERVED]["default"][leaf])
            step = lr * (lr_ratio if lr_ratio and leaf == "lora_b" else 1.0)
            shared = old[tied[0]] - step * g[tied].sum(axis=0)  # the step of one pair used by every tied layer
            for i in range(M.LAYERS):
                want = shared if i in tied else old[i] - step * g[i]
                np.testing.assert_allclose(new[i], want, rtol=1e-5, atol=1e-7, err_msg=f"{m}/{leaf}[{i}]")


def test_scan_training_keeps_tied_slices_equal_and_merges():
    method, tree = scan_method(), tied_random(scan_method(), seed=3)
    wrapped = jpeft.wrap(M.Model().apply, method)
    target = jax.random.normal(jax.random.key(5), (M.BATCH, M.SEQ, M.VOCAB))
    tx = jpeft.optimizer(optax.adam(2e-2), method, tree)

    def loss(p):
        return jnp.mean((wrapped({"params": p}, M.inputs(1)) - target) ** 2)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    state, trained, losses = tx.init(tree), tree, []
    for _ in range(8):
        trained, state, value = step(trained, state)
        losses.append(float(value))
    assert losses[-1] < losses[0], losses
    for m in ("q", "v"):
        for leaf in ("lora_a", "lora_b"):
            after = trained["layers"][m][jpeft.RESERVED]["default"][leaf]
            before = tree["layers"][m][jpeft.RESERVED]["default"][leaf]
            assert all(not np.array_equal(after[i], before[i]) for i in range(M.LAYERS)), (m, leaf)
            if m == "v":
                np.testing.assert_array_equal(after[0], after[1])
    for p, x in flat(M.params()).items():
        assert np.array_equal(flat(trained)[p], x), p
    merged = jpeft.merge(method, trained)
    assert jax.tree.structure(merged) == jax.tree.structure(M.params())
    np.testing.assert_allclose(M.Model().apply({"params": merged}, M.inputs(1)),
                               wrapped({"params": trained}, M.inputs(1)), rtol=1e-5, atol=1e-5)


def flat(tree: Any) -> dict[tuple[str, ...], Any]:
    return {tuple(str(k.key) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_scan_errors():
    def make(**kw: Any) -> Any:
        fields = dict(targets=SCAN_TARGETS, rank=RANK, scan_layers=SCAN_TARGETS) | kw
        return jpeft.apply(jpeft.LoRADrop(**fields), M.params(), key=jax.random.key(0))

    with pytest.raises(jpeft.JpeftError, match=r"\['layers/q'\] are not among .* 'path\[i\]' for layer i"):
        make(keep=("layers/q",))
    with pytest.raises(jpeft.JpeftError, match=r"\['layers/v\[2\]'\] are not among the 4 targets and layers"):
        make(keep=("layers/v[2]",))
    with pytest.raises(jpeft.JpeftError, match=r"scan_layers='nothing'\) names none of the 8 targets"):
        jpeft.LoRADrop(targets=("q", "v"), rank=RANK, scan_layers="nothing").param_count(params())
    with pytest.raises(jpeft.JpeftError, match=r"target 'block_0/q' \(kernel \(6, 6\), layout 'dense'\) has 0 stack"):
        jpeft.LoRADrop(targets=("q",), rank=RANK, scan_layers="block_0/q").param_count(params())
    with pytest.raises(jpeft.JpeftError, match=r"LoRADrop\(scan_layers='\('\): not a valid regular expression"):
        jpeft.LoRADrop(targets=("q",), scan_layers="(")
    with pytest.raises(jpeft.JpeftError, match=r"'layers/q' is a stack of .* name it with scan_layers='layers/q'"):
        jpeft.apply(jpeft.LoRADrop(targets=("layers/q",), rank=2), M.params(), key=jax.random.key(0))


class Nested(nn.Module):
    """Two nested nn.scan stacks: each target sows a (2, 2) importance."""

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        class Inner(nn.Module):
            @nn.compact
            def __call__(self, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
                return nn.Dense(D, name="q")(h), None

        class Mid(nn.Module):
            @nn.compact
            def __call__(self, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
                scan = nn.scan(Inner, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                               length=2)
                return scan(name="inner")(h, None)[0], None

        scan = nn.scan(Mid, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True}, length=2)
        return scan(name="outer")(h, None)[0]


def test_nested_scan_importance_raises():
    tree = Nested().init(jax.random.key(0), batch(0))["params"]
    method = jpeft.LoRA(targets=("q",), rank=RANK)
    peft = randomize(jpeft.apply(method, tree, key=jax.random.key(1)), seed=2)
    with pytest.raises(jpeft.JpeftError, match=r"'outer/inner/q' sowed values of shape \(2, 2\); expected \(\)"):
        jpeft.lora_drop_importance(method, peft, Nested().apply, [batch(1)])


# --- errors ------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(jpeft.JpeftError, match=r"keep must be a sequence of '/'-joined module paths"):
        jpeft.LoRADrop(targets=("q",), keep="block_0/q")
    with pytest.raises(jpeft.JpeftError, match=r"DoRA is not supported"):
        jpeft.LoRADrop(targets=("q",), use_dora=True)
    with pytest.raises(jpeft.JpeftError, match=r"\['block_9/q'\] are not among the 8 targets and layers"):
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


def test_mixed_batches_are_refused_clearly():
    """The shared pairs live at the root and reach the layers only during the root's own call, so one call
    cannot run a different adapter per row. It used to fail deep in the model with a message that blamed the
    caller for not calling through the root (found by the feature matrix)."""
    method, peft = shared_tree(seed=2)
    with pytest.raises(jpeft.JpeftError, match=r"LoRADrop\): adapter_index= \(a mixed batch\) is not supported"):
        jpeft.wrap(Stack().apply, method)({"params": peft}, batch(5), adapter_index=jnp.zeros((2,), jnp.int32))
    composed = jpeft.compose(method, jpeft.IA3(targets=("q",)))
    assert not composed.mixed_batches and jpeft.LoRA(targets=("q",)).mixed_batches
