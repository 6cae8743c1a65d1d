"""Shared pieces of the data pipelines: tokenizers, the unpacked example format, skip reasons.

An *example* is one training document after a builder ran on it, before packing. It is a flat
dict of numpy arrays, so grain can move it between processes cheaply and ArrayRecord can store it:

=============== ============ =====================================================================
key             dtype/shape  meaning
=============== ============ =====================================================================
``input_ids``   int32[T]     decoder ids; every memory span is ``S + ceil(n/cr) x M + E``
``labels``      int32[T]     aligned with ``input_ids`` (the loss shifts); -100 = not supervised.
                             ``labels[0]`` is always -100, so once packed no label is predicted
                             from the previous document.
``enc_ids``     int32[N]     encoder ids of all spans, concatenated in span order
``span_lens``   int32[K]     encoder token count of each span (all > 0: empty spans are errors)
``kind``        int32[]      :data:`KIND_CPT`, :data:`KIND_RECON` or :data:`KIND_SFT`
``skip``        int32[]      -1 for a real example, else a :data:`SKIP_REASONS` index; a skipped
                             record travels as an empty example so that the packer can count it
                             (counts survive worker processes and checkpoints)
=============== ============ =====================================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

IGNORE = -100
KIND_CPT, KIND_RECON, KIND_SFT = 0, 1, 2
KIND_NAMES = ("cpt", "reconstruction", "sft")

SKIP_REASONS = (
    "empty",  # no text / no usable message
    "invalid_utf8",  # bytes that are not UTF-8
    "bad_format",  # not JSON, missing field, wrong type, no assistant turn
    "too_short",  # cannot satisfy the segment rules (e.g. < 2 x min_segment tokens)
    "too_long",  # over the character / token limit, or does not fit one pack
    "empty_span",  # a memory span would be empty (an error in this project)
)
NUM_SKIP_REASONS = len(SKIP_REASONS)

MEMORY_START = "<|memory_start|>"
MEMORY_END = "<|memory_end|>"
MEMORY = "<|memory|>"


class SkipRecord(Exception):
    """Raised by record parsing / builders; the record is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Tokenizers:
    """Decoder + encoder ``tokenizers.Tokenizer`` pair and the special ids the builders need.

    Picklable (``tokenizers.Tokenizer`` pickles through its JSON form), so builders holding it can
    run in grain worker processes.
    """

    decoder: Any
    encoder: Any
    compression_ratio: int

    def __post_init__(self):
        def need(tok, s):
            i = tok.token_to_id(s)
            if i is None:
                raise ValueError(f"decoder tokenizer has no {s!r} token")
            return int(i)

        self.memory_start_id = need(self.decoder, MEMORY_START)
        self.memory_end_id = need(self.decoder, MEMORY_END)
        self.memory_id = need(self.decoder, MEMORY)
        self.im_start_id = self.decoder.token_to_id("<|im_start|>")
        self.im_end_id = self.decoder.token_to_id("<|im_end|>")
        eos = self.decoder.token_to_id("<|endoftext|>")
        self.eos_id = int(eos) if eos is not None else 0
        self.pad_id = self.eos_id
        epad = self.encoder.token_to_id("<|endoftext|>")
        self.encoder_pad_id = int(epad) if epad is not None else 0
        if self.compression_ratio < 1:
            raise ValueError("compression_ratio must be >= 1")

    @classmethod
    def from_files(cls, decoder_json: str, encoder_json: str, compression_ratio: int):
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(decoder_json)), Tokenizer.from_file(str(encoder_json)),
                   int(compression_ratio))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str, compression_ratio: int | None = None):
        """Reads ``{decoder,encoder}/tokenizer.json`` (and the ratio from ``model_config.json``)."""
        import os

        if compression_ratio is None:
            with open(os.path.join(checkpoint_dir, "model_config.json")) as f:
                compression_ratio = json.load(f)["compression_ratio"]
        return cls.from_files(os.path.join(checkpoint_dir, "decoder", "tokenizer.json"),
                              os.path.join(checkpoint_dir, "encoder", "tokenizer.json"),
                              compression_ratio)

    # -- encoding helpers --------------------------------------------------------------------
    def decode_tokens(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Decoder ids of ``text`` and, per token, the char offset where it starts.

        A token that continues a character split across byte-level tokens repeats the previous
        token's start: such positions are not valid cut points (see :func:`cut_points_ok`).
        """
        enc = self.decoder.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, np.int32)
        starts = np.fromiter((o[0] for o in enc.offsets), np.int64, count=len(ids))
        return ids, starts

    def decoder_ids(self, text: str) -> np.ndarray:
        return np.asarray(self.decoder.encode(text, add_special_tokens=False).ids, np.int32)

    def encoder_ids(self, text: str) -> np.ndarray:
        return np.asarray(self.encoder.encode(text, add_special_tokens=False).ids, np.int32)

    def num_latents(self, n: int) -> int:
        return int(math.ceil(n / self.compression_ratio))


def valid_cuts(starts: np.ndarray) -> np.ndarray:
    """bool[T+1]: True where the text may be cut before token ``i`` (char boundary)."""
    ok = np.ones(len(starts) + 1, bool)
    if len(starts) > 1:
        ok[1:-1] = starts[1:] > starts[:-1]
    return ok


def snap_cuts(cuts: list[int], ok: np.ndarray) -> list[int]:
    """Moves each interior cut forward to the next valid boundary (keeps order, drops duplicates)."""
    out, n = [], len(ok) - 1
    for c in cuts:
        while c < n and not ok[c]:
            c += 1
        if out and c <= out[-1]:
            continue
        out.append(c)
    return out


# ----------------------------------------------------------------------------------------------
# Example construction
# ----------------------------------------------------------------------------------------------


class ExampleWriter:
    """Accumulates decoder pieces and memory spans; :meth:`finish` returns the example dict."""

    def __init__(self, tok: Tokenizers, kind: int):
        self.tok, self.kind = tok, kind
        self.ids: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.spans: list[np.ndarray] = []

    def text(self, ids, supervised: bool):
        ids = np.asarray(ids, np.int32)
        self.ids.append(ids)
        self.labels.append(ids.copy() if supervised else np.full(len(ids), IGNORE, np.int32))

    def span(self, enc_ids: np.ndarray):
        enc_ids = np.asarray(enc_ids, np.int32)
        if enc_ids.size == 0:
            raise SkipRecord("empty_span")
        n = self.tok.num_latents(len(enc_ids))
        t = self.tok
        ids = np.concatenate([[t.memory_start_id], np.full(n, t.memory_id), [t.memory_end_id]])
        self.ids.append(ids.astype(np.int32))
        self.labels.append(np.full(n + 2, IGNORE, np.int32))
        self.spans.append(enc_ids)

    def finish(self) -> dict[str, np.ndarray]:
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int32)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int32)
        if len(ids) == 0:
            raise SkipRecord("empty")
        labels[0] = IGNORE
        return make_example(ids, labels, self.spans, self.kind)


def make_example(ids, labels, spans, kind: int) -> dict[str, np.ndarray]:
    spans = [np.asarray(s, np.int32) for s in spans]
    return {
        "input_ids": np.asarray(ids, np.int32),
        "labels": np.asarray(labels, np.int32),
        "enc_ids": np.concatenate(spans) if spans else np.zeros(0, np.int32),
        "span_lens": np.asarray([len(s) for s in spans], np.int32),
        "kind": np.asarray(kind, np.int32),
        "skip": np.asarray(-1, np.int32),
    }


def skip_example(reason: str, kind: int = -1) -> dict[str, np.ndarray]:
    ex = make_example(np.zeros(0, np.int32), np.zeros(0, np.int32), [], kind)
    ex["skip"] = np.asarray(SKIP_REASONS.index(reason), np.int32)
    return ex


def split_spans(ex: dict[str, np.ndarray]) -> list[np.ndarray]:
    bounds = np.cumsum(ex["span_lens"])[:-1]
    return list(np.split(ex["enc_ids"], bounds)) if len(ex["span_lens"]) else []


def check_example(ex: dict[str, np.ndarray], tok: Tokenizers) -> None:
    """Raises ``AssertionError`` if an example breaks the format's invariants."""
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids.dtype == np.int32 and labels.shape == ids.shape
    assert labels[0] == IGNORE, "first label must be masked"
    special = np.isin(ids, [tok.memory_start_id, tok.memory_end_id, tok.memory_id])
    assert np.all(labels[special] == IGNORE), "memory tokens must not be supervised"
    sup = labels != IGNORE
    assert np.array_equal(labels[sup], ids[sup]), "labels must equal ids where supervised"
    starts = np.flatnonzero(ids == tok.memory_start_id)
    spans = split_spans(ex)
    assert len(starts) == len(spans) == len(ex["span_lens"])
    for s, span in zip(starts, spans):
        assert len(span) > 0, "empty memory span"
        n = tok.num_latents(len(span))
        assert np.all(ids[s + 1:s + 1 + n] == tok.memory_id) and ids[s + 1 + n] == tok.memory_end_id


# ----------------------------------------------------------------------------------------------
# Raw record parsing
# ----------------------------------------------------------------------------------------------


def as_str(value: Any) -> str:
    """``str`` from a str/bytes field; invalid UTF-8 raises :class:`SkipRecord`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipRecord("invalid_utf8", str(e)) from None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return as_str(value.item())
    if isinstance(value, str):
        # Lone surrogates (e.g. from a bad JSON escape) cannot be encoded: treat as invalid UTF-8.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SkipRecord("invalid_utf8", str(e)) from None
        return value
    raise SkipRecord("bad_format", f"expected text, got {type(value).__name__}")


def as_mapping(record: Any) -> dict:
    """A record as a dict: dicts pass through, bytes/str are parsed as JSON objects."""
    if isinstance(record, dict):
        return record
    text = as_str(record)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SkipRecord("bad_format", f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SkipRecord("bad_format", "JSON record is not an object")
    return obj


def get_text(record: Any, field: str | None = "text", max_chars: int | None = None) -> str:
    """The document text of a record (``field=None``: the record itself is the text)."""
    if field is None:
        text = as_str(record)
    else:
        rec = as_mapping(record)
        if field not in rec:
            raise SkipRecord("bad_format", f"missing field {field!r}")
        text = as_str(rec[field])
    if max_chars is not None and len(text) > max_chars:
        raise SkipRecord("too_long", f"{len(text)} chars")
    if not text.strip():
        raise SkipRecord("empty")
    return text
