"""AdaLoRA: the conformance checks, the orthogonality penalty, and the budget schedule.

The conformance checks (numbered as in STYLE.md) run on the synthetic ``nn.scan`` model and on
tiny HF BERT and GPT-2. The schedule is checked step by step against a NumPy re-implementation
on a small tree, and end to end on the scanned model, where the budget counts every (layer,
target) matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.methods._adalora import AdaLoRAState
from tests import _hf_models as H
from tests import _models as M
from tests import _reference as R

TOL = dict(rtol=1e-5, atol=1e-5)
INIT_R, TARGET_R, ALPHA = 3, 2, 6.0
MODELS = ("synthetic", "bert", "gpt2")
L, D = M.LAYERS, M.D
# The synthetic model's targets and their (kind, stack, d_in, d_out), from tests/_models.py.
SYNTHETIC_SHAPES = {
    ("embed",): ("embed", 1, M.VOCAB, D),
    ("layers", "q"): ("dense", L, D, D),
    ("layers", "v"): ("dense", L, D, D),
    ("layers", "o"): ("dense", L, D, D),
    ("layers", "dg_in"): ("dense_general", L, D, math.prod(M.DG_OUT)),
    ("layers", "dg_out"): ("dense_general", L, math.prod(M.DG_OUT), D),
    ("layers", "conv"): ("conv", L, M.CONV_WINDOW * D, D),
}
N_IN = {("layers", "dg_in"): 1, ("layers", "dg_out"): 2}
HF_TARGETS = {"bert": ("query", "value"), "gpt2": ("c_attn", "c_fc")}


def flat(tree: Any) -> dict[tuple[str, ...], Any]:
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(str(k.key) for k in path): leaf for path, leaf in pairs}


def get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def randomize(peft: Any, seed: int) -> Any:
    """Random non-zero delta leaves (NumPy noise); the base leaves stay the same objects."""
    rng = np.random.RandomState(seed)

    def fill(path: Any, x: Any) -> Any:
        if jpeft.RESERVED not in [str(k.key) for k in path]:
            return x
        return jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, peft)


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    method: jpeft.AdaLoRA
    params: dict[str, Any]
    apply: Any  # apply(variables, **kw) -> logits, or (logits, state) with mutable=
    expected: dict[tuple[str, ...], tuple[str, int, int, int]]


@functools.cache
def case(model: str) -> Case:
    kw = dict(init_r=INIT_R, target_r=TARGET_R, alpha=ALPHA, total_step=10)
    if model == "synthetic":
        method = jpeft.AdaLoRA(targets=M.ALL_TARGETS, layouts=M.LAYOUTS, **kw)
        ids = M.inputs()
        return Case(method, M.params(), lambda v, **k: M.Model().apply(v, ids, **k), SYNTHETIC_SHAPES)
    hf = H.make(model)
    method = jpeft.AdaLoRA(targets=HF_TARGETS[model], **kw)
    expected = {}
    for path in flat(hf.params):
        if path[-1] == "kernel" and path[-2] in HF_TARGETS[model]:
            rows, cols = get(hf.params, path).shape
            # HF GPT-2's Conv1D kernels are (out, in).
            expected[path[:-1]] = ("transposed", 1, cols, rows) if model == "gpt2" else ("dense", 1, rows, cols)

    def apply(variables: Any, **k: Any) -> Any:
        out = hf.apply(variables, **hf.inputs, **k)
        return (hf.logits(out[0]), out[1]) if "mutable" in k else hf.logits(out)

    return Case(method, hf.params, apply, expected)


@functools.cache
def trees(model: str) -> tuple[Any, Any]:
    c = case(model)
    peft = jpeft.apply(c.method, c.params, key=jax.random.key(1))
    return peft, randomize(peft, seed=2)


@functools.cache
def jitted(model: str) -> tuple[Any, list[None]]:
    """One compiled function per model: the wrapped output, each target's input and output, and the
    gradient of a weighted sum of the output w.r.t. the trainable half of :func:`jpeft.split`."""
    traces: list[None] = []
    c = case(model)
    wrapped = jpeft.wrap(c.apply, c.method)
    names = tuple(p[-1] for p in c.expected)
    weights = jax.random.normal(jax.random.key(3), base_fn(model)(c.params).shape)

    def loss(trainable: Any, frozen: Any) -> tuple[jax.Array, Any]:
        with nn.intercept_methods(M.capture(names)):
            out, state = wrapped({"params": jpeft.combine(trainable, frozen)}, mutable=["intermediates"])
        return jnp.sum(out * weights), (out, state["intermediates"])

    @jax.jit
    def run(trainable: Any, frozen: Any) -> tuple[jax.Array, Any, Any]:
        traces.append(None)
        grads, (out, seen) = jax.grad(loss, has_aux=True)(trainable, frozen)
        return out, seen, grads

    return run, traces


@functools.cache
def results(model: str, random: bool) -> tuple[np.ndarray, Any, Any]:
    c = case(model)
    run, _ = jitted(model)
    return run(*jpeft.split(c.method, trees(model)[random]))


@functools.cache
def base_fn(model: str) -> Any:
    c = case(model)
    return jax.jit(lambda p: c.apply({"params": p}))


# --- the conformance checks --------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_1_identity_at_init_and_7_jit_agrees(model):
    c = case(model)
    base = np.asarray(base_fn(model)(c.params))
    np.testing.assert_allclose(np.asarray(results(model, False)[0]), base, rtol=1e-6, atol=1e-6)
    out = np.asarray(results(model, True)[0])
    assert not np.allclose(out, base, **TOL), "random deltas must change the output"
    if model == "synthetic":  # eager HF models run op by op, slowly; the scan model shows the point
        np.testing.assert_allclose(np.asarray(jpeft.wrap(c.apply, c.method)({"params": trees(model)[1]})), out, **TOL)
    assert len(jitted(model)[1]) == 1, "a second call must reuse the compilation"


@pytest.mark.parametrize("model", MODELS)
def test_2_each_layer_matches_numpy_reference(model):
    c = case(model)
    _, peft = trees(model)
    seen = results(model, True)[1]
    s = ALPHA / INIT_R
    for path, (kind, stack, _, _) in c.expected.items():
        own = {k: v for k, v in get(peft, path).items() if k != jpeft.RESERVED}
        deltas = get(peft, path)[jpeft.RESERVED]["default"]
        xs, ys = get(seen, path)["x"][0], get(seen, path)["y"][0]
        stacked = path[0] == "layers"
        for layer in range(stack):
            x, y = (xs[layer], ys[layer]) if stacked else (xs, ys)
            own_l = {k: v[layer] for k, v in own.items()} if stacked else own
            d = {k: np.asarray(v[layer] if stacked else v, np.float64) for k, v in deltas.items()}
            # P diag(lambda) Q as LoRA factors (P diag(lambda), Q), merged in float64 by the reference.
            lora = {"lora_a": d["lora_a"] * d["lora_e"], "lora_b": d["lora_b"]}
            want = R.forward(kind, x, own_l, lora, s, n_in=N_IN.get(path, 1))
            base = R.forward(kind, x, own_l, None, s, n_in=N_IN.get(path, 1))
            assert not np.allclose(want, base, **TOL), f"{path}: the deltas do not change this layer"
            np.testing.assert_allclose(np.asarray(y), want, **TOL, err_msg=f"{'/'.join(path)} layer {layer}")


@pytest.mark.parametrize("model", MODELS)
def test_3_merge_equals_wrapped_and_4_keeps_structure(model):
    c = case(model)
    _, peft = trees(model)
    merged = jpeft.merge(c.method, peft)
    np.testing.assert_allclose(np.asarray(base_fn(model)(merged)), np.asarray(results(model, True)[0]), **TOL)
    assert jax.tree.structure(merged) == jax.tree.structure(c.params)
    base, out = flat(c.params), flat(merged)
    for path, leaf in base.items():
        new = out[path]
        assert (new.shape, new.dtype) == (leaf.shape, leaf.dtype), path
        if path[:-1] in c.expected and path[-1] in ("kernel", "embedding"):
            assert not np.array_equal(new, leaf), path
        else:
            assert new is leaf, f"{path}: an untouched leaf must be the same object"


@pytest.mark.parametrize("model", MODELS)
def test_5_grads_reach_exactly_the_trainable_leaves(model):
    c = case(model)
    got = flat(results(model, True)[2])
    want = {p + (jpeft.RESERVED, "default", leaf) for p in c.expected for leaf in ("lora_a", "lora_e", "lora_b")}
    assert set(got) == want == set(flat(jpeft.split(c.method, trees(model)[1])[0]))
    for path, g in got.items():
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), path


@pytest.mark.parametrize("model", MODELS)
def test_6_trainable_count_is_closed_form_and_8_stack_axes(model):
    c = case(model)
    peft, _ = trees(model)
    labels = flat(jpeft.labels(c.method, peft))
    counted = sum(int(np.size(x)) for p, x in flat(peft).items() if labels[p] != "frozen")
    closed = sum(stack * INIT_R * (d_in + d_out + 1) for _, stack, d_in, d_out in c.expected.values())
    assert counted == c.method.param_count(c.params) == closed
    assert f"trainable params: {counted:,} ||" in jpeft.summary(c.method, peft)
    for path, (_, stack, d_in, d_out) in c.expected.items():
        d = get(peft, path)[jpeft.RESERVED]["default"]
        lead = (stack,) if path[0] == "layers" else ()
        assert d["lora_e"].shape == lead + (INIT_R,)
        assert d["lora_a"].shape[: len(lead)] == lead and d["lora_a"].shape[-1] == INIT_R
        assert d["lora_b"].shape[: len(lead) + 1] == lead + (INIT_R,)
        assert math.prod(d["lora_a"].shape) == stack * d_in * INIT_R
        assert math.prod(d["lora_b"].shape) == stack * d_out * INIT_R
        assert np.all(np.asarray(d["lora_e"]) == 0)


def test_init_statistics():
    """P and Q are N(0, 0.02^2), as in HF PEFT: pooled over the three models' factors (~2700 values)."""
    pooled = [
        np.ravel(x) for model in MODELS for p, x in flat(trees(model)[0]).items() if p[-1] in ("lora_a", "lora_b")
    ]
    values = np.concatenate(pooled)
    assert values.size > 2000 and abs(values.mean()) < 2e-3 and abs(values.std() - 0.02) < 2e-3


def test_dropout_only_with_a_dropout_rng():
    params = {"w": nn.Dense(5).init(jax.random.key(0), jnp.ones((1, 4)))["params"]}
    method = jpeft.AdaLoRA(targets=["w"], init_r=2, target_r=1, total_step=5, dropout=0.5)
    peft = randomize(jpeft.apply(method, params, key=jax.random.key(1)), seed=2)
    x = jax.random.normal(jax.random.key(2), (64, 4))

    def layer(m: jpeft.AdaLoRA, **kw: Any) -> np.ndarray:
        fn = jpeft.wrap(lambda v, x, **k: nn.Dense(5).apply({"params": v["params"]["w"]}, x, **k), m)
        return np.asarray(fn({"params": peft}, x, **kw))

    exact = layer(dataclasses.replace(method, dropout=0.0))
    np.testing.assert_array_equal(layer(method), exact)
    one, two = layer(method, rngs={"dropout": jax.random.key(1)}), layer(method, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(one, exact) and not np.allclose(one, two)
    np.testing.assert_array_equal(layer(method, rngs={"dropout": jax.random.key(1)}), one)


# --- the orthogonality penalty -----------------------------------------------------------------
def test_penalty_matches_numpy():
    """HF PEFT's form: weight * mean over all 2n factor matrices of the unsquared Frobenius norms."""
    c = case("synthetic")
    _, peft = trees("synthetic")
    method = dataclasses.replace(c.method, orth_reg_weight=0.3)
    norms = []
    for path, (_, stack, _, _) in c.expected.items():
        d = get(peft, path)[jpeft.RESERVED]["default"]
        for layer in range(stack):
            p = np.asarray(d["lora_a"][layer] if path[0] == "layers" else d["lora_a"], np.float64)
            q = np.asarray(d["lora_b"][layer] if path[0] == "layers" else d["lora_b"], np.float64)
            p, q = p.reshape(-1, INIT_R), q.reshape(INIT_R, -1)
            norms += [np.linalg.norm(p.T @ p - np.eye(INIT_R)), np.linalg.norm(q @ q.T - np.eye(INIT_R))]
    assert len(norms) == 2 * (1 + 6 * L)  # the embedding, and each layer of six stacked targets
    got = jpeft.regularizer(method, peft)
    np.testing.assert_allclose(float(got), 0.3 * np.mean(norms), rtol=1e-5)
    # Orthonormal P and Q have no penalty, and a finite (zero) gradient there.
    tree = {
        "w": {
            "kernel": jnp.ones((5, 4)),
            jpeft.RESERVED: {"default": {"lora_a": jnp.eye(5, 3), "lora_e": jnp.ones(3), "lora_b": jnp.eye(3, 4)}},
        }
    }
    assert float(jpeft.regularizer(method, tree)) == 0.0
    grads = jax.grad(lambda t: jpeft.regularizer(method, t))(tree)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(grads))
    # Another adapter name on the same tree has its own penalty; a name without triplets raises.
    with pytest.raises(jpeft.JpeftError, match=r"no lora_a/lora_e/lora_b triplet of adapter 'other'"):
        jpeft.regularizer(method, tree, name="other")


def test_penalty_matches_hf_peft_formula():
    """The same number as HF PEFT's AdaLoraModel.forward computes, from its A = P^T and B = Q^T."""
    torch = pytest.importorskip("torch")
    _, peft = trees("synthetic")
    method = case("synthetic").method
    want, count = 0.0, 0
    for path, (_, stack, _, _) in case("synthetic").expected.items():
        d = get(peft, path)[jpeft.RESERVED]["default"]
        for layer in range(stack):
            p = np.asarray(d["lora_a"][layer] if path[0] == "layers" else d["lora_a"]).reshape(-1, INIT_R)
            q = np.asarray(d["lora_b"][layer] if path[0] == "layers" else d["lora_b"]).reshape(INIT_R, -1)
            for name, w in (("lora_A", torch.from_numpy(p.T.copy())), ("lora_B", torch.from_numpy(q.T.copy()))):
                cov = w @ w.T if "lora_A" in name else w.T @ w  # peft/tuners/adalora/model.py
                want += float(torch.norm(cov - torch.eye(*cov.size()), p="fro"))
                count += 1
    assert method.orth_reg_weight == 0.5  # HF PEFT's AdaLoraConfig default
    np.testing.assert_allclose(float(jpeft.regularizer(method, peft)), 0.5 * want / count, rtol=1e-5)


# --- the schedule ------------------------------------------------------------------------------
def budget(method: jpeft.AdaLoRA, n: int, t: int) -> int:
    """The paper's cubic schedule, in exact rational arithmetic."""
    b0, bt = method.init_r * n, method.target_r * n
    end = method.total_step - method.tfinal
    if t <= method.tinit:
        return b0
    if t >= end:
        return bt
    frac = 1 - Fraction(t - method.tinit, end - method.tinit)
    return bt + math.floor((b0 - bt) * frac**3)


def test_schedule_matches_numpy_step_by_step():
    """Scores, budget, masking and the E updates against a NumPy re-implementation with SGD."""
    params = {"q": {"kernel": jnp.ones((6, 5))}, "s": {"kernel": jnp.ones((2, 5, 7))}}  # s: a 2-layer stack
    method = jpeft.AdaLoRA(
        targets=["q", "s"], init_r=4, target_r=2, total_step=20, tinit=2, tfinal=4, delta_t=3, beta1=0.7, beta2=0.8
    )
    n, lr, end = 3, 0.1, 16
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    tx = jpeft.optimizer(optax.sgd(lr), method, peft)
    state = tx.init(peft)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    paths = {"q": ("q", jpeft.RESERVED, "default"), "s": ("s", jpeft.RESERVED, "default")}
    leaves = ("lora_a", "lora_e", "lora_b")
    theta = {m: {k: np.asarray(get(peft, p)[k], np.float64) for k in leaves} for m, p in paths.items()}
    ipt = {m: {k: np.zeros_like(v) for k, v in d.items()} for m, d in theta.items()}
    unc = {m: {k: np.zeros_like(v) for k, v in d.items()} for m, d in theta.items()}
    mask = {"q": np.ones(4, bool), "s": np.ones((2, 4), bool)}
    rng = np.random.RandomState(0)
    came_back = False
    for t in range(1, 23):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), peft)
        updates, state = step(grads, state, peft)
        peft = optax.apply_updates(peft, updates)
        # The reference.
        scores = {}
        for m, p in paths.items():
            g = {k: np.asarray(get(grads, p)[k], np.float64) for k in leaves}
            for k in leaves:
                stepped = theta[m][k] - lr * g[k]
                if t <= end:
                    sens = np.abs(stepped * g[k])
                    ipt[m][k] = method.beta1 * ipt[m][k] + (1 - method.beta1) * sens
                    unc[m][k] = method.beta2 * unc[m][k] + (1 - method.beta2) * np.abs(sens - ipt[m][k])
                theta[m][k] = stepped
            s = {k: ipt[m][k] * unc[m][k] for k in leaves}
            if m == "q":
                scores[m] = s["lora_e"] + s["lora_a"].mean(0) + s["lora_b"].mean(1)
            else:
                per_layer = [s["lora_e"][i] + s["lora_a"][i].mean(0) + s["lora_b"][i].mean(1) for i in range(2)]
                scores[m] = np.stack(per_layer)
        remask = (t > 2 and t < end and (t - 2) % 3 == 0) or t == end
        if remask:
            flat_scores = np.concatenate([scores["q"].ravel(), scores["s"].ravel()])
            keep = np.zeros(flat_scores.size, bool)
            keep[np.argsort(-flat_scores, kind="stable")[: budget(method, n, t)]] = True
            mask = {"q": keep[:4], "s": keep[4:].reshape(2, 4)}
        if remask or t > end:
            for m in paths:
                theta[m]["lora_e"] = np.where(mask[m], theta[m]["lora_e"], 0.0)
        # jpeft against it.
        ranks = jpeft.adalora_ranks(state)
        np.testing.assert_array_equal(ranks["q"], mask["q"].sum(-1), err_msg=f"step {t}")
        np.testing.assert_array_equal(ranks["s"], mask["s"].sum(-1), err_msg=f"step {t}")
        if remask:
            assert int(ranks["q"]) + int(ranks["s"].sum()) == budget(method, n, t), t
        for m, p in paths.items():
            for k in leaves:
                np.testing.assert_allclose(
                    get(peft, p)[k], theta[m][k], rtol=1e-5, atol=1e-6, err_msg=f"{m}/{k} step {t}"
                )
            e = np.asarray(get(peft, p)["lora_e"])
            if remask or t > end:
                assert np.all(e[~mask[m]] == 0.0), f"masked values must be exactly 0 at step {t}"
            elif np.any(e[~mask[m]] != 0.0):
                came_back = True  # between maskings, masked values train (HF PEFT's behaviour)
    assert came_back
    assert int(ranks["q"]) + int(ranks["s"].sum()) == 2 * n


def test_split_half_and_full_tree_train_identically():
    params = {"q": {"kernel": jnp.ones((6, 5))}, "s": {"kernel": jnp.ones((2, 5, 7))}}
    method = jpeft.AdaLoRA(targets=["q", "s"], init_r=4, target_r=2, total_step=10, tinit=1, tfinal=3, delta_t=2)
    full = jpeft.apply(method, params, key=jax.random.key(0))
    half, frozen = jpeft.split(method, full)
    tx_full, tx_half = jpeft.optimizer(optax.adam(1e-2), method, full), jpeft.optimizer(optax.adam(1e-2), method, half)
    s_full, s_half = tx_full.init(full), tx_half.init(half)
    rng = np.random.RandomState(0)
    for _ in range(12):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), half)
        u, s_half = tx_half.update(g, s_half, half)
        half = optax.apply_updates(half, u)
        u, s_full = tx_full.update(jpeft.combine(g, jax.tree.map(jnp.zeros_like, frozen)), s_full, full)
        full = optax.apply_updates(full, u)
    for a, b in zip(jax.tree.leaves(jpeft.combine(half, frozen)), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)
    ranks = jpeft.adalora_ranks(s_half)
    assert int(ranks["q"]) + int(ranks["s"].sum()) == 2 * 3
    assert jax.tree.map(np.asarray, ranks).keys() == jpeft.adalora_ranks(s_full).keys()


def test_state_can_be_donated():
    """Regression: the initial state held one counter buffer in two fields, so a train step jitted with the
    state donated failed ("Attempt to donate the same buffer twice"; found by experiments.claims)."""
    params = {"q": {"kernel": jnp.ones((6, 5))}}
    method = jpeft.AdaLoRA(targets=["q"], init_r=4, target_r=2, total_step=10, tinit=1, tfinal=3, delta_t=2)
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    tx = jpeft.optimizer(optax.adam(1e-2), method, peft)
    state = tx.init(peft)
    leaves = jax.tree.leaves(state)
    assert len({id(x) for x in leaves}) == len(leaves)
    step = jax.jit(lambda s, p: tx.update(jax.tree.map(jnp.ones_like, p), s, p), donate_argnums=0)
    _, state = step(state, peft)
    assert set(jpeft.adalora_ranks(state)) == {"q"}


@pytest.mark.parametrize("placement", ["inside", "outside"])
def test_multisteps_schedule_counts_real_updates(placement):
    """MultiSteps(every_k_schedule=2) over 2k micro-steps (each real step's gradient fed twice) gives the
    params, masks, ranks and step count of k plain steps, whether MultiSteps is the tx that
    jpeft.optimizer wraps ('inside') or wraps jpeft.optimizer ('outside')."""
    params = {"q": {"kernel": jnp.ones((6, 5))}, "s": {"kernel": jnp.ones((2, 5, 7))}}
    method = jpeft.AdaLoRA(targets=["q", "s"], init_r=4, target_r=2, total_step=10, tinit=1, tfinal=3, delta_t=2)
    plain_tree = micro_tree = jpeft.apply(method, params, key=jax.random.key(0))
    plain = jpeft.optimizer(optax.adam(1e-1), method, plain_tree)
    if placement == "inside":
        micro = jpeft.optimizer(optax.MultiSteps(optax.adam(1e-1), every_k_schedule=2), method, micro_tree)
    else:
        micro = optax.MultiSteps(jpeft.optimizer(optax.adam(1e-1), method, micro_tree), every_k_schedule=2)
    s_plain, s_micro = plain.init(plain_tree), micro.init(micro_tree)

    def stepper(tx):  # compiled once (eagerly, MultiSteps' lax.cond would trace and compile on every call)
        @jax.jit
        def step(g, s, p):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step

    plain_step, micro_step = stepper(plain), stepper(micro)
    rng = np.random.RandomState(0)
    for k in range(1, 12):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), plain_tree)
        plain_tree, s_plain = plain_step(g, s_plain, plain_tree)
        for _ in range(2):
            micro_tree, s_micro = micro_step(g, s_micro, micro_tree)
        sched = [
            x
            for x in jax.tree.leaves(s_micro, is_leaf=lambda x: isinstance(x, AdaLoRAState))
            if isinstance(x, AdaLoRAState)
        ][0]
        assert int(sched.count) == k
        for a, b in zip(jax.tree.leaves(micro_tree), jax.tree.leaves(plain_tree), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"step {k}")
        ranks, want = jpeft.adalora_ranks(s_micro), jpeft.adalora_ranks(s_plain)
        assert {m: np.asarray(r).tolist() for m, r in ranks.items()} == {
            m: np.asarray(r).tolist() for m, r in want.items()
        }
    assert int(ranks["q"]) + int(ranks["s"].sum()) == 2 * 3  # the final budget after k = total_step updates


def test_full_schedule_on_the_scan_model():
    """A plain optax loop: the final rank is target_r per (layer, target) and masked values stay 0."""
    c = case("synthetic")
    method = dataclasses.replace(c.method, total_step=24, tinit=4, tfinal=8, delta_t=2)
    n = sum(stack for _, stack, _, _ in c.expected.values())
    peft = jpeft.apply(method, c.params, key=jax.random.key(1))
    target = jax.random.normal(jax.random.key(4), base_fn("synthetic")(c.params).shape)
    wrapped = jpeft.wrap(c.apply, method)
    tx = jpeft.optimizer(optax.adam(1e-2), method, peft)
    state = tx.init(peft)

    def loss(p):
        return jnp.mean((wrapped({"params": p}) - target) ** 2) + jpeft.regularizer(method, p)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    def e_values(p):
        return {path: np.asarray(get(p, path)[jpeft.RESERVED]["default"]["lora_e"]) for path in c.expected}

    end, fixed, losses = method.total_step - method.tfinal, None, []
    for t in range(1, 31):
        peft, state, value = step(peft, state)
        losses.append(float(value))
        ranks = jpeft.adalora_ranks(state)
        total = sum(int(np.sum(r)) for r in ranks.values())
        if t <= method.tinit:
            assert total == INIT_R * n
        elif t == end or (t < end and (t - method.tinit) % method.delta_t == 0):
            assert total == budget(method, n, t), t
        if t >= end:
            schedule = jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mask"))[0]
            masks = {k: np.asarray(v) for k, v in schedule.mask.items()}
            if fixed is None:
                fixed = masks
            assert masks.keys() == fixed.keys() and all(np.array_equal(masks[k], fixed[k]) for k in masks)
            for path, e in e_values(peft).items():
                kept = fixed["/".join(path + (jpeft.RESERVED, "default"))]
                assert np.all(e[~kept] == 0.0), f"{path}: masked values must stay exactly 0 (step {t})"
                assert np.all(e[kept] != 0.0), path
    assert total == TARGET_R * n
    per_matrix = np.concatenate([np.ravel(r) for r in ranks.values()])
    assert per_matrix.size == n and len(set(per_matrix.tolist())) > 1, "the budget goes where the scores are"
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(init_r=4, target_r=5), r"target_r must be <= init_r"),
        (dict(tinit=5, tfinal=5), r"tinit \+ tfinal must be < total_step"),
        (dict(delta_t=0), r"delta_t must be a positive int"),
        (dict(total_step=0), r"total_step must be a positive int"),
        (dict(tinit=-1), r"tinit must be an int >= 0"),
        (dict(beta1=1.0), r"beta1 must be a float in \[0, 1\)"),
        (dict(orth_reg_weight=-0.1), r"orth_reg_weight must be a number >= 0"),
        (dict(layouts=((".*",),)), r"layouts must be a sequence of \(regex, layout\) pairs"),
        (dict(layouts=((".*", "dense3"),)), r"unknown layout 'dense3'"),
        (dict(dtype="int8"), r"dtype must name a float dtype"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.AdaLoRA(targets=["q"], **{"total_step": 10, **kwargs})


def test_usage_errors():
    params = {"q": {"kernel": jnp.ones((6, 4))}}
    method = jpeft.AdaLoRA(targets=["q"], init_r=3, target_r=1, total_step=10)
    with pytest.raises(jpeft.JpeftError, match=r"init_r must be <= 4"):
        jpeft.apply(dataclasses.replace(method, init_r=5, target_r=1), params, key=jax.random.key(0))
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    with pytest.raises(jpeft.JpeftError, match=r"q/__jpeft__/default/lora_e has shape \(3,\), expected rank 4"):
        jpeft.optimizer(optax.sgd(0.1), dataclasses.replace(method, init_r=4), peft).init(peft)
    lora = jpeft.LoRA(targets=["q"], rank=2)
    with pytest.raises(jpeft.JpeftError, match=r"found no lora_a/lora_e/lora_b triplet"):
        lora_peft = jpeft.apply(lora, params, key=jax.random.key(0))
        jpeft.optimizer(optax.sgd(0.1), method, lora_peft).init(lora_peft)
    tx = jpeft.optimizer(optax.sgd(0.1), method, peft)
    with pytest.raises(jpeft.JpeftError, match=r"needs the parameters"):
        tx.update(peft, tx.init(peft))
    with pytest.raises(jpeft.JpeftError, match=r"found 0 AdaLoRA schedules"):
        jpeft.adalora_ranks(optax.sgd(0.1).init(peft))
    # Deltas made for a (out, in) layout do not fit an nn.Dense (in, out) kernel.
    odd = jpeft.apply(dataclasses.replace(method, layouts=(("q", "transposed"),)), params, key=jax.random.key(0))
    wrapped = jpeft.wrap(lambda v, x: nn.Dense(4).apply({"params": v["params"]["q"]}, x), method)
    with pytest.raises(jpeft.JpeftError, match=r"lora_a/lora_e/lora_b have shapes \(4, 3\)/\(3,\)/\(3, 6\)"):
        wrapped({"params": odd}, jnp.ones((2, 6)))
