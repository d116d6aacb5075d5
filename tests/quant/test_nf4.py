"""NF4 storage: the code book, parity with a NumPy quantiser, round-trip error, bytes, the tree API and errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jpeft
from jpeft.quant import NF4_LEVELS, NF4Array, bits_per_param, dequantize_array, nf4_levels, quantize_array

# The oracle: the table published with QLoRA (appendix E) and in bitsandbytes' functional.py.
PUBLISHED = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0]
)  # fmt: skip


# --- a plain NumPy reference of the format -----------------------------------------------------
def np_quantize(w: np.ndarray, bs: int, dq: int | None) -> dict[str, np.ndarray]:
    """Blockwise NF4 by brute-force nearest level, and linear int8 double quantisation of the scales."""
    w = np.asarray(w, np.float64)
    stack, n = w.shape[:-2], math.prod(w.shape[-2:])
    blocks = w.reshape(stack + (n // bs, bs))
    absmax = np.abs(blocks).max(-1)
    normed = blocks / np.where(absmax > 0, absmax, 1)[..., None]
    idx = np.abs(normed[..., None] - PUBLISHED).argmin(-1).reshape(stack + (n,))
    out = {"idx": idx, "absmax": absmax}
    if dq:
        nb = absmax.shape[-1]
        offset = absmax.mean(-1, keepdims=True)
        c = absmax - offset
        pad = -nb % dq
        cp = np.concatenate([c, np.zeros(stack + (pad,))], -1).reshape(stack + (-1, dq))
        step = np.abs(cp).max(-1, keepdims=True) / 127
        q = np.round(cp / np.where(step > 0, step, 1))
        out["absmax"] = ((q * step).reshape(stack + (-1,))[..., :nb] + offset)
    return out


def np_dequantize(ref: dict[str, np.ndarray], shape: tuple[int, ...], bs: int) -> np.ndarray:
    stack = shape[:-2]
    vals = PUBLISHED[ref["idx"]].reshape(stack + (-1, bs))
    return (vals * ref["absmax"][..., None]).reshape(shape)


def gaussian(shape: tuple[int, ...], seed: int = 0, std: float = 0.02) -> np.ndarray:
    return (std * np.random.RandomState(seed).standard_normal(shape)).astype(np.float32)


# --- the code book -----------------------------------------------------------------------------
def test_levels_equal_published_table():
    np.testing.assert_allclose(NF4_LEVELS, PUBLISHED, rtol=0, atol=1e-6)
    np.testing.assert_allclose(nf4_levels(0.9677083), PUBLISHED, rtol=0, atol=1e-6)  # bitsandbytes' literal
    assert NF4_LEVELS[7] == 0.0 and NF4_LEVELS.dtype == np.float32


def test_bits_per_param_closed_form_and_measured():
    assert bits_per_param(jpeft.NF4()) == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(jpeft.NF4().bits_per_param, 3) == 4.127
    assert bits_per_param(jpeft.NF4(double_quant=False)) == 4.5
    assert bits_per_param(jpeft.NF4(block_size=128, dq_block_size=64)) == 4 + 8 / 128 + 32 / (128 * 64)
    # 64 * 256 * 2 weights: a whole number of second-level blocks; the only extra is one float32 mean.
    w = gaussian((512, 64))
    for cfg in (jpeft.NF4(), jpeft.NF4(double_quant=False)):
        extra = 32 if cfg.double_quant else 0
        assert quantize_array(w, cfg).nbytes * 8 == bits_per_param(cfg) * w.size + extra


# --- parity with NumPy ---------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,bs,dq", [((64, 32), 64, 256), ((3, 16, 12), 16, 4), ((96, 32), 32, 5)])
def test_matches_numpy_reference(shape, bs, dq, double_quant):
    w = gaussian(shape, seed=1)
    cfg = jpeft.NF4(block_size=bs, dq_block_size=dq, double_quant=double_quant)
    q = quantize_array(w, cfg)
    ref = np_quantize(w, bs, dq if double_quant else None)
    n = math.prod(shape[-2:])
    idx = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 15], -1).reshape(shape[:-2] + (n,))
    np.testing.assert_array_equal(idx, ref["idx"])  # high nibble first, nearest level
    assert q.codes.dtype == np.uint8 and q.codes.shape == shape[:-2] + (n // 2,)
    assert q.absmax.dtype == (np.int8 if double_quant else np.float32)
    got = np.asarray(dequantize_array(q))
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, np_dequantize(ref, shape, bs), rtol=1e-5, atol=1e-7)


def test_round_trip_error_on_gaussian_weights():
    w = gaussian((768, 3072), seed=3)
    errs = {}
    for dq in (True, False):
        back = np.asarray(jpeft.dequantize(quantize_array(w, jpeft.NF4(double_quant=dq))))
        errs[dq] = np.linalg.norm(back - w) / np.linalg.norm(w)
    # NF4 on N(0, s^2) with 64-blocks: relative Frobenius error about 0.092 (measured 0.09205 with, 0.09204 without double quantisation).
    assert 0.05 < errs[False] < 0.1
    assert abs(errs[True] - errs[False]) < 0.01 * errs[False]  # double quantisation costs < 1% of it


def test_zero_blocks_and_dtypes():
    w = np.zeros((4, 32), np.float32)
    w[2:] = gaussian((2, 32), seed=4)
    q = quantize_array(jnp.asarray(w, jnp.bfloat16), jpeft.NF4(block_size=32, dq_block_size=2))
    back = jpeft.dequantize(q)
    assert back.dtype == jnp.bfloat16 and q.orig_dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(back[:2], np.float32), 0)
    assert jpeft.dequantize(q, jnp.float32).dtype == jnp.float32


def test_stack_axes_are_quantised_independently():
    w = gaussian((3, 16, 8), seed=5)
    cfg = jpeft.NF4(block_size=16, dq_block_size=3)
    q = quantize_array(w, cfg)
    assert q.shape == (3, 16, 8) and q.absmax_offset.shape == (3,)
    for i in range(3):
        one = quantize_array(w[i], cfg)
        for got, want in zip(jax.tree.leaves(jax.tree.map(lambda x, i=i: x[i], q)), jax.tree.leaves(one), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_nf4_array_is_a_pytree_that_jits():
    q = quantize_array(gaussian((64, 16), seed=6), jpeft.NF4(block_size=32, dq_block_size=8))
    assert [x.dtype for x in jax.tree.leaves(q)] == [np.uint8, np.int8, np.float32, np.float32]
    traces = []

    @jax.jit
    def f(q):
        traces.append(None)
        return jpeft.dequantize(q, jnp.float32)

    np.testing.assert_allclose(np.asarray(f(q)), np.asarray(dequantize_array(q)), rtol=1e-6, atol=1e-7)
    f(jax.tree.map(lambda x: x + 0, q))
    assert len(traces) == 1  # static metadata is aux data: the same program is reused


# --- the tree API ------------------------------------------------------------------------------
def small_tree() -> dict:
    return {
        "enc": {"q": {"kernel": jnp.asarray(gaussian((16, 8), 7)), "bias": jnp.zeros(8)}},
        "head": {"kernel": jnp.asarray(gaussian((8, 4), 8))},
        "ids": {"table": jnp.zeros((4, 4), jnp.int32)},
    }


def test_quantize_tree_keeps_paths_and_untouched_objects():
    params = small_tree()
    q = jpeft.quantize(params, jpeft.NF4(block_size=16), targets=("q",))  # module suffix -> its kernel
    assert isinstance(q["enc"]["q"]["kernel"], NF4Array) and q["enc"]["q"]["kernel"].shape == (16, 8)
    assert q["enc"]["q"]["bias"] is params["enc"]["q"]["bias"] and q["head"]["kernel"] is params["head"]["kernel"]
    assert not isinstance(params["enc"]["q"]["kernel"], NF4Array)  # not mutated
    assert jpeft.list_paths(q) == jpeft.list_paths(params)
    q2 = jpeft.quantize(params, jpeft.NF4(block_size=16), targets=r".*/kernel")  # leaf regex
    assert all(isinstance(q2[m]["kernel"] if m == "head" else q2[m]["q"]["kernel"], NF4Array) for m in ("enc", "head"))
    back = jpeft.dequantize(q2)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert back["ids"]["table"] is params["ids"]["table"]
    np.testing.assert_allclose(
        np.asarray(back["head"]["kernel"]), np.asarray(dequantize_array(q2["head"]["kernel"])), rtol=0, atol=0
    )
    method = jpeft.QLoRA(targets=("q",), quant=jpeft.NF4(block_size=16))
    assert isinstance(jpeft.quantize(params, method)["enc"]["q"]["kernel"], NF4Array)  # a QLoRA config


def test_gpt2_small_kernels_take_under_0_27_of_bf16_bytes():
    """GPT-2-small's 48 block kernels; the twelve blocks have the same four shapes, so one is quantised."""
    config = transformers.GPT2Config()
    d, ff = config.n_embd, config.n_inner or 4 * config.n_embd
    shapes = {"attn/c_attn": (3 * d, d), "attn/c_proj": (d, d), "mlp/c_fc": (ff, d), "mlp/c_proj": (d, ff)}
    cfg = jpeft.NF4()
    real = {k: quantize_array(gaussian(s, i), cfg) for i, (k, s) in enumerate(shapes.items())}
    real_bytes = sum(sum(x.nbytes for x in jax.tree.leaves(q)) for q in real.values())
    assert real_bytes == sum(q.nbytes for q in real.values())
    n = config.n_layer * sum(math.prod(s) for s in shapes.values())
    ratio = config.n_layer * real_bytes / (2 * n)
    assert n == 84_934_656
    assert ratio <= 0.27, ratio
    assert abs(ratio - bits_per_param(cfg) / 16) < 1e-4  # measured 0.25794 (4.1270 bits per weight)


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=0), r"NF4\(block_size=0\): block_size must be a positive int"),
        (dict(block_size=63), r"NF4\(block_size=63\): block_size must be even"),
        (dict(dq_block_size=-1), r"NF4\(dq_block_size=-1\): dq_block_size must be a positive int"),
        (dict(double_quant=1), r"NF4\(double_quant=1\): double_quant must be a bool"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.NF4(**kwargs)


@pytest.mark.parametrize(
    "targets,match",
    [
        (("bias",), r"'enc/q/bias' has shape \(8,\); NF4 quantises arrays of rank >= 2"),
        (("table",), r"'ids/table' has dtype int32, expected a float array"),
        (("nothing",), r"matched 0 of 4 parameter paths.\nPaths look like 'enc/q/bias'"),
        (r"enc/.*", r"'enc/q/bias' has shape \(8,\)"),
    ],
)
def test_bad_targets(targets, match):
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.quantize(small_tree(), jpeft.NF4(block_size=16), targets=targets)


def test_block_size_must_divide():
    with pytest.raises(jpeft.JpeftError, match=r"'head/kernel' has shape \(8, 4\): its last two axes hold 32 "
                       r"weights, which block_size=64 does not divide"):  # fmt: skip
        jpeft.quantize(small_tree(), jpeft.NF4(), targets=("head",))


def test_other_errors():
    q = jpeft.quantize(small_tree(), jpeft.NF4(block_size=16), targets=("q",))
    with pytest.raises(jpeft.JpeftError, match=r"'enc/q/kernel' is already NF4-quantised"):
        jpeft.quantize(q, jpeft.NF4(block_size=16), targets=("q",))
    with pytest.raises(jpeft.JpeftError, match=r"needs targets"):
        jpeft.quantize(small_tree(), jpeft.NF4())
    with pytest.raises(jpeft.JpeftError, match=r"expects a jpeft.NF4 config \(or a jpeft.QLoRA method\); got LoRA"):
        jpeft.quantize(small_tree(), jpeft.LoRA(targets=("q",)), targets=("q",))
    with pytest.raises(jpeft.JpeftError, match=r"expects a nested mapping of arrays; got list"):
        jpeft.quantize([1], jpeft.NF4(), targets=("q",))
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.dequantize expects an NF4Array or a tree holding some; got"):
        jpeft.dequantize(np.ones((2, 2)))
    with pytest.raises(jpeft.JpeftError, match=r"bits_per_param expects a jpeft.NF4 config; got dict"):
        bits_per_param({})
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.quantize has shape \(64,\)"):
        quantize_array(np.ones(64, np.float32))


def test_orbax_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    tree = jpeft.quantize(small_tree(), jpeft.NF4(block_size=16, dq_block_size=4), targets=("q",))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", tree)
    checkpointer.wait_until_finished()
    back = checkpointer.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
    assert isinstance(back["enc"]["q"]["kernel"], NF4Array) and back["enc"]["q"]["kernel"].shape == (16, 8)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
