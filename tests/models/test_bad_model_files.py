"""``load_hf_safetensors`` on damaged or unusual weight files (issue 16, part 3).

A header cut short, a header length, offsets or dtype bit-flipped: a ``JpeftError`` naming the
file. HF model files carry no checksum, so a flipped mantissa bit in the data loads as the flipped
value (what is and is not caught is asserted, not hidden); a flipped exponent bit that makes Inf is
refused by the finite scan. bfloat16 weights (most HF checkpoints) load, and float64 ones, cast to
the Flax model's float32 as torch's ``load_state_dict`` casts; float64 values beyond float32's range
are refused. Oracles: the Flax parameters the checkpoint was written from, NumPy's casts and flips.
"""

from __future__ import annotations

import json
import os
import struct

import flax
import ml_dtypes
import numpy as np
import pytest

import jpeft
from jpeft import _tensor_files
from jpeft.models import load_hf_safetensors
from tests.models.test_safetensors_files import LN, directory, gpt2  # noqa: F401 - gpt2 is a fixture

WEIGHTS = "model.safetensors"


def rewrite(d: str, edit) -> None:
    file = os.path.join(d, WEIGHTS)
    data = open(file, "rb").read()
    open(file, "wb").write(edit(data))


def header(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def header_edit(old: str, new: str):
    def edit(data: bytes) -> bytes:
        n, _ = header(data)
        text = data[8 : 8 + n].decode()
        assert old in text and len(old) == len(new)
        return data[:8] + text.replace(old, new, 1).encode() + data[8 + n :]

    return edit


def end_offset_edit(data: bytes) -> bytes:
    """The last digit of the layer norm's end offset changed: what a bit flip in that digit does."""
    a, b = header(data)[1][LN]["data_offsets"]
    flipped = str(b)[:-1] + str((int(str(b)[-1]) + 1) % 10)
    return header_edit(f"[{a},{b}]", f"[{a},{flipped}]")(data)


def first_ln_dtype(data: bytes) -> str:
    return header(data)[1][LN]["dtype"]


DAMAGE = {
    "header-length-cut": (lambda d: d[:6], "header too small"),
    "header-cut": (lambda d: d[: 8 + header(d)[0] // 2], "invalid header length"),
    "header-length-flipped": (lambda d: struct.pack("<Q", header(d)[0] ^ 1 << 40) + d[8:], "header too large"),
    "offsets-flipped": (lambda d: end_offset_edit(d), "invalid shape, data type, or offset"),
    "dtype-flipped": (header_edit('"F32"', '"F16"'), "invalid shape, data type, or offset"),
    "data-cut": (lambda d: d[:-2], "incomplete metadata, file not fully covered"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_weights_file_is_refused(tmp_path, gpt2, damage):  # noqa: F811 - the fixture
    d = directory(tmp_path, gpt2)
    edit, reason = DAMAGE[damage]
    rewrite(d, edit)
    with pytest.raises(jpeft.JpeftError, match=rf"load_hf_safetensors: '.*model.safetensors' \(\d+ bytes\) is not a "
                                               rf"readable safetensors file: .*({reason}).*truncated or corrupted"):
        load_hf_safetensors(d)


def test_a_data_bit_flip_loads_unless_it_makes_inf(tmp_path, gpt2):  # noqa: F811
    hf, state = gpt2
    d = directory(tmp_path, gpt2)
    data = open(os.path.join(d, WEIGHTS), "rb").read()
    n, head = header(data)
    offset = 8 + n + head[LN]["data_offsets"][0] + 4 * 3  # element 3 of the final layer norm's scale (1.0)
    rewrite(d, lambda b: b[:offset] + bytes([b[offset] ^ 1]) + b[offset + 1 :])  # lowest mantissa bit
    want = np.array(state[LN], np.float32)
    want.view(np.uint32)[3] ^= 1  # NumPy's flip of the same bit: the value a checksum-less file now holds
    _, params = load_hf_safetensors(d)
    np.testing.assert_array_equal(params["transformer"]["ln_f"]["scale"], want)
    rewrite(d, lambda b: b[: offset + 3] + bytes([b[offset + 3] ^ 0x40]) + b[offset + 4 :])  # 1.0 -> inf
    with pytest.raises(jpeft.JpeftError, match=rf"1 tensors of the checkpoint hold NaN or Inf: {LN} \(1 of \d+\)"):
        load_hf_safetensors(d)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float64], ids=["bf16", "f16", "f64"])
def test_bf16_f16_and_f64_weights_load_cast_to_the_model_dtype(tmp_path, gpt2, dtype):  # noqa: F811
    """bf16 files raised a raw KeyError('BF16') before (safetensors.numpy has no bfloat16)."""
    hf, state = gpt2
    cast = {k: np.asarray(v).astype(dtype) for k, v in state.items()}
    d = directory(tmp_path, gpt2, lambda s: s.update(cast))
    if dtype is ml_dtypes.bfloat16:
        assert first_ln_dtype(open(os.path.join(d, WEIGHTS), "rb").read()) == "BF16"
    _, params = load_hf_safetensors(d)
    want = flax.traverse_util.flatten_dict(flax.core.unfreeze(hf.params))
    got = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    assert sorted(got) == sorted(want)
    for k in want:  # the oracle: NumPy's cast of the written values back to the model's float32
        assert got[k].dtype == want[k].dtype == np.float32, k
        np.testing.assert_array_equal(got[k], np.asarray(want[k]).astype(dtype).astype(np.float32), err_msg=str(k))


def test_f64_values_beyond_float32_are_refused(tmp_path, gpt2):  # noqa: F811
    def big(state):
        state[LN] = np.array(state[LN], np.float64)
        state[LN][5] = 1e39

    d = directory(tmp_path, gpt2, big)
    with pytest.raises(jpeft.JpeftError, match=rf"1 tensors of the checkpoint hold NaN or Inf: {LN} \(1 beyond "
                                               r"float32's range\).*check_finite=False skips this scan"):
        load_hf_safetensors(d)
    _, params = load_hf_safetensors(d, check_finite=False)  # the explicit opt-out loads it, as inf
    assert np.isinf(params["transformer"]["ln_f"]["scale"][5])


def test_bf16_file_bytes_match_the_safetensors_layout():
    """jpeft's reader gives BF16 bytes the bfloat16 values torch wrote (the high half of each float32)."""
    x = np.array([1.0, -2.5, 3.140625], np.float32)
    raw = (x.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 = float32's top 16 bits (exact for these)
    head = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    tensors, _ = _tensor_files.load("test", "w.safetensors", struct.pack("<Q", len(head)) + head + raw.tobytes())
    assert tensors["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(tensors["w"].astype(np.float32), x)


def test_a_config_nested_too_deep_is_refused(tmp_path, gpt2):  # noqa: F811
    d = directory(tmp_path, gpt2)
    open(os.path.join(d, "config.json"), "w").write("[" * 100_000 + "]" * 100_000)
    with pytest.raises(jpeft.JpeftError, match=r"config.json' is not a valid HF model config: not valid JSON "
                                               r"\(maximum recursion depth"):
        load_hf_safetensors(d)
