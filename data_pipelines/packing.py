"""Packing examples (decoder tokens + their encoder spans) into fixed-length rows.

A *pack* is one decoder row of ``seq_len`` tokens holding whole examples, plus the encoder spans
those examples reference, with three budgets checked together:

* decoder tokens ``<= seq_len``;
* encoder windows ``<= max_windows`` (a span of ``n`` encoder tokens needs ``ceil(n / W)``);
* latents (``<|memory|>`` placeholders) ``<= max_latents``.

Pack dict (decoder fields padded to ``seq_len``, encoder fields ragged):

=============== ============ ================================================================
``input_ids``   int32[S]     example ids back to back, then ``pad_id``
``labels``      int32[S]     the examples' labels (each starts with -100), -100 on padding
``segment_ids`` int32[S]     1, 2, ... per example, 0 on padding
``positions``   int32[S]     0, 1, ... restarting at every example, 0 on padding
``enc_ids``     int32[N]     encoder ids of all spans, in order
``span_lens``   int32[K]     tokens per span
``kinds``       int32[D]     example kind per segment
``skipped``     int32[R]     records skipped (per :data:`SKIP_REASONS`) since the previous pack
=============== ============ ================================================================

Labels stay aligned with ``input_ids`` (the loss shifts by one). Because every example's first
label is -100, the prediction made at the last token of one example never targets the next one
(the reference packer leaks there, spec §7.4). Padding has label -100 and segment 0, and is never
counted as a token.

:class:`PackIterDataset` is a first-fit packer over ``num_bins`` open rows: an example goes into
the first row with room; when it fits in none, all open rows are emitted (in order) and it opens
the next group. Examples that cannot fit an empty row are skipped and counted (``too_long``).
Its state is the parent's state at the start of the current group plus the number of rows of
that group already emitted, so a restore re-packs the group identically (exact resume).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from data_pipelines.common import IGNORE, NUM_SKIP_REASONS, SKIP_REASONS


@dataclasses.dataclass(frozen=True)
class PackConfig:
    seq_len: int = 16384
    max_windows: int = 128
    window_size: int = 1024
    compression_ratio: int = 16
    max_latents: int | None = None  # default: min(seq_len, max_windows * window_size / cr)
    num_bins: int = 8
    pad_id: int = 0
    # Records skipped in a row (no example packed in between) before the packer gives up with
    # :class:`NothingFitsError` instead of pulling from an endless (repeated) stream forever.
    max_skips_in_a_row: int = 2000

    @property
    def latent_budget(self) -> int:
        if self.max_latents is not None:
            return self.max_latents
        return min(self.seq_len, self.max_windows * self.window_size // self.compression_ratio)


def example_cost(ex: dict[str, np.ndarray], cfg: PackConfig) -> tuple[int, int, int]:
    """(decoder tokens, encoder windows, latents) an example takes in a pack."""
    lens = ex["span_lens"].astype(np.int64)
    windows = int(np.sum(-(-lens // cfg.window_size)))
    latents = int(np.sum(-(-lens // cfg.compression_ratio)))
    return len(ex["input_ids"]), windows, latents


def pack_examples(examples: list[dict[str, np.ndarray]], cfg: PackConfig,
                  skipped: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Concatenates examples into one pack (the caller checked the budgets)."""
    S = cfg.seq_len
    ids = np.full(S, cfg.pad_id, np.int32)
    labels = np.full(S, IGNORE, np.int32)
    seg = np.zeros(S, np.int32)
    pos = np.zeros(S, np.int32)
    off = 0
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if off + n > S:
            raise ValueError(f"examples need more than seq_len={S} tokens")
        ids[off:off + n] = ex["input_ids"]
        labels[off:off + n] = ex["labels"]
        labels[off] = IGNORE  # also for examples not made by our builders
        seg[off:off + n] = i + 1
        pos[off:off + n] = np.arange(n, dtype=np.int32)
        off += n
    cat = lambda k: (np.concatenate([e[k] for e in examples]).astype(np.int32)  # noqa: E731
                     if examples else np.zeros(0, np.int32))
    return {
        "input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos,
        "enc_ids": cat("enc_ids"), "span_lens": cat("span_lens"),
        "kinds": np.asarray([int(e["kind"]) for e in examples], np.int32),
        "skipped": (np.zeros(NUM_SKIP_REASONS, np.int32) if skipped is None
                    else np.asarray(skipped, np.int32)),
    }


def unpack(pack: dict[str, np.ndarray], memory_start_id: int) -> list[dict[str, np.ndarray]]:
    """Inverse of :func:`pack_examples`: the examples of a pack (``skip`` = -1)."""
    from data_pipelines.common import make_example

    lens = pack["span_lens"]
    spans = np.split(pack["enc_ids"], np.cumsum(lens)[:-1]) if len(lens) else []
    out, span_i = [], 0
    for d, kind in enumerate(pack["kinds"]):
        sel = pack["segment_ids"] == d + 1
        ids = pack["input_ids"][sel]
        k = int(np.sum(ids == memory_start_id))
        out.append(make_example(ids, pack["labels"][sel], spans[span_i:span_i + k], int(kind)))
        span_i += k
    return out


class NothingFitsError(RuntimeError):
    """Every record of a long run was skipped: the pipeline would never emit a batch."""


_HINTS = {
    "too_long": ("examples exceed a pack's budgets: raise seq_len / max_windows / max_latents, or "
                 "shorten the examples (cpt: max_document_tokens with long_document_policy="
                 "'truncate'; reconstruction: max_span_tokens; sft: shorter chats)"),
    "too_short": ("documents are shorter than the builder's minimum: lower cpt "
                  "min_segment_tokens (a document needs 2 x that many tokens) or reconstruction "
                  "min_span_tokens via the stream options, or use longer documents"),
    "empty": "records have no text / messages: check the source and the builder's text_field",
    "bad_format": ("records do not parse (JSON, fields, roles, an assistant turn): check the "
                   "source format and the builder options (text_field, ...)"),
    "invalid_utf8": "records are not valid UTF-8: check the source encoding",
    "empty_span": "memory spans come out empty: check the tagged spans in the records",
}


def nothing_fits_message(in_a_row: int, skipped: np.ndarray, cfg: PackConfig,
                         smallest: np.ndarray | None = None) -> str:
    counts = {r: int(c) for r, c in zip(SKIP_REASONS, skipped) if c}
    top = max(counts, key=counts.get) if counts else "too_long"
    msg = (f"{in_a_row} records in a row were skipped and nothing was packed "
           f"(skip reasons: {counts}); the pipeline would never produce a batch. Most are "
           f"{top!r}: {_HINTS[top]}. Pack budgets: seq_len={cfg.seq_len}, "
           f"max_windows={cfg.max_windows} x window_size={cfg.window_size}, "
           f"latents={cfg.latent_budget}.")
    if smallest is not None and top == "too_long":
        msg += (f" The shortest example skipped as too long needed (decoder tokens, windows, "
                f"latents) = {tuple(int(x) for x in smallest)}.")
    return msg + " (PackConfig.max_skips_in_a_row sets this limit.)"


class PackIterDataset(grain.IterDataset):
    """First-fit packer over example dicts (and skip markers); see the module docstring."""

    def __init__(self, parent: grain.IterDataset, config: PackConfig, memory_start_id: int):
        super().__init__(parent)
        self.config, self.memory_start_id = config, int(memory_start_id)

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self.config, self.memory_start_id)

    def __str__(self):
        return f"PackIterDataset(seq_len={self.config.seq_len}, bins={self.config.num_bins})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent, cfg: PackConfig, memory_start_id: int):
        super().__init__(parent)
        self.cfg, self.memory_start_id = cfg, memory_start_id
        self._group_state = self._parent.get_state()
        self._emitted = 0
        self._rows: list[dict] | None = None  # packed rows of the current group
        self._carry = None  # (example, parent state before it) that opened the next group
        self._exhausted = False

    def _fill(self):
        """Builds the current group's rows by pulling from the parent."""
        cfg = self.cfg
        budgets = np.array([cfg.seq_len, cfg.max_windows, cfg.latent_budget])
        bins: list[list[dict]] = []
        used: list[np.ndarray] = []
        skipped = np.zeros(NUM_SKIP_REASONS, np.int32)
        too_long = SKIP_REASONS.index("too_long")
        next_carry = None
        in_a_row, smallest = 0, None
        while True:
            if in_a_row >= cfg.max_skips_in_a_row > 0:
                raise NothingFitsError(nothing_fits_message(in_a_row, skipped, cfg, smallest))
            if self._carry is not None:
                ex, before = self._carry
                self._carry = None
            else:
                before = self._parent.get_state()
                try:
                    ex = next(self._parent)
                except StopIteration:
                    self._exhausted = True
                    break
            if int(ex["skip"]) >= 0:
                skipped[int(ex["skip"])] += 1
                in_a_row += 1
                continue
            cost = np.array(example_cost(ex, cfg))
            if np.any(cost > budgets) or cost[0] == 0:
                skipped[too_long] += 1
                in_a_row += 1
                if cost[0] > 0 and (smallest is None or cost[0] < smallest[0]):
                    smallest = cost
                continue
            in_a_row = 0
            for b in range(len(bins)):
                if np.all(used[b] + cost <= budgets):
                    bins[b].append(ex)
                    used[b] += cost
                    break
            else:
                if len(bins) < cfg.num_bins:
                    bins.append([ex])
                    used.append(cost.copy())
                else:
                    next_carry = (ex, before)
                    break
        rows = []
        for i, b in enumerate(bins):
            rows.append(pack_examples(b, cfg, skipped if i == 0 else None))
        if not rows and skipped.any():  # only skipped records left: report them on an empty row
            rows.append(pack_examples([], cfg, skipped))
        return rows, next_carry

    def __next__(self):
        while self._rows is None or self._emitted >= len(self._rows):
            if self._rows is not None:  # move on to the next group
                if self._carry is None and self._exhausted:
                    raise StopIteration
                self._group_state = (self._carry[1] if self._carry is not None
                                     else self._parent.get_state())
                self._emitted = 0
            elif self._exhausted:
                raise StopIteration
            self._rows, self._carry = self._fill()
            if not self._rows:
                raise StopIteration
        row = self._rows[self._emitted]
        self._emitted += 1
        return row

    def get_state(self) -> dict[str, Any]:
        if self._rows is not None and self._emitted >= len(self._rows):
            # Group finished: the next group starts at the carried example (or the parent's
            # current position).
            start = self._carry[1] if self._carry is not None else self._parent.get_state()
            return {"parent": start, "emitted": 0}
        return {"parent": self._group_state, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]):
        self._parent.set_state(state["parent"])
        self._group_state = state["parent"]
        self._rows, self._carry, self._exhausted = None, None, False
        self._emitted = 0
        if state["emitted"]:
            self._rows, self._carry = self._fill()
            self._emitted = int(state["emitted"])
