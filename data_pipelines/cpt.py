"""Continual-pretraining (CPT) examples: a document as alternating compressed and raw segments.

Layout of one document of ``N`` decoder tokens (paper App. C.4; defaults below)::

    [W_1][R_1][W_2][R_2] ... [W_k][R_k]        W = wrapped (compressed), R = raw (supervised)

* ``k`` (segment pairs) is drawn uniformly from the bucket of ``N``: 1 (<2K), 1-2 (2-4K),
  2-4 (4-8K), 4-6 (8-16K), 4-8 (>16K);
* trainable (raw) tokens: 8,192 when ``N > 16,384``, else ``N // 2``; the rest is wrapped;
* with ``k >= 2``: ``W_1`` holds 30-40 % of the wrapped tokens and ``R_k`` 40-50 % of the raw ones;
  the other segments share the rest at random;
* no segment is shorter than 128 tokens. When ``k`` drawn from the bucket cannot satisfy the rules
  it is lowered; a document that cannot hold even one pair (``N < 256``) is skipped (``too_short``).

Segment lengths are counted in decoder tokens of the whole document. Raw segments keep the
document's own decoder ids; a wrapped segment's text is re-encoded with the encoder tokenizer and
replaced by ``<|memory_start|> + ceil(n_enc/cr) x <|memory|> + <|memory_end|>``. Cuts fall on
character boundaries (a byte-level token that continues a character is never a cut point).
Loss is on raw tokens only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from data_pipelines.common import (KIND_CPT, ExampleWriter, SkipRecord, Tokenizers, get_text,
                                   skip_example, snap_cuts, valid_cuts)

# (upper bound on N, exclusive except for the last bucket; min pairs; max pairs)
DEFAULT_PAIR_BUCKETS = ((2048, 1, 1), (4096, 1, 2), (8192, 2, 4), (16385, 4, 6), (None, 4, 8))


@dataclasses.dataclass(frozen=True)
class CPTConfig:
    pair_buckets: tuple = DEFAULT_PAIR_BUCKETS
    first_wrapped_frac: tuple[float, float] = (0.30, 0.40)
    last_raw_frac: tuple[float, float] = (0.40, 0.50)
    min_segment_tokens: int = 128
    long_threshold: int = 16384  # documents with more tokens than this ...
    long_trainable_tokens: int = 8192  # ... keep this many trainable tokens
    short_trainable_frac: float = 0.5  # shorter documents keep this fraction
    max_document_tokens: int = 131072
    long_document_policy: str = "skip"  # "skip" | "truncate" (to max_document_tokens)
    max_chars: int = 4_000_000  # checked before tokenizing
    text_field: str | None = "text"  # None: the record itself is the text

    def __post_init__(self):
        if self.long_document_policy not in ("skip", "truncate"):
            raise ValueError("long_document_policy must be 'skip' or 'truncate'")


def trainable_tokens(n: int, cfg: CPTConfig) -> int:
    if n > cfg.long_threshold:
        return cfg.long_trainable_tokens
    return int(n * cfg.short_trainable_frac)


def pair_range(n: int, cfg: CPTConfig) -> tuple[int, int]:
    for bound, lo, hi in cfg.pair_buckets:
        if bound is None or n < bound:
            return lo, hi
    raise ValueError("pair_buckets must end with an open bucket (bound None)")


def _frac_range(total: int, frac: tuple[float, float], k: int, m: int) -> tuple[int, int]:
    lo = max(math.ceil(frac[0] * total), m)
    hi = min(math.floor(frac[1] * total), total - m * (k - 1))
    return lo, hi


def _composition(total: int, parts: int, m: int, rng: np.random.Generator) -> list[int]:
    """``total`` split into ``parts`` random integers, each ``>= m``."""
    if parts == 0:
        return []
    extra = total - m * parts
    cuts = np.sort(rng.integers(0, extra + 1, size=parts - 1))
    return list(np.diff(np.concatenate([[0], cuts, [extra]])) + m)


def plan_segments(n: int, cfg: CPTConfig, rng: np.random.Generator) -> list[tuple[bool, int]]:
    """Segment plan ``[(wrapped, length), ...]`` (wrapped first, raw last) summing to ``n``.

    Raises :class:`SkipRecord` (``too_short``) when no plan satisfies the rules.
    """
    m = cfg.min_segment_tokens
    raw_total = trainable_tokens(n, cfg)
    wrap_total = n - raw_total
    if raw_total < m or wrap_total < m:
        raise SkipRecord("too_short", f"{n} tokens")
    lo_k, hi_k = pair_range(n, cfg)
    k = int(rng.integers(lo_k, hi_k + 1))
    while k > 1:
        w_lo, w_hi = _frac_range(wrap_total, cfg.first_wrapped_frac, k, m)
        r_lo, r_hi = _frac_range(raw_total, cfg.last_raw_frac, k, m)
        if w_lo <= w_hi and r_lo <= r_hi:
            break
        k -= 1
    if k == 1:
        wraps, raws = [wrap_total], [raw_total]
    else:
        w1 = int(rng.integers(w_lo, w_hi + 1))
        rk = int(rng.integers(r_lo, r_hi + 1))
        wraps = [w1] + _composition(wrap_total - w1, k - 1, m, rng)
        raws = _composition(raw_total - rk, k - 1, m, rng) + [rk]
    plan = []
    for w, r in zip(wraps, raws):
        plan += [(True, int(w)), (False, int(r))]
    return plan


def check_plan(n: int, plan: list[tuple[bool, int]], cfg: CPTConfig) -> list[str]:
    """Names of the rules a plan breaks (empty list: all hold). Used by tests and statistics."""
    bad = []
    wraps = [l for w, l in plan if w]
    raws = [l for w, l in plan if not w]
    k = len(wraps)
    if sum(l for _, l in plan) != n:
        bad.append("sum")
    if [w for w, _ in plan] != [True, False] * k:
        bad.append("alternation")
    lo, hi = pair_range(n, cfg)
    if not 1 <= k <= hi:
        bad.append("pairs")
    if min(l for _, l in plan) < cfg.min_segment_tokens:
        bad.append("min_segment")
    if sum(raws) != trainable_tokens(n, cfg):
        bad.append("trainable")
    if k >= 2:
        f1 = wraps[0] / sum(wraps)
        fk = raws[-1] / sum(raws)
        eps = 1.0 / max(sum(wraps), 1)
        if not cfg.first_wrapped_frac[0] - eps <= f1 <= cfg.first_wrapped_frac[1] + eps:
            bad.append("first_wrapped_frac")
        eps = 1.0 / max(sum(raws), 1)
        if not cfg.last_raw_frac[0] - eps <= fk <= cfg.last_raw_frac[1] + eps:
            bad.append("last_raw_frac")
    return bad


class CPTBuilder:
    """grain ``random_map`` transform: raw record -> CPT example (or a counted skip marker)."""

    def __init__(self, tokenizers: Tokenizers, config: CPTConfig = CPTConfig()):
        self.tok, self.cfg = tokenizers, config
        self.last_plan = None

    def __call__(self, record, rng: np.random.Generator):
        try:
            return self.build(record, rng)[0]
        except SkipRecord as e:
            return skip_example(e.reason, KIND_CPT)

    def build(self, record, rng: np.random.Generator):
        """Returns ``(example, realised)``: the segment lengths after snapping cuts to character
        boundaries (each cut moves forward by at most 3 tokens; ``self.last_plan`` keeps the plan)."""
        cfg, tok = self.cfg, self.tok
        text = get_text(record, cfg.text_field, cfg.max_chars)
        ids, starts = tok.decode_tokens(text)
        if len(ids) > cfg.max_document_tokens:
            if cfg.long_document_policy == "skip":
                raise SkipRecord("too_long", f"{len(ids)} tokens")
            text = text[:starts[cfg.max_document_tokens]]
            ids, starts = ids[:cfg.max_document_tokens], starts[:cfg.max_document_tokens]
        n = len(ids)
        plan = self.last_plan = plan_segments(n, cfg, rng)
        cuts = list(np.cumsum([l for _, l in plan]))[:-1]
        snapped = snap_cuts(cuts, valid_cuts(starts))
        if len(snapped) != len(cuts):
            raise SkipRecord("too_short", "segment vanished at a character boundary")
        bounds = [0] + snapped + [n]
        realised = [(w, int(bounds[i + 1] - bounds[i])) for i, (w, _) in enumerate(plan)]
        if min(l for _, l in realised) < cfg.min_segment_tokens:
            raise SkipRecord("too_short", "segment below minimum after character snapping")
        char = np.append(starts, len(text))
        w = ExampleWriter(tok, KIND_CPT)
        for i, (wrapped, _) in enumerate(plan):
            a, b = bounds[i], bounds[i + 1]
            if wrapped:
                w.span(tok.encoder_ids(text[char[a]:char[b]]))
            else:
                w.text(ids[a:b], supervised=True)
        return w.finish(), realised
