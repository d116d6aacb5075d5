"""Reading and writing the two files of an HF PEFT adapter, ``adapter_config.json`` and ``adapter_model.safetensors``.

What the format modules (``_hf_peft.py``, ``_hf_peft_ia3.py``, ``_hf_peft_prompt.py`` and their NNX
twins) share, so that every adapter passes the same checks:

* **Reading** (:func:`read_adapter`): the config must be UTF-8 JSON holding an object whose fields
  have PEFT's types (``use_dora: "false"`` is refused, not read as ``True``; ``lora_alpha: 1e400``,
  which JSON reads as ``inf``, and ``NaN`` are refused; a ``target_modules`` or
  ``feedforward_modules`` string must be a valid regex; fields HF PEFT does not know or jpeft cannot
  honour, see ``_hf_peft_fields.py``); every tensor must be a finite float. Float16, bfloat16,
  float32 and float64 tensors are all read and cast to the dtype ``jpeft.apply`` gives the leaf (the
  kernel's, at least float32), as HF PEFT's ``autocast_adapter_dtype`` and torch's ``load_state_dict``
  do: exact for the half types, rounded for float64, whose values beyond float32's range are refused.
  A jpeft-written file's data is checked against the SHA-256 in its metadata
  (``jpeft._tensor_files.DIGEST``): a bit flip in it is refused. Other files have no checksum: a
  flipped bit in their data that leaves a finite float loads as that value (in the header, it breaks
  the JSON, offsets, dtype or a key name, all refused).
* **Writing** (:func:`write`): the config is serialised and the tensors checked *before* anything is
  written; both files are staged in a temporary directory inside the export directory and renamed
  into place, weights first. The weights' safetensors metadata holds :data:`CONFIG_HASH`, the
  SHA-256 of the config (its canonical JSON without the fields users edit to point at another copy
  of the base model, :data:`UNHASHED`); :func:`read_adapter` checks it when present, so a pair torn
  by a killed or concurrent export (new weights beside an old config) is refused, never loaded with
  the old ``lora_alpha``. HF PEFT ignores the metadata, and files written by others carry none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft import _tensor_files
from jpeft._errors import JpeftError
from jpeft.io._hf_peft_fields import check_fields

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
"""The ``peft_type`` values that ``jpeft.import_hf`` reads."""

CONFIG_HASH = "jpeft_config_sha256"
"""The weights' safetensors metadata key holding the SHA-256 of the config written beside them."""

UNHASHED = ("base_model_name_or_path", "revision", "task_type", "inference_mode")
"""Config fields left out of :data:`CONFIG_HASH`: where the base model lives, not what the adapter is."""

_BOOLS = ("use_dora", "use_rslora", "fan_in_fan_out", "inference_mode", "init_ia3_weights", "prefix_projection")
_INTS = ("r", "num_virtual_tokens", "num_layers", "token_dim", "num_transformer_submodules", "encoder_hidden_size")
_NUMBERS = ("lora_alpha", "lora_dropout")
_NAMES = ("target_modules", "feedforward_modules")


def config_hash(config: Mapping[str, Any]) -> str:
    """The SHA-256 of ``config``'s canonical JSON, without the :data:`UNHASHED` fields."""
    kept = {k: v for k, v in config.items() if k not in UNHASHED}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _decode(owner: str, file: str, data: bytes) -> Any:
    def refuse(name: str) -> None:
        raise JpeftError(
            f"{owner}: {file!r} holds the JSON extension {name}; adapter configs hold finite numbers only. "
            "Write the value as a number, or export the adapter again."
        )

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JpeftError(
            f"{owner}: {file!r} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 4]!r}); JSON files are "
            "UTF-8. The file is damaged or not a config: write or download it again."
        ) from None
    try:
        return json.loads(text, parse_constant=refuse)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise JpeftError(f"{owner}: {file!r} is not valid JSON ({e}). Write or download it again.") from None


def check_config(owner: str, file: str, config: Any) -> dict[str, Any]:
    """Checks the types of the fields jpeft reads; returns the config."""
    if not isinstance(config, dict):
        raise JpeftError(f"{owner}: {file!r} holds a {type(config).__name__}, expected a JSON object.")
    if config.get("peft_type") not in PEFT_TYPES:
        raise JpeftError(
            f"{owner}: {file!r} has peft_type={config.get('peft_type')!r}; import_hf reads {list(PEFT_TYPES)} "
            "adapters only."
        )

    def bad(field: str, want: str) -> JpeftError:
        return JpeftError(
            f"{owner}: {file!r} has {field}={config[field]!r} ({type(config[field]).__name__}); expected {want}. "
            "Fix the field (JSON true/false for booleans, numbers without quotes)."
        )

    for field in _BOOLS:
        if field in config and not isinstance(config[field], bool):
            raise bad(field, "a JSON boolean, true or false")
    for field in _INTS:
        value = config.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad(field, "an integer")
    for field in _NUMBERS:
        value = config.get(field)
        if field in config and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad(field, "a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(field, "a finite number (JSON reads 1e400 as inf)")
    for field in _NAMES:
        value = config.get(field)
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise JpeftError(
                    f"{owner}: {file!r} has {field}={value!r}, which is not a valid regex ({e}); HF PEFT reads a "
                    "string as a regex over module names. Fix it, or give a list of module names."
                ) from None
        elif value is not None and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
            raise bad(field, "a regex str or a list of module names")
    check_fields(owner, file, config)
    return config


def read_config(owner: str, path: str) -> dict[str, Any]:
    """``adapter_config.json`` of ``path`` as a checked dict."""
    file = os.path.join(path, CONFIG)
    return check_config(owner, file, _decode(owner, file, _read(owner, path, CONFIG)))


def _read(owner: str, path: str, name: str) -> bytes:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise JpeftError(f"{owner}: {file!r} does not exist. Pass the directory HF PEFT's save_pretrained wrote.")
    with open(file, "rb") as f:
        return f.read()


def check_tensors(owner: str, file: str, tensors: Mapping[str, Any]) -> None:
    """Refuses tensors that are not floats, or hold NaN or Inf, naming the first such key."""
    for key in sorted(tensors):
        x = np.asarray(tensors[key])
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise JpeftError(
                f"{owner}: {file!r}: tensor {key!r} {tuple(x.shape)} has dtype {x.dtype}; adapter tensors are floats "
                "(float16, bfloat16, float32, float64). The file was not written by HF PEFT or jpeft, or was edited."
            )
        bad = ~np.isfinite(x)
        if bad.any():
            raise JpeftError(
                f"{owner}: {file!r}: tensor {key!r} {tuple(x.shape)} holds {int(bad.sum())} non-finite values (NaN or "
                f"Inf), the first at index {tuple(int(i) for i in np.argwhere(bad)[0])}. Training diverged or the "
                "file is damaged: re-train from an earlier checkpoint, or export the adapter again."
            )
        big = np.abs(x) > np.finfo(np.float32).max if x.dtype == np.float64 else None
        if big is not None and big.any():
            raise JpeftError(
                f"{owner}: {file!r}: tensor {key!r} {tuple(x.shape)} float64 holds {int(big.sum())} values beyond "
                f"float32's range (largest |x| = {float(np.abs(x).max()):.3g}); import_hf holds adapter tensors in the "
                "kernel's dtype, at least float32, where they would be inf. The file is damaged or not an adapter."
            )


def read_adapter(owner: str, path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, tensors)`` of an adapter directory, checked (see the module docstring).

    A pair whose weights name another config's hash is read once more (a concurrent export may have
    been between its two renames), then refused.
    """
    file = os.path.join(path, WEIGHTS)
    for attempt in range(2):
        config = read_config(owner, path)
        tensors, metadata = _tensor_files.load(owner, file, _read(owner, path, WEIGHTS))
        written_for = metadata.get(CONFIG_HASH)
        if written_for is None or written_for == config_hash(config):
            break
        if attempt:
            raise JpeftError(
                f"{owner}: {file!r} was written by jpeft.export_hf beside another {CONFIG} (its metadata "
                f"{CONFIG_HASH}={written_for[:12]}..., the config there hashes to {config_hash(config)[:12]}...): "
                "the two files come from different exports (one killed or run concurrently), or the config was "
                f"edited. Export the adapter again; to keep a hand-edited config, re-save the weights without "
                "jpeft's metadata (safetensors.numpy.save_file(load_file(f), f))."
            )
    stamped = metadata.get(_tensor_files.DIGEST)
    if stamped is not None and stamped != _tensor_files.digest(tensors):
        raise JpeftError(
            f"{owner}: {file!r} is damaged: its tensors' SHA-256 is not the {_tensor_files.DIGEST} that "
            f"jpeft.export_hf wrote into it ({stamped[:12]}...), so a byte of the data (or of the header) changed "
            "after the export. Export the adapter again, or copy an undamaged file."
        )
    check_tensors(owner, file, tensors)
    return config, tensors


def check_export_path(owner: str, path: Any) -> None:
    """Refuses an export directory that is a file, or holds a directory where a file goes."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise JpeftError(
            f"{owner}: {os.fspath(path)!r} exists and is not a directory; export_hf writes {CONFIG} and {WEIGHTS} "
            "into a directory. Pass a new or existing directory."
        )
    for name in (CONFIG, WEIGHTS):
        target = os.path.join(path, name)
        if os.path.lexists(target) and not os.path.isfile(target):
            raise JpeftError(
                f"{owner}: {target!r} exists and is not a regular file (a directory?); export_hf would replace it. "
                "Remove it or export to another directory."
            )


def _serialise(owner: str, config: Mapping[str, Any]) -> str:
    for field, value in config.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise JpeftError(
                f"{owner}: the adapter config's {field}={value!r} cannot be written as JSON ({e}). Pass a str, number, "
                "bool, None or a list of them (e.g. str(path) for a pathlib.Path)."
            ) from None
    return json.dumps(dict(config), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write(
    path: str, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], owner: str = "jpeft.export_hf"
) -> None:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into ``path`` as one pair.

    Everything is checked and serialised before anything is written; the files are staged in a
    temporary directory inside ``path`` and renamed into place, weights first, whose metadata holds
    the config's hash (see the module docstring).
    """
    from safetensors.numpy import save

    check_export_path(owner, path)
    check_tensors(owner, f"{os.fspath(path)}/{WEIGHTS}", tensors)
    text = _serialise(owner, config)
    contents = {
        WEIGHTS: save(
            dict(tensors),
            metadata={
                "format": "pt",
                CONFIG_HASH: config_hash(config),
                _tensor_files.DIGEST: _tensor_files.digest(tensors),
            },
        ),
        CONFIG: text.encode(),
    }
    os.makedirs(path, exist_ok=True)
    staging = tempfile.mkdtemp(dir=path, prefix=".jpeft-export-")
    try:
        for name, data in contents.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name in (WEIGHTS, CONFIG):
            os.replace(os.path.join(staging, name), os.path.join(path, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
