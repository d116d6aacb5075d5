"""jpeft.partition_specs: derived delta specs, its errors, and training on a simulated 8-device mesh.

The spec derivation is checked in-process against specs written down from the layouts. The mesh
runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported, so one
subprocess (this file run as a script) runs them all: a ``jax.jit`` step with ``NamedSharding``
in/out shardings on a 2x4 ('data', 'model') mesh with FSDP-style base sharding, and a ``shard_map``
data-parallel step (``pmean`` of the gradients) on an 8-way 'data' mesh. Each must give the loss
and updated parameters of the same step run on one device (to 1e-5), on the synthetic scanned
model or tiny HF GPT-2 (see CASES): LoRA and DoRA with each run type and model; QLoRA (NF4 codes
split FSDP-style in the jit run), P-tuning v2 prefixes, each with both run types; ``on_quantized(LoRA)``
on INT8 and INT4 bases (codes split) in the jit run; the parallel
adapter (leaves on GPT-2's MLP module, which has no kernel) in the jit run and the Houlsby adapter
(stacked leaves under ``nn.scan``) in the shard_map run. The jit runs also save the sharded result
with ``jpeft.save`` and restore it onto the sharded base: the deltas come back with the shardings
``partition_specs`` derives (over a quantised base, only on the mesh; see _check_sharded_restore).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jpeft
from tests import _models as M

R = jpeft.RESERVED
MESH = AbstractMesh((2, 4), ("data", "model"))


def fsdp_specs(params: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """FSDP-style base specs: every kernel split over 'model' on one axis, the q/v layer axis over 'data'.

    Modules named q, o, dg_out, conv, c_attn or c_fc prefer their second-to-last axis, the others
    their last; an axis that 'model' (size 4) does not divide falls back to the other one. Biases and
    norms are replicated.
    """
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out[k] = fsdp_specs(v, path + (k,))
            continue
        if k not in ("kernel", "embedding"):  # biases and norms replicated
            out[k] = None
            continue
        spec: list[Any] = [None] * v.ndim
        first = -2 if path[-1] in ("q", "o", "dg_out", "conv", "c_attn", "c_fc") else -1
        for axis in (first, -3 - first):
            if v.shape[axis] % 4 == 0:
                spec[axis] = "model"
                break
        if path[:2] in (("layers", "q"), ("layers", "v")):
            spec[0] = "data"
        out[k] = P(*spec)
    return out


def _at(tree: Any, *path: str) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def gpt2_shapes() -> tuple[Any, Any]:
    """The tiny HF GPT-2 of tests/_hf_models.py: its bare module and its params as ShapeDtypeStructs.

    ``jax.eval_shape`` traces HF's init without compiling it (``H.make`` compiles it).
    """
    from tests import _hf_models as H

    cls, config = H._config("gpt2")
    with jax.numpy_rank_promotion("allow"):  # HF's GPT-2 relies on it
        module = cls(config, _do_init=False).module
        ids = jnp.ones((1, H.SEQ), jnp.int32)
        return module, jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids, ids))["params"]


# --- derivation, in-process ------------------------------------------------------------------------
def test_lora_factors_follow_the_kernel_on_the_scanned_model(key):
    method = jpeft.LoRA(targets=M.ALL_TARGETS, rank=2, layouts=M.LAYOUTS)
    params = M.params()
    base = fsdp_specs(params)
    peft = jpeft.apply(method, params, key=key)
    specs = jpeft.partition_specs(method, peft, base, mesh=MESH)
    d = "default"
    # Written down from the kernels' specs (fsdp_specs) and layouts: (stack, in..., out...).
    expected = {
        # embed (11, 8): P(None, 'model'); table rows are the input axis, features the output.
        "embed": (P(None, None), P(None, "model")),
        # q (L, D, D): P('data', 'model', None): a keeps the stack and input shardings.
        "layers/q": (P("data", "model", None), P("data", None, None)),
        # v (L, D, D): P('data', None, 'model'): b keeps the output sharding.
        "layers/v": (P("data", None, None), P("data", None, "model")),
        "layers/o": (P(None, "model", None), P(None, None, None)),
        # dg_in (L, D, 2, 4): P(None, None, None, 'model'); b (L, r, 2, 4).
        "layers/dg_in": (P(None, None, None), P(None, None, None, "model")),
        # dg_out (L, 2, 4, D): P(None, None, 'model', None); a (L, 2, 4, r).
        "layers/dg_out": (P(None, None, "model", None), P(None, None, None)),
        # conv (L, 3, D, D): P(None, None, 'model', None); a (L, 3, D, r).
        "layers/conv": (P(None, None, "model", None), P(None, None, None)),
    }
    for module, (a, b) in expected.items():
        got = _at(specs, *module.split("/"), R, d)
        assert (got["lora_a"], got["lora_b"]) == (a, b), module
    # Base leaves keep their specs; None becomes P() with one entry per axis.
    assert specs["layers"]["q"]["kernel"] == P("data", "model", None)
    assert specs["layers"]["q"]["bias"] == P(None, None)
    assert specs["head"]["kernel"] == P("model", None)
    # Every leaf of the tree gets a spec with one entry per axis.
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0])
    flat_peft = dict(jax.tree_util.tree_flatten_with_path(peft)[0])
    assert flat_specs.keys() == flat_peft.keys()
    assert all(len(flat_specs[k]) == flat_peft[k].ndim for k in flat_peft)


def test_dora_magnitude_follows_the_output_axes(key):
    method = jpeft.DoRA(targets=M.LINEAR_TARGETS, rank=2, layouts=M.LAYOUTS)
    params = M.params()
    specs = jpeft.partition_specs(method, jpeft.apply(method, params, key=key), fsdp_specs(params))
    magnitude = {m: _at(specs, "layers", m, R, "default", "magnitude") for m in ("q", "v", "dg_in", "dg_out")}
    assert magnitude == {
        "q": P("data", None),  # (L, D)
        "v": P("data", "model"),
        "dg_in": P(None, None, "model"),  # (L, 2, 4)
        "dg_out": P(None, None),
    }


def test_transposed_gpt2_kernels_swap_the_axes(key):
    _, params = gpt2_shapes()  # shapes only: partition_specs needs no values, and nothing compiles
    method = jpeft.DoRA(targets=("c_attn", "c_proj"), rank=2)
    base = fsdp_specs(params)
    peft = jax.eval_shape(lambda p: jpeft.apply(method, p, key=key), params)
    specs = jpeft.partition_specs(method, peft, base, mesh=MESH)
    attn = specs["transformer"]["h"]["0"]["attn"]
    # c_attn kernel (3 * 32 out, 32 in) sharded P('model', None): 'model' splits the *output* axis.
    assert base["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"] == P("model", None)
    assert attn["c_attn"][R]["default"] == {
        "lora_a": P(None, None),
        "lora_b": P(None, "model"),
        "magnitude": P("model"),
    }
    # c_proj kernel (out, in) sharded P(None, 'model'): the input axis.
    assert attn["c_proj"][R]["default"] == {
        "lora_a": P("model", None),
        "lora_b": P(None, None),
        "magnitude": P(None),
    }


def test_a_composition_uses_each_components_layouts(key):
    method = jpeft.compose(
        jpeft.LoRA(targets=r"layers/q", rank=2), jpeft.LoRAFA(targets=r"layers/dg_in", rank=2, layouts=M.LAYOUTS)
    )
    params = M.params()
    specs = jpeft.partition_specs(method, jpeft.apply(method, params, key=key), fsdp_specs(params), mesh=MESH)
    assert _at(specs, "layers", "q", R, "default", "lora") == {
        "lora_a": P("data", "model", None),
        "lora_b": P("data", None, None),
    }
    # dg_in (L, D, 2, 4) is 'dense_general:1,2' only by LoRAFA's own layouts: b (L, r, 2, 4) keeps 'model'.
    assert _at(specs, "layers", "dg_in", R, "default", "lorafa") == {
        "lora_a": P(None, None, None),
        "lora_b": P(None, None, None, "model"),
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Scales(jpeft.Method):
    """A test method with leaves LoRA's rule does not know: a stacked vector and a free table."""

    spec: tuple[Any, ...] | None = None

    def select(self, params):
        return [("layers", "q")]

    def init_module(self, key, path, own, ctx):
        stack = own["kernel"].shape[0]
        return {"gate": jnp.ones((stack, M.D)), "table": jnp.ones((3, M.D)), "lora_a": jnp.ones((stack, 5))}

    def partition_spec(self, path, leaf, shape, module_params, module_specs, ctx):
        return self.spec if leaf == "gate" else None


def test_unknown_leaves_keep_only_the_stack_axis_and_a_hook_can_override(key):
    params = M.params()
    base = fsdp_specs(params)
    specs = jpeft.partition_specs(_Scales(), jpeft.apply(_Scales(), params, key=key), base)
    # The kernel is P('data', 'model', None): the leading stack axis (L) carries over, nothing else;
    # a leaf named lora_a of a shape LoRA does not make falls back to the same default.
    assert _at(specs, "layers", "q", R, "default") == {
        "gate": P("data", None),
        "table": P(None, None),
        "lora_a": P("data", None),
    }
    hooked = _Scales(spec=(None, "model"))
    specs = jpeft.partition_specs(hooked, jpeft.apply(hooked, params, key=key), base)
    assert _at(specs, "layers", "q", R, "default", "gate") == P(None, "model")


def _children(q: jpeft.NF4Array) -> tuple[Any, ...]:
    return q.codes, q.absmax, q.absmax_scale, q.absmax_offset


def test_quantised_kernels_get_specs_for_their_children(key):
    params = jpeft.quantize(M.params(), NF4, targets=QUANTISED["synthetic"])
    method = _method("synthetic", "qlora")
    peft = jpeft.apply(method, params, key=key)
    specs = jpeft.partition_specs(method, peft, fsdp_specs(params), mesh=MESH)
    # Logical kernels (L, D, D): q P('data', 'model', None), v P('data', None, 'model'), o P(None, 'model', None).
    # codes (L, D * D / 2) split like the rows; v's column split cannot be, and is dropped.
    scales = (P("data", None), P("data", None), P("data"))
    assert _children(specs["layers"]["q"]["kernel"]) == (P("data", "model"), *scales)
    assert _children(specs["layers"]["v"]["kernel"]) == (P("data", None), *scales)
    assert _children(specs["layers"]["o"]["kernel"]) == (P(None, "model"), P(None, None), P(None, None), P(None))
    # The LoRA factors follow the logical kernel, as over a float one.
    q, v = _at(specs, "layers", "q", R, "default"), _at(specs, "layers", "v", R, "default")
    assert q == {"lora_a": P("data", "model", None), "lora_b": P("data", None, None)}
    assert v == {"lora_a": P("data", None, None), "lora_b": P("data", None, "model")}
    # The spec tree has the structure of the params (so it can be mapped to NamedShardings for device_put).
    want = jax.tree.structure(jax.tree.map(lambda _: P(), peft))
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == want
    # Without double quantisation there are no second-level scales: no specs for them either.
    single = jpeft.NF4(block_size=64, double_quant=False)
    params = jpeft.quantize(M.params(), single, targets=("layers/q",))
    peft = jpeft.apply(jpeft.QLoRA(targets=("layers/q",), rank=2, quant=single), params, key=key)
    spec = jpeft.partition_specs(jpeft.QLoRA(targets=("layers/q",), rank=2, quant=single), peft, fsdp_specs(params))
    assert _children(spec["layers"]["q"]["kernel"]) == (P("data", "model"), P("data", None), None, None)


# --- errors ----------------------------------------------------------------------------------------
@pytest.fixture
def small(key):
    params = {"q": {"kernel": jnp.ones((6, 8)), "bias": jnp.ones(8)}}
    method = jpeft.LoRA(targets=["q"], rank=2)
    return method, jpeft.apply(method, params, key=key)


def test_a_mesh_axis_that_does_not_divide_raises(small):
    method, peft = small
    with pytest.raises(
        jpeft.JpeftError,
        match=r"'q/kernel' has shape \(6, 8\) and spec P\('model', None\): axis 0 "
        r"\(size 6\) is split over mesh axis 'model' of size 4",
    ):
        jpeft.partition_specs(method, peft, {"q": {"kernel": P("model"), "bias": None}}, mesh=MESH)
    with pytest.raises(
        jpeft.JpeftError, match=r"axis 0 \(size 6\) is split over mesh axis \('data', 'model'\) of size 8"
    ):
        jpeft.partition_specs(method, peft, {"q": {"kernel": P(("data", "model")), "bias": None}}, mesh=MESH)
    # Delta specs are validated too (LoRA's never fail where the kernel's pass; a hook's can).
    hooked = _Scales(spec=("model", None))
    with pytest.raises(
        jpeft.JpeftError,
        match=r"'layers/q/__jpeft__/default/gate' has shape \(2, 8\) and spec "
        r"P\('model', None\): axis 0 \(size 2\) is split over mesh axis 'model' of size 4",
    ):
        jpeft.partition_specs(
            hooked, jpeft.apply(hooked, M.params(), key=jax.random.key(0)), fsdp_specs(M.params()), mesh=MESH
        )


def test_quantised_codes_that_a_mesh_axis_does_not_divide_raise(key):
    # Kernel (4, 3) split 4 ways over its rows is valid; its 6 bytes of codes cannot be split 4 ways.
    config = jpeft.NF4(block_size=4, double_quant=False)
    params = jpeft.quantize({"q": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}, config, targets=("q",))
    method = jpeft.QLoRA(targets=("q",), rank=2, quant=config)
    peft = jpeft.apply(method, params, key=key)
    with pytest.raises(
        jpeft.JpeftError,
        match=r"'q/kernel/codes' has shape \(6,\) and spec P\('model',\): axis 0 \(size 6\) "
        r"is split over mesh axis 'model' of size 4.* derived from P\('model', None\), given for the "
        r"quantised kernel 'q/kernel' of shape \(4, 3\)",
    ):
        jpeft.partition_specs(method, peft, {"q": {"kernel": P("model"), "bias": None}}, mesh=MESH)


def test_an_unknown_mesh_axis_raises(small):
    method, peft = small
    with pytest.raises(
        jpeft.JpeftError, match=r"names mesh axis 'tensor'; the mesh has axes \{'data': 2, 'model': 4\}"
    ):
        jpeft.partition_specs(method, peft, {"q": {"kernel": P(None, "tensor"), "bias": None}}, mesh=MESH)


def test_bad_base_specs_raise(small):
    method, peft = small
    with pytest.raises(jpeft.JpeftError, match=r"base_specs has no entry for the base leaf 'q/bias' \(shape \(8,\)\)"):
        jpeft.partition_specs(method, peft, {"q": {"kernel": P()}})
    with pytest.raises(jpeft.JpeftError, match=r"base_specs at 'q/kernel' is \('model',\) \(tuple\); expected"):
        jpeft.partition_specs(method, peft, {"q": {"kernel": ("model",), "bias": None}})
    with pytest.raises(jpeft.JpeftError, match=r"base_specs at 'q/kernel' is P\(None, None, 'model'\) with 3 entries"):
        jpeft.partition_specs(method, peft, {"q": {"kernel": P(None, None, "model"), "bias": None}})
    with pytest.raises(jpeft.JpeftError, match=r"base_specs at 'q' is a subtree, but the params hold a leaf"):
        jpeft.partition_specs(method, {"q": jnp.ones(3)}, {"q": {"kernel": P()}})
    with pytest.raises(jpeft.JpeftError, match=r"base_specs must be a nested mapping; got list"):
        jpeft.partition_specs(method, peft, [P()])
    with pytest.raises(jpeft.JpeftError, match=r"expects a jpeft method first; got dict"):
        jpeft.partition_specs({}, peft, {})


def test_a_hook_with_the_wrong_length_raises(key):
    method = _Scales(spec=("model",))
    peft = jpeft.apply(method, M.params(), key=key)
    with pytest.raises(
        jpeft.JpeftError,
        match=r"_Scales.partition_spec gave \('model',\) for "
        r"'layers/q/__jpeft__/gate' of shape \(2, 8\); expected one entry per axis",
    ):
        jpeft.partition_specs(method, peft, fsdp_specs(M.params()))


# --- training on a simulated mesh (subprocess) ----------------------------------------------------
# Each run type sees both models and both methods, and each model both methods and both run types.
CASES = (
    "jit-synthetic-lora",
    "jit-gpt2-dora",
    "shard_map-synthetic-dora",
    "shard_map-gpt2-lora",
    "jit-synthetic-qlora",
    "shard_map-gpt2-qlora",
    "jit-synthetic-int8",
    "jit-synthetic-int4",
    "jit-gpt2-prefix",
    "shard_map-gpt2-prefix",
    "jit-gpt2-parallel",
    "shard_map-synthetic-houlsby",
)
# Delta leaves the restored jit run must hold split over the mesh: LoRA's factors follow the kernels;
# prefixes and adapter weights have no axis that follows a kernel's (on GPT-2 and the FFN modules of
# the synthetic model, whose layer axes fsdp_specs leaves unsplit), so they are replicated; QLoRA's
# see _check_sharded_restore.
RESTORED_SHARDED = {"lora": 4, "dora": 4, "qlora": 0, "int8": 4, "int4": 4, "prefix": 0, "parallel": 0, "houlsby": 0}
NF4 = jpeft.NF4(block_size=64, dq_block_size=8)
#: The formats of the quantised-base cases: QLoRA's NF4, and ``jpeft.on_quantized(LoRA)`` on INT8 / INT4.
QUANT = {"qlora": NF4, "int8": jpeft.Int8(), "int4": jpeft.Int4(block_size=4)}
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
"""The adapters' profile of the synthetic model (as in tests/methods/test_adapters.py)."""
TOL = dict(rtol=1e-5, atol=1e-5)
STEPS = 2


def test_mesh_steps_equal_the_single_device_step():
    """One test item, so that the subprocess runs once even under pytest-xdist."""
    # Both runs compile in the same process with the same flags; LLVM optimisation and XLA:CPU's
    # fusion emitters are off to cut the compile time by about 3/4 (the float results agree to 1e-5
    # either way).
    flags = (
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
    )
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_sharding"], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {
        r["case"]: r for r in map(json.loads, filter(lambda line: line.startswith("{"), proc.stdout.splitlines()))
    }
    assert sorted(results) == sorted(CASES), proc.stderr[-4000:]
    failed = {case: r["error"] for case, r in results.items() if r["error"] is not None}
    assert not failed, failed
    for case, r in results.items():
        assert r["devices"] == 8
        # jit: leaves the 2x4 mesh actually splits; shard_map: devices that each saw 1/8 of the batch.
        assert r["sharded"] >= (8 if case.startswith("shard_map") else 10), r
        if case.startswith("jit"):  # jpeft.save + jpeft.restore onto the sharded base kept the shardings
            assert r["restored_sharded"] >= RESTORED_SHARDED[case.split("-")[2]], r
        if (
            case.startswith("jit-synthetic-") and case.split("-")[2] in QUANT
        ):  # q, v, o's codes split over 'data'/'model'
            assert r["split_codes"] == 3, r


def _method(model: str, name: str) -> jpeft.Method:
    """The method of a case; QLoRA's quantised modules are QUANTISED[model]."""
    synthetic = model == "synthetic"
    lora_targets = ("layers/q", "layers/v") if synthetic else ("c_attn", "c_fc")
    profile, layouts = (SYNTHETIC, M.LAYOUTS) if synthetic else (None, ())
    return {
        "lora": lambda: jpeft.LoRA(targets=M.ALL_TARGETS if synthetic else lora_targets, rank=2, layouts=layouts),
        "dora": lambda: jpeft.DoRA(targets=M.LINEAR_TARGETS if synthetic else lora_targets, rank=2, layouts=layouts),
        "qlora": lambda: jpeft.QLoRA(targets=lora_targets, rank=2, quant=NF4, compute_dtype="float32"),
        "int8": lambda: jpeft.on_quantized(jpeft.LoRA(targets=lora_targets, rank=2), compute_dtype="float32"),
        "int4": lambda: jpeft.on_quantized(jpeft.LoRA(targets=lora_targets, rank=2), compute_dtype="float32"),
        "prefix": lambda: jpeft.PTuningV2(num_virtual_tokens=4),
        "houlsby": lambda: jpeft.HoulsbyAdapter(reduction_factor=4, profile=profile),
        "parallel": lambda: jpeft.ParallelAdapter(bottleneck=4, profile=profile),
    }[name]()


QUANTISED = {"synthetic": ("layers/q", "layers/v", "layers/o"), "gpt2": ("c_attn", "c_proj", "c_fc")}


def _setup(model: str, name: str, batch: int):
    """(method, params, loss(peft, batch) -> scalar, batch) for one model."""
    rng = np.random.RandomState(0)
    method = _method(model, name)
    if model == "synthetic":
        params = M.params()
        if name in QUANT:
            params = jpeft.quantize(params, QUANT[name], targets=QUANTISED[model])
        fwd = jpeft.wrap(M.Model().apply, method)
        data = {"ids": jnp.asarray(rng.randint(0, M.VOCAB, (batch, M.SEQ)), jnp.int32)}

        def loss(peft, data):
            logits = fwd({"params": peft}, data["ids"])
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], data["ids"][:, 1:]).mean()

        return method, params, loss, data
    from tests import _hf_models as H

    module, shapes = gpt2_shapes()
    # GPT-2's init, drawn with NumPy: normal(0, 0.02) matrices, unit LayerNorm scales, zero biases.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(
            {"scale": np.ones(x.shape), "bias": np.zeros(x.shape)}.get(p[-1].key, 0.02 * rng.standard_normal(x.shape)),
            x.dtype,
        ),
        shapes,
    )
    if name in QUANT:
        params = jpeft.quantize(params, QUANT[name], targets=QUANTISED[model])
    fwd = jpeft.wrap(module.apply, method)
    ids = rng.randint(0, H.VOCAB, (batch, H.SEQ))
    data = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "attention_mask": jnp.ones((batch, H.SEQ), jnp.int32),
        "position_ids": jnp.asarray(np.broadcast_to(np.arange(H.SEQ), (batch, H.SEQ)), jnp.int32),
    }

    def loss(peft, data):
        with jax.numpy_rank_promotion("allow"):
            logits = fwd({"params": peft}, **data, deterministic=True).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], data["input_ids"][:, 1:]).mean()

    return method, params, loss, data


def _randomize(peft: Any) -> Any:
    """Non-zero deltas (B = 0 at init would make the first step's A-gradient zero)."""
    rng = np.random.RandomState(1)

    def fill(path, x):
        if any(getattr(k, "key", None) == R for k in path):
            return jnp.asarray(x + 0.1 * rng.standard_normal(x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(fill, peft)


def _compare(got: Any, want: Any) -> float:
    """Asserts every leaf agrees to TOL; returns the largest absolute difference."""
    worst = 0.0
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL, err_msg=jax.tree_util.keystr(path))
        worst = max(worst, float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)), initial=0.0)))
    return worst


_REFERENCE: dict[tuple[str, str], Any] = {}


def _run_case(case: str) -> dict[str, Any]:
    run, model, name = case.split("-")
    method, params, loss_fn, data = _setup(model, name, batch=8)
    peft = _randomize(jpeft.apply(method, params, key=jax.random.key(0)))
    tx = jpeft.optimizer(optax.adam(1e-2), method, peft)
    trainable, frozen = jpeft.split(method, peft)

    def step(trainable, state, frozen, data):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(jpeft.combine(t, frozen), data))(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    def train(step_fn, trainable, state, frozen, data):
        losses = []
        for _ in range(STEPS):
            trainable, state, loss = step_fn(trainable, state, frozen, data)
            losses.append(loss)
        return trainable, state, np.asarray(losses)

    key = (model, name)
    if key not in _REFERENCE:  # the single-device run, shared by the jit and shard_map cases
        _REFERENCE[key] = train(jax.jit(step), trainable, tx.init(trainable), frozen, data)
    want = _REFERENCE[key]
    extra: dict[str, Any] = {}
    if run == "jit":
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        replicated = NamedSharding(mesh, P())
        specs = jpeft.partition_specs(method, peft, fsdp_specs(params), mesh=mesh)
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
        t_sh, f_sh = jpeft.split(method, shardings)
        d_sh = jax.tree.map(lambda _: NamedSharding(mesh, P("data")), data)
        t, f, d = (jax.device_put(x, s) for x, s in ((trainable, t_sh), (frozen, f_sh), (data, d_sh)))
        state = jax.jit(tx.init)(t)  # moments sharded like their parameters; the step count replicated
        s_sh = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
        state = jax.device_put(state, s_sh)
        step_fn = jax.jit(step, in_shardings=(t_sh, s_sh, f_sh, d_sh), out_shardings=(t_sh, s_sh, replicated))
        got = train(step_fn, t, state, f, d)
        sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves((got[0], f)))
        # Quantised kernels whose codes each device holds only a part of (FSDP over NF4 / INT codes).
        kinds = (jpeft.NF4Array, jpeft.IntArray)
        codes = [x.codes for x in jax.tree.leaves(f, is_leaf=lambda v: isinstance(v, kinds)) if isinstance(x, kinds)]
        extra["split_codes"] = sum(c.addressable_shards[0].data.size < c.size for c in codes)
        extra["restored_sharded"] = _check_sharded_restore(method, params, jpeft.combine(got[0], f), got[1], shardings)
    else:
        mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))

        def dp_step(trainable, state, frozen, data):
            def local(t):
                return jax.lax.pmean(loss_fn(jpeft.combine(t, frozen), data), "data")

            loss, grads = jax.value_and_grad(local)(trainable)
            grads = jax.lax.pmean(grads, "data")
            updates, state = tx.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state, loss

        step_fn = jax.jit(
            jax.shard_map(dp_step, mesh=mesh, in_specs=(P(), P(), P(), P("data")), out_specs=(P(), P(), P()))
        )
        got = train(step_fn, trainable, tx.init(trainable), frozen, data)
        first = jax.tree.leaves(data)[0]
        local = jax.shard_map(lambda x: jnp.full((1,), x.shape[0]), mesh=mesh, in_specs=P("data"), out_specs=P("data"))
        sharded = int((np.asarray(local(first)) == first.shape[0] // 8).sum())  # devices that saw 1/8 of the batch
    np.testing.assert_allclose(got[2], want[2], **TOL, err_msg="loss")
    extra["max_abs_diff"] = max(_compare(got[0], want[0]), _compare(got[1], want[1]), _compare(got[2], want[2]))
    return {"sharded": int(sharded), "loss": got[2].tolist(), **extra}


def _check_sharded_restore(method, params, trained, state, shardings) -> int:
    """Saves the sharded run and restores it onto the sharded base: the deltas come back with the
    shardings partition_specs derives and the same values; the optimizer state with the template's.

    Over a quantised base (QLoRA) jpeft.restore cannot yet recover the kernels' specs from their
    placement (an NF4Array has no ``.sharding``), so its deltas come back on the mesh but replicated:
    only the values and the mesh are checked for them (RESTORED_SHARDED["qlora"] is 0). Over an
    INT8 / INT4 base restore reads the specs from the codes' placement: the deltas come back split."""
    import tempfile

    def like(tree, sh):  # the shardings of the base leaves only
        return {k: like(v, sh[k]) if isinstance(v, Mapping) else sh[k] for k, v in tree.items()}

    base = jax.device_put(params, like(params, shardings))
    nf4 = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, jpeft.NF4Array))
    quantised = any(isinstance(x, jpeft.NF4Array) for x in nf4)
    with tempfile.TemporaryDirectory() as path:
        jpeft.save(path, method, trained, step=STEPS, opt_state=state)
        restored = jpeft.restore(path, base, opt_state=state)
    count = 0
    for (p, x), want, sh in zip(
        jax.tree_util.tree_flatten_with_path(restored.params)[0],
        jax.tree.leaves(trained),
        jax.tree.leaves(shardings, is_leaf=lambda v: isinstance(v, NamedSharding)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want), err_msg=jax.tree_util.keystr(p))
        delta = R in jax.tree_util.keystr(p)
        if delta and quantised:
            assert x.sharding.mesh == sh.mesh, (jax.tree_util.keystr(p), x.sharding, sh)
        else:
            assert x.sharding.is_equivalent_to(sh, x.ndim), (jax.tree_util.keystr(p), x.sharding, sh)
        count += delta and not x.sharding.is_fully_replicated
    for x, want in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want))
        assert x.sharding.is_equivalent_to(want.sharding, x.ndim)
    return count


def main() -> None:
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "float32")
    for case in CASES:
        start = time.perf_counter()
        try:
            result = {"case": case, "error": None, "devices": jax.device_count(), **_run_case(case)}
        except Exception as e:  # reported per case to the parent test
            result = {"case": case, "error": f"{type(e).__name__}: {e}"[-3000:], "devices": jax.device_count()}
        print(json.dumps({**result, "seconds": round(time.perf_counter() - start, 2)}), flush=True)


if __name__ == "__main__":
    main()
