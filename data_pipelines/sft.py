"""SFT examples: chat records in the Qwen3 template with compressed message regions.

Template (Qwen3-Instruct-2507, no default system prompt, no thinking block)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n   ... for every message

Only assistant turns are supervised, exactly ``{content}<|im_end|>\\n``; the
``<|im_start|>assistant\\n`` header is not. Every message whose role is in ``wrap_roles`` is
compressed: with probability ``full_wrap_prob`` (0.5) the whole content becomes one memory span,
otherwise 1-3 spans cover 80-100 % of its tokens (raw gaps between them). A message content that
already contains ``<|memory_start|>...<|memory_end|>`` tags (the reference's raw record format)
keeps exactly those spans instead. Empty spans are an error: a record whose given tags enclose
nothing is skipped (``empty_span``).

Accepted record shapes (dicts, or JSON text/bytes of them):
``{"messages": [{"role", "content"}, ...]}``; the reference's ``{"compression_prompt": [...],
"target": str}``; question/answer pairs ``{"question": str, "answer": str}`` (e.g. TFDS gsm8k).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from data_pipelines.common import (KIND_SFT, MEMORY_END, MEMORY_START, ExampleWriter, SkipRecord,
                                   Tokenizers, as_mapping, as_str, skip_example, snap_cuts,
                                   valid_cuts)

ROLES = ("system", "user", "assistant", "tool")
_TAGGED = re.compile(re.escape(MEMORY_START) + "(.*?)" + re.escape(MEMORY_END), re.DOTALL)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    wrap_roles: tuple[str, ...] = ("user",)
    full_wrap_prob: float = 0.5
    num_regions: tuple[int, int] = (1, 3)
    coverage: tuple[float, float] = (0.8, 1.0)
    min_region_tokens: int = 1
    supervise: str = "all_assistant"  # or "last_assistant"
    max_chars: int = 4_000_000
    messages_field: str = "messages"
    question_field: str = "question"
    answer_field: str = "answer"


def get_messages(record, cfg: SFTConfig) -> list[dict[str, str]]:
    rec = as_mapping(record)
    if cfg.messages_field in rec:
        msgs = rec[cfg.messages_field]
    elif "compression_prompt" in rec and "target" in rec:
        msgs = list(rec["compression_prompt"]) + [{"role": "assistant", "content": rec["target"]}]
    elif cfg.question_field in rec and cfg.answer_field in rec:
        msgs = [{"role": "user", "content": rec[cfg.question_field]},
                {"role": "assistant", "content": rec[cfg.answer_field]}]
    else:
        raise SkipRecord("bad_format", "no messages / question-answer fields")
    if isinstance(msgs, (str, bytes)):
        import json

        try:
            msgs = json.loads(as_str(msgs))
        except json.JSONDecodeError:
            raise SkipRecord("bad_format", "messages is not a list") from None
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise SkipRecord("empty" if isinstance(msgs, (list, tuple)) else "bad_format")
    out, chars = [], 0
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SkipRecord("bad_format", "message without role/content")
        role, content = as_str(m["role"]), as_str(m["content"])
        if role not in ROLES:
            raise SkipRecord("bad_format", f"unknown role {role!r}")
        chars += len(content)
        out.append({"role": role, "content": content})
    if chars > cfg.max_chars:
        raise SkipRecord("too_long", f"{chars} chars")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise SkipRecord("bad_format", "no non-empty assistant turn")
    return out


def plan_regions(n: int, cfg: SFTConfig, rng: np.random.Generator) -> list[tuple[bool, int]]:
    """``[(wrapped, length), ...]`` over a message of ``n`` tokens (``n >= 1``)."""
    if rng.random() < cfg.full_wrap_prob:
        return [(True, n)]
    m = cfg.min_region_tokens
    r = int(rng.integers(cfg.num_regions[0], cfg.num_regions[1] + 1))
    cov = rng.uniform(*cfg.coverage)
    wrapped = min(n, max(1, int(round(cov * n))))
    raw = n - wrapped
    # r regions need r * m wrapped tokens and r - 1 raw tokens between them.
    while r > 1 and (r * m > wrapped or r - 1 > raw):
        r -= 1
    if r * m > wrapped:
        return [(True, n)]
    w = _split(wrapped, r, m, rng)
    inner = _split(raw, r + 1, 0, rng, interior_min=1)
    plan = []
    for i in range(r):
        if inner[i]:
            plan.append((False, inner[i]))
        plan.append((True, w[i]))
    if inner[r]:
        plan.append((False, inner[r]))
    return plan


def _split(total, parts, m, rng, interior_min=0):
    """Random composition; with ``interior_min`` the parts between the ends get at least that."""
    mins = np.full(parts, m)
    if interior_min and parts > 2:
        mins[1:-1] = np.maximum(mins[1:-1], interior_min)
    extra = total - int(mins.sum())
    cuts = np.sort(rng.integers(0, extra + 1, size=parts - 1))
    return [int(x) for x in np.diff(np.concatenate([[0], cuts, [extra]])) + mins]


class ChatRenderer:
    """Writes messages in the Qwen3 template into an :class:`ExampleWriter`."""

    def __init__(self, tok: Tokenizers):
        if tok.im_start_id is None or tok.im_end_id is None:
            raise ValueError("the decoder tokenizer has no <|im_start|>/<|im_end|> tokens")
        self.tok = tok
        self._nl = tok.decoder_ids("\n")
        self._headers: dict[str, np.ndarray] = {}

    def header(self, w: ExampleWriter, role: str):
        if role not in self._headers:
            self._headers[role] = np.concatenate(
                [[self.tok.im_start_id], self.tok.decoder_ids(role + "\n")]).astype(np.int32)
        w.text(self._headers[role], supervised=False)

    def footer(self, w: ExampleWriter, supervised: bool):
        w.text(np.concatenate([[self.tok.im_end_id], self._nl]).astype(np.int32), supervised)

    def content(self, w: ExampleWriter, text: str, supervised: bool, wrap_plan=None, rng=None,
                cfg: SFTConfig | None = None):
        """Raw or compressed content. ``wrap_plan``: callable(n, rng) -> region plan."""
        tok = self.tok
        if MEMORY_START in text or MEMORY_END in text:
            return self._tagged(w, text, supervised)
        if wrap_plan is None or not text:
            if text:
                w.text(tok.decoder_ids(text), supervised)
            return
        ids, starts = tok.decode_tokens(text)
        plan = wrap_plan(len(ids), rng)
        cuts = snap_cuts(list(np.cumsum([l for _, l in plan]))[:-1], valid_cuts(starts))
        bounds = [0] + cuts + [len(ids)]
        if len(bounds) != len(plan) + 1:  # a region vanished at a character boundary
            plan, bounds = [(True, len(ids))], [0, len(ids)]
        char = np.append(starts, len(text))
        for i, (wrapped, _) in enumerate(plan):
            a, b = bounds[i], bounds[i + 1]
            if wrapped:
                w.span(tok.encoder_ids(text[char[a]:char[b]]))
            else:
                w.text(ids[a:b], supervised)

    def _tagged(self, w, text, supervised):
        if supervised:
            raise SkipRecord("bad_format", "memory tags inside a supervised turn")
        pos = 0
        for m in _TAGGED.finditer(text):
            if m.start() > pos:
                w.text(self.tok.decoder_ids(text[pos:m.start()]), False)
            w.span(self.tok.encoder_ids(m.group(1)))  # empty -> SkipRecord("empty_span")
            pos = m.end()
        rest = text[pos:]
        if MEMORY_START in rest or MEMORY_END in rest:
            raise SkipRecord("bad_format", "unbalanced memory tags")
        if rest:
            w.text(self.tok.decoder_ids(rest), False)


class SFTBuilder:
    """grain ``random_map`` transform: chat record -> SFT example (or a counted skip marker)."""

    kind = KIND_SFT

    def __init__(self, tokenizers: Tokenizers, config: SFTConfig = SFTConfig()):
        self.tok, self.cfg = tokenizers, config
        self.chat = ChatRenderer(tokenizers)

    def __call__(self, record, rng: np.random.Generator):
        try:
            return self.build(record, rng)
        except SkipRecord as e:
            return skip_example(e.reason, self.kind)

    def build(self, record, rng: np.random.Generator):
        cfg = self.cfg
        msgs = get_messages(record, cfg)
        last_asst = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        w = ExampleWriter(self.tok, self.kind)
        plan = lambda n, r: plan_regions(n, cfg, r)  # noqa: E731
        for i, m in enumerate(msgs):
            sup = m["role"] == "assistant" and (cfg.supervise == "all_assistant" or i == last_asst)
            self.chat.header(w, m["role"])
            wrap = plan if (m["role"] in cfg.wrap_roles and not sup) else None
            self.chat.content(w, m["content"], sup, wrap, rng)
            self.chat.footer(w, sup)
        return w.finish()
