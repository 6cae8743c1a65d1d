"""Batch sources for the train loop: the grain pipeline's batches, or a small synthetic source.

Every source yields ``data_pipelines.batch.TrainBatch`` dicts (host numpy) and has
``get_state()`` / ``set_state(state)`` with JSON-able states, stored in every checkpoint.

:class:`SyntheticSource` builds packs of reconstruction-style documents -- some text, a memory span
(``<|memory_start|>`` + ``ceil(n/cr)`` x ``<|memory|>`` + ``<|memory_end|>``), then the span's tokens
repeated as supervised text -- and collates them with the pipeline's own ``collate``. Batch ``i``
depends only on ``(seed, process, i)``, so resuming is exact. The task is learnable only through the
latents, so its loss falls when the adapter (stage 0) learns to carry the span's content.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from data_pipelines.batch import BatchConfig, collate
from data_pipelines.common import IGNORE, NUM_SKIP_REASONS


class SyntheticSource:
    def __init__(self, cfg: BatchConfig, seed: int = 0, process_index: int = 0, vocab: int | None = None,
                 span_tokens: tuple[int, int] = (8, 40), text_vocab: int = 256, memory_end_id: int | None = None):
        self.cfg = cfg
        self.memory_end_id = cfg.memory_start_id + 1 if memory_end_id is None else memory_end_id
        self.seed = seed
        self.process_index = process_index
        self.index = 0
        self.span_tokens = span_tokens
        self.text_vocab = text_vocab  # ids 1..text_vocab-1 are shared by encoder and decoder

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def _doc(self, rng):
        cfg = self.cfg
        n = int(rng.integers(self.span_tokens[0], self.span_tokens[1] + 1))
        span = rng.integers(1, self.text_vocab, size=n).astype(np.int32)
        k = -(-n // cfg.compression_ratio)
        prefix = rng.integers(1, self.text_vocab, size=int(rng.integers(2, 6))).astype(np.int32)
        ids = np.concatenate([prefix, [cfg.memory_start_id], np.full(k, cfg.memory_id), [self.memory_end_id],
                              span]).astype(np.int32)
        labels = ids.copy()
        labels[0] = IGNORE
        labels[len(prefix):len(prefix) + k + 2] = IGNORE
        return ids, labels, span

    def _pack(self, rng):
        cfg = self.cfg
        s = cfg.seq_len
        budget_lat = cfg.pack_config().latent_budget
        budget_enc = cfg.max_windows * cfg.window_size
        ids, labels, seg, pos, enc, lens = [], [], [], [], [], []
        used = lat = ntok = 0
        while True:
            d_ids, d_lab, span = self._doc(rng)
            k = -(-len(span) // cfg.compression_ratio)
            windows = sum(-(-n // cfg.window_size) for n in lens + [len(span)])
            if used + len(d_ids) > s or lat + k > budget_lat or windows > cfg.max_windows or (
                    ntok + len(span) > budget_enc):
                break
            ids.append(d_ids), labels.append(d_lab)
            seg.append(np.full(len(d_ids), len(lens) + 1, np.int32)), pos.append(np.arange(len(d_ids), dtype=np.int32))
            enc.append(span), lens.append(len(span))
            used += len(d_ids)
            lat += k
            ntok += len(span)
        pad = s - used
        cat = lambda xs, fill: np.concatenate(xs + [np.full(pad, fill, np.int32)]).astype(np.int32)  # noqa: E731
        return {"input_ids": cat(ids, cfg.pad_id), "labels": cat(labels, IGNORE), "segment_ids": cat(seg, 0),
                "positions": cat(pos, 0), "enc_ids": np.concatenate(enc).astype(np.int32),
                "span_lens": np.asarray(lens, np.int32), "kinds": np.zeros(len(lens), np.int32),
                "skipped": np.zeros(NUM_SKIP_REASONS, np.int32)}

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.process_index, self.index])
        self.index += 1
        return collate([self._pack(rng) for _ in range(self.cfg.batch_size)], self.cfg)


def batch_config(run, tok=None, memory_ids=(0, 0, 0), pad_id=0, encoder_pad_id=0) -> BatchConfig:
    """The pipeline's :class:`BatchConfig` for a run (rows per process = ``batch_size * grad_accum``)."""
    kw = dict(batch_size=run.batch_size * run.grad_accum, seq_len=run.seq_len,
              window_size=run.window_size, overlap=run.overlap, bidirectional=run.mask == "bidirectional",
              pooling=run.pooling, max_windows=run.max_windows, max_latents=run.max_latents)
    if tok is not None:
        return BatchConfig.for_tokenizers(tok, **kw)
    start, _end, mem = memory_ids
    return BatchConfig(compression_ratio=run.compression_ratio, pad_id=pad_id, encoder_pad_id=encoder_pad_id,
                       memory_id=mem, memory_start_id=start, **kw)


def make_source(run, checkpoint_dir: str | None, memory_ids, *, process_index: int = 0, process_count: int = 1):
    """The batch iterator for a run's ``dataset``.

    ``synthetic`` -> :class:`SyntheticSource`; a directory or glob of ArrayRecord shards written by
    ``data_pipelines.prepare`` -> ``pipeline.packed_dataset``; ``stream`` (or no shards found) ->
    ``jax.streams`` (pipeline stream specs, with ``jax.stream_options``) built online by
    ``pipeline.build_dataset`` with the run's tokenizers. Either pipeline iterator's state is
    JSON-able and goes into every checkpoint, so a resumed run continues at the same batch.
    """
    if run.dataset == "synthetic":
        return SyntheticSource(batch_config(run, memory_ids=memory_ids), seed=run.seed, process_index=process_index,
                               memory_end_id=int(memory_ids[1]))
    from data_pipelines import pipeline
    from data_pipelines.common import Tokenizers

    tok = Tokenizers.from_checkpoint(checkpoint_dir, run.compression_ratio)
    pcfg_kw = dict(batch=batch_config(run, tok), seed=run.seed, process_index=process_index,
                   process_count=process_count)
    paths = []
    if run.dataset not in ("stream", "streams"):
        shards = run.dataset
        if os.path.isdir(shards):
            shards = os.path.join(shards, "*.array_record*")
        paths = sorted(glob.glob(shards))
    if paths:
        it = iter(pipeline.packed_dataset(paths, pipeline.PipelineConfig(streams=(), **pcfg_kw)))
    elif run.streams:
        streams = tuple(stream_specs(run))
        it = iter(pipeline.build_dataset(pipeline.PipelineConfig(streams=streams, **pcfg_kw), tok))
    else:
        raise FileNotFoundError(f"dataset {run.dataset!r}: no packed shards found and no jax.streams given "
                                "(use dataset: synthetic for a synthetic source)")
    return it


def stream_specs(run):
    """``run.streams`` (``KIND=WEIGHT@SOURCE``) as pipeline ``StreamSpec``s with ``run.stream_options``."""
    import dataclasses

    from data_pipelines import pipeline

    out = []
    for text in run.streams:
        spec = pipeline.parse_stream(text)
        opts = (run.stream_options or {}).get(spec.kind) or {}
        out.append(dataclasses.replace(spec, options={**spec.options, **opts}))
    return out
