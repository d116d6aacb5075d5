"""The conformance suite: every LoRA-family method on the synthetic scan model and the tiny HF families.

Checks, numbered as in STYLE.md: 1 identity at init; 2 wrapped output == NumPy reference; 3
``apply(merge(p)) == wrap(apply)(p)``; 4 merge keeps structure, shapes, dtypes and untouched
objects; 5 gradients reach exactly the trainable leaves; 6 the trainable count is the closed form;
7 jit == no-jit without recompiling; 8 the ``nn.scan``-stacked model gets stacked deltas. Then the
tree API (apply, labels, optimizer, split) and the methods' own promises (LoRA+, DoRA, dropout,
bf16).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
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
from tests import _reference as R

TOL = dict(rtol=1e-5, atol=1e-5)
RANK, ALPHA = 2, 4.0

METHODS: dict[str, Callable[..., jpeft.Method]] = {
    "lora": lambda **kw: jpeft.LoRA(rank=RANK, alpha=ALPHA, **kw),
    "rslora": lambda **kw: jpeft.LoRA(rank=RANK, alpha=ALPHA, use_rslora=True, **kw),
    "dora": lambda **kw: jpeft.DoRA(rank=RANK, alpha=ALPHA, **kw),
    "gaussian": lambda **kw: jpeft.LoRA(rank=RANK, alpha=ALPHA, init="gaussian", **kw),
    "lora_fa": lambda **kw: jpeft.LoRAFA(rank=RANK, alpha=ALPHA, **kw),
    "lora_plus": lambda **kw: jpeft.LoRAPlus(rank=RANK, alpha=ALPHA, lr_ratio=16.0, **kw),
}
MODELS = ("synthetic", *H.FAMILIES, "gpt2_all")
CASES = [(model, name) for model in MODELS for name in METHODS]
SYNTHETIC = [("synthetic", name) for name in METHODS]

# The synthetic model's target modules and their (kind, stack size, d_in, d_out), written down from
# the model's definition (tests/_models.py), not read from the tree.
L, D = M.LAYERS, M.D
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


# --- helpers -----------------------------------------------------------------------------------
def modules(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict[str, Any]]:
    """Module path -> its own array leaves, for a plain nested dict (delta subtrees skipped)."""
    out = {}
    own = {k: v for k, v in tree.items() if not isinstance(v, dict)}
    if own:
        out[path] = own
    for k, v in tree.items():
        if isinstance(v, dict) and k != jpeft.RESERVED:
            out.update(modules(v, path + (k,)))
    return out


def flat(tree: Any) -> dict[tuple[str, ...], Any]:
    """Key-path tuple -> leaf, for every leaf of ``tree`` (``None`` holes are not leaves)."""
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(str(k.key) for k in path): leaf for path, leaf in pairs}


def get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One (model, method) pair of the suite."""

    model: str
    name: str
    method: jpeft.Method
    params: dict[str, Any]
    apply: Callable[..., Any]  # apply(variables, **apply_kwargs) -> the main output array
    expected: dict[tuple[str, ...], tuple[str, int, int, int]]  # target -> (kind, stack, d_in, d_out)

    @property
    def wrapped(self) -> Callable[..., Any]:
        return jpeft.wrap(self.apply, self.method)


@functools.cache
def case(model: str, name: str) -> Case:
    if model == "synthetic":
        targets = M.LINEAR_TARGETS if name == "dora" else M.ALL_TARGETS  # DoRA refuses embeddings
        method = METHODS[name](targets=targets, layouts=M.LAYOUTS)
        ids = M.inputs()
        expected = {p: s for p, s in SYNTHETIC_SHAPES.items() if re.fullmatch(targets, "/".join(p))}
        return Case(model, name, method, M.params(), lambda v, **kw: M.Model().apply(v, ids, **kw), expected)
    family = "gpt2" if model == "gpt2_all" else model
    hf = H.make(family)
    suffixes = (
        ("c_attn", "c_proj", "c_fc") if model == "gpt2_all" else getattr(jpeft.profiles, family.upper()).lora_default
    )
    method = METHODS[name](targets=suffixes)
    expected = {}
    for path, own in modules(hf.params).items():
        if path and path[-1] in suffixes:
            rows, cols = own["kernel"].shape
            # HF GPT-2's Conv1D stores (out, in); every other family here uses Flax's (in, out).
            expected[path] = ("transposed", 1, cols, rows) if family == "gpt2" else ("dense", 1, rows, cols)

    def apply(variables: Any, **kw: Any) -> Any:
        out = hf.apply(variables, **hf.inputs, **kw)
        return (hf.logits(out[0]), out[1]) if "mutable" in kw else hf.logits(out)

    return Case(model, name, method, hf.params, apply, expected)


def randomize(peft: Any, seed: int, scale: float = 0.1) -> Any:
    """Replaces every delta leaf by random non-zero values; base leaves stay the same objects.

    The noise comes from NumPy: drawing it with ``jax.random`` would compile one kernel per shape.
    """
    rng = np.random.RandomState(seed)
    pairs, treedef = jax.tree_util.tree_flatten_with_path(peft)
    leaves = []
    for path, x in pairs:
        names = [str(k.key) for k in path]
        if jpeft.RESERVED not in names:
            leaves.append(x)
            continue
        noise = rng.standard_normal(x.shape)
        new = np.asarray(x) * (1 + 0.2 * noise) if names[-1] == "magnitude" else scale * noise
        leaves.append(jnp.asarray(new, x.dtype))
    return jax.tree.unflatten(treedef, leaves)


@functools.cache
def trees(model: str, name: str) -> tuple[Any, Any]:
    """The tree right after ``jpeft.apply`` and one with random deltas."""
    c = case(model, name)
    peft = jpeft.apply(c.method, c.params, key=jax.random.key(1))
    return peft, randomize(peft, seed=2)


@functools.cache
def base_fn(model: str) -> Callable[[Any], jax.Array]:
    """The base model as a function of ``params``, jitted once: merged trees reuse the compilation."""
    c = case(model, "lora")
    return jax.jit(lambda params: c.apply({"params": params}))


@functools.cache
def base_output(model: str) -> np.ndarray:
    return np.asarray(base_fn(model)(case(model, "lora").params))


@functools.cache
def jitted(model: str, name: str) -> tuple[Callable[[Any], jax.Array], list[None]]:
    """The jitted wrapped model and the list its Python body appends to on each trace."""
    traces: list[None] = []
    wrapped = case(model, name).wrapped

    @jax.jit
    def run(params: Any) -> jax.Array:
        traces.append(None)
        return wrapped({"params": params})

    return run, traces


@functools.cache
def wrapped_output(model: str, name: str) -> np.ndarray:
    """The eager (not jitted) wrapped output with random deltas."""
    c = case(model, name)
    out = np.asarray(c.wrapped({"params": trees(model, name)[1]}))
    assert not np.allclose(out, base_output(model), **TOL), "random deltas must change the output"
    return out


def loss_weights(shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.key(3), shape)


def closed_form(method: jpeft.Method, expected: dict[tuple[str, ...], tuple[str, int, int, int]]) -> int:
    """``r (d_in + d_out)`` per target and layer; LoRA-FA trains only B, DoRA adds ``d_out``."""
    trains_a = not isinstance(method, jpeft.LoRAFA)
    return sum(
        stack * (method.rank * (trains_a * d_in + d_out) + (d_out if method.use_dora else 0))
        for _, stack, d_in, d_out in expected.values()
    )


# --- 1-8: the conformance suite ----------------------------------------------------------------
@pytest.mark.parametrize("model,name", CASES, scope="module")
def test_1_identity_at_init(model, name):
    c = case(model, name)
    assert c.method.identity_at_init
    peft, _ = trees(model, name)
    run, _ = jitted(model, name)
    np.testing.assert_allclose(np.asarray(run(peft)), base_output(model), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model,name", SYNTHETIC, scope="module")
def test_2_each_layer_matches_numpy_reference(model, name):
    c = case(model, name)
    _, peft = trees(model, name)
    names = tuple(p[-1] for p in c.expected)
    with nn.intercept_methods(M.capture(names)):
        _, state = c.wrapped({"params": peft}, mutable=["intermediates"])
    seen = state["intermediates"]
    scale = R.scale(c.method.alpha, c.method.rank, rslora=c.method.use_rslora)
    for path, (kind, stack, _, _) in c.expected.items():
        own = {k: v for k, v in get(peft, path).items() if k != jpeft.RESERVED}
        deltas = get(peft, path)[jpeft.RESERVED]["default"]
        xs, ys = get(seen, path)["x"][0], get(seen, path)["y"][0]
        stacked = path[0] == "layers"
        for layer in range(stack):
            x, y = (xs[layer], ys[layer]) if stacked else (xs, ys)
            own_l = {k: v[layer] for k, v in own.items()} if stacked else own
            deltas_l = {k: v[layer] for k, v in deltas.items()} if stacked else deltas
            want = R.forward(kind, x, own_l, deltas_l, scale, n_in=N_IN.get(path, 1))
            base = R.forward(kind, x, own_l, None, scale, n_in=N_IN.get(path, 1))
            assert not np.allclose(want, base, **TOL), f"{path}: the deltas do not change this layer"
            np.testing.assert_allclose(np.asarray(y), want, **TOL, err_msg=f"{'/'.join(path)} layer {layer}")


@pytest.mark.parametrize("model,name", CASES, scope="module")
def test_3_merge_equals_wrapped(model, name):
    c = case(model, name)
    merged = jpeft.merge(c.method, trees(model, name)[1])
    np.testing.assert_allclose(np.asarray(base_fn(model)(merged)), wrapped_output(model, name), **TOL)


@pytest.mark.parametrize("model,name", CASES, scope="module")
def test_4_merge_keeps_structure_and_untouched_objects(model, name):
    c = case(model, name)
    _, peft = trees(model, name)
    structure = jax.tree.structure(peft)
    merged = jpeft.merge(c.method, peft)
    assert jax.tree.structure(peft) == structure, "merge mutated its input"
    assert jax.tree.structure(merged) == jax.tree.structure(c.params)
    base, out = flat(c.params), flat(merged)
    assert base.keys() == out.keys()
    for path, leaf in base.items():
        new = out[path]
        assert (new.shape, new.dtype) == (leaf.shape, leaf.dtype), path
        if path[:-1] in c.expected and path[-1] in ("kernel", "embedding"):
            assert new is not leaf and not np.array_equal(new, leaf), path
        else:
            assert new is leaf, f"{path}: an untouched leaf must be the same object"


@pytest.mark.parametrize("model,name", CASES, scope="module")
def test_5_grads_reach_exactly_the_trainable_leaves(model, name):
    c = case(model, name)
    _, peft = trees(model, name)
    trainable, frozen = jpeft.split(c.method, peft)
    weights = loss_weights(base_output(model).shape)
    grads = jax.grad(lambda t: jnp.sum(c.wrapped({"params": jpeft.combine(t, frozen)}) * weights))(trainable)
    labels = flat(jpeft.labels(c.method, peft))
    want = {p for p, label in labels.items() if label != "frozen"}
    got = flat(grads)
    assert got.keys() == want == flat(trainable).keys()
    # The base leaves are holes in the split path: JAX computes no gradient for them.
    assert not any(jpeft.RESERVED not in p for p in got), "a base leaf received a gradient"
    leaves_of = {p[-1] for p in got}
    assert leaves_of == ({"lora_b"} if isinstance(c.method, jpeft.LoRAFA) else {"lora_a", "lora_b"}) | (
        {"magnitude"} if c.method.use_dora else set()
    )
    for path, g in got.items():
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), f"{path}: zero gradient"


@pytest.mark.parametrize("model,name", CASES, scope="module")
def test_6_trainable_count_is_closed_form(model, name):
    c = case(model, name)
    peft, _ = trees(model, name)
    sites = {p[: p.index(jpeft.RESERVED)] for p in flat(peft) if jpeft.RESERVED in p}
    assert sites == set(c.expected)
    labels = flat(jpeft.labels(c.method, peft))
    counted = sum(int(np.size(leaf)) for p, leaf in flat(peft).items() if labels[p] != "frozen")
    assert counted == c.method.param_count(c.params) == closed_form(c.method, c.expected)
    assert f"trainable params: {counted:,} ||" in jpeft.summary(c.method, peft)


@pytest.mark.parametrize("model,name", CASES, scope="module")
def test_7_jit_agrees_and_does_not_retrace(model, name):
    peft, peft_random = trees(model, name)
    run, traces = jitted(model, name)
    np.testing.assert_allclose(np.asarray(run(peft_random)), wrapped_output(model, name), **TOL)
    np.testing.assert_allclose(np.asarray(run(peft)), base_output(model), rtol=1e-6, atol=1e-6)
    assert len(traces) == 1, f"traced {len(traces)} times; a second call must reuse the compilation"


@pytest.mark.parametrize("model,name", SYNTHETIC, scope="module")
def test_8_scan_stacked_deltas_have_the_layer_axis(model, name):
    c = case(model, name)
    peft, _ = trees(model, name)
    r = c.method.rank
    for path, (_, stack, _, _) in c.expected.items():
        deltas = get(peft, path)[jpeft.RESERVED]["default"]
        kernel = get(peft, path).get("kernel")
        if path[0] != "layers":
            continue
        n_in = N_IN.get(path, kernel.ndim - 2)  # conv: window axes + c_in
        assert deltas["lora_a"].shape == (stack, *kernel.shape[1 : 1 + n_in], r)
        assert deltas["lora_b"].shape == (stack, r, *kernel.shape[1 + n_in :])
        if c.method.use_dora:
            assert deltas["magnitude"].shape == (stack, *kernel.shape[1 + n_in :])


# --- single layers against the reference -------------------------------------------------------
class One(nn.Module):
    """Runs one layer, named ``layer``."""

    layer: nn.Module

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer(x)


def _layer(kind: str) -> tuple[nn.Module, jax.Array, str]:
    """A standalone layer, its input and the layout override it needs ('' for none)."""
    x = jax.random.normal(jax.random.key(5), (2, 6, 5))
    if kind.startswith("transposed"):  # HF GPT-2's Conv1D: no profile is detected on this tree
        from transformers.models.gpt2.modeling_flax_gpt2 import FlaxConv1D

        return FlaxConv1D(5 if kind == "transposed_square" else 7), x, "transposed"
    if kind == "dense":
        return nn.Dense(4), x, ""
    if kind == "dense_general":
        return nn.DenseGeneral((3, 2), axis=(-2, -1)), x, "dense_general:2,2"
    if kind == "embed":
        return nn.Embed(9, 4), jnp.asarray([[0, 3, 8], [1, 1, 2]]), ""
    if kind == "conv1d":
        return nn.Conv(4, (3,), padding="SAME"), x, "conv"
    if kind == "conv2d":
        return nn.Conv(4, (3, 2), padding="SAME"), jax.random.normal(jax.random.key(5), (2, 5, 4, 3)), "conv"
    raise ValueError(kind)


LAYER_CASES = [
    (kind, name)
    for kind in ("dense", "transposed_square", "transposed", "dense_general", "embed", "conv1d", "conv2d")
    for name in ("lora", "dora")
    if not (kind == "embed" and name == "dora")  # DoRA refuses embeddings (tests/test_errors.py)
] + [("dense", "rslora")]


@pytest.mark.parametrize("kind,name", LAYER_CASES)
def test_single_layer_matches_numpy_reference(kind, name):
    layer, x, layout = _layer(kind)
    model = One(layer)
    # HF's Conv1D adds its bias by implicit rank promotion, which conftest.py makes an error.
    promotion = "allow" if kind.startswith("transposed") else "raise"
    with jax.numpy_rank_promotion(promotion):
        params = model.init(jax.random.key(0), x)["params"]
    if "bias" in params["layer"]:
        params["layer"]["bias"] = jax.random.normal(jax.random.key(6), params["layer"]["bias"].shape)
    method = METHODS[name](targets=("layer",), layouts=((r"layer", layout),) if layout else ())
    leaf = "embedding" if kind == "embed" else "kernel"
    ref_kind = {"transposed_square": "transposed", "conv1d": "conv", "conv2d": "conv"}.get(kind, kind)
    is_transposed, n_out = ref_kind == "transposed", 2 if kind == "dense_general" else 1

    init = jpeft.apply(method, params, key=jax.random.key(1))
    if method.use_dora:  # m starts at ||W||_c
        want_m = R.column_norm(params["layer"][leaf], n_out=n_out, is_transposed=is_transposed)
        np.testing.assert_allclose(init["layer"][jpeft.RESERVED]["default"]["magnitude"], want_m, rtol=1e-6)
    peft = randomize(init, seed=2, scale=0.5)

    def apply(variables, x):
        with jax.numpy_rank_promotion(promotion):
            return model.apply(variables, x)

    y = jpeft.wrap(apply, method)({"params": peft}, x)
    own = {k: v for k, v in peft["layer"].items() if k != jpeft.RESERVED}
    deltas = peft["layer"][jpeft.RESERVED]["default"]
    scale = R.scale(method.alpha, method.rank, rslora=method.use_rslora)
    assert method.scale == pytest.approx(scale)
    want = R.forward(ref_kind, x, own, deltas, scale, n_in=2)
    assert not np.allclose(want, R.forward(ref_kind, x, own, None, scale, n_in=2), **TOL)
    np.testing.assert_allclose(np.asarray(y), want, **TOL)

    a, b = deltas["lora_a"], deltas["lora_b"]
    if method.use_dora:
        kernel = R.merge_dora(own[leaf], a, b, deltas["magnitude"], scale, n_out=n_out, is_transposed=is_transposed)
    else:
        kernel = R.merge_lora(own[leaf], a, b, scale, is_transposed=is_transposed)
    np.testing.assert_allclose(np.asarray(jpeft.merge(method, peft)["layer"][leaf]), kernel, **TOL)


def test_rslora_scale():
    assert jpeft.LoRA(targets="q", rank=4, alpha=8.0, use_rslora=True).scale == R.scale(8.0, 4, rslora=True) == 4.0
    assert jpeft.LoRA(targets="q", rank=4, alpha=8.0).scale == R.scale(8.0, 4) == 2.0


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_distributions(init):
    params = {"q": {"kernel": jnp.zeros((64, 48))}, "e": {"embedding": jnp.zeros((50, 40))}}
    method = jpeft.LoRA(targets=("q", "e"), rank=8, init=init)
    deltas = jpeft.apply(method, params, key=jax.random.key(0))
    a, b = (np.asarray(deltas["q"][jpeft.RESERVED]["default"][k]) for k in ("lora_a", "lora_b"))
    assert a.shape == (64, 8) and b.shape == (8, 48) and not b.any()
    if init == "kaiming":  # uniform in +-1/sqrt(d_in)
        assert np.abs(a).max() <= 1 / 8 and a.std() == pytest.approx(1 / 8 / np.sqrt(3), rel=0.1)
    else:  # normal with std 1/r
        assert a.std() == pytest.approx(1 / 8, rel=0.1)
    # Embeddings follow HF PEFT: A = 0 and B Gaussian.
    ea, eb = (np.asarray(deltas["e"][jpeft.RESERVED]["default"][k]) for k in ("lora_a", "lora_b"))
    assert ea.shape == (50, 8) and eb.shape == (8, 40) and not ea.any() and eb.std() == pytest.approx(1, rel=0.1)


# --- the tree API ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["synthetic", "gpt2"])
def test_apply_shares_base_leaves_and_does_not_mutate(model):
    c = case(model, "lora")
    params = c.params
    structure, before = jax.tree.structure(params), flat(params)
    peft = jpeft.apply(c.method, params, key=jax.random.key(1))
    assert jax.tree.structure(params) == structure
    assert all(flat(params)[p] is leaf for p, leaf in before.items())
    after = flat(peft)
    assert all(after[p] is leaf for p, leaf in before.items()), "apply must share base leaves"
    assert all(jpeft.RESERVED in p for p in set(after) - set(before))


def test_apply_under_jit():
    # apply is plain Python over the tree, so it also runs traced (e.g. to initialise sharded).
    c = case("gpt2", "lora")
    peft = jax.jit(lambda p, k: jpeft.apply(c.method, p, key=k))(c.params, jax.random.key(1))
    eager, _ = trees("gpt2", "lora")
    assert jax.tree.structure(peft) == jax.tree.structure(eager)
    for p, x in flat(eager).items():
        np.testing.assert_array_equal(flat(peft)[p], x, err_msg="/".join(p))


def test_tree_with_two_families_gets_both_layouts():
    # A BERT encoder with a GPT-2 decoder (as in HF's EncoderDecoderModel): both profiles' layouts
    # apply, each to its own modules; GPT-2's c_attn is (out, in) = (3 * 32, 32).
    tree = {"encoder": H.make("bert").params["bert"], "decoder": H.make("gpt2").params["transformer"]}
    method = jpeft.LoRA(targets=("query", "c_attn"), rank=2)
    peft = jpeft.apply(method, tree, key=jax.random.key(1))
    c_attn = peft["decoder"]["h"]["0"]["attn"]["c_attn"][jpeft.RESERVED]["default"]
    assert (c_attn["lora_a"].shape, c_attn["lora_b"].shape) == ((H.HIDDEN, 2), (2, 3 * H.HIDDEN))
    query = peft["encoder"]["encoder"]["layer"]["0"]["attention"]["self"]["query"][jpeft.RESERVED]["default"]
    assert (query["lora_a"].shape, query["lora_b"].shape) == ((H.HIDDEN, 2), (2, H.HIDDEN))


class MLP(nn.Module):
    """A tiny MLP with two targets and a head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(nn.Dense(6, name="up")(x))
        return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(5, name="down")(h)))


@functools.cache
def mlp_params() -> dict[str, Any]:
    return MLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"]


MLP_X = jax.random.normal(jax.random.key(7), (8, 4))


def mlp_loss(method: jpeft.Method) -> Callable[[Any], jax.Array]:
    wrapped = jpeft.wrap(MLP().apply, method)
    return lambda params: jnp.sum(wrapped({"params": params}, MLP_X) ** 2)


@pytest.mark.parametrize(
    "method,want",
    [
        (jpeft.LoRA(targets=("up",), rank=2), {"lora_a": "trainable", "lora_b": "trainable"}),
        (jpeft.LoRAFA(targets=("up",), rank=2), {"lora_a": "frozen", "lora_b": "trainable"}),
        (jpeft.LoRAPlus(targets=("up",), rank=2), {"lora_a": "lora_a", "lora_b": "lora_b"}),
        (jpeft.DoRA(targets=("up",), rank=2), {"lora_a": "trainable", "lora_b": "trainable", "magnitude": "trainable"}),
    ],
    ids=["lora", "lora_fa", "lora_plus", "dora"],
)
def test_labels(method, want):
    peft = jpeft.apply(method, mlp_params(), key=jax.random.key(1))
    labels = jpeft.labels(method, peft)
    assert labels["up"][jpeft.RESERVED]["default"] == want
    assert {v for p, v in flat(labels).items() if jpeft.RESERVED not in p} == {"frozen"}
    trainable, frozen = jpeft.split(method, peft)
    assert jax.tree.structure(jpeft.labels(method, trainable)) == jax.tree.structure(trainable)
    assert jpeft.labels(method, trainable)["up"]["kernel"] is None  # holes stay holes


def test_extra_trainable_labels_and_split():
    method = jpeft.LoRA(targets=("up",), rank=2, extra_trainable=r"head/.*")
    peft = jpeft.apply(method, mlp_params(), key=jax.random.key(1))
    labels = jpeft.labels(method, peft)
    assert labels["head"] == {"kernel": "trainable", "bias": "trainable"}
    assert labels["down"] == {"kernel": "frozen", "bias": "frozen"}
    trainable, _ = jpeft.split(method, peft)
    assert trainable["head"]["kernel"] is peft["head"]["kernel"]


def test_param_count_includes_extra_trainable():
    # The trainable count (labels != 'frozen') and param_count must agree with extra_trainable too;
    # summary() counts the head as trainable.
    method = jpeft.LoRA(targets=("up",), rank=2, extra_trainable=r"head/.*")
    params = mlp_params()
    peft = jpeft.apply(method, params, key=jax.random.key(1))
    labels = flat(jpeft.labels(method, peft))
    counted = sum(int(np.size(x)) for p, x in flat(peft).items() if labels[p] != "frozen")
    head = 5 * 3 + 3
    assert counted == 2 * (4 + 6) + head
    assert f"trainable params: {counted:,}" in jpeft.summary(method, peft)
    assert method.param_count(params) == counted


def test_multiple_named_adapters():
    params = mlp_params()
    method = jpeft.LoRA(targets=("up", "down"), rank=2)
    peft = jpeft.apply(method, params, key=jax.random.key(1), name="one")
    peft = randomize(jpeft.apply(method, peft, key=jax.random.key(2), name="two"), seed=3)
    assert set(peft["up"][jpeft.RESERVED]) == {"one", "two"}
    outs = {n: jpeft.wrap(MLP().apply, method, active=n)({"params": peft}, MLP_X) for n in ("one", "two")}
    assert not np.allclose(outs["one"], outs["two"])
    for n in ("one", "two"):
        merged = jpeft.merge(method, peft, name=n)
        assert jax.tree.structure(merged) == jax.tree.structure(params)
        np.testing.assert_allclose(MLP().apply({"params": merged}, MLP_X), outs[n], **TOL)


# --- optimizers --------------------------------------------------------------------------------
def random_like(tree: Any, seed: int) -> Any:
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def test_lora_plus_scales_b_learning_rate_under_adam():
    lr, ratio = 1e-2, 16.0
    method = jpeft.LoRAPlus(targets=("up", "down"), rank=2, lr_ratio=ratio)
    peft = randomize(jpeft.apply(method, mlp_params(), key=jax.random.key(1)), seed=2)
    tx = jpeft.optimizer(optax.adam(lr), method, peft)
    state = tx.init(peft)

    def part(tree: Any, leaf: str) -> dict[str, Any]:
        return {m: tree[m][jpeft.RESERVED]["default"][leaf] for m in ("up", "down")}

    manual = {"lora_a": optax.adam(lr), "lora_b": optax.adam(lr * ratio)}
    manual_state = {k: manual[k].init(part(peft, k)) for k in manual}
    for step in range(3):
        grads = random_like(peft, seed=10 + step)
        updates, state = tx.update(grads, state, peft)
        for k in manual:
            want, manual_state[k] = manual[k].update(part(grads, k), manual_state[k])
            for m in ("up", "down"):
                np.testing.assert_allclose(part(updates, k)[m], want[m], rtol=1e-6, atol=1e-9)
        assert not any(np.any(u) for p, u in flat(updates).items() if jpeft.RESERVED not in p)


@pytest.mark.parametrize("name", ["lora", "dora", "lora_plus"])
def test_optimizer_freezes_base_without_state(name):
    method = METHODS[name](targets=("up", "down"), extra_trainable=None)
    peft = randomize(jpeft.apply(method, mlp_params(), key=jax.random.key(1)), seed=2)
    tx = jpeft.optimizer(optax.adam(1e-2), method, peft)
    state = tx.init(peft)
    labels = flat(jpeft.labels(method, peft))
    n_trainable = sum(int(np.size(x)) for p, x in flat(peft).items() if labels[p] != "frozen")
    arrays = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
    # Adam keeps mu and nu for the trainable leaves only; the rest are scalar step counts.
    assert sum(int(np.size(x)) for x in arrays) == 2 * n_trainable
    trainable_shapes = {np.shape(x) for p, x in flat(peft).items() if labels[p] != "frozen"}
    base_only = {np.shape(x) for p, x in flat(peft).items() if labels[p] == "frozen"} - trainable_shapes
    assert base_only and not {np.shape(x) for x in arrays} & base_only, "optimizer state for a frozen leaf"
    updates, _ = tx.update(random_like(peft, seed=3), state, peft)
    for p, u in flat(updates).items():
        if labels[p] == "frozen":
            assert not np.any(u), p
        else:
            assert np.all(u != 0), p


def test_optimizer_on_a_frozen_dict_tree():
    # Flax and HF code still hand out FrozenDict trees; the label tree must follow their node types.
    import flax

    method = jpeft.LoRA(targets=("up",), rank=2)
    peft = flax.core.freeze(jpeft.apply(method, mlp_params(), key=jax.random.key(1)))
    tx = jpeft.optimizer(optax.adam(1e-2), method, peft)
    updates, _ = tx.update(random_like(peft, seed=3), tx.init(peft), peft)
    assert not np.any(updates["up"]["kernel"]) and np.all(updates["up"][jpeft.RESERVED]["default"]["lora_a"] != 0)


@pytest.mark.parametrize("name", ["lora", "lora_fa", "lora_plus"])
def test_split_path_equals_optimizer_path(name):
    method = METHODS[name](targets=("up", "down"), extra_trainable=r"head/.*")
    loss = mlp_loss(method)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    peft = randomize(jpeft.apply(method, mlp_params(), key=jax.random.key(1)), seed=2)

    # The full tree with jpeft.optimizer.
    full, opt = peft, jpeft.optimizer(tx, method, peft)
    full_state = opt.init(full)
    # The split path: gradients w.r.t. the trainable half only.
    trainable, frozen = jpeft.split(method, peft)
    split_opt = jpeft.optimizer(tx, method, trainable)
    split_state = split_opt.init(trainable)
    # Plain optax on the trainable half, for a single-label method.
    plain = trainable if name != "lora_plus" else None
    plain_state = tx.init(plain) if plain is not None else None
    for _ in range(3):
        updates, full_state = opt.update(jax.grad(loss)(full), full_state, full)
        full = optax.apply_updates(full, updates)
        grads = jax.grad(lambda t: loss(jpeft.combine(t, frozen)))(trainable)
        updates, split_state = split_opt.update(grads, split_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        if plain is not None:
            grads = jax.grad(lambda t: loss(jpeft.combine(t, frozen)))(plain)
            updates, plain_state = tx.update(grads, plain_state, plain)
            plain = optax.apply_updates(plain, updates)
    want = flat(full)
    for got in [jpeft.combine(trainable, frozen)] + ([jpeft.combine(plain, frozen)] if plain is not None else []):
        got = flat(got)
        assert got.keys() == want.keys()
        for p in want:
            np.testing.assert_array_equal(got[p], want[p], err_msg="/".join(p))
    moved = [p for p in want if not np.array_equal(want[p], flat(peft)[p])]
    labels = flat(jpeft.labels(method, peft))
    assert set(moved) == {p for p in want if labels[p] != "frozen"}


# --- the methods' own promises -----------------------------------------------------------------
def test_frozen_kernel_gets_no_weight_gradient_in_split_path():
    method = jpeft.LoRA(targets=("up",), rank=2)
    peft = randomize(jpeft.apply(method, mlp_params(), key=jax.random.key(1)), seed=2)
    loss = mlp_loss(method)
    trainable, frozen = jpeft.split(method, peft)

    def dot_shapes(jaxpr: Any) -> list[tuple[int, ...]]:
        out = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                # A weight gradient contracts over tokens; the fast path's ``W + s A B`` contracts
                # over the rank only, and is not a weight gradient.
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                if math.prod(lhs[d] for d in lhs_contract) != method.rank:
                    out += [tuple(v.aval.shape) for v in eqn.outvars]
            for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
                out += dot_shapes(sub)
            for value in eqn.params.values():
                if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
                    out += dot_shapes(value.jaxpr)
        return out

    kernel = tuple(peft["up"]["kernel"].shape)  # (4, 6): no other value has this shape or its transpose
    shapes = {kernel, kernel[::-1]}
    split = dot_shapes(jax.make_jaxpr(jax.grad(lambda t: loss(jpeft.combine(t, frozen))))(trainable).jaxpr)
    full = dot_shapes(jax.make_jaxpr(jax.grad(loss))(peft).jaxpr)
    assert shapes & set(full), "sanity: the full-tree gradient computes the kernel's weight gradient"
    assert not shapes & set(split), "the split path must not compute a weight gradient for the frozen kernel"


def test_dora_norm_is_stop_gradient():
    method = jpeft.DoRA(targets=("up",), rank=2, alpha=4.0)
    peft = randomize(jpeft.apply(method, mlp_params(), key=jax.random.key(1)), seed=2, scale=0.5)
    w, bias = peft["up"]["kernel"], peft["up"]["bias"]
    x = MLP_X
    weights = jax.random.normal(jax.random.key(8), (8, 6))

    def jpeft_loss(d):
        tree = {**peft, "up": {**peft["up"], jpeft.RESERVED: {"default": d}}}
        layer = jpeft.wrap(lambda v, x: nn.Dense(6).apply({"params": v["params"]["up"]}, x), method)
        return jnp.sum(layer({"params": tree}, x) * weights)

    def independent_loss(d, stop):
        v = w + method.scale * d["lora_a"] @ d["lora_b"]
        norm = jnp.sqrt(jnp.sum(v * v, axis=0))
        norm = jax.lax.stop_gradient(norm) if stop else norm
        return jnp.sum((x @ (d["magnitude"][None, :] * v / norm[None, :]) + bias[None, :]) * weights)

    deltas = peft["up"][jpeft.RESERVED]["default"]
    np.testing.assert_allclose(jpeft_loss(deltas), independent_loss(deltas, True), rtol=1e-5)
    got = jax.grad(jpeft_loss)(deltas)
    want = jax.grad(independent_loss)(deltas, True)
    other = jax.grad(independent_loss)(deltas, False)
    for k in ("lora_a", "lora_b", "magnitude"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert not np.allclose(got["lora_b"], other["lora_b"], rtol=1e-3), "sanity: the stop_gradient matters"


DROP_X = jnp.tile(jax.random.normal(jax.random.key(9), (1, 4)), (20000, 1))


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_dropout(name):
    method = METHODS[name](targets=("up",), dropout=0.5)
    no_dropout = dataclasses.replace(method, dropout=0.0)
    peft = randomize(jpeft.apply(method, mlp_params(), key=jax.random.key(1)), seed=2, scale=0.5)

    def layer(m: jpeft.Method, **kw: Any) -> np.ndarray:
        up = lambda v, x, **kw: nn.Dense(6).apply({"params": v["params"]["up"]}, x, **kw)  # noqa: E731
        return np.asarray(jpeft.wrap(up, m)({"params": peft}, DROP_X, **kw), np.float64)

    base = np.asarray(nn.Dense(6).apply({"params": peft["up"]}, DROP_X), np.float64)
    exact = layer(no_dropout)
    # Without a 'dropout' rng, dropout is off (Flax's convention for evaluation).
    np.testing.assert_array_equal(layer(method), exact)
    one = layer(method, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(layer(method, rngs={"dropout": jax.random.key(1)}), one)
    two = layer(method, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(one, two) and not np.allclose(one, exact)
    # Inverted dropout keeps the expected delta: the mean over 20000 rows is near the exact one.
    delta = exact - base
    np.testing.assert_allclose((one - base).mean(0), delta.mean(0), atol=0.05 * np.abs(delta).max())


def test_dropout_on_the_scan_model():
    c = case("synthetic", "lora")
    method = dataclasses.replace(c.method, dropout=0.3)
    _, peft = trees("synthetic", "lora")
    wrapped = jax.jit(lambda p, k: jpeft.wrap(c.apply, method)({"params": p}, rngs={"dropout": k}))
    one, two = wrapped(peft, jax.random.key(1)), wrapped(peft, jax.random.key(2))
    assert not np.allclose(one, two)
    np.testing.assert_array_equal(wrapped(peft, jax.random.key(1)), one)
    # No rng: deterministic, and equal to the model without LoRA dropout.
    np.testing.assert_allclose(
        jpeft.wrap(c.apply, method)({"params": peft}), wrapped_output("synthetic", "lora"), **TOL
    )


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_bf16_model_keeps_bf16(name):
    hf = H.make("gpt2", dtype=jnp.bfloat16)
    method = METHODS[name](targets=("c_attn", "c_fc"))
    peft = randomize(jpeft.apply(method, hf.params, key=jax.random.key(1)), seed=2)
    out = hf.logits(jpeft.wrap(hf.apply, method)({"params": peft}, **hf.inputs))
    assert out.dtype == jnp.bfloat16
    merged = jpeft.merge(method, peft)
    assert jax.tree.map(lambda x: x.dtype, merged) == jax.tree.map(lambda x: x.dtype, hf.params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))
    want = hf.logits(hf.apply({"params": merged}, **hf.inputs))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=0.05, atol=0.05)


def test_bf16_scan_model_keeps_bf16():
    method = jpeft.LoRA(targets=M.ALL_TARGETS, rank=2, layouts=M.LAYOUTS)
    params = M.params(jnp.bfloat16)
    peft = randomize(jpeft.apply(method, params, key=jax.random.key(1)), seed=2)
    delta_dtypes = {x.dtype for p, x in flat(peft).items() if jpeft.RESERVED in p}
    assert delta_dtypes == {jnp.dtype(jnp.float32)}, "factors default to float32 on a bf16 kernel"
    model = M.Model(dtype=jnp.bfloat16)
    out = jax.jit(lambda p: jpeft.wrap(model.apply, method)({"params": p}, M.inputs()))(peft)
    assert out.dtype == jnp.bfloat16
    merged = jpeft.merge(method, peft)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))
