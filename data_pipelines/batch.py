"""The train-step batch contract (:class:`TrainBatch`) and the collation that builds it from packs.

Static sizes come from :class:`BatchConfig`: ``B`` rows per process, decoder length ``S``, ``NW``
encoder windows per row of length ``L`` (``W + O [+ O if bidirectional] [+ W/cr for eos]``),
``C`` = ``C_max`` latents per row, ``G`` pool members per latent (``cr``; 1 for eos pooling).

Device keys (:data:`DEVICE_KEYS`), all numpy on the host:

=====================  ==============  ========================================================
key                    dtype[shape]    meaning
=====================  ==============  ========================================================
``input_ids``          int32[B,S]      decoder ids; ``pad_id`` on padding
``labels``             int32[B,S]      aligned with ``input_ids`` (NOT shifted: the loss compares
                                       logits at ``t`` with ``labels[t+1]``); -100 = ignored.
                                       Each document's first label and all padding are -100, so no
                                       supervised label crosses a document boundary
``segment_ids``        int32[B,S]      1, 2, ... per packed document; 0 = padding
``positions``          int32[B,S]      RoPE positions, restarting at 0 for every document
``placeholder_index``  int32[B,C]      positions (in the row) of the ``<|memory|>`` tokens, in
                                       latent order; 0 where invalid
``placeholder_valid``  bool[B,C]       True for the row's real placeholders
``enc_input_ids``      int32[B,NW,L]   encoder window grid (encoder pad id on padding)
``enc_valid``          bool[B,NW,L]    real encoder tokens (eos markers included)
``enc_positions``      int32[B,NW,L]   encoder positions, 0 at each window's first real token
``pool_index``         int32[B,C,G]    flat indices into that row's ``[NW*L]`` grid
``pool_mask``          bool[B,C,G]     present pool members
``latent_valid``       bool[B,C]       real latents; equals ``placeholder_valid``
=====================  ==============  ========================================================

Latent ``c`` of row ``b`` (pooled from ``pool_index[b, c]``) replaces the decoder embedding at
``placeholder_index[b, c]``. Host-only keys: ``num_tokens`` int32[B] (non-padding decoder tokens),
``num_supervised`` int32[B], ``num_enc_tokens`` int32[B], ``num_docs`` int32[B], ``skipped``
int32[B,R] (records skipped per reason, see ``common.SKIP_REASONS``).
"""

from __future__ import annotations

import dataclasses
from typing import TypedDict

import numpy as np

from data_pipelines.common import IGNORE, NUM_SKIP_REASONS
from data_pipelines.packing import PackConfig


class TrainBatch(TypedDict):
    input_ids: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    placeholder_index: np.ndarray
    placeholder_valid: np.ndarray
    enc_input_ids: np.ndarray
    enc_valid: np.ndarray
    enc_positions: np.ndarray
    pool_index: np.ndarray
    pool_mask: np.ndarray
    latent_valid: np.ndarray
    num_tokens: np.ndarray
    num_supervised: np.ndarray
    num_enc_tokens: np.ndarray
    num_docs: np.ndarray
    skipped: np.ndarray


# key -> (dtype, dims); dims name BatchConfig sizes.
SPEC = {
    "input_ids": (np.int32, "BS"), "labels": (np.int32, "BS"),
    "segment_ids": (np.int32, "BS"), "positions": (np.int32, "BS"),
    "placeholder_index": (np.int32, "BC"), "placeholder_valid": (np.bool_, "BC"),
    "enc_input_ids": (np.int32, "BWL"), "enc_valid": (np.bool_, "BWL"),
    "enc_positions": (np.int32, "BWL"),
    "pool_index": (np.int32, "BCG"), "pool_mask": (np.bool_, "BCG"), "latent_valid": (np.bool_, "BC"),
    "num_tokens": (np.int32, "B"), "num_supervised": (np.int32, "B"),
    "num_enc_tokens": (np.int32, "B"), "num_docs": (np.int32, "B"), "skipped": (np.int32, "BR"),
}
DEVICE_KEYS = tuple(list(SPEC)[:12])
HOST_KEYS = tuple(list(SPEC)[12:])


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    batch_size: int = 1  # rows per process
    seq_len: int = 16384
    compression_ratio: int = 16
    window_size: int = 1024
    overlap: int = 0
    bidirectional: bool = False
    pooling: str = "mean"
    max_windows: int = 128
    max_latents: int | None = None
    pad_id: int = 0
    encoder_pad_id: int = 0
    memory_id: int = 0
    memory_start_id: int = 0
    num_bins: int = 8
    max_skips_in_a_row: int = 2000  # see PackConfig: fail instead of spinning on unusable data

    def window_config(self):
        from lclm_jax.lclm.windows import WindowConfig

        return WindowConfig(self.compression_ratio, self.window_size, self.overlap,
                            self.bidirectional, self.pooling)

    def pack_config(self) -> PackConfig:
        return PackConfig(self.seq_len, self.max_windows, self.window_size,
                          self.compression_ratio, self.max_latents, self.num_bins, self.pad_id,
                          self.max_skips_in_a_row)

    @property
    def window_len(self) -> int:
        from lclm_jax.lclm.windows import default_length

        return default_length(self.window_config())

    def dims(self) -> dict[str, int]:
        return {"B": self.batch_size, "S": self.seq_len, "W": self.max_windows,
                "L": self.window_len, "C": self.pack_config().latent_budget,
                "G": 1 if self.pooling == "eos" else self.compression_ratio,
                "R": NUM_SKIP_REASONS}

    @classmethod
    def for_tokenizers(cls, tok, **kw) -> "BatchConfig":
        return cls(compression_ratio=tok.compression_ratio, pad_id=tok.pad_id,
                   encoder_pad_id=tok.encoder_pad_id, memory_id=tok.memory_id,
                   memory_start_id=tok.memory_start_id, **kw)


def shapes(cfg: BatchConfig) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    d = cfg.dims()
    return {k: (np.dtype(t), tuple(d[c] for c in dims)) for k, (t, dims) in SPEC.items()}


def check_batch(batch: dict, cfg: BatchConfig) -> None:
    for k, (dtype, shape) in shapes(cfg).items():
        a = batch[k]
        if a.dtype != dtype or a.shape != shape:
            raise AssertionError(f"{k}: {a.dtype}{list(a.shape)} != {dtype}{list(shape)}")


def collate(packs: list[dict[str, np.ndarray]], cfg: BatchConfig) -> TrainBatch:
    """Stacks ``batch_size`` packs (fewer are padded with empty rows) into a :class:`TrainBatch`."""
    from lclm_jax.lclm.windows import build_encoder_batch

    if len(packs) > cfg.batch_size:
        raise ValueError(f"{len(packs)} packs for batch_size={cfg.batch_size}")
    d = cfg.dims()
    B, S, NW, L, C, G = d["B"], d["S"], d["W"], d["L"], d["C"], d["G"]
    out = {k: np.zeros(shape, dtype) for k, (dtype, shape) in shapes(cfg).items()}
    out["input_ids"][:] = cfg.pad_id
    out["labels"][:] = IGNORE
    out["enc_input_ids"][:] = cfg.encoder_pad_id
    wcfg = cfg.window_config()
    for b, p in enumerate(packs):
        for k in ("input_ids", "labels", "segment_ids", "positions"):
            out[k][b] = p[k]
        ph = np.flatnonzero(p["input_ids"] == cfg.memory_id)
        if len(ph) > C:
            raise ValueError(f"{len(ph)} placeholders > max_latents={C}")
        out["placeholder_index"][b, :len(ph)] = ph
        out["placeholder_valid"][b, :len(ph)] = True
        lens = p["span_lens"]
        if len(lens):
            spans = np.split(p["enc_ids"], np.cumsum(lens)[:-1])
            eb = build_encoder_batch(spans, wcfg, cfg.encoder_pad_id, window_bucket=NW,
                                     length_bucket=L, latent_bucket=C)
            if eb.input_ids.shape[0] != NW or eb.pool_index.shape[0] != C:
                raise ValueError("pack exceeds max_windows / max_latents")
            if eb.num_latents != len(ph):
                raise ValueError(f"{eb.num_latents} latents but {len(ph)} placeholders")
            out["enc_input_ids"][b] = eb.input_ids
            out["enc_valid"][b] = eb.valid
            out["enc_positions"][b] = eb.positions
            out["pool_index"][b] = eb.pool_index
            out["pool_mask"][b] = eb.pool_mask
            out["latent_valid"][b] = eb.latent_valid
        seg = p["segment_ids"]
        out["num_tokens"][b] = np.count_nonzero(seg)
        out["num_supervised"][b] = np.count_nonzero(p["labels"] != IGNORE)
        out["num_enc_tokens"][b] = int(np.sum(lens))
        out["num_docs"][b] = len(p["kinds"])
        out["skipped"][b] = p["skipped"]
    return out  # type: ignore[return-value]


def device_arrays(batch: TrainBatch) -> dict[str, np.ndarray]:
    return {k: batch[k] for k in DEVICE_KEYS}


def to_global(batch: TrainBatch, mesh, batch_axes=("data", "fsdp")) -> dict:
    """Device keys as global ``jax.Array``s sharded over ``batch_axes`` on their leading dim.

    Every process passes its own ``B`` rows; the global batch has ``B * process_count`` rows
    (``jax.make_array_from_process_local_data``). Axes missing from ``mesh`` are ignored.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    axes = tuple(a for a in batch_axes if a in mesh.axis_names) or None
    out = {}
    for k in DEVICE_KEYS:
        a = batch[k]
        spec = PartitionSpec(axes, *([None] * (a.ndim - 1)))
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), a)
    return out


def to_model_inputs(batch: TrainBatch) -> dict:
    """The batch in ``lclm_jax.lclm.model.LCLMModel``'s layout: one flat encoder grid for all rows.

    ``encoder.input_ids [B*NW, L]`` (row ``b``'s windows first), ``pool_index [B*C, G]`` shifted
    into that grid, ``placeholder_index [B*C]`` flat into ``B*S`` (-1 = padded latent),
    ``span_ids``/``span_pos`` [B*C]: span number within the row and latent rank within the span
    (a span's placeholders are one contiguous run; span numbers are unique across rows; -1 / 0
    on padded latents).
    """
    B, NW, L = batch["enc_input_ids"].shape
    S, C = batch["input_ids"].shape[1], batch["placeholder_index"].shape[1]
    valid = batch["placeholder_valid"]
    ph = batch["placeholder_index"]
    new_run = np.ones_like(valid)
    new_run[:, 1:] = np.diff(ph, axis=1) != 1
    local = np.where(valid, np.cumsum(new_run & valid, axis=1) - 1, -1)
    offset = np.concatenate([[0], np.cumsum(local.max(axis=1) + 1)[:-1]])
    span_ids = np.where(valid, local + offset[:, None], -1)  # unique over the whole batch
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(C)[None], 0), axis=1)
    span_pos = np.where(valid, np.arange(C)[None] - run_start, 0)
    pidx = np.where(valid, batch["placeholder_index"] + (np.arange(B) * S)[:, None], -1)
    pool = batch["pool_index"] + (np.arange(B) * NW * L)[:, None, None]
    enc = {
        "input_ids": batch["enc_input_ids"].reshape(B * NW, L),
        "valid": batch["enc_valid"].reshape(B * NW, L),
        "positions": batch["enc_positions"].reshape(B * NW, L),
        "pool_index": np.where(batch["pool_mask"], pool, 0).reshape(B * C, -1).astype(np.int32),
        "pool_mask": batch["pool_mask"].reshape(B * C, -1),
        "span_ids": span_ids.reshape(-1).astype(np.int32),
        "span_pos": span_pos.reshape(-1).astype(np.int32),
    }
    return {"input_ids": batch["input_ids"], "labels": batch["labels"],
            "segment_ids": batch["segment_ids"], "positions": batch["positions"],
            "placeholder_index": pidx.reshape(-1).astype(np.int32), "encoder": enc}
