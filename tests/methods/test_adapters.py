"""The adapter family: Houlsby, Pfeiffer, parallel, scaled parallel and multi-head parallel.

Checks: identity at init on tiny HF BERT, GPT-2, Llama and BART; one HF BERT layer against a plain
NumPy layer with each adapter where its paper puts it; the conformance points that apply to
non-mergeable methods on the ``nn.scan`` + ``nn.remat`` synthetic model (gradients reach exactly
the trainable leaves, jit == no-jit without retracing, stacked leaves); closed-form counts on the
tiny models and on BERT-base shapes; a short training run per adapter; every error.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import jpeft
from jpeft import JpeftError
from tests import _hf_models as H
from tests import _models as M
from tests import _reference as R

TOL = dict(rtol=1e-5, atol=1e-5)

SYNTHETIC = jpeft.profiles.Profile(
    name="synthetic",
    detect=r"layers/q/kernel",
    layouts=M.LAYOUTS,
    embedding=r"embed",
    query=r"layers/q",
    key=r"layers/k",
    value=r"layers/v",
    attn_out=r"layers/o",
    ffn_in=r"layers/dg_in",
    ffn_out=r"layers/dg_out",
    layer_pattern=r"(layers)",
)
"""tests/_models.py's scanned block: attention q/k/v/o, then the FFN ``h + dg_out(tanh(dg_in(h)))``."""

# Constructors for the synthetic model (D = 8, 2 heads); tests pass profile=SYNTHETIC.
METHODS: dict[str, Callable[..., jpeft.Method]] = {
    "houlsby": lambda **kw: jpeft.HoulsbyAdapter(reduction_factor=4, **kw),
    "pfeiffer": lambda **kw: jpeft.PfeifferAdapter(reduction_factor=4, **kw),
    "parallel": lambda **kw: jpeft.ParallelAdapter(bottleneck=3, **kw),
    "scaled_learned": lambda **kw: jpeft.ScaledParallelAdapter(bottleneck=3, scaling="learned", **kw),
    "multi_head": lambda **kw: jpeft.MultiHeadParallelAdapter(bottleneck=3, num_heads=2, **kw),
}
NAMES = tuple(METHODS)


def closed_form(name: str, method: jpeft.Method, layers: int, d: int) -> int:
    """The trainable count from METHODS.md / METHODS-REFERENCE.md, for ``layers`` layers of width ``d``."""
    if name == "houlsby":
        r = d // method.reduction_factor
        return layers * (4 * d * r + 2 * r + 2 * d)
    if name == "pfeiffer":
        r = d // method.reduction_factor
        return layers * (2 * d * r + r + d)
    r = method.bottleneck
    if name == "multi_head":
        return 2 * r * layers * d
    return layers * (2 * d * r + r + d) + (layers if method.scaling == "learned" else 0)


def flat(tree: Any) -> dict[tuple[str, ...], Any]:
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(str(k.key) for k in path): leaf for path, leaf in pairs}


def randomize(peft: Any, seed: int, scale: float = 0.3) -> Any:
    """Every delta leaf random and non-zero (NumPy noise); base leaves stay the same objects."""
    rng = np.random.RandomState(seed)

    def fill(path: Any, x: Any) -> Any:
        if jpeft.RESERVED not in [str(k.key) for k in path]:
            return x
        noise = rng.standard_normal(x.shape)
        return jnp.asarray(1 + 0.2 * noise if path[-1].key == "scaling" else scale * noise, x.dtype)

    return jax.tree_util.tree_map_with_path(fill, peft)


def hf_method(name: str) -> jpeft.Method:
    """The method for a tiny HF model (hidden 32, 4 heads)."""
    if name == "multi_head":
        return jpeft.MultiHeadParallelAdapter(bottleneck=3, num_heads=H.HEADS)
    return METHODS[name]()


# --- identity at init on HF models ---------------------------------------------------------------
@functools.cache
def hf_base(family: str) -> np.ndarray:
    hf = H.make(family)
    return np.asarray(hf.logits(hf.apply({"params": hf.params}, **hf.inputs)))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "bart"])
@pytest.mark.parametrize("name", NAMES)
def test_identity_at_init_on_hf_models(family, name):
    hf = H.make(family)
    method = hf_method(name)
    assert method.identity_at_init and not method.mergeable
    peft = jpeft.apply(method, hf.params, key=jax.random.key(1))
    wrapped = jpeft.wrap(hf.apply, method)
    out = np.asarray(hf.logits(wrapped({"params": peft}, **hf.inputs)))
    np.testing.assert_allclose(out, hf_base(family), rtol=1e-6, atol=1e-6)
    moved = np.asarray(hf.logits(wrapped({"params": randomize(peft, seed=2)}, **hf.inputs)))
    assert not np.allclose(moved, hf_base(family), **TOL), "random adapter leaves must change the output"
    layers = 2 * H.LAYERS if family == "bart" else H.LAYERS  # BART: encoder and decoder stacks
    count = sum(int(np.size(x)) for p, x in flat(peft).items() if jpeft.RESERVED in p)
    assert count == method.param_count(hf.params) == closed_form(name, method, layers, H.HIDDEN)


# --- one HF BERT layer against NumPy ---------------------------------------------------------------
def capture_layer(path: tuple[str, ...], seen: list) -> Callable[..., Any]:
    """An interceptor that records the (hidden, mask) input and the output of the module at ``path``."""

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and tuple(context.module.path) == path:
            seen.append((args[0], args[1], out[0]))
        return out

    return intercept


@pytest.mark.parametrize("name", [*NAMES, "scaled"])
def test_bert_layer_matches_numpy(name):
    hf = H.make("bert")
    method = jpeft.ScaledParallelAdapter(bottleneck=3) if name == "scaled" else hf_method(name)
    peft = randomize(jpeft.apply(method, hf.params, key=jax.random.key(1)), seed=2)
    seen: list = []
    layer = ("bert", "encoder", "layer", "0")
    with nn.intercept_methods(capture_layer(layer, seen)):
        jpeft.wrap(hf.apply, method)({"params": peft}, **hf.inputs)
    ((x, mask, y),) = seen
    p = functools.reduce(lambda t, k: t[k], layer, peft)
    f = method.nonlinearity

    def deltas(*path: str) -> dict[str, Any]:
        return functools.reduce(lambda t, k: t[k], path, p)[jpeft.RESERVED]["default"]

    adapters: dict[str, Any] = {}
    if name in ("houlsby", "pfeiffer"):
        adapters["ffn_adapter"] = (deltas("output", "dense"), f)
    if name == "houlsby":
        adapters["attn_adapter"] = (deltas("attention", "output", "dense"), f)
    if name in ("parallel", "scaled", "scaled_learned"):  # BERT's FFN spans two modules: the layer holds it
        d = deltas()
        s = d["scaling"] if name == "scaled_learned" else method.scaling
        adapters["parallel"] = ({k: v for k, v in d.items() if k != "scaling"}, f, s)
    if name == "multi_head":
        d = deltas("attention")
        adapters["multi_head"] = (d["prefix_key"], d["prefix_value"], f)
    want = R.bert_layer(x, mask, p, heads=H.HEADS, **adapters)
    base = R.bert_layer(x, mask, p, heads=H.HEADS)
    assert not np.allclose(want, base, **TOL), "the adapter must change this layer"
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)


def test_gpt2_parallel_adapter_reads_the_mlp_input():
    # GPT-2's FFN is one module (mlp): its input is ln_2's output, and s g(x) joins c_proj's output.
    hf = H.make("gpt2")
    method = jpeft.ScaledParallelAdapter(bottleneck=3, nonlinearity="gelu_new")
    peft = randomize(jpeft.apply(method, hf.params, key=jax.random.key(1)), seed=3)
    seen: list = []

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and tuple(context.module.path) == ("transformer", "h", "1", "mlp"):
            seen.append((args[0], out))
        return out

    with nn.intercept_methods(intercept):
        jpeft.wrap(hf.apply, method)({"params": peft}, **hf.inputs)
    ((x, y),) = seen
    mlp = peft["transformer"]["h"]["1"]["mlp"]
    hidden = R.activation("gelu_new", R.transposed(x, mlp["c_fc"]["kernel"], mlp["c_fc"]["bias"]))
    base = R.transposed(hidden, mlp["c_proj"]["kernel"], mlp["c_proj"]["bias"])
    want = base + 4.0 * R.bottleneck(x, mlp[jpeft.RESERVED]["default"], "gelu_new")
    assert not np.allclose(want, base, **TOL)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)


def test_gpt2_multi_head_adapter_reads_the_fused_query():
    # GPT-2's c_attn outputs [q; k; v]: the adapter reads the first third, and adds to the merged
    # heads that c_proj receives. An outer interceptor sees c_proj's original input and its output.
    hf = H.make("gpt2")
    method = jpeft.MultiHeadParallelAdapter(bottleneck=3, num_heads=H.HEADS, nonlinearity="tanh")
    peft = randomize(jpeft.apply(method, hf.params, key=jax.random.key(1)), seed=3)
    attn = ("transformer", "h", "0", "attn")  # the first layer: its input is the same in both runs

    def run(apply: Callable[..., Any], params: Any) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = tuple(context.module.path)
            if context.method_name == "__call__" and path[:-1] == attn and path[-1] in ("c_attn", "c_proj"):
                seen[path[-1]] = (args[0], out)
            return out

        with nn.intercept_methods(intercept):
            apply({"params": params}, **hf.inputs)
        return seen

    base = run(hf.apply, hf.params)
    seen = run(jpeft.wrap(hf.apply, method), peft)
    heads = np.asarray(base["c_proj"][0])
    np.testing.assert_array_equal(np.asarray(seen["c_proj"][0]), heads)
    deltas = functools.reduce(lambda t, k: t[k], attn, peft)[jpeft.RESERVED]["default"]
    q = np.asarray(base["c_attn"][1])[..., : H.HIDDEN]
    delta = R.multi_head_parallel(q, deltas["prefix_key"], deltas["prefix_value"], "tanh")
    c_proj = functools.reduce(lambda t, k: t[k], attn, peft)["c_proj"]
    want = R.transposed(heads + delta, c_proj["kernel"], c_proj["bias"])
    assert not np.allclose(want, base["c_proj"][1], **TOL)
    np.testing.assert_allclose(np.asarray(seen["c_proj"][1]), want, rtol=1e-4, atol=1e-4)


# --- conformance on the nn.scan model ------------------------------------------------------------
@functools.cache
def synthetic(name: str) -> tuple[jpeft.Method, Any, Any]:
    method = METHODS[name](profile=SYNTHETIC)
    peft = jpeft.apply(method, M.params(), key=jax.random.key(1))
    return method, peft, randomize(peft, seed=2)


def model_apply(variables: Any, **kw: Any) -> jax.Array:
    return M.Model().apply(variables, M.inputs(), **kw)


@functools.cache
def synthetic_base() -> np.ndarray:
    return np.asarray(model_apply({"params": M.params()}))


# The sites and their per-layer leaf shapes, written from tests/_models.py (D = 8, 2 layers).
L, D = M.LAYERS, M.D
BOTTLENECK = {"down_kernel": (L, D, 2), "down_bias": (L, 2), "up_kernel": (L, 2, D), "up_bias": (L, D)}
PARALLEL = {"down_kernel": (L, D, 3), "down_bias": (L, 3), "up_kernel": (L, 3, D), "up_bias": (L, D)}
SITES = {
    "houlsby": {("layers", "o"): BOTTLENECK, ("layers", "dg_out"): BOTTLENECK},
    "pfeiffer": {("layers", "dg_out"): BOTTLENECK},
    "parallel": {("layers",): PARALLEL},
    "scaled_learned": {("layers",): {**PARALLEL, "scaling": (L,)}},
    "multi_head": {("layers",): {"prefix_key": (L, 2, 3, D // 2), "prefix_value": (L, 2, 3, D // 2)}},
}


@pytest.mark.parametrize("name", NAMES)
def test_scan_model_stacked_leaves_and_count(name):
    method, peft, _ = synthetic(name)
    got = {}
    for path, leaf in flat(peft).items():
        if jpeft.RESERVED in path:
            got.setdefault(path[: path.index(jpeft.RESERVED)], {})[path[-1]] = tuple(leaf.shape)
    assert got == SITES[name]
    labels = flat(jpeft.labels(method, peft))
    counted = sum(int(np.size(x)) for p, x in flat(peft).items() if labels[p] != "frozen")
    assert counted == method.param_count(M.params()) == closed_form(name, method, L, D)
    assert f"trainable params: {counted:,} ||" in jpeft.summary(method, peft)


@pytest.mark.parametrize("name", NAMES)
def test_scan_model_identity_jit_and_no_retrace(name):
    method, peft, random = synthetic(name)
    traces: list[None] = []

    @jax.jit
    def run(params):
        traces.append(None)
        return jpeft.wrap(model_apply, method)({"params": params})

    np.testing.assert_allclose(np.asarray(run(peft)), synthetic_base(), rtol=1e-6, atol=1e-6)
    eager = np.asarray(jpeft.wrap(model_apply, method)({"params": random}))
    assert not np.allclose(eager, synthetic_base(), **TOL)
    np.testing.assert_allclose(np.asarray(run(random)), eager, **TOL)
    assert len(traces) == 1, f"traced {len(traces)} times"


TARGET = np.random.RandomState(4).standard_normal((M.BATCH, M.SEQ, M.VOCAB)).astype(np.float32)


@functools.cache
def loss_and_grad(name: str) -> Callable[[Any, Any], tuple[jax.Array, Any]]:
    """The jitted ``(loss, grads)`` of a regression to ``TARGET`` w.r.t. the trainable half only."""
    method = synthetic(name)[0]
    wrapped = jpeft.wrap(model_apply, method)

    def loss(trainable: Any, frozen: Any) -> jax.Array:
        return jnp.mean((wrapped({"params": jpeft.combine(trainable, frozen)}) - TARGET) ** 2)

    return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize("name", NAMES)
def test_scan_model_grads_reach_exactly_the_adapter_leaves(name):
    method, _, peft = synthetic(name)
    trainable, frozen = jpeft.split(method, peft)
    _, grads = loss_and_grad(name)(trainable, frozen)
    got = flat(grads)
    assert got.keys() == flat(trainable).keys() == {p for p in flat(peft) if jpeft.RESERVED in p}
    for path, g in got.items():
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), path


def test_merge_is_refused():
    method, peft, _ = synthetic("houlsby")
    with pytest.raises(JpeftError, match=r"HoulsbyAdapter cannot be merged into the base weights"):
        jpeft.merge(method, peft)


# --- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_training_lowers_the_loss_and_keeps_the_base(name):
    method, peft, _ = synthetic(name)
    original = {p: np.array(x, copy=True) for p, x in flat(M.params()).items()}
    trainable, frozen = jpeft.split(method, peft)
    tx = jpeft.optimizer(optax.adam(3e-2), method, trainable)
    state = tx.init(trainable)
    losses = []
    for _ in range(60):
        loss, grads = loss_and_grad(name)(trainable, frozen)
        updates, state = tx.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        losses.append(float(loss))
    final = float(loss_and_grad(name)(trainable, frozen)[0])
    assert np.isfinite(losses).all() and final < 0.2 * losses[0], f"loss {losses[0]:.3f} -> {final:.3f}"
    trained = flat(jpeft.combine(trainable, frozen))
    for path, leaf in original.items():
        np.testing.assert_array_equal(np.asarray(trained[path]), leaf, err_msg="/".join(path))


# --- BERT-base counts ------------------------------------------------------------------------------
@functools.cache
def bert_base_shapes() -> Any:
    model = transformers.FlaxBertModel(transformers.BertConfig(), _do_init=False)
    with jax.numpy_rank_promotion("allow"):
        return jax.eval_shape(lambda k: model.init_weights(k, (1, 8)), jax.random.key(0))


BERT_BASE = {
    # name -> (method, closed form with L = 12, d = 768, d_ff = 3072)
    "houlsby": (jpeft.HoulsbyAdapter(), 12 * (4 * 768 * 48 + 2 * 48 + 2 * 768)),
    "houlsby+ln": (
        jpeft.HoulsbyAdapter(extra_trainable=r"encoder/layer/\d+/.*LayerNorm/.*"),
        12 * (4 * 768 * 48 + 2 * 48 + 2 * 768) + 4 * 768 * 12,
    ),
    "pfeiffer": (jpeft.PfeifferAdapter(), 12 * (2 * 768 * 48 + 48 + 768)),
    "scaled_parallel": (jpeft.ScaledParallelAdapter(bottleneck=512), 12 * (2 * 768 * 512 + 512 + 768)),
    "multi_head": (jpeft.MultiHeadParallelAdapter(bottleneck=30, num_heads=12), 2 * 30 * 12 * 768),
}


@pytest.mark.parametrize("name", list(BERT_BASE))
def test_bert_base_counts_are_closed_form(name):
    method, want = BERT_BASE[name]
    shapes = bert_base_shapes()
    peft = jax.eval_shape(lambda p: jpeft.apply(method, p, key=jax.random.key(0)), shapes)
    labels = flat(jpeft.labels(method, peft))
    counted = sum(int(np.prod(x.shape)) for p, x in flat(peft).items() if labels[p] != "frozen")
    assert counted == method.param_count(shapes) == want


# --- errors --------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """Two Dense layers ``q`` and ``o``; ``o`` takes its input by keyword when ``keyword``."""

    keyword: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(4, name="q")(x)
        o = nn.Dense(4, name="o")
        return o(inputs=h) if self.keyword else o(h)


TINY = jpeft.profiles.Profile(
    name="tiny",
    detect=r"q/kernel",
    embedding="q",
    query="q",
    key="q",
    value="q",
    attn_out="o",
    ffn_in="q",
    ffn_out="o",
    layer_pattern=r"(q)",
)


def tiny_params() -> dict[str, Any]:
    return jax.tree.map(jnp.asarray, Tiny().init(jax.random.key(0), jnp.ones((1, 4)))["params"])


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: jpeft.HoulsbyAdapter(profile="bert"), r"HoulsbyAdapter\(profile='bert'\): profile must be a jpeft"),
        (lambda: jpeft.PfeifferAdapter(nonlinearity="sigmoid"), r"nonlinearity must be one of \('relu', 'swish'"),
        (lambda: jpeft.HoulsbyAdapter(dtype="int8"), r"HoulsbyAdapter\(dtype='int8'\): dtype must name a float"),
        (lambda: jpeft.HoulsbyAdapter(reduction_factor=0), r"reduction_factor must be a positive int; got 0"),
        (lambda: jpeft.ParallelAdapter(bottleneck=-1), r"ParallelAdapter\(bottleneck=-1\): bottleneck must be a pos"),
        (lambda: jpeft.ParallelAdapter(bottleneck=2, scaling="fixed"), r"scaling must be a number > 0 or 'learned'"),
        (lambda: jpeft.ScaledParallelAdapter(bottleneck=2, scaling=0.0), r"scaling must be a number > 0; got 0.0"),
        (lambda: jpeft.MultiHeadParallelAdapter(bottleneck=2, num_heads=0), r"num_heads must be a positive int"),
    ],
)
def test_config_errors(make, match):
    with pytest.raises(JpeftError, match=match):
        make()


def test_no_profile_detected():
    with pytest.raises(JpeftError, match=r"no known architecture matches the 4 parameter paths"):
        jpeft.apply(jpeft.HoulsbyAdapter(), tiny_params(), key=jax.random.key(0))


def test_profile_that_matches_nothing_lists_nearest_paths():
    broken = dataclasses.replace(SYNTHETIC, ffn_out=r"layers/dg_output")
    with pytest.raises(JpeftError, match=r"ffn_out='layers/dg_output' matches none of .*\nNearest: 'layers/dg_out'"):
        jpeft.apply(jpeft.PfeifferAdapter(profile=broken), M.params(), key=jax.random.key(0))


@pytest.mark.parametrize(
    "method,match",
    [
        (
            jpeft.PfeifferAdapter(profile=dataclasses.replace(SYNTHETIC, ffn_out=r"layers/ln")),
            r"ffn_out site 'layers/ln' has no 'kernel' leaf \(it holds \['bias', 'scale'\]\)",
        ),
        (
            jpeft.HoulsbyAdapter(profile=dataclasses.replace(SYNTHETIC, attn_out=r"layers/dg_in")),
            r"layers/dg_in/kernel has shape \(2, 8, 2, 4\) with output axes \(2, 4\); adapters need a single",
        ),
        (
            jpeft.HoulsbyAdapter(reduction_factor=9, profile=SYNTHETIC),
            r"reduction_factor=9\): layers/dg_out outputs 8 features, .* Use reduction_factor <= 8",
        ),
        (
            jpeft.ParallelAdapter(
                bottleneck=2, profile=dataclasses.replace(SYNTHETIC, ffn_in=r"embed", ffn_out="head")
            ),
            r"ffn_out site 'head' shares no enclosing module with a ffn_in site \(nearest 'embed'\)",
        ),
        (
            jpeft.ParallelAdapter(bottleneck=2, profile=dataclasses.replace(SYNTHETIC, ffn_out=r"layers/(o|dg_out)")),
            r"ffn_out regex matches both 'layers/dg_out' and 'layers/o' inside 'layers'; expected one per layer",
        ),
        (
            jpeft.MultiHeadParallelAdapter(bottleneck=2, num_heads=3, profile=SYNTHETIC),
            r"num_heads=3\): the query 'layers/q' outputs 8 features and the attention output 'layers/o' takes 8",
        ),
    ],
)
def test_apply_errors(method, match):
    with pytest.raises(JpeftError, match=match):
        jpeft.apply(method, M.params(), key=jax.random.key(0))


def test_integer_kernel_is_refused():
    params = M.params()
    params["layers"]["dg_out"] = {
        **params["layers"]["dg_out"],
        "kernel": params["layers"]["dg_out"]["kernel"].astype(jnp.int8),
    }
    with pytest.raises(JpeftError, match=r"layers/dg_out/kernel has dtype int8, expected a float kernel"):
        jpeft.apply(jpeft.PfeifferAdapter(profile=SYNTHETIC), params, key=jax.random.key(0))


class Outer(nn.Module):
    """``Tiny`` nested as ``block``, so that ``q`` and ``o`` have a common ancestor module."""

    keyword: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Tiny(keyword=self.keyword, name="block")(x)


def nested(**sites: str) -> jpeft.profiles.Profile:
    """``TINY`` under ``block/``, with ``sites`` overriding fields (given without the prefix)."""
    fields = ("embedding", "query", "key", "value", "attn_out", "ffn_in", "ffn_out")
    paths = {f: f"block/{sites.get(f, getattr(TINY, f))}" for f in fields}
    return dataclasses.replace(TINY, detect="block/q/kernel", layer_pattern=r"(block)", **paths)


def test_sink_before_source():
    reversed_ffn = dict(ffn_in="o", ffn_out="q")
    # Without the enclosing module, the common ancestor of q and o would be the root: apply refuses.
    method = jpeft.ParallelAdapter(bottleneck=2, profile=dataclasses.replace(TINY, **reversed_ffn))
    with pytest.raises(JpeftError, match=r"ffn_out site 'q' shares no enclosing module with a ffn_in site"):
        jpeft.apply(method, tiny_params(), key=jax.random.key(0))
    # Nested, the call order is only known at the forward pass.
    method = jpeft.ParallelAdapter(bottleneck=2, profile=nested(**reversed_ffn))
    peft = jpeft.apply(method, {"block": tiny_params()}, key=jax.random.key(0))
    with pytest.raises(JpeftError, match=r"inside 'block' the ffn_out module 'block/q' ran before any ffn_in"):
        jpeft.wrap(Outer().apply, method)({"params": peft}, jnp.ones((1, 4)))


def test_multi_head_needs_a_positional_input():
    method = jpeft.MultiHeadParallelAdapter(bottleneck=2, num_heads=2, profile=nested())
    peft = jpeft.apply(method, {"block": tiny_params()}, key=jax.random.key(0))
    with pytest.raises(
        JpeftError, match=r"attention output module 'block/o' was called with keyword arguments \['inputs'\]"
    ):
        jpeft.wrap(Outer(keyword=True).apply, method)({"params": peft}, jnp.ones((1, 4)))


@pytest.mark.parametrize("kind", ["parallel", "houlsby"])
def test_mixed_batch_rows_equal_each_adapter_alone(kind):
    # A parallel adapter reads its input inside the block's own call, so the mixed-batch path re-runs
    # the block for it (Method.reenters) instead of reusing the precomputed base output; it used to
    # raise "no ffn_out module ran". Row 0 runs the adapter, row 1 (-1) the base model.
    method, _, random = synthetic(kind)
    mixed = jpeft.wrap(model_apply, method)({"params": random}, adapter_index=jnp.asarray([0, -1]))
    full = jpeft.wrap(model_apply, method)({"params": random})
    np.testing.assert_allclose(np.asarray(mixed[0]), np.asarray(full[0]), **TOL)
    np.testing.assert_allclose(np.asarray(mixed[1]), synthetic_base()[1], **TOL)
    assert not np.allclose(np.asarray(full[0]), synthetic_base()[0], atol=1e-3)  # the adapter does act


def test_composes_with_lora():
    # A LoRA on the attention output and Houlsby's adapter on the same module, plus a parallel
    # adapter on the FFN: counts add up, the model starts unchanged, every component's leaves train.
    lora = jpeft.LoRA(targets=r"layers/o", rank=2)
    houlsby, parallel = synthetic("houlsby")[0], synthetic("scaled_learned")[0]
    method = jpeft.compose(lora, houlsby, parallel)
    peft = jpeft.apply(method, M.params(), key=jax.random.key(1))
    counts = [m.param_count(M.params()) for m in (lora, houlsby, parallel)]
    assert (
        method.param_count(M.params())
        == sum(counts)
        == 2 * 2 * (D + D) + closed_form("houlsby", houlsby, L, D) + closed_form("scaled_learned", parallel, L, D)
    )
    np.testing.assert_allclose(
        np.asarray(jpeft.wrap(model_apply, method)({"params": peft})), synthetic_base(), rtol=1e-6, atol=1e-6
    )
    labels = {label for p, label in flat(jpeft.labels(method, peft)).items() if jpeft.RESERVED in p}
    assert labels == {"lora:trainable", "houlsbyadapter:trainable", "scaledparalleladapter:trainable"}


def test_bf16_model_keeps_bf16():
    method = jpeft.ParallelAdapter(bottleneck=3, profile=SYNTHETIC)
    params = M.params(jnp.bfloat16)
    peft = randomize(jpeft.apply(method, params, key=jax.random.key(1)), seed=2)
    assert {x.dtype for p, x in flat(peft).items() if jpeft.RESERVED in p} == {jnp.dtype(jnp.float32)}
    model = M.Model(dtype=jnp.bfloat16)
    out = jpeft.wrap(model.apply, method)({"params": peft}, M.inputs())
    want = jpeft.wrap(model_apply, method)({"params": jax.tree.map(lambda x: x.astype(jnp.float32), peft)})
    base = model_apply({"params": jax.tree.map(lambda x: x.astype(jnp.float32), params)})
    assert out.dtype == jnp.bfloat16
    assert not np.allclose(np.asarray(want), np.asarray(base), rtol=0.1, atol=0.1), "sanity: the adapter matters"
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), rtol=0.1, atol=0.1)
