"""Shared helpers of the evaluation scripts: model loading, batched generation, JSON output, plots."""

from __future__ import annotations

import json
import os
import time


def load_model(checkpoint, dtype: str = "float32", **overrides):
    import lclm_jax
    return lclm_jax.load(checkpoint, dtype=dtype, **overrides)


def has_chat_tokens(lm) -> bool:
    return lm.processor.decoder_tokenizer.token_to_id("<|im_start|>") is not None


def token_counter(lm):
    """Counts encoder tokens of a text (the unit RULER lengths are measured in here)."""
    tok = lm.processor.encoder_tokenizer
    return lambda s: len(tok.encode(s, add_special_tokens=False).ids)


def generate_batched(lm, prompts, max_new_tokens: int, batch_size: int = 8, **kw) -> list[str]:
    """Greedy generation over ``prompts`` in batches, in order. Prompts are sorted by length inside
    the call so that each batch pads little; outputs come back in the input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        texts = lm.generate([prompts[i] for i in idx], max_new_tokens=max_new_tokens, **kw)
        for i, t in zip(idx, texts):
            out[i] = t
    return out  # type: ignore[return-value]


def time_first_token(lm, prompt: str, repeats: int = 3) -> float:
    """Median seconds from a prompt string to its first generated token (encode + prefill + 1 step),
    after one warm-up call (compiles excluded). The latent cache is cleared before each call, so the
    encoder always runs."""
    lm.clear_latent_cache()
    lm.generate_ids([prompt], max_new_tokens=1)
    ts = []
    for _ in range(repeats):
        lm.clear_latent_cache()
        t0 = time.perf_counter()
        lm.generate_ids([prompt], max_new_tokens=1)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def load_jsonl(path, n: int | None = None) -> list[dict]:
    """The first ``n`` (all when None) JSON records of a JSONL file, blank lines skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if n is not None and len(rows) >= n:
                break
    return rows


def write_json(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def pyplot():
    """matplotlib.pyplot with a non-interactive backend, or None (with a printed note) if absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the plot (pip install 'lclm-jax[plot]')")
        return None


def format_table(header, rows) -> str:
    cols = [list(map(str, header))] + [[_fmt(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.2f}"
    return str(x)
