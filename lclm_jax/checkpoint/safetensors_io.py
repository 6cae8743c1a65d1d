"""Minimal, strict safetensors reader/writer on numpy (with ``ml_dtypes.bfloat16``).

The format is a little-endian u64 header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
(plus an optional ``__metadata__`` of strings), then the raw tensor bytes. Reading memory-maps the file
and hands out one tensor at a time, so peak host memory stays near one tensor. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
TAGS = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is malformed or holds something this reader does not accept."""


class SafetensorsFile:
    """Lazy access to the tensors of one ``.safetensors`` file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: file too short to be safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{self.path}: header length {n} is invalid for a {size}-byte file")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._data_len = size - self._base
        self.entries = {}
        for name, e in header.items():
            try:
                tag, shape, (start, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise SafetensorsError(f"{self.path}: malformed header entry for tensor {name!r}") from err
            if tag not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {tag!r}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[tag].itemsize
            if end - start != nbytes or not 0 <= start <= end <= self._data_len:
                raise SafetensorsError(f"{self.path}: tensor {name!r} byte range {start}:{end} does not match "
                                       f"dtype {tag} and shape {list(shape)}")
            self.entries[name] = (tag, shape, start, end)
        self._mm = None

    def keys(self):
        return list(self.entries)

    def dtype_tag(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a fresh numpy array (a copy out of the memory map)."""
        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        tag, shape, start, end = self.entries[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self._base + start:self._base + end]
        return np.frombuffer(raw.tobytes(), dtype=DTYPES[tag]).reshape(shape)


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write ``tensors`` (numpy arrays; bf16 as ``ml_dtypes.bfloat16``) to a safetensors file."""
    header, offset, order = {}, 0, sorted(tensors)
    for name in order:
        arr = tensors[name]
        dt = np.dtype(arr.dtype)
        if dt not in TAGS:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {dt}")
        nbytes = arr.size * dt.itemsize
        header[name] = {"dtype": TAGS[dt], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
    os.replace(tmp, path)


def iter_model_files(model_dir: str | os.PathLike, stem: str = "model") -> list[str]:
    """The safetensors files of a HF model directory: one file, or the shards named by the index."""
    model_dir = os.fspath(model_dir)
    index = os.path.join(model_dir, f"{stem}.safetensors.index.json")
    single = os.path.join(model_dir, f"{stem}.safetensors")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SafetensorsError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [p for p in files if not os.path.exists(os.path.join(model_dir, p))]
        if missing:
            raise SafetensorsError(f"{index} names shard files that do not exist: {missing}")
        return [os.path.join(model_dir, p) for p in files]
    if os.path.exists(single):
        return [single]
    if os.path.exists(os.path.join(model_dir, "pytorch_model.bin")):
        raise SafetensorsError(f"{model_dir}: only pytorch_model.bin found; pickled checkpoints are not read "
                               "(convert to safetensors first)")
    raise SafetensorsError(f"{model_dir}: no {stem}.safetensors or {stem}.safetensors.index.json")


def open_tensors(files: list[str]) -> Iterator[tuple[str, SafetensorsFile]]:
    """(name, file) for every tensor of the files; a name present in two files is an error."""
    seen = {}
    for path in files:
        sf = SafetensorsFile(path)
        for name in sf.keys():
            if name in seen:
                raise SafetensorsError(f"tensor {name!r} appears in both {seen[name]} and {path}")
            seen[name] = path
            yield name, sf
