"""``load_hf_safetensors`` on damaged or unusual model directories (issue 17, findings 6 to 8).

Bool or int tensors for float weights, NaN weights, a ``config.json`` that is not UTF-8 or lacks
``model_type``, a bad ``model.safetensors.index.json``, shard names outside the model directory and
a tensor in two shards: each a ``JpeftError`` naming the file and the problem. The tiny GPT-2
checkpoint comes from ``test_safetensors``' inverse renaming; the oracle for a good load is the
Flax parameters it was written from.
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jpeft
from jpeft.models import load_hf_safetensors
from tests import _hf_models
from tests.models.test_safetensors import same_tree, torch_state, write

LN = "transformer.ln_f.weight"


@pytest.fixture(scope="module")
def gpt2():
    hf = _hf_models.make("gpt2")
    return hf, torch_state(hf.params, "gpt2")


def directory(tmp_path, gpt2, edit=None):
    hf, state = gpt2
    state = dict(state)
    if edit:
        edit(state)
    return write(tmp_path, hf.model.config, state, "GPT2LMHeadModel")


# --- finding 6 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.bool_, np.int32], ids=["bool", "int"])
def test_non_float_weights_are_refused(tmp_path, gpt2, dtype):
    d = directory(tmp_path, gpt2, lambda s: s.update({LN: np.ones_like(s[LN], dtype)}))
    with pytest.raises(jpeft.JpeftError, match=rf"Non-float tensors for float parameters \(1\): {LN} "
                                               rf"{np.dtype(dtype).name} -> transformer/ln_f/scale float32"):
        load_hf_safetensors(d)


def test_nan_weights_are_refused_unless_the_scan_is_off(tmp_path, gpt2):
    def nan(state):
        state[LN] = state[LN].copy()
        state[LN][3] = np.nan

    d = directory(tmp_path, gpt2, nan)
    with pytest.raises(jpeft.JpeftError, match=rf"1 tensors of the checkpoint hold NaN or Inf: {LN} \(1 of \d+\).*"
                                               r"check_finite=False skips this scan"):
        load_hf_safetensors(d)
    _, params = load_hf_safetensors(d, check_finite=False)  # the explicit opt-out loads it as it is
    assert np.isnan(params["transformer"]["ln_f"]["scale"][3])


# --- finding 7 -------------------------------------------------------------------------------------


def test_config_not_utf8_or_without_model_type(tmp_path, gpt2):
    d = directory(tmp_path, gpt2)
    config = os.path.join(d, "config.json")
    raw = json.load(open(config))
    data = json.dumps(raw).encode()
    open(config, "wb").write(data.replace(b'"gpt2"', b'"gpt\xfe"', 1))
    with pytest.raises(jpeft.JpeftError, match=r"config.json' is not a valid HF model config: not UTF-8 text"):
        load_hf_safetensors(d)
    json.dump({k: v for k, v in raw.items() if k != "model_type"}, open(config, "w"))
    with pytest.raises(jpeft.JpeftError, match=r"config.json' is not a valid HF model config: it holds "
                                               r"model_type=None; expected a JSON object with a model_type"):
        load_hf_safetensors(d)
    json.dump([raw], open(config, "w"))
    with pytest.raises(jpeft.JpeftError, match=r"it holds a list; expected a JSON object"):
        load_hf_safetensors(d)


def sharded(tmp_path, gpt2, shards=None):
    """The checkpoint as two shards and an index; ``shards``: file name per half."""
    hf, state = gpt2
    d = directory(tmp_path, gpt2)
    os.remove(os.path.join(d, "model.safetensors"))
    names = sorted(state)
    files = shards or ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for file, keys in zip(files, (names[::2], names[1::2]), strict=True):
        save_file({k: state[k] for k in keys}, os.path.join(d, file))
    weight_map = {k: file for file, keys in zip(files, (names[::2], names[1::2]), strict=True) for k in keys}
    index = os.path.join(d, "model.safetensors.index.json")
    json.dump({"metadata": {}, "weight_map": weight_map}, open(index, "w"))
    return d, index, weight_map


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"is not a valid sharded-checkpoint index: not valid JSON"),
        ('{"metadata": {}}', r"holds an object without 'weight_map'"),
        ('[{"weight_map": {}}]', r"holds list without 'weight_map'"),
        ('{"weight_map": ["a.safetensors"]}', r"holds an object with a bad 'weight_map'"),
    ],
    ids=["json", "no-weight-map", "list", "weight-map-list"],
)
def test_bad_index(tmp_path, gpt2, text, message):
    d, index, _ = sharded(tmp_path, gpt2)
    open(index, "w").write(text)
    with pytest.raises(jpeft.JpeftError, match=r"model.safetensors.index.json' " + message):
        load_hf_safetensors(d)


# --- finding 8 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("outside", ["absolute", "dotdot"])
def test_shards_outside_the_model_directory_are_not_read(tmp_path, gpt2, outside):
    d, index, weight_map = sharded(tmp_path / "model", gpt2)
    second = "model-00002-of-00002.safetensors"
    os.rename(os.path.join(d, second), tmp_path / second)  # a real shard, one level up
    name = str(tmp_path / second) if outside == "absolute" else f"../{second}"
    json.dump({"weight_map": {k: name if v == second else v for k, v in weight_map.items()}}, open(index, "w"))
    with pytest.raises(jpeft.JpeftError, match=r"maps tensors to shard .*, which is not a file name inside the model "
                                               r"directory \(absolute or with '..'\)"):
        load_hf_safetensors(d)


def test_a_tensor_in_two_shards_is_refused(tmp_path, gpt2):
    hf, state = gpt2
    d, index, weight_map = sharded(tmp_path, gpt2)
    _, params = load_hf_safetensors(d)  # the good sharded checkpoint loads exactly
    same_tree(params, hf.params)
    first = os.path.join(d, "model-00001-of-00002.safetensors")
    key = next(k for k, v in weight_map.items() if v == "model-00002-of-00002.safetensors" and "mlp" in k)
    save_file({**load_file(first), key: state[key] + 1}, first)  # a different copy in the other shard too
    with pytest.raises(jpeft.JpeftError, match=rf"tensor '{key}' is in two shards, 'model-00001-of-00002.safetensors' "
                                               r"and 'model-00002-of-00002.safetensors'"):
        load_hf_safetensors(d)
