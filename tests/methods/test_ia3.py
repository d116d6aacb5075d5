"""(IA)^3 on the synthetic scan model and tiny HF BERT and GPT-2: conformance checks 1-8, single
layers against the NumPy reference, training, and every error."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from tests import _hf_models as H
from tests import _models as M
from tests import _reference as R
from tests import test_conformance as C
from tests.methods import _common as K

L, D = M.LAYERS, M.D
SYNTHETIC = jpeft.IA3(
    targets=r"embed|layers/(k|v|o|dg_in|dg_out|conv)", feedforward=r"layers/(o|dg_out|conv)", layouts=M.LAYOUTS
)
METHODS = {"synthetic": SYNTHETIC, "bert": jpeft.IA3(), "gpt2": jpeft.IA3()}
MODELS = tuple(METHODS)
FAST = ("synthetic", "gpt2")  # the checks that compile a backward pass or run eagerly skip BERT

# Each target's (side, stack, vector shape, reference kind), written from the models' definitions.
SYNTHETIC_SITES = {
    ("embed",): ("ia3_out", 1, (D,), "embed"),
    ("layers", "k"): ("ia3_out", L, (D,), "dense"),
    ("layers", "v"): ("ia3_out", L, (D,), "dense"),
    ("layers", "o"): ("ia3_in", L, (D,), "dense"),
    ("layers", "dg_in"): ("ia3_out", L, M.DG_OUT, "dense_general"),
    ("layers", "dg_out"): ("ia3_in", L, M.DG_OUT, "dense_general"),
    ("layers", "conv"): ("ia3_in", L, (D,), "conv"),  # input scaling runs over channels
}
N_IN = {("layers", "dg_in"): 1, ("layers", "dg_out"): 2}


def hf_sites(family: str) -> dict[tuple[str, ...], tuple[str, int, tuple[int, ...], str]]:
    """The profile defaults: key and value (output), FFN output projection (input)."""
    out: dict[tuple[str, ...], tuple[str, int, tuple[int, ...], str]] = {}
    for i in range(H.LAYERS):
        if family == "bert":
            layer = ("bert", "encoder", "layer", str(i))
            out[layer + ("attention", "self", "key")] = ("ia3_out", 1, (H.HIDDEN,), "dense")
            out[layer + ("attention", "self", "value")] = ("ia3_out", 1, (H.HIDDEN,), "dense")
            out[layer + ("output", "dense")] = ("ia3_in", 1, (H.FFN,), "dense")
        else:  # HF PEFT's choice: one vector over c_attn's whole fused q/k/v output
            layer = ("transformer", "h", str(i))
            out[layer + ("attn", "c_attn")] = ("ia3_out", 1, (3 * H.HIDDEN,), "transposed")
            out[layer + ("mlp", "c_proj")] = ("ia3_in", 1, (H.FFN,), "transposed")
    return out


SITES = {"synthetic": SYNTHETIC_SITES, "bert": hf_sites("bert"), "gpt2": hf_sites("gpt2")}


def randomize(peft: Any, seed: int) -> Any:
    """Vectors around one, ``1 + 0.3 N(0, 1)``; base leaves stay the same objects."""
    rng = np.random.RandomState(seed)

    def new(path: Any, x: Any) -> Any:
        names = [str(k.key) for k in path]
        return jnp.asarray(1 + 0.3 * rng.standard_normal(x.shape), x.dtype) if jpeft.RESERVED in names else x

    return jax.tree_util.tree_map_with_path(new, peft)


@functools.cache
def trees(name: str) -> tuple[Any, Any]:
    peft = jpeft.apply(METHODS[name], K.model(name)[0], key=jax.random.key(1))
    return peft, randomize(peft, seed=2)


@pytest.mark.parametrize("name", MODELS)
def test_1_identity_at_init(name):
    peft, _ = trees(name)
    assert METHODS[name].identity_at_init
    assert all(np.all(np.asarray(x) == 1) for p, x in K.flat(peft).items() if jpeft.RESERVED in p)
    K.check_identity(name, METHODS[name], peft)


def test_2_each_layer_matches_numpy_reference():
    _, peft = trees("synthetic")
    wrapped = jpeft.wrap(K.model("synthetic")[1], SYNTHETIC)
    with nn.intercept_methods(M.capture(tuple(p[-1] for p in SYNTHETIC_SITES))):
        _, state = wrapped({"params": peft}, mutable=["intermediates"])
    seen = state["intermediates"]
    for path, (side, stack, _, kind) in SYNTHETIC_SITES.items():
        own = {k: v for k, v in K.get(peft, path).items() if k != jpeft.RESERVED}
        v = K.get(peft, path)[jpeft.RESERVED]["default"][side]
        xs, ys = K.get(seen, path)["x"][0], K.get(seen, path)["y"][0]
        for layer in range(stack):
            stacked = path[0] == "layers"
            x, y = (xs[layer], ys[layer]) if stacked else (xs, ys)
            own_l = {k: w[layer] for k, w in own.items()} if stacked else own
            v_l = v[layer] if stacked else v
            kw = {"out": v_l} if side == "ia3_out" else {"inp": v_l}
            want = R.ia3_forward(kind, x, own_l, n_in=N_IN.get(path, 1), **kw)
            assert not np.allclose(want, R.forward(kind, x, own_l, None, 0.0, n_in=N_IN.get(path, 1)), **K.TOL)
            np.testing.assert_allclose(np.asarray(y), want, **K.TOL, err_msg=f"{'/'.join(path)} layer {layer}")


@pytest.mark.parametrize("kind", ["transposed", "conv2d", "dense_general"])
@pytest.mark.parametrize("side", ["ia3_out", "ia3_in"])
def test_2_single_layer_matches_numpy_reference(kind, side):
    layer, x, layout = C._layer(kind)
    model = C.One(layer)
    promotion = "allow" if kind == "transposed" else "raise"  # HF's Conv1D adds its bias by promotion
    with jax.numpy_rank_promotion(promotion):
        params = model.init(jax.random.key(0), x)["params"]
    params["layer"]["bias"] = jax.random.normal(jax.random.key(6), params["layer"]["bias"].shape)
    method = jpeft.IA3(
        targets=("layer",), feedforward=("layer",) if side == "ia3_in" else None, layouts=((r"layer", layout),)
    )
    peft = randomize(jpeft.apply(method, params, key=jax.random.key(1)), seed=3)
    v = peft["layer"][jpeft.RESERVED]["default"][side]

    def apply(variables, x):
        with jax.numpy_rank_promotion(promotion):
            return model.apply(variables, x)

    y = jpeft.wrap(apply, method)({"params": peft}, x)
    own = {k: w for k, w in peft["layer"].items() if k != jpeft.RESERVED}
    ref_kind = {"conv2d": "conv"}.get(kind, kind)
    want = R.ia3_forward(ref_kind, x, own, n_in=2, **({"out": v} if side == "ia3_out" else {"inp": v}))
    np.testing.assert_allclose(np.asarray(y), want, **K.TOL)
    merged = jpeft.merge(method, peft)
    with jax.numpy_rank_promotion(promotion):
        np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, x)), want, **K.TOL)
    if side == "ia3_in":
        assert merged["layer"]["bias"] is params["layer"]["bias"], "input scaling leaves the bias alone"


@pytest.mark.parametrize("name", MODELS)
def test_3_4_merge_equals_wrapped_and_keeps_structure(name):
    _, peft = trees(name)
    touched = {path + ("embedding" if path == ("embed",) else "kernel",) for path in SITES[name]}
    touched |= {path + ("bias",) for path, (side, *_) in SITES[name].items() if side == "ia3_out" and path != ("embed",)}
    K.check_merge(name, METHODS[name], peft, touched)


@pytest.mark.parametrize("name", FAST)
def test_5_grads_reach_exactly_the_vectors(name):
    _, peft = trees(name)
    grads = K.check_grads(name, METHODS[name], peft)
    want = {path + (jpeft.RESERVED, "default", side) for path, (side, *_) in SITES[name].items()}
    assert set(grads) == want


@pytest.mark.parametrize("name", MODELS)
def test_6_trainable_count_is_closed_form(name):
    peft, _ = trees(name)
    closed = sum(stack * int(np.prod(shape)) for _, stack, shape, _ in SITES[name].values())
    assert K.count(METHODS[name], peft) == METHODS[name].param_count(K.model(name)[0]) == closed
    if name == "bert":
        assert closed == H.LAYERS * (2 * H.HIDDEN + H.FFN)  # the paper's L (2 d + d_ff)


@pytest.mark.parametrize("name", FAST)
def test_7_jit_agrees_and_does_not_retrace(name):
    K.check_jit(name, METHODS[name], *trees(name))


def test_bart_defaults_include_cross_attention():
    # Encoder L (2 d + d_ff); decoder L (4 d + d_ff): self- and cross-attention keys and values.
    method = jpeft.IA3()
    params = H.make("bart").params
    peft = jpeft.apply(method, params, key=jax.random.key(1))
    sites = {p[: p.index(jpeft.RESERVED)]: p[-1] for p in K.flat(peft) if jpeft.RESERVED in p}
    want = {}
    for stack, attentions in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "encoder_attn"))):
        for i in range(H.LAYERS):
            layer = ("model", stack, "layers", str(i))
            want.update({layer + (a, m): "ia3_out" for a in attentions for m in ("k_proj", "v_proj")})
            want[layer + ("fc2",)] = "ia3_in"
    assert sites == want
    closed = H.LAYERS * (2 * H.HIDDEN + H.FFN) + H.LAYERS * (4 * H.HIDDEN + H.FFN)
    assert K.count(method, peft) == method.param_count(params) == closed


def test_8_scan_stacked_vectors_have_the_layer_axis():
    peft, _ = trees("synthetic")
    for path, (side, stack, shape, _) in SYNTHETIC_SITES.items():
        v = K.get(peft, path)[jpeft.RESERVED]["default"][side]
        assert v.shape == ((stack,) if path[0] == "layers" else ()) + shape, path


def test_training_lowers_the_loss_and_keeps_the_base():
    peft, _ = trees("gpt2")
    K.check_training("gpt2", METHODS["gpt2"], peft, steps=40, lr=5e-2)


def test_bf16_model_keeps_bf16():
    hf = H.make("gpt2", dtype=jnp.bfloat16)
    method = jpeft.IA3()
    peft = randomize(jpeft.apply(method, hf.params, key=jax.random.key(1)), seed=2)
    assert {x.dtype for p, x in K.flat(peft).items() if jpeft.RESERVED in p} == {jnp.dtype(jnp.float32)}
    out = hf.logits(jpeft.wrap(hf.apply, method)({"params": peft}, **hf.inputs))
    assert out.dtype == jnp.bfloat16
    merged = jpeft.merge(method, peft)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))
    want = hf.logits(hf.apply({"params": merged}, **hf.inputs))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=0.05, atol=0.05)


# --- errors ------------------------------------------------------------------------------------
def test_no_profile_and_no_targets_raises():
    with pytest.raises(jpeft.JpeftError, match=r"IA3\(targets=None\): no architecture profile matches"):
        jpeft.apply(jpeft.IA3(), M.params(), key=jax.random.key(0))


def test_feedforward_outside_targets_raises():
    method = jpeft.IA3(targets=("key",), feedforward=("intermediate/dense",))
    with pytest.raises(jpeft.JpeftError, match=r"feedforward modules must be a subset of the targets"):
        jpeft.apply(method, H.make("bert").params, key=jax.random.key(0))


def test_feedforward_matching_nothing_raises():
    method = jpeft.IA3(targets=("key",), feedforward=("nothing",))
    with pytest.raises(jpeft.JpeftError, match=r"IA3\(feedforward\)\(targets=\('nothing',\)\) matched 0"):
        jpeft.apply(method, H.make("bert").params, key=jax.random.key(0))


def test_embedding_in_feedforward_raises():
    method = jpeft.IA3(targets=("embed",), feedforward=("embed",))
    with pytest.raises(jpeft.JpeftError, match=r"'embed' is an embedding, whose input is token ids"):
        jpeft.apply(method, M.params(), key=jax.random.key(0))


def test_integer_kernel_raises():
    params = {"q": {"kernel": jnp.ones((2, 2), jnp.int8)}}
    with pytest.raises(jpeft.JpeftError, match=r"q/kernel has dtype int8, expected a float kernel"):
        jpeft.apply(jpeft.IA3(targets=("q",)), params, key=jax.random.key(0))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(targets=3), r"targets must be a regex str"),
        (dict(targets="q", layouts=((1,),)), r"layouts must be a sequence of \(regex, layout\) pairs"),
        (dict(targets="q", layouts=(("q", "diagonal"),)), r"unknown layout 'diagonal' for 'q'"),
        (dict(targets="q", dtype="int32"), r"IA3\(dtype='int32'\): dtype must name a float dtype"),
    ],
)
def test_bad_fields_raise(kw, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.IA3(**kw)


def test_vectors_for_another_layout_raise_at_forward():
    # Made for a (3, 2) kernel read as dense, then run on the (2, 3) Dense: shape (2,) != (3,).
    params = {"dense": {"kernel": jnp.ones((3, 2))}}
    method = jpeft.IA3(targets=("dense",))
    peft = jpeft.apply(method, params, key=jax.random.key(0))
    peft["dense"][jpeft.RESERVED]["default"]["ia3_out"] = jnp.ones((5,))
    layer = jpeft.wrap(lambda v, x: nn.Dense(2, use_bias=False).apply({"params": v["params"]["dense"]}, x), method)
    with pytest.raises(jpeft.JpeftError, match=r"ia3_out has shape \(5,\), expected \(2,\)"):
        layer({"params": peft}, jnp.ones((1, 3)))
