"""Small, offline helpers for tests, benchmarks and demos: tiny tokenizers and synthetic records."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from data_pipelines.common import Tokenizers

_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_CHECKPOINT = _ROOT / "tests" / "fixtures" / "lclm_golden" / "mean_causal_cr4_w16" / "checkpoint"

_WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "or has had not but have they their one all been its who new after also first two time "
    "memory latent context encoder decoder window span token compression model data pipeline "
    "river mountain city quantum protein market theory history music language number system"
).split()
_EXOTIC = ["héllo", "naïve", "日本語", "😀", "Ωmega", "straße", "–", "«quote»", "tab\there", "x\n\ny"]


def tiny_tokenizers(compression_ratio: int = 4, chat: bool = True,
                    checkpoint: str | os.PathLike = FIXTURE_CHECKPOINT) -> Tokenizers:
    """The golden fixture's byte-level BPE pair; ``chat`` adds ``<|im_start|>``/``<|im_end|>``.

    Decoder: ``<|endoftext|>`` 0 (eos = pad), memory tokens 509/510/511, and with ``chat`` the
    two chat tokens at 512/513.
    """
    from tokenizers import AddedToken, Tokenizer

    dec = Tokenizer.from_file(str(pathlib.Path(checkpoint) / "decoder" / "tokenizer.json"))
    enc = Tokenizer.from_file(str(pathlib.Path(checkpoint) / "encoder" / "tokenizer.json"))
    if chat:
        dec.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False),
                                AddedToken("<|im_end|>", special=True, normalized=False)])
    return Tokenizers(dec, enc, compression_ratio)


def save_tokenizers(tok: Tokenizers, directory: str | os.PathLike) -> tuple[str, str]:
    """Writes ``decoder.json``/``encoder.json`` (for CLI tools and worker processes)."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.decoder.save(str(d / "decoder.json"))
    tok.encoder.save(str(d / "encoder.json"))
    return str(d / "decoder.json"), str(d / "encoder.json")


def random_text(rng: np.random.Generator, n_words: int, exotic: float = 0.02) -> str:
    """Word salad with punctuation, newlines and some multi-byte characters."""
    words = rng.choice(_WORDS, size=n_words)
    out = []
    for i, w in enumerate(words):
        if rng.random() < exotic:
            w = _EXOTIC[int(rng.integers(len(_EXOTIC)))]
        out.append(w)
        r = rng.random()
        out.append(". " if r < 0.05 else ",\n" if r < 0.07 else "\n\n" if r < 0.08 else " ")
    return "".join(out).strip()


def random_documents(n: int, seed: int = 0, words: tuple[int, int] = (50, 4000)) -> list[dict]:
    """``n`` ``{"text": ...}`` records with log-uniform word counts in ``words``."""
    rng = np.random.default_rng(seed)
    lo, hi = np.log(words[0]), np.log(words[1])
    return [{"text": random_text(rng, int(np.exp(rng.uniform(lo, hi))))} for _ in range(n)]


def random_chats(n: int, seed: int = 0, max_turns: int = 2) -> list[dict]:
    """``n`` chat records ``{"messages": [...]}`` (optional system, user/assistant turns)."""
    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": random_text(rng, 8)})
        for _ in range(int(rng.integers(1, max_turns + 1))):
            msgs.append({"role": "user", "content": random_text(rng, int(rng.integers(5, 400)))})
            msgs.append({"role": "assistant", "content": random_text(rng, int(rng.integers(3, 80)))})
        recs.append({"messages": msgs})
    return recs


def bad_records() -> list:
    """One record of each kind the builders must skip (and count) instead of crashing."""
    return [
        {"text": ""},
        {"text": "   \n "},
        b'{"text": "\xff\xfe broken"}',
        b"\xff\xfe not utf8 at all",
        {"txt": "wrong field"},
        {"text": 12345},
        "not json {",
        b'["a", "list"]',
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "<|memory_start|><|memory_end|> q"},
                      {"role": "assistant", "content": "a"}]},  # empty span
        {"text": "word " * 400_000},  # huge: over max_chars in the tests' configs
        {"text": "\ud800 lone surrogate"},
    ]


def jsonl_lines(records: list) -> bytes:
    """Records as JSONL bytes; bytes/str records are written as they are (to test bad lines)."""
    out = []
    for r in records:
        if isinstance(r, bytes):
            out.append(r)
        elif isinstance(r, str):
            out.append(r.encode("utf-8", "surrogatepass"))
        else:
            out.append(json.dumps(r).encode("utf-8", "surrogatepass"))
    return b"\n".join(out) + b"\n"
