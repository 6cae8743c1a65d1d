"""Host-side LCLM prompt processing: memory spans -> decoder ids with latent placeholders.

A prompt marks text to be compressed with ``<|memory_start|>...<|memory_end|>`` (any number of spans,
any text before, between and after them). Each span's content is kept verbatim (whitespace included),
encoded with the *encoder* tokenizer without special tokens, and replaced in the prompt by
``<|memory_start|>`` + ``ceil(T / cr)`` x ``<|memory|>`` + ``<|memory_end|>``. The expanded text is then
encoded with the *decoder* tokenizer and the placeholder ranges are located and verified. A memory
position is the half-open range ``(start, end)`` of the ``<|memory|>`` ids: ``start`` is the index
after ``<|memory_start|>``, ``end`` the index of ``<|memory_end|>``.

Input rules (violations raise :class:`PromptError`, a ``ValueError``, naming the character offset):

* tags must be balanced and not nested;
* the literal strings ``<|memory|>``, ``<|memory_start|>``, ``<|memory_end|>`` may appear only as the
  span delimiters: a stray ``<|memory|>`` would be read as a latent placeholder, tags inside a span or
  inside a training target would be misparsed;
* **an empty span is an error** (``<|memory_start|><|memory_end|>``, or content that encodes to zero
  encoder tokens). This is the one rule used throughout lclm-jax (the window builder enforces the same);
  the reference gives such a span zero placeholders and fails later inside the model;
* a span longer than ``max_span_tokens`` encoder tokens is an error when that limit is set.

Everything here is numpy + ``tokenizers``; no device code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Sequence

import numpy as np
import tokenizers

IGNORE_INDEX = -100
MEMORY_START = "<|memory_start|>"
MEMORY_END = "<|memory_end|>"
MEMORY = "<|memory|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
CHAT_ROLES = ("system", "user", "assistant", "tool")


class PromptError(ValueError):
    """A prompt, target or chat message that cannot be processed; the message says what and where."""


@dataclasses.dataclass(frozen=True, eq=False)
class ProcessedPrompt:
    """One processed prompt. ``labels`` is None unless built for training (sft / cpt / chat)."""

    input_ids: np.ndarray  # int32[S]
    span_ids: list  # list[int32[T_j]] encoder ids per span
    memory_positions: list  # list[(start, end)] half-open placeholder ranges
    latent_counts: list  # list[int], ceil(T_j / cr)
    labels: np.ndarray | None = None  # int32[S], IGNORE_INDEX where not supervised


@dataclasses.dataclass(frozen=True)
class _Span:
    content: str
    start: int  # char offset of the <|memory_start|> tag
    content_start: int  # char offset of the first content character


def _token_name(value) -> str | None:
    """A tokenizer_config.json special-token entry is a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: pathlib.Path) -> dict:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class LCLMProcessor:
    """Turns prompts with memory spans into decoder ids, encoder span ids and placeholder positions."""

    def __init__(
        self,
        decoder_tokenizer: tokenizers.Tokenizer,
        encoder_tokenizer: tokenizers.Tokenizer,
        compression_ratio: int,
        max_span_tokens: int | None = None,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        encoder_pad_token: str | None = None,
        source: str = "decoder tokenizer",
    ):
        if int(compression_ratio) < 1:
            raise ValueError(f"compression_ratio must be a positive integer, got {compression_ratio!r}")
        if max_span_tokens is not None and int(max_span_tokens) < 1:
            raise ValueError(f"max_span_tokens must be positive or None, got {max_span_tokens!r}")
        self.decoder_tokenizer = decoder_tokenizer
        self.encoder_tokenizer = encoder_tokenizer
        self.compression_ratio = int(compression_ratio)
        self.max_span_tokens = None if max_span_tokens is None else int(max_span_tokens)

        def required(tok: str) -> int:
            tid = decoder_tokenizer.token_to_id(tok)
            if tid is None:
                raise ValueError(
                    f"{source} has no {tok} token; an LCLM decoder tokenizer must contain "
                    f"{MEMORY_START}, {MEMORY_END} and {MEMORY}"
                )
            return tid

        self.memory_start_id = required(MEMORY_START)
        self.memory_end_id = required(MEMORY_END)
        self.memory_id = required(MEMORY)
        self.eos_id = self._first_id(decoder_tokenizer, [eos_token, IM_END, ENDOFTEXT], "eos", source)
        self.pad_id = self._first_id(decoder_tokenizer, [pad_token], "pad", source, default=self.eos_id)
        self.encoder_pad_id = self._first_id(
            encoder_tokenizer, [encoder_pad_token, ENDOFTEXT], "pad", "encoder tokenizer"
        )
        self.im_end_id = decoder_tokenizer.token_to_id(IM_END)
        self.stop_ids = {self.eos_id} | ({self.im_end_id} if self.im_end_id is not None else set())
        self._tag_re = re.compile("|".join(re.escape(t) for t in (MEMORY_START, MEMORY_END, MEMORY)))

    @staticmethod
    def _first_id(tok, names, what, source, default=None) -> int:
        """First of ``names`` in the vocabulary; ``names[0]`` is the configured one and must exist."""
        if names[0] is not None and tok.token_to_id(names[0]) is None:
            raise ValueError(f"{source}: configured {what} token {names[0]!r} is not in the vocabulary")
        for name in names:
            if name is not None and tok.token_to_id(name) is not None:
                return tok.token_to_id(name)
        if default is not None:
            return default
        tried = ", ".join(n for n in names if n)
        raise ValueError(f"{source}: no {what} token found (tried {tried})")

    @classmethod
    def from_checkpoint(cls, path, compression_ratio: int | None = None, **kw) -> "LCLMProcessor":
        """Load ``path/{decoder,encoder}/tokenizer.json``; cr from ``model_config.json`` unless given."""
        root = pathlib.Path(path)
        dec_file, enc_file = root / "decoder" / "tokenizer.json", root / "encoder" / "tokenizer.json"
        for f in (dec_file, enc_file):
            if not f.exists():
                raise FileNotFoundError(f"missing tokenizer file {f}")
        if compression_ratio is None:
            for name in ("model_config.json", "processor_config.json"):
                compression_ratio = _read_json(root / name).get("compression_ratio")
                if compression_ratio is not None:
                    break
            else:
                raise ValueError(f"no compression_ratio in {root / 'model_config.json'} and none given")
        dec_cfg = _read_json(root / "decoder" / "tokenizer_config.json")
        enc_cfg = _read_json(root / "encoder" / "tokenizer_config.json")
        kw.setdefault("eos_token", _token_name(dec_cfg.get("eos_token")))
        kw.setdefault("pad_token", _token_name(dec_cfg.get("pad_token")))
        kw.setdefault("encoder_pad_token", _token_name(enc_cfg.get("pad_token")))
        kw.setdefault("source", str(dec_file))
        return cls(
            tokenizers.Tokenizer.from_file(str(dec_file)),
            tokenizers.Tokenizer.from_file(str(enc_file)),
            int(compression_ratio),
            **kw,
        )

    # ------------------------------------------------------------------ parsing and expansion

    def _parse(self, prompt: str) -> list[_Span]:
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be a str, got {type(prompt).__name__}")
        spans, open_at = [], None
        for m in self._tag_re.finditer(prompt):
            tag, pos = m.group(0), m.start()
            if tag == MEMORY_START:
                if open_at is not None:
                    raise PromptError(
                        f"nested {MEMORY_START} at character {pos}: the span opened at character "
                        f"{open_at} is not closed (spans cannot be nested)"
                    )
                open_at, content_start = pos, m.end()
            elif tag == MEMORY_END:
                if open_at is None:
                    raise PromptError(f"{MEMORY_END} at character {pos} without a matching {MEMORY_START}")
                content = prompt[content_start:pos]
                if not content:
                    raise PromptError(
                        f"empty memory span at character {open_at} ({MEMORY_START}{MEMORY_END}); "
                        "empty spans are not allowed"
                    )
                spans.append(_Span(content, open_at, content_start))
                open_at = None
            else:
                where = f"inside the span opened at character {open_at}" if open_at is not None else (
                    "outside any span (it would be read as a latent placeholder)"
                )
                raise PromptError(f"literal {MEMORY} at character {pos} {where}; it is a reserved token")
        if open_at is not None:
            raise PromptError(f"{MEMORY_START} at character {open_at} has no matching {MEMORY_END}")
        return spans

    def _expand(self, prompt: str):
        """Returns (expanded_text, span_ids, latent_counts)."""
        spans = self._parse(prompt)
        pieces, span_ids, counts, cursor = [], [], [], 0
        for sp in spans:
            ids = np.asarray(
                self.encoder_tokenizer.encode(sp.content, add_special_tokens=False).ids, np.int32
            )
            if ids.size == 0:
                raise PromptError(f"memory span at character {sp.start} encodes to zero encoder tokens")
            if self.max_span_tokens is not None and ids.size > self.max_span_tokens:
                raise PromptError(
                    f"memory span at character {sp.start} has {ids.size} encoder tokens, more than "
                    f"max_span_tokens={self.max_span_tokens}"
                )
            n = math.ceil(ids.size / self.compression_ratio)
            pieces += [prompt[cursor : sp.start], MEMORY_START, MEMORY * n, MEMORY_END]
            cursor = sp.content_start + len(sp.content) + len(MEMORY_END)
            span_ids.append(ids)
            counts.append(n)
        pieces.append(prompt[cursor:])
        return "".join(pieces), span_ids, counts

    def _locate(self, ids: np.ndarray, counts: Sequence[int]) -> list[tuple[int, int]]:
        starts = np.flatnonzero(ids == self.memory_start_id)
        if len(starts) != len(counts):
            raise PromptError(
                f"expected {len(counts)} {MEMORY_START} tokens after tokenisation, found {len(starts)}"
            )
        if int((ids == self.memory_id).sum()) != sum(counts):
            raise PromptError(f"expected {sum(counts)} {MEMORY} tokens after tokenisation")
        positions = []
        for k, (s0, n) in enumerate(zip(starts, counts)):
            s, e = int(s0) + 1, int(s0) + 1 + n
            if e >= len(ids) or ids[e] != self.memory_end_id or not np.all(ids[s:e] == self.memory_id):
                raise PromptError(f"span {k}: tokenised placeholders at {s}..{e} do not match {n} latents")
            positions.append((s, e))
        return positions

    def _check_target(self, target: str) -> None:
        if not isinstance(target, str):
            raise PromptError(f"target must be a str, got {type(target).__name__}")
        m = self._tag_re.search(target)
        if m:
            raise PromptError(
                f"target contains the reserved token {m.group(0)} at character {m.start()}; "
                "memory spans are only allowed in the prompt"
            )

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.decoder_tokenizer.encode(text).ids, np.int32)

    # ------------------------------------------------------------------ single prompts

    def process(self, prompt: str) -> ProcessedPrompt:
        """Inference prompt (no chat template applied)."""
        expanded, span_ids, counts = self._expand(prompt)
        ids = self._encode(expanded)
        return ProcessedPrompt(ids, span_ids, self._locate(ids, counts), counts, None)

    def process_sft(self, prompt: str, target: str) -> ProcessedPrompt:
        """Prompt + target tokenised together; labels supervise only the target tokens.

        The prompt length is the length of the expanded prompt encoded alone, as in the reference.
        """
        return self._sft(prompt, target)[0]

    def _sft(self, prompt: str, target: str) -> tuple[ProcessedPrompt, int]:
        self._check_target(target)
        expanded, span_ids, counts = self._expand(prompt)
        ids = self._encode(expanded + target)
        prompt_len = len(self.decoder_tokenizer.encode(expanded, add_special_tokens=False).ids)
        labels = ids.copy()
        labels[:prompt_len] = IGNORE_INDEX
        return ProcessedPrompt(ids, span_ids, self._locate(ids, counts), counts, labels), prompt_len

    def process_cpt(self, text: str) -> ProcessedPrompt:
        """Continual-pretraining text: every token supervised except each S M..M E region."""
        p = self.process(text)
        labels = p.input_ids.copy()
        for s, e in p.memory_positions:
            labels[s - 1 : e + 1] = IGNORE_INDEX
        return dataclasses.replace(p, labels=labels)

    def process_chat(self, messages: list[dict], target: str) -> ProcessedPrompt:
        """Chat SFT example: templated prompt, supervised ``target<|im_end|>\\n``."""
        return self.process_sft(self.apply_chat_template(messages), self.sft_target_text(target))

    # ------------------------------------------------------------------ chat format (Qwen3-2507)

    @staticmethod
    def apply_chat_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Qwen3-2507 instruct chat format, written out by hand (no jinja).

        Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; consecutive ``tool``
        messages are grouped into one user turn of ``<tool_response>`` blocks as Qwen's template does.
        Tool calls and reasoning content are not supported.
        """
        if not isinstance(messages, (list, tuple)):
            raise PromptError(f"messages must be a list of dicts, got {type(messages).__name__}")
        out = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise PromptError(f"message {i} must be a dict, got {type(msg).__name__}")
            role, content = msg.get("role"), msg.get("content")
            if role not in CHAT_ROLES:
                raise PromptError(f"message {i} has role {role!r}; expected one of {CHAT_ROLES}")
            if not isinstance(content, str):
                raise PromptError(f"message {i} ({role}) content must be a str, got {type(content).__name__}")
            if role != "tool":
                out.append(f"{IM_START}{role}\n{content}{IM_END}\n")
                continue
            prev_tool = i > 0 and messages[i - 1].get("role") == "tool"
            next_tool = i + 1 < len(messages) and isinstance(messages[i + 1], dict) and (
                messages[i + 1].get("role") == "tool"
            )
            opener = "" if prev_tool else f"{IM_START}user"
            out.append(f"{opener}\n<tool_response>\n{content}\n</tool_response>")
            if not next_tool:
                out.append(f"{IM_END}\n")
        if add_generation_prompt:
            out.append(f"{IM_START}assistant\n")
        return "".join(out)

    @staticmethod
    def sft_target_text(target: str) -> str:
        """The supervised continuation of a chat prompt: the answer, ``<|im_end|>`` and a newline."""
        if not isinstance(target, str):
            raise PromptError(f"target must be a str, got {type(target).__name__}")
        return f"{target}{IM_END}\n"

    # ------------------------------------------------------------------ batches

    def process_batch(
        self,
        prompts: Sequence[str],
        targets: Sequence[str] | None = None,
        padding_side: str = "right",
        *,
        pad_to_multiple_of: int | None = None,
        reference_left_pad_labels: bool = False,
    ) -> dict:
        """Process and pad a batch (SFT labels when ``targets`` is given).

        Returns numpy ``input_ids [B,S]``, ``attention_mask [B,S]`` (1 token / 0 pad), ``labels [B,S]``
        or None (padding -> -100) and per-row lists ``memory_positions`` (in padded coordinates),
        ``span_ids``, ``latent_counts``.

        ``reference_left_pad_labels=True`` reproduces a quirk of the reference batch builder: it masks
        label positions ``[0, prompt_len)`` of the *padded* row, so with left padding the last
        ``pad_count`` prompt tokens (memory placeholders included) end up supervised. Off by default;
        only for parity with reference losses.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of str, not a single str")
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if targets is None:
            rows, prompt_lens = [self.process(p) for p in prompts], [0] * len(prompts)
        else:
            pairs = [self._sft(p, t) for p, t in zip(prompts, targets)]
            rows, prompt_lens = [r for r, _ in pairs], [n for _, n in pairs]
        width = max((len(r.input_ids) for r in rows), default=0)
        if pad_to_multiple_of:
            width = -(-max(width, 1) // pad_to_multiple_of) * pad_to_multiple_of
        B = len(rows)
        input_ids = np.full((B, width), self.pad_id, np.int32)
        mask = np.zeros((B, width), np.int32)
        labels = None if targets is None else np.full((B, width), IGNORE_INDEX, np.int32)
        positions = []
        for b, r in enumerate(rows):
            n = len(r.input_ids)
            off = width - n if padding_side == "left" else 0
            input_ids[b, off : off + n] = r.input_ids
            mask[b, off : off + n] = 1
            positions.append([(s + off, e + off) for s, e in r.memory_positions])
            if labels is not None:
                if reference_left_pad_labels:
                    labels[b] = np.where(np.arange(width) < prompt_lens[b], IGNORE_INDEX, input_ids[b])
                else:
                    labels[b, off : off + n] = r.labels
                labels[b, mask[b] == 0] = IGNORE_INDEX
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "memory_positions": positions,
            "span_ids": [r.span_ids for r in rows],
            "latent_counts": [r.latent_counts for r in rows],
        }
