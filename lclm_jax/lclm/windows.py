"""Host-side encoder windowing with static shapes.

Every memory span (encoder token ids) is cut into windows of ``W`` pool tokens. A window row is

    left context (``O`` tokens before the pool, none for a span's first window)
    + pool tokens (up to ``W``)
    + right context (up to ``O`` tokens after the pool; bidirectional encoders only, never past the span)
    + eos markers (``pooling="eos"`` only: one encoder-pad token per latent of the window)

Windows of all spans are stacked in span order, then window order, into one ``[NW, L]`` grid.
Rows are padded on the **right** (real tokens first). The device applies explicit key masks and the
``positions`` computed here, so the padding side does not change results; right padding keeps every
index simple. Positions count ``0, 1, ...`` from the first real token of each row (the first left-context
token), so pool tokens of a later window start at position ``O``.

Each latent pools a group of tokens given as flat indices into the ``[NW * L]`` grid:

* ``mean`` / ``concat``: ``cr`` consecutive pool tokens (overlap and markers are never pooled); a
  window's last group may be short, its missing members have ``pool_mask`` False. ``mean`` averages the
  present members; ``concat`` flattens them row-major and zero-fills to ``cr * H``.
* ``eos``: the single marker token of that latent (``G = 1``).

A window of ``n`` pool tokens yields ``ceil(n / cr)`` latents, so a span of ``T`` tokens yields
``ceil(T / cr)`` (``W`` is a multiple of ``cr``). **An empty span is an error**, the same rule as the
processor. Windows, row length and latents can be padded to buckets so shapes repeat across calls;
padded windows are all padding, padded latents have an all-False ``pool_mask``.

``pool_numpy`` is the executable specification of the device-side pooling.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

POOLINGS = ("mean", "concat", "eos")


@dataclasses.dataclass(frozen=True)
class WindowConfig:
    compression_ratio: int
    window_size: int
    overlap: int = 0
    bidirectional: bool = False
    pooling: str = "mean"

    def __post_init__(self):
        cr, w, o = self.compression_ratio, self.window_size, self.overlap
        if not isinstance(cr, (int, np.integer)) or cr < 1:
            raise ValueError(f"compression_ratio must be a positive integer, got {cr!r}")
        if not isinstance(w, (int, np.integer)) or w < 1:
            raise ValueError(f"window_size must be a positive integer, got {w!r}")
        if w % cr:
            raise ValueError(f"window_size ({w}) must be a multiple of compression_ratio ({cr})")
        if not isinstance(o, (int, np.integer)) or o < 0:
            raise ValueError(f"overlap must be a non-negative integer, got {o!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    @property
    def right_overlap(self) -> int:
        """Right context exists only for bidirectional encoders."""
        return self.overlap if self.bidirectional else 0

    @property
    def group_size(self) -> int:
        """Members per latent in ``pool_index``: ``cr`` for mean/concat, 1 for eos."""
        return 1 if self.pooling == "eos" else self.compression_ratio


@dataclasses.dataclass(frozen=True, eq=False)
class EncoderBatch:
    input_ids: np.ndarray  # int32[NW, L], encoder pad id on padding
    valid: np.ndarray  # bool[NW, L], real tokens (eos markers included)
    positions: np.ndarray  # int32[NW, L], 0.. on real tokens, 0 on padding
    pool_index: np.ndarray  # int32[C, G], flat indices into the [NW*L] grid
    pool_mask: np.ndarray  # bool[C, G]
    latent_valid: np.ndarray  # bool[C]
    span_latent_counts: tuple  # latents per span, in order
    num_windows: int  # real windows (rows after these are padding)
    num_latents: int  # real latents (rows after these are padding)


def num_latents(span_len: int, cr: int) -> int:
    """Latents for ``span_len`` encoder tokens: ``ceil(span_len / cr)``; ``span_len`` must be > 0."""
    if span_len <= 0:
        raise ValueError(f"span length must be positive (empty spans are not allowed), got {span_len}")
    return -(-int(span_len) // int(cr))


def default_length(cfg: WindowConfig) -> int:
    """Longest possible window row: ``W + O + right O (+ W/cr eos markers)``; a natural static bucket."""
    markers = cfg.window_size // cfg.compression_ratio if cfg.pooling == "eos" else 0
    return cfg.window_size + cfg.overlap + cfg.right_overlap + markers


def _round_up(n: int, bucket: int | None) -> int:
    if bucket is None:
        return n
    if bucket < 1:
        raise ValueError(f"bucket sizes must be positive, got {bucket}")
    return math.ceil(max(n, 1) / bucket) * bucket


def _plan_windows(spans, cfg: WindowConfig):
    """Yields (span_index, token_ids_of_row, pool_start, pool_len, n_latents) per window."""
    W, O, R, cr = cfg.window_size, cfg.overlap, cfg.right_overlap, cfg.compression_ratio
    for j, span in enumerate(spans):
        ids = np.asarray(span).reshape(-1).astype(np.int32)
        T = ids.size
        if T == 0:
            raise ValueError(f"span {j} is empty; empty memory spans are not allowed")
        for offset in range(0, T, W):
            pool_end = min(T, offset + W)
            left = max(0, offset - O)
            right = min(T, pool_end + R)
            yield j, ids[left:right], offset - left, pool_end - offset, num_latents(pool_end - offset, cr)


def build_encoder_batch(
    spans: list,
    cfg: WindowConfig,
    pad_id: int,
    *,
    window_bucket: int | None = None,
    length_bucket: int | None = None,
    latent_bucket: int | None = None,
) -> EncoderBatch:
    """Window grid + pooling indices for all ``spans`` (1-D int arrays of encoder ids).

    ``window_bucket`` / ``latent_bucket`` pad the window / latent counts up to a multiple (at least one
    bucket); ``length_bucket`` is the exact row length ``L`` (default: longest row rounded up to 8).
    """
    plan = list(_plan_windows(spans, cfg))
    eos = cfg.pooling == "eos"
    lengths = [len(toks) + (n if eos else 0) for _, toks, _, _, n in plan]
    longest = max(lengths, default=0)
    if length_bucket is None:
        L = max(8, math.ceil(longest / 8) * 8)
    else:
        if length_bucket < longest:
            raise ValueError(f"length_bucket={length_bucket} is shorter than the longest window ({longest})")
        L = int(length_bucket)
    nw_real = len(plan)
    nw = _round_up(nw_real, window_bucket)
    c_real = sum(n for *_, n in plan)
    c = _round_up(c_real, latent_bucket)
    G = cfg.group_size

    input_ids = np.full((nw, L), pad_id, np.int32)
    valid = np.zeros((nw, L), bool)
    positions = np.zeros((nw, L), np.int32)
    pool_index = np.zeros((c, G), np.int32)
    pool_mask = np.zeros((c, G), bool)
    counts = [0] * len(spans)
    latent = 0
    for w, (j, toks, pool_start, pool_len, n) in enumerate(plan):
        length = lengths[w]
        input_ids[w, : len(toks)] = toks
        valid[w, :length] = True
        positions[w, :length] = np.arange(length, dtype=np.int32)
        base = w * L
        if eos:  # markers already pad_id; one per latent, after the right context
            pool_index[latent : latent + n, 0] = base + len(toks) + np.arange(n)
            pool_mask[latent : latent + n, 0] = True
        else:
            k = np.arange(n * G)  # member k of the window's pool region
            present = k < pool_len
            pool_index[latent : latent + n] = np.where(present, base + pool_start + k, 0).reshape(n, G)
            pool_mask[latent : latent + n] = present.reshape(n, G)
        counts[j] += n
        latent += n
    latent_valid = np.zeros((c,), bool)
    latent_valid[:c_real] = True
    return EncoderBatch(
        input_ids=input_ids,
        valid=valid,
        positions=positions,
        pool_index=pool_index,
        pool_mask=pool_mask,
        latent_valid=latent_valid,
        span_latent_counts=tuple(counts),
        num_windows=nw_real,
        num_latents=c_real,
    )


def pool_numpy(hidden: np.ndarray, batch: EncoderBatch, pooling: str) -> np.ndarray:
    """Reference pooling of encoder hidden states ``[NW, L, H]`` -> ``[C, H]`` (``[C, cr*H]`` concat).

    mean: average of the present group members; concat: members flattened row-major, zero-filled;
    eos: the marker's hidden state. Padded latent rows are zero.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    nw, L, H = hidden.shape
    if (nw, L) != batch.input_ids.shape:
        raise ValueError(
            f"hidden states {hidden.shape[:2]} do not match the window grid {batch.input_ids.shape}"
        )
    if pooling == "eos" and batch.pool_index.shape[1] != 1:
        raise ValueError(
            f"pooling 'eos' does not match a batch built with group size {batch.pool_index.shape[1]}"
        )
    flat = hidden.reshape(nw * L, H)
    m = batch.pool_mask[..., None].astype(hidden.dtype)
    members = flat[batch.pool_index] * m  # [C, G, H]
    if pooling == "mean":
        return members.sum(1) / np.maximum(m.sum(1), 1)
    if pooling == "concat":
        return members.reshape(members.shape[0], -1)
    return members[:, 0]
