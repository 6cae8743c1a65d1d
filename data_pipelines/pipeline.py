"""End-to-end grain pipelines: records -> examples -> mixed -> packed -> :class:`TrainBatch`.

Online (build while training)::

    tok = Tokenizers.from_checkpoint("ckpt/")            # or Tokenizers.from_files(...)
    cfg = PipelineConfig(streams=(StreamSpec("cpt", "jsonl:data/web/*.jsonl", 0.6),
                                  StreamSpec("sft", "tfds:gsm8k:train", 0.4)),
                         batch=BatchConfig.for_tokenizers(tok, batch_size=1, seq_len=16384))
    it = iter(build_dataset(cfg, tok))
    batch = next(it); state = it.get_state()             # JSON-able; it.set_state(state) resumes

Offline: ``python -m data_pipelines.prepare`` writes the packs to ArrayRecord shards and
:func:`packed_dataset` reads them back into the same batches.

Order of operations per stream: per-process shard -> shuffle (new permutation per epoch) ->
repeat -> builder (``random_map``: the RNG of element ``i`` depends only on the seed and ``i``).
Then the streams are mixed by weight, packed (first-fit, see :mod:`packing`), collated, and
optionally moved to ``worker_count`` processes (``mp_prefetch``; results and resume states are
the same as with zero workers up to the order of packs, which is fixed for a given worker count).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import grain

from data_pipelines import records, sources
from data_pipelines.batch import BatchConfig, collate
from data_pipelines.common import Tokenizers
from data_pipelines.cpt import CPTBuilder, CPTConfig
from data_pipelines.mixing import mix
from data_pipelines.packing import PackIterDataset
from data_pipelines.reconstruction import ReconstructionBuilder, ReconstructionConfig
from data_pipelines.sft import SFTBuilder, SFTConfig

KINDS = {
    "cpt": (CPTBuilder, CPTConfig),
    "reconstruction": (ReconstructionBuilder, ReconstructionConfig),
    "sft": (SFTBuilder, SFTConfig),
}


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """One input stream: ``kind`` in :data:`KINDS`, a source spec, a weight, builder overrides.

    Source specs: ``jsonl:GLOB``, ``parquet:GLOB``, ``arrayrecord:GLOB`` (JSON records),
    ``tfds:NAME[:SPLIT]`` (``tfds.data_source``; set ``tfds_data_dir`` in the pipeline config),
    ``demo:docs:N[:MIN-MAX]`` / ``demo:chats:N`` (synthetic records, see :func:`demo_records`).
    ``records`` may instead hold an in-memory list (tests, demos).
    """

    kind: str
    source: str = ""
    weight: float = 1.0
    options: dict = dataclasses.field(default_factory=dict)
    records: Any = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown stream kind {self.kind!r}; expected one of {list(KINDS)}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    streams: tuple[StreamSpec, ...]
    batch: BatchConfig = BatchConfig()
    seed: int = 4231
    num_epochs: int | None = None  # None: repeat forever
    shuffle: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 2
    tfds_data_dir: str | None = None
    process_index: int | None = None
    process_count: int | None = None


def parse_stream(text: str) -> StreamSpec:
    """``KIND=WEIGHT@SOURCE`` (e.g. ``cpt=0.6@jsonl:data/*.jsonl``); ``=WEIGHT`` is optional."""
    head, _, source = text.partition("@")
    kind, _, weight = head.partition("=")
    return StreamSpec(kind.strip(), source.strip(), float(weight) if weight else 1.0)


def open_source(spec: str, tfds_data_dir: str | None = None):
    kind, _, rest = spec.partition(":")
    if kind == "jsonl":
        return sources.JsonlSource(rest)
    if kind == "parquet":
        return sources.ParquetSource(rest)
    if kind == "arrayrecord":
        return sources.ArrayRecordSource(rest)
    if kind == "tfds":
        name, _, split = rest.partition(":")
        return sources.tfds_source(name, split or "train", data_dir=tfds_data_dir)
    if kind == "demo":
        return demo_records(rest)
    raise ValueError(f"unknown source kind in {spec!r}")


def demo_records(spec: str) -> list[dict]:
    """Synthetic in-memory records (:mod:`data_pipelines.testing`), no files needed.

    ``docs:N[:MIN-MAX[:SEED]]``: ``N`` word-salad documents of ``MIN``-``MAX`` words (default
    50-4000); ``chats:N[:SEED]``: ``N`` chat records. Deterministic for a given spec.
    """
    from data_pipelines import testing

    parts = spec.split(":")
    what, n = parts[0], int(parts[1]) if len(parts) > 1 and parts[1] else 1000
    if what == "docs":
        lo, _, hi = (parts[2] if len(parts) > 2 and parts[2] else "50-4000").partition("-")
        seed = int(parts[3]) if len(parts) > 3 else 0
        return testing.random_documents(n, seed, (int(lo), int(hi)))
    if what == "chats":
        return testing.random_chats(n, int(parts[2]) if len(parts) > 2 else 0)
    raise ValueError(f"demo source {spec!r}: expected docs:N[:MIN-MAX[:SEED]] or chats:N[:SEED]")


def make_builder(stream: StreamSpec, tok: Tokenizers):
    builder_cls, config_cls = KINDS[stream.kind]
    opts = dict(stream.options)
    for k, v in opts.items():  # YAML/JSON lists -> tuples for the frozen configs
        if isinstance(v, list):
            opts[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return builder_cls(tok, config_cls(**opts))


def example_dataset(cfg: PipelineConfig, tok: Tokenizers) -> grain.MapDataset:
    """The mixed stream of examples and skip markers (before packing)."""
    streams = []
    for i, s in enumerate(cfg.streams):
        src = s.records if s.records is not None else open_source(s.source, cfg.tfds_data_dir)
        ds = sources.record_stream(src, seed=cfg.seed + 1009 * i, shuffle=cfg.shuffle,
                                   num_epochs=cfg.num_epochs, process_index=cfg.process_index,
                                   process_count=cfg.process_count)
        streams.append(ds.random_map(make_builder(s, tok), seed=cfg.seed + 7919 * (i + 1)))
    return mix(streams, [s.weight for s in cfg.streams])


class Collate:
    """Picklable ``batch_fn`` for grain's ``batch``."""

    def __init__(self, cfg: BatchConfig):
        self.cfg = cfg

    def __call__(self, packs):
        return collate(list(packs), self.cfg)


def _finish(ds: grain.IterDataset, cfg: PipelineConfig) -> grain.IterDataset:
    ds = ds.batch(cfg.batch.batch_size, drop_remainder=False, batch_fn=Collate(cfg.batch))
    if cfg.worker_count > 0:
        mark_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
    return ds


def build_dataset(cfg: PipelineConfig, tok: Tokenizers) -> grain.IterDataset:
    """Iterable of :class:`TrainBatch` dicts built from raw records."""
    packs = PackIterDataset(example_dataset(cfg, tok).to_iter_dataset(), cfg.batch.pack_config(),
                            tok.memory_start_id)
    return _finish(packs, cfg)


class DecodePack:
    def __call__(self, data: bytes):
        return records.decode(data)


def packed_dataset(paths: str | Sequence[str], cfg: PipelineConfig) -> grain.IterDataset:
    """Batches from packs written by ``prepare`` (``cfg.streams`` is ignored)."""
    paths = sources._expand(paths)
    check_shard_meta(paths, cfg.batch)
    src = sources.ArrayRecordSource(paths)
    ds = sources.record_stream(src, seed=cfg.seed, shuffle=cfg.shuffle, num_epochs=cfg.num_epochs,
                               process_index=cfg.process_index, process_count=cfg.process_count)
    return _finish(ds.map(DecodePack()).to_iter_dataset(), cfg)


def shard_meta_path(shard: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(shard)), "meta.json")


def check_shard_meta(paths: Sequence[str], bcfg: BatchConfig) -> None:
    """Packs must have been built with budgets that fit this batch config."""
    meta_file = shard_meta_path(paths[0])
    if not os.path.exists(meta_file):
        return
    with open(meta_file) as f:
        pack = json.load(f)["pack"]
    want = bcfg.pack_config()
    for k in ("seq_len", "compression_ratio"):
        if pack[k] != getattr(want, k):
            raise ValueError(f"shards were packed with {k}={pack[k]}, batch config has "
                             f"{getattr(want, k)}")
    if pack["max_windows"] * pack["window_size"] > want.max_windows * want.window_size or (
            pack["latent_budget"] > want.latent_budget):
        raise ValueError("shards were packed with larger encoder budgets than this batch config")


def mark_flags_parsed() -> None:
    """grain's worker processes read absl flags; scripts that never parse them must mark them."""
    try:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    except ImportError:  # pragma: no cover
        pass
