"""HF PEFT adapter files that are torn, damaged or hold unusual values (issue 17, findings 5 to 7).

``export_hf`` checks and serialises everything before it writes, stages both files and renames
them, weights first, with the config's hash in the weights' metadata; ``import_hf`` refuses a torn
pair, non-float and non-finite tensors and config fields of the wrong type, each with a
``JpeftError`` naming the file. The oracle for a good load is the exported arrays themselves.
"""

import json
import os
import pathlib
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jpeft

KEY_A = "base_model.model.query.lora_A.weight"


@pytest.fixture(scope="module")
def params():
    return {"query": nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 6)))["params"]}


def exported(path, params, alpha, seed=1, **kwargs):
    """Exports a rank-2 LoRA with ``alpha`` and random factors; returns its lora_a."""
    method = jpeft.LoRA(targets=("query",), rank=2, alpha=alpha)
    peft = jpeft.apply(method, params, key=jax.random.key(seed))
    store = peft["query"][jpeft.RESERVED]["default"]
    store["lora_b"] = jnp.full_like(store["lora_b"], 0.25 * seed)
    jpeft.export_hf(str(path), method, peft, **kwargs)
    return np.asarray(store["lora_a"])


def hand_written(path, config=None, tensors=None):
    """A plain HF PEFT LoRA file pair (no jpeft metadata) for ``params``, with edits."""
    rng = np.random.RandomState(0)
    base = {KEY_A: rng.standard_normal((2, 6)).astype(np.float32),
            "base_model.model.query.lora_B.weight": rng.standard_normal((4, 2)).astype(np.float32)}
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"], **(config or {})}))
    save_file({**base, **(tensors or {})}, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return str(path)


# --- finding 5: export_hf writes a consistent pair or nothing ---------------------------------------


def test_torn_export_is_refused_not_loaded_with_the_old_alpha(tmp_path, params, monkeypatch):
    exported(tmp_path, params, alpha=4)
    real, calls = os.replace, []

    def killed_after_one_rename(src, dst):  # the process dies between the two renames
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_one_rename)
    with pytest.raises(OSError, match="killed"):
        exported(tmp_path, params, alpha=8, seed=2)
    monkeypatch.undo()
    assert [os.path.basename(c) for c in calls] == ["adapter_model.safetensors", "adapter_config.json"]
    with pytest.raises(jpeft.JpeftError, match=r"adapter_model.safetensors' was written by jpeft.export_hf beside "
                                               r"another adapter_config.json .* different exports"):
        jpeft.import_hf(str(tmp_path), params)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # the staging directory is gone
    a = exported(tmp_path, params, alpha=8, seed=2)  # exporting again repairs the pair
    method, peft = jpeft.import_hf(str(tmp_path), params)
    assert method.alpha == 8
    np.testing.assert_array_equal(peft["query"][jpeft.RESERVED]["default"]["lora_a"], a)


def test_export_checks_everything_before_writing(tmp_path, params):
    exported(tmp_path, params, alpha=4)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    with pytest.raises(jpeft.JpeftError, match=r"base_model_name_or_path=PosixPath\('/models/gpt2'\)\): expected a "
                                               r"str or None.*got a PosixPath"):
        exported(tmp_path, params, alpha=8, seed=2, base_model_name_or_path=pathlib.Path("/models/gpt2"))
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before  # untouched
    assert jpeft.import_hf(str(tmp_path), params)[0].alpha == 4
    other = tmp_path / "other"
    (other / "adapter_config.json").mkdir(parents=True)
    with pytest.raises(jpeft.JpeftError, match=r"other/adapter_config.json' exists and is not a regular file"):
        exported(other, params, alpha=8)
    assert os.listdir(other) == ["adapter_config.json"]  # no weights beside it
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(jpeft.JpeftError, match=r"a_file' exists and is not a directory; export_hf writes"):
        exported(file, params, alpha=8)
    assert file.read_text() == "x"


def test_export_and_import_racing_never_mix_two_exports(tmp_path, params):
    """Two writers (alpha 4 with factors 1, alpha 8 with factors 2) and a reader: each load is one export's."""
    want = {4: exported(tmp_path / "a", params, alpha=4, seed=1), 8: exported(tmp_path / "b", params, alpha=8, seed=2)}
    exported(tmp_path, params, alpha=4, seed=1)
    stop, errors = threading.Event(), []

    def writer(alpha, seed):
        while not stop.is_set():
            try:
                exported(tmp_path, params, alpha=alpha, seed=seed)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

    threads = [threading.Thread(target=writer, args=a) for a in ((4, 1), (8, 2))]
    for t in threads:
        t.start()
    loads = refused = 0
    try:
        for _ in range(60):
            try:
                method, peft = jpeft.import_hf(str(tmp_path), params)
            except jpeft.JpeftError as e:
                assert "different exports" in str(e)
                refused += 1
                continue
            got = peft["query"][jpeft.RESERVED]["default"]
            np.testing.assert_array_equal(got["lora_a"], want[method.alpha])
            assert float(got["lora_b"][0, 0]) == 0.25 * (1 if method.alpha == 4 else 2)
            loads += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and loads > 0, (errors, loads, refused)


def test_jpeft_metadata_leaves_config_location_fields_editable(tmp_path, params):
    exported(tmp_path, params, alpha=4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert load_file(str(tmp_path / "adapter_model.safetensors"))  # still plain safetensors
    config["base_model_name_or_path"] = "/local/copy/of/the/model"  # where the base model lives: not hashed
    (tmp_path / "adapter_config.json").write_text(json.dumps(config, indent=4))
    assert jpeft.import_hf(str(tmp_path), params)[0].alpha == 4
    config["lora_alpha"] = 16  # what the adapter is: hashed
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(jpeft.JpeftError, match=r"or the config was edited"):
        jpeft.import_hf(str(tmp_path), params)


# --- finding 6: non-finite and non-float tensors ---------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        (np.float32("nan"), r"holds 1 non-finite values \(NaN or Inf\), the first at index \(1, 3\)"),
        (np.float32("inf"), r"holds 1 non-finite values"),
        (np.int32(1), r"has dtype int32; adapter tensors are floats"),
        (np.bool_(True), r"has dtype bool; adapter tensors are floats"),
    ],
    ids=["nan", "inf", "int", "bool"],
)
def test_non_finite_and_non_float_tensors_are_refused(tmp_path, params, value, message):
    x = np.zeros((2, 6), np.asarray(value).dtype)
    x[1, 3] = value
    hand_written(tmp_path, tensors={KEY_A: x})
    with pytest.raises(jpeft.JpeftError, match=rf"adapter_model.safetensors': tensor '{KEY_A}' \(2, 6\) {message}"):
        jpeft.import_hf(str(tmp_path), params)


@pytest.mark.parametrize("text", ['"lora_alpha": 1e400', '"lora_alpha": NaN', '"lora_dropout": -Infinity'],
                         ids=["1e400", "nan", "-inf"])
def test_non_finite_config_numbers_are_refused(tmp_path, params, text):
    hand_written(tmp_path)
    file = tmp_path / "adapter_config.json"
    file.write_text(file.read_text()[:-1] + ", " + text + "}")
    with pytest.raises(jpeft.JpeftError, match=r"adapter_config.json' (has lora_alpha=inf|holds the JSON extension)"):
        jpeft.import_hf(str(tmp_path), params)


def test_export_refuses_non_finite_deltas(tmp_path, params):
    method = jpeft.LoRA(targets=("query",), rank=2)
    peft = jpeft.apply(method, params, key=jax.random.key(1))
    store = peft["query"][jpeft.RESERVED]["default"]
    store["lora_b"] = store["lora_b"].at[0, 1].set(jnp.nan)
    with pytest.raises(jpeft.JpeftError, match=r"tensor 'base_model.model.query.lora_B.weight' \(4, 2\) holds 1 "
                                               r"non-finite values .* first at index \(1, 0\)"):
        jpeft.export_hf(str(tmp_path), method, peft)
    assert os.listdir(tmp_path) == []


# --- finding 7: configs that are not UTF-8, a bad regex, strings for booleans ------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        ({"use_dora": "false"}, r"has use_dora='false' \(str\); expected a JSON boolean, true or false"),
        ({"use_rslora": 1}, r"has use_rslora=1 \(int\); expected a JSON boolean"),
        ({"r": "2"}, r"has r='2' \(str\); expected an integer"),
        ({"r": 2.0}, r"has r=2.0 \(float\); expected an integer"),
        ({"lora_alpha": True}, r"has lora_alpha=True \(bool\); expected a number"),
        ({"target_modules": "query("}, r"has target_modules='query\(', which is not a valid regex"),
        ({"target_modules": [1]}, r"has target_modules=\[1\] \(list\); expected a regex str or a list"),
        ({"peft_type": "IA3", "feedforward_modules": "(["},
         r"has feedforward_modules='\(\[', which is not a valid regex \(.*\); HF PEFT reads a string as a regex"),
    ],
    ids=["dora-str", "rslora-int", "r-str", "r-float", "alpha-bool", "targets-regex", "targets-type", "ff-regex"],
)
def test_config_fields_of_the_wrong_type_are_refused(tmp_path, params, config, message):
    hand_written(tmp_path, config)
    with pytest.raises(jpeft.JpeftError, match=r"jpeft.import_hf: '.*adapter_config.json' " + message):
        jpeft.import_hf(str(tmp_path), params)


def test_config_that_is_not_utf8_is_refused(tmp_path, params):
    hand_written(tmp_path)
    file = tmp_path / "adapter_config.json"
    file.write_bytes(file.read_bytes().replace(b"query", b"qu\xffry"))
    with pytest.raises(jpeft.JpeftError, match=r"adapter_config.json' is not UTF-8 text \(byte \d+: b'\\xffry"):
        jpeft.import_hf(str(tmp_path), params)
