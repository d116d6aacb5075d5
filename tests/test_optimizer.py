"""jpeft.optimizer: one instance of the user's transform over every trainable leaf, rules around it.

The oracle is NumPy: ``chain(clip_by_global_norm(1), sgd(1))`` gives ``-g / max(1, ||g||)`` with
the norm over *all* trainable gradients, and LoRA+ then scales B's rows by ``lr_ratio``.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import JpeftError

R = jpeft.RESERVED
CLIP = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))


def params() -> dict[str, Any]:
    rng = np.random.RandomState(0)
    shapes = {"q": {"kernel": (6, 4)}, "v": {"kernel": (6, 4)}, "head": {"kernel": (4, 3), "bias": (3,)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))


def flat(tree: Any) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def grads_like(tree: Any, seed: int = 1) -> Any:
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(3 * rng.standard_normal(x.shape), x.dtype), tree)


def one_update(method: jpeft.Method, tx: Any = CLIP, extra: bool = False) -> tuple[dict, dict, dict]:
    """(flat updates, flat grads, flat labels) of one step on a fresh tree."""
    tree = jpeft.apply(method, params(), key=jax.random.key(0))
    grads = grads_like(tree)
    opt = jpeft.optimizer(tx, method, tree)
    updates, _ = opt.update(grads, opt.init(tree), tree)
    return flat(updates), flat(grads), flat(jpeft.labels(method, tree))


def norm(leaves: dict[str, Any]) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves.values())))


LORA = dict(targets=("q", "v"), rank=2)
METHODS = {
    "lora": jpeft.LoRA(**LORA),
    "lora_head": jpeft.LoRA(**LORA, extra_trainable=r"head/.*"),
    "lora_plus_1": jpeft.LoRAPlus(**LORA, lr_ratio=1.0),
    "lora_plus_1_head": jpeft.LoRAPlus(**LORA, lr_ratio=1.0, extra_trainable=r"head/.*"),
    "lora_fa": jpeft.LoRAFA(**LORA),
    "dora_plus_1": jpeft.LoRAPlus(**LORA, lr_ratio=1.0, use_dora=True),
    "compose": jpeft.compose(jpeft.LoRAPlus(targets=("q",), rank=2, lr_ratio=1.0), jpeft.LoRAFA(targets=("v",), rank=2)),
    "compose_lora_ia3": jpeft.compose(jpeft.LoRA(targets=("q",), rank=2), jpeft.IA3(targets=("v",))),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_global_norm_clip_sees_every_trainable_leaf(name):
    updates, grads, labels = one_update(METHODS[name])
    trainable = {p: g for p, g in grads.items() if labels[p] != "frozen"}
    assert norm(trainable) > 1.5  # the clip is active
    np.testing.assert_allclose(norm({p: updates[p] for p in trainable}), 1.0, rtol=1e-6)
    scale = 1.0 / norm(trainable)
    for p, u in updates.items():
        want = 0.0 if labels[p] == "frozen" else -scale * np.asarray(grads[p], np.float64)
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-7, err_msg=p)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_plus_scales_b_after_the_global_clip(use_dora):
    ratio = 16.0
    plus, _, labels = one_update(jpeft.LoRAPlus(**LORA, lr_ratio=ratio, use_dora=use_dora))
    plain, grads, _ = one_update(jpeft.LoRA(**LORA, use_dora=use_dora))
    scale = 1.0 / norm({p: g for p, g in grads.items() if labels[p] != "frozen"})
    fast = ("lora_b", "magnitude")  # HF PEFT's create_loraplus_optimizer gives 1-D leaves B's rate
    for p, u in plus.items():
        leaf = p.rsplit("/", 1)[-1]
        if labels[p] == "frozen":
            assert not np.any(u), p
            continue
        factor = ratio if leaf in fast else 1.0
        assert labels[p] == ("lora_b" if leaf in fast else "lora_a"), p
        np.testing.assert_allclose(u, -factor * scale * np.asarray(grads[p], np.float64), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(u, factor * np.asarray(plain[p]), rtol=1e-5, atol=1e-7)
    assert use_dora == any(p.endswith("magnitude") for p in plus)


@pytest.mark.parametrize("name", ["lora", "lora_plus_1_head", "compose"])
def test_frozen_leaves_keep_no_state(name):
    method = METHODS[name]
    tree = jpeft.apply(method, params(), key=jax.random.key(0))
    labels = flat(jpeft.labels(method, tree))
    state = jpeft.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), method, tree).init(tree)
    arrays = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
    n_trainable = sum(int(np.size(x)) for p, x in flat(tree).items() if labels[p] != "frozen")
    # One Adam (mu and nu) for the trainable leaves; every other state leaf is a scalar count.
    assert sum(int(np.size(x)) for x in arrays) == 2 * n_trainable
    assert len(arrays) == 2 * sum(labels[p] != "frozen" for p in labels)


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_multi_steps_accumulates_trainable_leaves(where):
    method = jpeft.LoRAPlus(**LORA, lr_ratio=4.0, extra_trainable=r"head/.*")
    tree = jpeft.apply(method, params(), key=jax.random.key(0))
    if where == "inside":  # the documented form: accumulators for the trainable leaves only
        opt = jpeft.optimizer(optax.MultiSteps(CLIP, every_k_schedule=2), method, tree)
    else:
        opt = optax.MultiSteps(jpeft.optimizer(CLIP, method, tree), every_k_schedule=2)
    state = opt.init(tree)
    g1, g2 = grads_like(tree, 1), grads_like(tree, 2)
    u1, state = opt.update(g1, state, tree)
    u2, state = opt.update(g2, state, tree)
    labels = flat(jpeft.labels(method, tree))
    assert not any(np.any(u) for u in flat(u1).values())  # a micro-step
    mean = {p: (np.asarray(a, np.float64) + np.asarray(b)) / 2 for (p, a), b in zip(flat(g1).items(), flat(g2).values(), strict=True)}
    scale = 1.0 / max(1.0, norm({p: g for p, g in mean.items() if labels[p] != "frozen"}))
    for p, u in flat(u2).items():
        factor = {"frozen": 0.0, "lora_b": 4.0}.get(labels[p], 1.0)
        np.testing.assert_allclose(u, -factor * scale * mean[p], rtol=1e-5, atol=1e-7, err_msg=p)
    sizes = sum(int(np.size(x)) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
    n_trainable = sum(int(np.size(x)) for p, x in flat(tree).items() if labels[p] != "frozen")
    n_all = sum(int(np.size(x)) for x in flat(tree).values())
    # Inside: one accumulator per trainable leaf. Outside: MultiSteps keeps one per leaf of the tree.
    assert sizes == (n_trainable if where == "inside" else n_all)


# --- the variables-dict form is refused everywhere -------------------------------------------------
def test_labels_optimizer_split_refuse_a_variables_dict():
    method = jpeft.LoRA(**LORA, extra_trainable=r"head/.*")
    tree = jpeft.apply(method, params(), key=jax.random.key(0))
    for fn, where in (
        (lambda t: jpeft.labels(method, t), "jpeft.labels"),
        (lambda t: jpeft.optimizer(CLIP, method, t), "jpeft.optimizer"),
        (lambda t: jpeft.split(method, t), "jpeft.split"),
    ):
        with pytest.raises(
            JpeftError, match=re.escape(f"{where} got a variables dict {{'params': ...}}; pass variables['params'] instead.")
        ):
            fn({"params": tree})
    # The bare tree trains the extra_trainable head.
    opt = jpeft.optimizer(CLIP, method, tree)
    updates, _ = opt.update(grads_like(tree), opt.init(tree), tree)
    assert np.all(np.asarray(updates["head"]["kernel"]) != 0)
    # A tree built bare but stepped wrapped is refused too (when the state is made).
    with pytest.raises(JpeftError, match=r"jpeft.optimizer\(...\).init/update got a variables dict"):
        opt.init({"params": tree})
