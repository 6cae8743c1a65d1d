"""Reconstruction examples: a compressed span, an instruction, then the same text verbatim.

``plain`` format (default)::

    <|memory_start|> M...M <|memory_end|> \\n{instruction}\\n {verbatim text} <|endoftext|>

``chat`` format: one user turn ``[span]\\n\\n{instruction}`` and the verbatim text as the
assistant turn (Qwen3 template, see :mod:`data_pipelines.sft`).

Supervised: the verbatim text (+ the closing ``<|endoftext|>`` in plain format, ``<|im_end|>\\n``
in chat format). The span is a random contiguous window of the document of
``min_span_tokens..max_span_tokens`` decoder tokens, cut on character boundaries; the target is
exactly the decoder ids of that window. The instruction is drawn uniformly from ``templates``.
The paper used 100 templates per source; the list below is ours and is meant to be replaced.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.common import (KIND_RECON, ExampleWriter, SkipRecord, Tokenizers, get_text,
                                   skip_example, snap_cuts, valid_cuts)

DEFAULT_TEMPLATES = (
    "Repeat the text above exactly.",
    "Reproduce the preceding passage word for word.",
    "Write out the compressed text verbatim.",
    "Copy the content above without any changes.",
    "Reconstruct the original text from the memory above.",
    "Restate the passage above exactly as it was written.",
    "Output the text stored in memory, unchanged.",
    "Recover the exact wording of the text above.",
    "Transcribe the above content character for character.",
    "Give back the preceding document verbatim.",
    "What was the exact text above? Reproduce it.",
    "Decompress the memory block and print its text.",
    "Recite the passage above with no edits.",
    "Rewrite the text above exactly, keeping all formatting.",
    "Return the original content of the compressed block.",
    "Echo the previous text in full.",
)


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    min_span_tokens: int = 128
    max_span_tokens: int = 2048
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    format: str = "plain"  # "plain" | "chat"
    append_eos: bool = True  # plain format: supervise an <|endoftext|> after the target
    max_chars: int = 4_000_000
    text_field: str | None = "text"

    def __post_init__(self):
        if self.format not in ("plain", "chat"):
            raise ValueError("format must be 'plain' or 'chat'")
        if not self.templates:
            raise ValueError("need at least one template")
        if not 0 < self.min_span_tokens <= self.max_span_tokens:
            raise ValueError("need 0 < min_span_tokens <= max_span_tokens")


class ReconstructionBuilder:
    """grain ``random_map`` transform: text record -> reconstruction example (or a skip marker)."""

    def __init__(self, tokenizers: Tokenizers, config: ReconstructionConfig = ReconstructionConfig()):
        self.tok, self.cfg = tokenizers, config
        if config.format == "chat":
            from data_pipelines.sft import ChatRenderer

            self.chat = ChatRenderer(tokenizers)
        self._instr = [tokenizers.decoder_ids("\n" + t + "\n") for t in config.templates]

    def __call__(self, record, rng: np.random.Generator):
        try:
            return self.build(record, rng)
        except SkipRecord as e:
            return skip_example(e.reason, KIND_RECON)

    def build(self, record, rng: np.random.Generator):
        cfg, tok = self.cfg, self.tok
        text = get_text(record, cfg.text_field, cfg.max_chars)
        ids, starts = tok.decode_tokens(text)
        n = len(ids)
        if n < cfg.min_span_tokens:
            raise SkipRecord("too_short", f"{n} tokens")
        length = int(rng.integers(cfg.min_span_tokens, min(cfg.max_span_tokens, n) + 1))
        a = int(rng.integers(0, n - length + 1))
        a, b = snap_cuts([a, a + length], valid_cuts(starts))
        if b - a < 1:
            raise SkipRecord("too_short", "span vanished at a character boundary")
        char = np.append(starts, len(text))
        span_text = text[char[a]:char[b]]
        target = ids[a:b]
        t = int(rng.integers(len(cfg.templates)))
        w = ExampleWriter(tok, KIND_RECON)
        if cfg.format == "plain":
            w.span(tok.encoder_ids(span_text))
            w.text(self._instr[t], supervised=False)
            w.text(target, supervised=True)
            if cfg.append_eos:
                w.text([tok.eos_id], supervised=True)
        else:
            self.chat.header(w, "user")
            w.span(tok.encoder_ids(span_text))
            w.text(tok.decoder_ids("\n\n" + cfg.templates[t]), supervised=False)
            self.chat.footer(w, supervised=False)
            self.chat.header(w, "assistant")
            w.text(target, supervised=True)
            self.chat.footer(w, supervised=True)
        return w.finish()
