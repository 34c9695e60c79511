"""Read and write the safetensors format with numpy only (bf16 via ml_dtypes).

Reading memory-maps the file, so a loader can copy just the slice each device needs.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import CorruptCheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry_problem(info) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(info, dict):
        return f"has {type(info).__name__} {info!r:.40} instead of {{dtype, shape, data_offsets}}"
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            return f"has no {key!r}"
    if not isinstance(info["dtype"], str):
        return f"has dtype {info['dtype']!r}, not a string"
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        return f"has shape {shape!r}, not a list of non-negative integers"
    offsets = info["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
            or offsets[0] > offsets[1]):
        return f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end"
    return None


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where the data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CorruptCheckpointError(f"{path}: header length {n} exceeds the file size")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors header is not a JSON object; "
                                     "re-download or re-export the checkpoint")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        problem = _entry_problem(info)
        if problem:
            raise CorruptCheckpointError(
                f"{path}: malformed safetensors header: tensor {name!r} {problem}; "
                "re-download or re-export the checkpoint")
        end = info["data_offsets"][1]
        if data_start + end > size:
            raise CorruptCheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} of {size}; "
                "re-download or re-export the checkpoint"
            )
    return header, data_start


def open_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-mapped, read-only views of every tensor in one file."""
    path = Path(path)
    header, start = read_header(path)
    tensors = {}
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                                         f"{info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if (end - begin) != count * dtype.itemsize:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, "
                                         f"expected {count * dtype.itemsize}")
        tensors[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin,
                                  shape=shape if shape else (1,))
        if not shape:
            tensors[name] = tensors[name].reshape(())
    return tensors


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write one safetensors file (tensors in name order, 8-byte aligned header)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NAMES:
            raise TypeError(f"cannot store dtype {a.dtype} of {name!r} in safetensors")
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays[name] = a
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(arrays):
            f.write(arrays[name].tobytes())
