"""A small, safe binary codec for dicts of numpy arrays (packs and examples in ArrayRecord files).

Layout: ``b"LCR1"`` + uint32 header length + JSON header ``[[key, dtype, shape], ...]`` + the
arrays' raw little-endian bytes back to back. No pickle, so reading a shard never runs code.
"""

from __future__ import annotations

import json
import struct

import numpy as np

MAGIC = b"LCR1"


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    header, blobs = [], []
    for k, v in arrays.items():
        a = np.ascontiguousarray(v)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        header.append([k, a.dtype.str, list(a.shape)])
        blobs.append(a.tobytes())
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(h)), h] + blobs)


def decode(data: bytes) -> dict[str, np.ndarray]:
    if data[:4] != MAGIC:
        raise ValueError("not an LCR1 record")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + n])
    off, out = 8 + n, {}
    for k, dt, shape in header:
        dtype = np.dtype(dt)
        size = int(np.prod(shape)) * dtype.itemsize
        out[k] = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=off).reshape(shape).copy()
        off += size
    if off != len(data):
        raise ValueError("trailing bytes in record")
    return out
