"""Bad files (issue 16, part 3): damaged adapter files and checkpoints give a clear error, never a wrong load.

HF PEFT adapters: a safetensors header cut short, a header length, offsets, dtype, shape or key
name bit-flipped, data cut or extended; a bit flip in the data of a jpeft-written file (refused by
the tensors' SHA-256 in its metadata) and of a hand-written one (no checksum: what is and is not
caught); half, double and bfloat16 tensors (cast as HF PEFT casts them, beyond float32's range
refused); ``adapter_config.json`` fields HF PEFT does not know, or knows but jpeft cannot honour, or
of the wrong type. Orbax checkpoints: partial steps (no commit marker, temporaries of a killed save),
an item of another dtype or another save, bit flips in orbax's metadata files; linen and NNX.
Every load runs in this process: the test process surviving is the check that nothing aborts it.
Oracles: the arrays written (bit-equal), NumPy's casts and bit flips, and HF PEFT 0.21.2 itself
for what it does with an unknown field.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save, save_file

import jpeft
from tests.io.test_checkpoint import assert_trees_equal, small
from tests.io.test_checkpoint_files import _flip as flip_middle
from tests.io.test_checkpoint_files import _truncate as truncate
from tests.io.test_checkpoint_files import copy

KEY_A = "base_model.model.query.lora_A.weight"
KEY_B = "base_model.model.query.lora_B.weight"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def params():
    return {"query": nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 6)))["params"]}


def factors():
    rng = np.random.RandomState(0)
    return {KEY_A: rng.standard_normal((2, 6)).astype(np.float32), KEY_B: rng.standard_normal((4, 2)).astype(np.float32)}


def hand_written(path: Path, config=None, tensors=None, edit=None) -> str:
    """An HF PEFT LoRA pair as HF PEFT writes it (no jpeft metadata); ``edit`` rewrites the weights' bytes."""
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"], **(config or {})})
    )
    data = save({**factors(), **(tensors or {})}, metadata={"format": "pt"})
    (path / WEIGHTS).write_bytes(edit(data) if edit else data)
    return str(path)


def exported(path: Path, params) -> dict[str, np.ndarray]:
    """A jpeft export of a rank-2 LoRA with non-zero factors; returns the file's tensors."""
    method = jpeft.LoRA(targets=("query",), rank=2, alpha=4)
    peft = jpeft.apply(method, params, key=jax.random.key(1))
    peft["query"][jpeft.RESERVED]["default"]["lora_b"] = jnp.full((2, 4), 0.25)
    jpeft.export_hf(str(path), method, peft)
    return load_file(str(path / WEIGHTS))


def header_edit(old: str, new: str):
    """Replaces ``old`` by ``new`` (same length: a bit flip's effect) in a safetensors header."""

    def edit(data: bytes) -> bytes:
        (n,) = struct.unpack("<Q", data[:8])
        header = data[8 : 8 + n].decode()
        assert old in header and len(old) == len(new), header
        return data[:8] + header.replace(old, new, 1).encode() + data[8 + n :]

    return edit


def header_length(change):
    return lambda data: struct.pack("<Q", change(struct.unpack("<Q", data[:8])[0])) + data[8:]


def flip(data: bytes, offset: int, bit: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def data_offset(data: bytes, key: str, element: int) -> int:
    """The file offset of float32 ``element`` of tensor ``key``."""
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n + json.loads(data[8 : 8 + n])[key]["data_offsets"][0] + 4 * element


# --- safetensors: truncated or bit-flipped headers and data -----------------------------------------
UNREADABLE = r"adapter_model.safetensors' \(\d+ bytes\) is not a readable safetensors file: .*{}.*truncated or corrupted"
DAMAGE = {
    "header-length-cut": (lambda d: d[:5], "header too small"),
    "header-cut": (lambda d: d[:40], "invalid header length"),
    "header-length-plus-one": (header_length(lambda n: n + 1), "invalid JSON in header"),
    "header-length-minus-one": (header_length(lambda n: n - 1), "incomplete metadata"),
    "header-length-huge": (header_length(lambda n: n | 1 << 62), "header too large"),
    "header-json": (header_edit('{"', '["'), "invalid JSON in header"),
    "offsets-out-of-range": (header_edit('"data_offsets":[0,48]', '"data_offsets":[0,98]'), "invalid .*offset"),
    "dtype-flipped": (header_edit('"F32"', '"F16"'), "invalid shape, data type, or offset"),
    "shape-flipped": (header_edit("[2,6]", "[3,6]"), "invalid shape, data type, or offset"),
    "data-cut": (lambda d: d[:-1], "incomplete metadata, file not fully covered"),
    "data-extended": (lambda d: d + bytes(4), "incomplete metadata, file not fully covered"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_safetensors_header_or_length_is_refused(tmp_path, params, damage):
    edit, reason = DAMAGE[damage]
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.import_hf: '.*" + UNREADABLE.format(reason)):
        jpeft.import_hf(hand_written(tmp_path, edit=edit), params)


def test_a_bit_flipped_key_name_is_refused(tmp_path, params):
    path = hand_written(tmp_path, edit=header_edit("query.lora_A", "querz.lora_A"))
    with pytest.raises(jpeft.JpeftError, match=r"adapter_model.safetensors' is for another model: 1 keys name modules "
                                               r"that params lacks, such as 'base_model.model.querz.lora_A.weight'"):
        jpeft.import_hf(path, params)


def test_a_bit_flip_in_jpeft_written_data_is_refused(tmp_path, params):
    tensors = exported(tmp_path, params)
    data = (tmp_path / WEIGHTS).read_bytes()
    assert set(json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]) == {
        "format", "jpeft_config_sha256", "jpeft_tensors_sha256"}
    _, peft = jpeft.import_hf(str(tmp_path), params)  # the good file loads its own arrays
    np.testing.assert_array_equal(peft["query"][jpeft.RESERVED]["default"]["lora_a"], tensors[KEY_A].T)
    for key, element, bit in ((KEY_A, 7, 0), (KEY_B, 0, 5)):  # a mantissa bit: still finite, a plausible value
        (tmp_path / WEIGHTS).write_bytes(flip(data, data_offset(data, key, element), bit))
        with pytest.raises(jpeft.JpeftError, match=r"adapter_model.safetensors' is damaged: its tensors' SHA-256 is "
                                                   r"not the jpeft_tensors_sha256 that jpeft.export_hf wrote"):
            jpeft.import_hf(str(tmp_path), params)
    digest = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]["jpeft_tensors_sha256"]
    (tmp_path / WEIGHTS).write_bytes(header_edit(digest[:4], "0000" if digest[:4] != "0000" else "1111")(data))
    with pytest.raises(jpeft.JpeftError, match=r"is damaged: its tensors' SHA-256"):  # the stamp itself flipped
        jpeft.import_hf(str(tmp_path), params)
    # The documented escape hatch (re-saving without jpeft's metadata) loads what the file now holds.
    (tmp_path / WEIGHTS).write_bytes(flip(data, data_offset(data, KEY_A, 7), 0))
    save_file(load_file(str(tmp_path / WEIGHTS)), str(tmp_path / WEIGHTS))
    jpeft.import_hf(str(tmp_path), params)


def test_a_bit_flip_in_hand_written_data_is_caught_only_when_not_finite(tmp_path, params):
    """HF PEFT files carry no checksum: a flipped mantissa bit loads as the flipped value (documented), a
    flipped exponent bit that makes Inf or NaN is refused by the finite scan."""
    data = save(factors(), metadata={"format": "pt"})
    offset = data_offset(data, KEY_A, 7)
    hand_written(tmp_path, edit=lambda d: flip(d, offset, 0))
    want = factors()[KEY_A].copy()
    want.view(np.uint32).reshape(-1)[7] ^= 1  # NumPy's bit flip of the same element: the oracle
    _, peft = jpeft.import_hf(str(tmp_path), params)
    np.testing.assert_array_equal(peft["query"][jpeft.RESERVED]["default"]["lora_a"], want.T)
    one = {KEY_A: np.ones((2, 6), np.float32)}
    data = save({**factors(), **one}, metadata={"format": "pt"})
    offset = data_offset(data, KEY_A, 7) + 3  # 1.0 = 0x3f800000; bit 30 set gives 0x7f800000 = inf
    hand_written(tmp_path, tensors=one, edit=lambda d: flip(d, offset, 6))
    with pytest.raises(jpeft.JpeftError, match=rf"tensor '{KEY_A}' \(2, 6\) holds 1 non-finite values \(NaN or Inf\), "
                                               r"the first at index \(1, 1\)"):
        jpeft.import_hf(str(tmp_path), params)


# --- dtypes: cast as HF PEFT casts, or refused -----------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64], ids=["f16", "bf16", "f64"])
def test_half_and_double_tensors_load_cast_to_float32(tmp_path, params, dtype):
    """HF PEFT (autocast_adapter_dtype) and torch's load_state_dict cast an adapter to the layer's float32:
    exact for half types, rounded for float64. bf16 files raised a raw KeyError('BF16') before."""
    x = (factors()[KEY_A] * 3).astype(dtype)
    hand_written(tmp_path, tensors={KEY_A: x})
    assert load_file  # safetensors.numpy cannot read BF16 files; jpeft reads them with ml_dtypes
    _, peft = jpeft.import_hf(str(tmp_path), params)
    got = peft["query"][jpeft.RESERVED]["default"]["lora_a"]
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, x.astype(np.float32).T)


def test_double_values_beyond_float32_are_refused(tmp_path, params):
    x = factors()[KEY_A].astype(np.float64)
    x[0, 2] = 1e39  # finite in float64, inf once cast to float32
    hand_written(tmp_path, tensors={KEY_A: x})
    with pytest.raises(jpeft.JpeftError, match=rf"tensor '{KEY_A}' \(2, 6\) float64 holds 1 values beyond float32's "
                                               r"range \(largest \|x\| = 1e\+39\); .* where they would be inf"):
        jpeft.import_hf(str(tmp_path), params)


def test_a_dtype_jpeft_does_not_read_is_named(tmp_path, params):
    header = json.dumps({KEY_A: {"dtype": "F8_E8M0", "shape": [2, 6], "data_offsets": [0, 12]}}).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(12)
    tmp_path.joinpath(CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["query"]}))
    tmp_path.joinpath(WEIGHTS).write_bytes(data)
    with pytest.raises(jpeft.JpeftError, match=rf"tensor '{KEY_A}' has safetensors (dtype 'F8_E8M0', which jpeft "
                                               r"does not read|.*not a readable)"):
        jpeft.import_hf(str(tmp_path), params)


# --- adapter_config.json: unknown, unsupported and wrong-typed fields ------------------------------
def test_hf_peft_ignores_unknown_fields_with_a_warning(tmp_path):
    """The behaviour jpeft matches for off values and refuses for others (see _hf_peft_fields.py)."""
    from peft import PeftConfig

    hand_written(tmp_path, {"lora_aplha": 16, "future_option": None})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = PeftConfig.from_pretrained(str(tmp_path))
    assert config.lora_alpha == 4 and not hasattr(config, "lora_aplha")  # the typo silently lost its 16
    assert any("Unexpected keyword arguments ['future_option', 'lora_aplha']" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "config",
    [
        {"future_option": None, "use_something_new": False, "new_config": {}, "enable_lora": None,
         "merge_weights": False},
        {"init_lora_weights": "gaussian", "layers_to_transform": [0], "exclude_modules": ["key"],
         "megatron_core": "megatron.core", "peft_version": "0.21.2", "qalora_group_size": 16, "rank_pattern": None,
         "bias": None, "use_qalora": False, "lora_bias": False, "ensure_weight_tying": False},
    ],
    ids=["unknown-but-off", "known-harmless"],
)
def test_fields_that_do_not_change_the_adapter_load(tmp_path, params, config):
    method, peft = jpeft.import_hf(hand_written(tmp_path, config), params)
    assert (method.rank, method.alpha) == (2, 4)
    np.testing.assert_array_equal(peft["query"][jpeft.RESERVED]["default"]["lora_a"], factors()[KEY_A].T)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"lora_aplha": 16}, r"has lora_aplha=16, a field HF PEFT 0.21.2's LORA config does not have \(did you mean "
                             r"'lora_alpha'\?\)\. HF PEFT ignores it with a warning; .* Fix the name"),
        ({"use_foo": True}, r"has use_foo=True, a field HF PEFT 0.21.2's LORA config does not have\. HF PEFT"),
        ({"layer_replication": [[0, 1]]}, r"has layer_replication=\[\[0, 1\]\]; jpeft.LoRA has no equivalent"),
        ({"use_qalora": True}, r"has use_qalora=True; jpeft.LoRA has no equivalent \(expected False\)"),
        ({"lora_bias": True}, r"has lora_bias=True; jpeft.LoRA has no equivalent"),
        ({"alora_invocation_tokens": [5, 6]}, r"has alora_invocation_tokens=\[5, 6\]; jpeft.LoRA has no equivalent"),
        ({"target_parameters": ["w"]}, r"has target_parameters=\['w'\]; jpeft.LoRA has no equivalent"),
        ({"trainable_token_indices": [1]}, r"has trainable_token_indices=\[1\]; jpeft.LoRA has no equivalent"),
        ({"bias": 1}, r"has bias=1; jpeft.LoRA has no equivalent \(expected 'none'\)"),
        ({"alpha_pattern": "x"}, r"has alpha_pattern='x'; jpeft.LoRA has no equivalent"),
        ({"lora_dropout": "0.1"}, r"has lora_dropout='0.1' \(str\); expected a number"),
        ({"inference_mode": "true"}, r"has inference_mode='true' \(str\); expected a JSON boolean"),
        ({"fan_in_fan_out": 0}, r"has fan_in_fan_out=0 \(int\); expected a JSON boolean"),
        ({"peft_type": 3}, r"has peft_type=3; import_hf reads \['LORA'"),
        ({"r": None}, r"does not make a valid LoRA"),
    ],
    ids=["typo", "unknown-on", "layer-replication", "qalora", "lora-bias", "alora", "target-parameters",
         "trainable-tokens", "bias-int", "alpha-pattern-str", "dropout-str", "inference-mode-str", "fan-in-int",
         "peft-type-int", "r-null"],
)
def test_fields_that_would_change_the_adapter_are_refused(tmp_path, params, config, message):
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.import_hf: '.*adapter_config.json' " + message
                       if "valid LoRA" not in message else message):
        jpeft.import_hf(hand_written(tmp_path, config), params)


def test_unknown_fields_of_ia3_and_prompt_configs(tmp_path, params):
    hand_written(tmp_path)
    ia3 = {"peft_type": "IA3", "target_modules": ["query"], "feedforward_module": ["query"]}
    tmp_path.joinpath(CONFIG).write_text(json.dumps(ia3))
    with pytest.raises(jpeft.JpeftError, match=r"has feedforward_module=\['query'\], a field HF PEFT 0.21.2's IA3 "
                                               r"config does not have \(did you mean 'feedforward_modules'\?\)"):
        jpeft.import_hf(str(tmp_path), params)
    tmp_path.joinpath(CONFIG).write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_token": 4}))
    with pytest.raises(jpeft.JpeftError, match=r"num_virtual_token=4, .* \(did you mean 'num_virtual_tokens'\?\)"):
        jpeft.import_hf(str(tmp_path), params)


DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON that Python's parser refuses with a RecursionError


def test_a_config_nested_too_deep_is_refused(tmp_path, params):
    hand_written(tmp_path)
    tmp_path.joinpath(CONFIG).write_text('{"peft_type": "LORA", "x": ' + DEEP + "}")
    with pytest.raises(jpeft.JpeftError, match=r"adapter_config.json' is not valid JSON \(maximum recursion depth"):
        jpeft.import_hf(str(tmp_path), params)


# --- the NNX import reads the same checks ----------------------------------------------------------
class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.Linear(6, 4, rngs=rngs)


TINY = dataclasses.replace(jpeft.profiles.BERT, name="tiny", hf_names=(("query", "query"),))
"""NNX imports map module names through a profile's ``hf_names``: here the module is ``query`` on both sides."""


def test_nnx_import_refuses_the_same_damage(tmp_path, params):
    model = Tiny(nnx.Rngs(0))
    tensors = exported(tmp_path, params)  # the linen twin's export: the same keys and shapes
    data = (tmp_path / WEIGHTS).read_bytes()
    _, peft = jpeft.import_hf(str(tmp_path), model, profile=TINY)  # the good file loads
    np.testing.assert_array_equal(peft.query.__jpeft__["default"]["lora_a"][...], tensors[KEY_A].T)
    (tmp_path / WEIGHTS).write_bytes(flip(data, data_offset(data, KEY_A, 3), 1))
    with pytest.raises(jpeft.JpeftError, match=r"adapter_model.safetensors' is damaged: its tensors' SHA-256"):
        jpeft.import_hf(str(tmp_path), model, profile=TINY)
    (tmp_path / WEIGHTS).write_bytes(data[:-3])
    with pytest.raises(jpeft.JpeftError, match=UNREADABLE.format("incomplete metadata")):
        jpeft.import_hf(str(tmp_path), model, profile=TINY)
    hand_written(tmp_path, {"use_qalora": True})
    with pytest.raises(jpeft.JpeftError, match=r"has use_qalora=True; jpeft.LoRA has no equivalent"):
        jpeft.import_hf(str(tmp_path), model, profile=TINY)


# --- orbax checkpoints: partial steps, items of another dtype or save, orbax's metadata files -------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_files_pristine")
    method, _, peft = small(1)
    jpeft.save(path, method, peft, step=1)
    return path


def partial_steps(path: Path) -> None:
    """What killed saves leave: a step without its commit marker, and both kinds of temporaries."""
    shutil.copytree(path / "step_1", path / "step_2")
    (path / "step_2" / "commit_success.txt").unlink()
    for name in ("step_3.jpeft-tmp-otherhost-1-abc", "step_3.jpeft-tmp-otherhost-1-abc.orbax-checkpoint-tmp-9"):
        shutil.copytree(path / "step_1", path / name)


def test_partial_steps_are_never_listed_nor_read(saved, tmp_path):
    path = copy(saved, tmp_path)
    partial_steps(path)
    _, params, peft = small(1)
    assert jpeft.io.steps(path) == [1]
    ck = jpeft.restore(path, params)  # the latest complete step, not the partial step_2 or step_3
    assert ck.step == 1
    assert_trees_equal(ck.params, peft)
    partial = r"ignored \['step_2', 'step_3.jpeft-tmp-otherhost-1-abc', .*\]: partial steps without commit_success.txt"
    with pytest.raises(jpeft.JpeftError, match=r"restore\(step=2\): no complete checkpoint of that step under .*; "
                                               r"found steps \[1\] \(" + partial):
        jpeft.restore(path, params, step=2)
    shutil.rmtree(path / "step_1")
    with pytest.raises(jpeft.JpeftError, match=r"restore: no complete checkpoint under '.*ck' \(" + partial):
        jpeft.restore(path, params)


def _other_item(tmp_path: Path, peft) -> Path:
    other = tmp_path / "other"
    jpeft.save(other, small(1)[0], peft, step=1)
    return other / "step_1" / "params"


ITEM = r"the checkpoint item '.*step_1/params' "
ORBAX_DAMAGE = {
    "bf16-item": (
        lambda p, t: _other_item(t, jax.tree.map(lambda x: x.astype(jnp.bfloat16), small(1)[2])),
        ITEM + r"does not hold the arrays its metadata lists: 000000: metadata says \(\(3,\), 'float32'\), stored "
        r"\(\(3,\), 'bfloat16'\)",
    ),
    "item-of-another-save": (
        lambda p, t: _other_item(t, small(2)[2]),
        r"the item '.*step_1/params' belongs to save [0-9a-f]+, the metadata to save [0-9a-f]+: .* or the item was "
        r"copied from another checkpoint",
    ),
    "sharding-flipped": (lambda p, t: flip_middle(p / "step_1" / "params" / "_sharding"), ITEM + "has damaged"),
    "manifest-flipped": (lambda p, t: flip_middle(p / "step_1" / "params" / "manifest.ocdbt"), ITEM + "has damaged"),
    "item-metadata-flipped": (lambda p, t: flip_middle(p / "step_1" / "params" / "_METADATA"), ITEM + "has damaged"),
    "meta-nested-too-deep": (
        lambda p, t: [(p / "step_1" / "meta" / "metadata").write_text(DEEP)] and None,
        r"the checkpoint metadata '.*step_1/meta/metadata' is not valid JSON \(maximum recursion depth",
    ),
}


@pytest.mark.parametrize("damage", list(ORBAX_DAMAGE))
def test_an_item_of_another_dtype_or_save_or_a_flipped_orbax_file_is_refused(saved, tmp_path, damage):
    path = copy(saved, tmp_path)
    do, message = ORBAX_DAMAGE[damage]
    replacement = do(path, tmp_path)
    if replacement is not None:
        shutil.rmtree(path / "step_1" / "params")
        shutil.copytree(replacement, path / "step_1" / "params")
    with pytest.raises(jpeft.JpeftError, match=message):
        jpeft.restore(path, small(1)[1])


@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped"])
def test_orbax_top_level_metadata_is_not_needed(saved, tmp_path, damage):
    """``step_N/_CHECKPOINT_METADATA`` is orbax's record of the save (time, item names); jpeft reads its own
    metadata and checks every array, so a damaged copy of it does not matter: the restore is bit-exact."""
    path = copy(saved, tmp_path)
    file = path / "step_1" / "_CHECKPOINT_METADATA"
    if damage == "deleted":
        file.unlink()
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:7])
    else:
        flip_middle(file)
    _, params, peft = small(1)
    assert_trees_equal(jpeft.restore(path, params).params, peft)


# --- the NNX checkpoint path reads through the same checks -----------------------------------------
@pytest.fixture(scope="module")
def nnx_saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_files_nnx")
    base = Tiny(nnx.Rngs(0))
    method = jpeft.LoRA(targets=("query",), rank=2)
    model = jpeft.apply(method, base, key=jax.random.key(1))
    model.query.__jpeft__["default"]["lora_b"][...] = jnp.full((2, 4), 0.5)
    jpeft.save(path, method, model, step=1)
    return path, base, model


NNX_DAMAGE = {
    "array-flipped": (
        lambda p: [flip_middle(f) for f in sorted((p / "step_1" / "params").glob("d/*"))],
        r"step_1(/params)?' (has damaged|failed)",
    ),
    "array-truncated": (
        lambda p: [truncate(f) for f in (p / "step_1" / "params").glob("d/*")],
        r"step_1(/params)?' (has damaged|failed)",
    ),
    "meta-truncated": (
        lambda p: truncate(p / "step_1" / "meta" / "metadata"),
        r"the checkpoint metadata '.*step_1/meta/metadata' is not valid JSON",
    ),
    "partial-step": (partial_steps, None),
}


@pytest.mark.parametrize("damage", list(NNX_DAMAGE))
def test_nnx_restore_refuses_the_same_damage(nnx_saved, tmp_path, damage):
    saved_path, base, model = nnx_saved
    path = copy(saved_path, tmp_path)
    do, message = NNX_DAMAGE[damage]
    do(path)
    if message is None:  # partial steps: ignored, the complete step restores bit-exact
        assert jpeft.io.steps(path) == [1]
        _, restored, _, step = jpeft.restore(path, base)
        assert step == 1
        np.testing.assert_array_equal(restored.query.__jpeft__["default"]["lora_b"][...], np.full((2, 4), 0.5))
        with pytest.raises(jpeft.JpeftError, match=r"restore\(step=2\): no complete checkpoint .*partial steps"):
            jpeft.restore(path, base, step=2)
        return
    with pytest.raises(jpeft.JpeftError, match=message):
        jpeft.restore(path, base)


def test_every_single_bit_flip_of_a_jpeft_export_is_refused_or_harmless(tmp_path, params):
    """One bit flipped at every byte of both files (bit = offset % 8): each load either raises a JpeftError
    or gives exactly the exported method and arrays. All 466 config flips are refused; of the weights'
    488, the 41 that load are in the metadata's key names ("format", "jpeft_config_sha256",
    "jpeft_tensors_sha256": the stamp is then lost, the data unchanged). No flip loads anything else,
    and none aborts this process."""
    tensors = exported(tmp_path, params)
    files = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS, CONFIG)}
    outcomes = {"refused": 0, "same": 0}
    for name, data in files.items():
        for offset in range(len(data)):
            (tmp_path / name).write_bytes(flip(data, offset, offset % 8))
            try:
                method, peft = jpeft.import_hf(str(tmp_path), params)
            except jpeft.JpeftError:
                outcomes["refused"] += 1
                continue
            finally:
                (tmp_path / name).write_bytes(data)
            got = peft["query"][jpeft.RESERVED]["default"]
            assert (method.rank, method.alpha, method.targets) == (2, 4, ("query",)), (name, offset)
            np.testing.assert_array_equal(got["lora_a"], tensors[KEY_A].T, err_msg=f"{name} byte {offset}")
            np.testing.assert_array_equal(got["lora_b"], tensors[KEY_B].T, err_msg=f"{name} byte {offset}")
            outcomes["same"] += 1
    assert outcomes["refused"] > 0.9 * sum(len(d) for d in files.values()), outcomes
