"""The bytes of a ``.safetensors`` file as NumPy arrays of every dtype, and a digest of tensors.

``safetensors.numpy`` has no ``bfloat16`` (``BF16`` files raise a raw ``KeyError``) nor float8, and
HF PEFT adapters of bf16 models are ``BF16``; :func:`load` reads them with ``ml_dtypes``' types (the
ones JAX uses). Every file that ``safetensors`` refuses (a header cut short, a header length or
offsets out of range, invalid header JSON, data that does not cover the tensors exactly) is a
:class:`jpeft.JpeftError` naming the file.

:func:`digest` is the SHA-256 of tensors' names, dtypes, shapes and bytes, independent of the order
of the file: ``jpeft.export_hf`` writes it into the weights' metadata (:data:`DIGEST`) and
``jpeft.import_hf`` checks it, so a bit flip in the data of a jpeft-written file is refused.
Files written by others carry none; their data bytes are not checked (safetensors has no checksum).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from jpeft._errors import JpeftError

DIGEST = "jpeft_tensors_sha256"
"""The safetensors metadata key holding :func:`digest` of the file's tensors."""

DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
"""safetensors' dtype names and the NumPy dtypes :func:`load` gives them."""


def load(owner: str, file: str, data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file's bytes.

    Args:
      owner: the public function to name in errors.
      file: the file the bytes come from, named in errors.
      data: its bytes.

    Returns:
      The tensors by name (read-only NumPy arrays; ``BF16`` as ``ml_dtypes.bfloat16``) and the
      header's ``__metadata__`` (``{}`` when absent).

    Raises:
      JpeftError: if the bytes are not a valid safetensors file, or hold a dtype not in :data:`DTYPES`.

    Example:
      >>> import numpy as np, ml_dtypes
      >>> from safetensors.numpy import save
      >>> tensors, meta = load("demo", "a.safetensors", save({"w": np.ones(2, np.float32)}, metadata={"k": "v"}))
      >>> tensors["w"].tolist(), meta
      ([1.0, 1.0], {'k': 'v'})
      >>> load("demo", "a.safetensors", b"\\x05")
      Traceback (most recent call last):
      ...
      jpeft._errors.JpeftError: demo: 'a.safetensors' (1 bytes) is not a readable safetensors file: Error while deserializing: header too small. The file is truncated or corrupted; write or download it again.
    """
    from safetensors import SafetensorError, deserialize

    try:
        flat = deserialize(data)
        (n,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, struct.error) as e:
        raise JpeftError(
            f"{owner}: {file!r} ({len(data)} bytes) is not a readable safetensors file: {e}. "
            "The file is truncated or corrupted; write or download it again."
        ) from None
    tensors = {}
    for name, info in flat:
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise JpeftError(
                f"{owner}: {file!r}: tensor {name!r} has safetensors dtype {info['dtype']!r}, which jpeft does not "
                f"read (it reads {sorted(DTYPES)}). Save it as a float (e.g. F32 or BF16)."
            )
        tensors[name] = np.frombuffer(info["data"], dtype).reshape(info["shape"])
    return tensors, metadata


def digest(tensors: Mapping[str, np.ndarray]) -> str:
    """The SHA-256 of ``tensors``: each name, dtype, shape and little-endian C-order bytes, sorted by name.

    Example:
      >>> import numpy as np
      >>> a = {"x": np.arange(3, dtype=np.float32)}
      >>> digest(a) == digest({"x": np.arange(3, dtype=np.float32)}), digest(a) == digest({"x": np.arange(3.0)})
      (True, False)
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        x = np.asarray(tensors[name])
        x = np.ascontiguousarray(x.astype(x.dtype.newbyteorder("<")) if x.dtype.byteorder == ">" else x)
        h.update(json.dumps([name, x.dtype.name, list(x.shape)]).encode() + b"\0")
        h.update(x.tobytes())
    return h.hexdigest()
