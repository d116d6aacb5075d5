"""The files of an HF model directory: ``config.json``, ``model.safetensors`` and a sharded checkpoint's index.

Every damaged or unusual file is a ``JpeftError`` naming it: bytes that are not UTF-8 JSON, a config
without ``model_type``, an index without a ``weight_map``, a shard name that is absolute or contains
``..`` (no file outside the model directory is read; symlinks inside it, as in the HF cache, are
followed), a tensor in two shards or missing from the shard the index names.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np

from jpeft import _tensor_files
from jpeft._errors import JpeftError

_OWNER = "jpeft.models.load_hf_safetensors"


def read_safetensors(path: str, owner: str) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into NumPy arrays, with a clear error for a bad file.

    Args:
      path: the file.
      owner: the public function to name in errors.

    Returns:
      The tensors by name.

    Raises:
      JpeftError: if the file is missing, truncated or not a safetensors file. ``BF16`` and float8
        tensors come back as ``ml_dtypes`` arrays (see ``jpeft._tensor_files``).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise JpeftError(f"{owner}: {path!r} does not exist. Expected a .safetensors file there.")
    if _numpy_dtypes_only(path):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise JpeftError(
                f"{owner}: {path!r} ({os.path.getsize(path)} bytes) is not a readable safetensors file: {e}. "
                "The file is truncated or corrupted; write or download it again."
            ) from None
    with open(path, "rb") as f:  # bfloat16 or float8 (safetensors.numpy has neither), or a damaged header
        return _tensor_files.load(owner, path, f.read())[0]


def _numpy_dtypes_only(path: str) -> bool:
    """Whether the header parses and names only dtypes ``safetensors.numpy`` reads (no ``BF16``, ``F8_*``)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, 100_000_000)))
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, struct.error):
        return False
    return dtypes <= {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"}


def _json(path: str, what: str) -> Any:
    """A JSON file's value, or a clear error for bytes that are not UTF-8 JSON."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise JpeftError(
            f"{_OWNER}: {path!r} is not {what}: not UTF-8 text (byte {e.start}: {data[e.start : e.start + 4]!r}). "
            "The file is damaged: download it again."
        ) from None
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise JpeftError(f"{_OWNER}: {path!r} is not {what}: not valid JSON ({e}). Download it again.") from None


def read_config(path: str) -> Any:
    import transformers

    raw = _json(path, "a valid HF model config")
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        got = f"a {type(raw).__name__}" if not isinstance(raw, dict) else f"model_type={raw.get('model_type')!r}"
        raise JpeftError(
            f"{_OWNER}: {path!r} is not a valid HF model config: it holds {got}; expected a JSON object with a "
            "model_type string such as 'bert'. Add the model_type of the checkpoint, or download config.json again."
        )
    try:
        return transformers.AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as e:
        raise JpeftError(f"{_OWNER}: {path!r} is not a valid HF model config: {e}.") from None


def read_shards(directory: str, index_path: str) -> dict[str, np.ndarray]:
    """The tensors of a sharded checkpoint, as ``model.safetensors.index.json`` maps them."""
    index = _json(index_path, "a valid sharded-checkpoint index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise JpeftError(
            f"{_OWNER}: {index_path!r} holds {type(index).__name__ if not isinstance(index, dict) else 'an object'} "
            f"{'without' if weight_map is None else 'with a bad'} 'weight_map'; expected {{\"weight_map\": {{tensor name: "
            "shard file name}}}. Download the index again."
        )
    for shard in sorted(set(weight_map.values())):
        parts = shard.replace("\\", "/").split("/")
        if not shard or os.path.isabs(shard) or shard.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise JpeftError(
                f"{_OWNER}: {index_path!r} maps tensors to shard {shard!r}, which is not a file name inside the "
                "model directory (absolute or with '..'); jpeft reads no file outside it. Fix the index."
            )
    state: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        for name, x in read_safetensors(os.path.join(directory, shard), _OWNER).items():
            if name in where:
                raise JpeftError(
                    f"{_OWNER}: tensor {name!r} is in two shards, {where[name]!r} and {shard!r} "
                    f"({index_path!r} names {weight_map.get(name)!r}); a checkpoint holds each tensor once. "
                    "Download the checkpoint again."
                )
            state[name], where[name] = x, shard
    lost = sorted(k for k, shard in weight_map.items() if where.get(k) != shard)
    if lost:
        raise JpeftError(
            f"{_OWNER}: {index_path!r} maps {len(lost)} tensors to shards that do not hold them, such as "
            f"{lost[0]!r} -> {weight_map[lost[0]]!r}. The index and the shards disagree; download them again."
        )
    return state
