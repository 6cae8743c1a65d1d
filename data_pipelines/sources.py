"""Random-access record sources (grain ``RandomAccessDataSource``s) and the sharded stream over them.

Every source returns raw records; parsing happens in the builders, so a bad record becomes a
counted skip instead of an exception inside the source:

* :class:`JsonlSource` - lines of ``*.jsonl`` files (bytes; an index of line offsets is built once);
* :class:`ParquetSource` - rows of ``*.parquet`` files as dicts (one row group cached at a time);
* :class:`ArrayRecordSource` - records of ArrayRecord files (bytes: JSON, or serialized arrays);
* :func:`tfds_source` - ``tfds.data_source(name, split)`` (array_record TFDS builds, no TensorFlow
  needed), e.g. ``c4``, ``wikipedia``, ``gsm8k``; features come back as dicts.

:func:`record_stream` turns a source into the per-process, shuffled, repeated ``MapDataset``.
"""

from __future__ import annotations

import bisect
import glob
import os
import threading
from typing import Any, Sequence

import grain
import numpy as np


def _expand(paths: str | Sequence[str]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in paths:
        p = str(p)
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not hits:
            raise FileNotFoundError(p)
        out += hits
    return out


class _PicklesWithoutLocal:
    """Pickles (for grain worker processes) without the per-thread file handles / caches in ``_local``."""

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


class JsonlSource(_PicklesWithoutLocal):
    """Lines (bytes, without the newline) of one or more JSONL files; blank lines are dropped."""

    def __init__(self, paths: str | Sequence[str]):
        self.paths = _expand(paths)
        self._offsets: list[np.ndarray] = []
        for p in self.paths:
            with open(p, "rb") as f:
                data = f.read()
            starts = np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + 1
            starts = np.concatenate([[0], starts]).astype(np.int64)
            ends = np.append(starts[1:] - 1, len(data))
            keep = ends > starts
            self._offsets.append(np.stack([starts[keep], ends[keep]], 1))
        self._cum = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()
        self._local = threading.local()

    def __len__(self) -> int:
        return self._cum[-1]

    def _file(self, i: int):
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = {}
        if i not in files:
            files[i] = open(self.paths[i], "rb")
        return files[i]

    def __getitem__(self, index: int) -> bytes:
        f = bisect.bisect_right(self._cum, index) - 1
        start, end = self._offsets[f][index - self._cum[f]]
        fh = self._file(f)
        fh.seek(int(start))
        line = fh.read(int(end - start))
        return line[:-1] if line.endswith(b"\r") else line

    def __repr__(self):
        return f"JsonlSource({len(self.paths)} files, {len(self)} records)"


class ParquetSource(_PicklesWithoutLocal):
    """Rows of parquet files as dicts of Python values (``columns``: the ones to read)."""

    def __init__(self, paths: str | Sequence[str], columns: Sequence[str] | None = None):
        import pyarrow.parquet as pq

        self.paths = _expand(paths)
        self.columns = list(columns) if columns else None
        self._groups = []  # (file index, row group, first row)
        n = 0
        for fi, p in enumerate(self.paths):
            meta = pq.ParquetFile(p).metadata
            for g in range(meta.num_row_groups):
                self._groups.append((fi, g, n))
                n += meta.row_group(g).num_rows
        self._len = n
        self._firsts = [g[2] for g in self._groups]
        self._local = threading.local()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        gi = bisect.bisect_right(self._firsts, index) - 1
        fi, g, first = self._groups[gi]
        cache = getattr(self._local, "cache", None)
        if cache is None or cache[0] != gi:
            table = pq.ParquetFile(self.paths[fi]).read_row_group(g, columns=self.columns)
            cache = self._local.cache = (gi, table.to_pylist())
        return cache[1][index - first]

    def __repr__(self):
        return f"ParquetSource({len(self.paths)} files, {len(self)} rows)"


def ArrayRecordSource(paths: str | Sequence[str]):  # noqa: N802 - reads like a class
    """Records (bytes) of ArrayRecord files, via grain's reader."""
    return grain.sources.ArrayRecordDataSource(_expand(paths))


def tfds_source(name: str, split: str = "train", data_dir: str | None = None, **kw):
    """``tfds.data_source`` for a registered builder (text builders are registered on import)."""
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text  # noqa: F401  (registers c4, wikipedia, gsm8k, ...)

    return tfds.data_source(name, split=split, data_dir=data_dir, **kw)


def record_stream(source, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> grain.MapDataset:
    """Per-process shard of ``source``, shuffled (a new permutation every epoch) and repeated.

    Process ``r`` of ``P`` reads records ``r, r + P, ...`` (defaults: ``jax.process_index()`` and
    ``jax.process_count()`` when jax is imported, else a single process). ``num_epochs=None``
    repeats forever.
    """
    if process_index is None or process_count is None:
        import sys

        jax = sys.modules.get("jax")
        process_index = jax.process_index() if jax else 0
        process_count = jax.process_count() if jax else 1
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise ValueError("empty source shard")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds
