"""Offline demo: a tiny LCLM answers needle questions over a compressed haystack (CPU, minutes).

    lclm-jax demo            # or: python -m experiments.demo [--n 64] [--haystack-tokens 256]

The committed checkpoint ``experiments/demo_checkpoint`` (~1.6M parameters, trained by
``python -m experiments.train_demo`` on synthetic needle retrieval + reconstruction, one model for
cr 4/8/16) reads haystacks of noise sentences with one hidden ``The special magic number for KEY
is: NN.`` and answers the question after them. For every ratio it compares, on the same samples:

* ``lclm``        the haystack compressed to ceil(T/cr) latents;
* ``truncated``   the haystack's last ceil(T/cr) tokens given raw (the same decoder-token budget);
* ``full``        the whole haystack raw (the same decoder, uncompressed).

It prints accuracy (the value string in the answer) and TTFT (best of 3, after a compile warm-up, on
this machine) per condition and writes ``demo.json`` and ``demo.png`` (if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import random
import time

from experiments import demo_data
from experiments import eval_common as ec
from experiments import ruler

DEFAULT_CHECKPOINT = pathlib.Path(__file__).resolve().parent / "demo_checkpoint"


def evaluate(models: dict, examples, count, batch_size: int = 16, max_new_tokens: int = 12, ttft: bool = True,
             log=print):
    """``models``: ``{cr: LCLM}`` (same weights, different ratio). Returns a list of result rows."""
    rows = []
    answers = [[ex.value] for ex in examples]
    hay_tokens = [count(ex.haystack) for ex in examples]

    def run(name, cr, lm, prompts, ctx_tokens):
        t0 = time.time()
        outs = ec.generate_batched(lm, prompts, max_new_tokens, batch_size)
        acc = sum(ruler.string_match_all(o, a) for o, a in zip(outs, answers)) / len(outs)
        t_first = None
        if ttft:
            i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
            t_first = ec.time_first_token(lm, prompts[i])
        row = {"method": name, "cr": cr, "accuracy": acc, "context_tokens": sum(ctx_tokens) / len(ctx_tokens),
               "ttft_ms": None if t_first is None else 1000 * t_first, "n": len(prompts),
               "examples": [{"answer": a[0], "output": o} for o, a in list(zip(outs, answers))[:3]]}
        log(f"{name:10s} cr={str(cr or '-'):>3s}  accuracy {acc:6.1f}%  context tokens {row['context_tokens']:6.1f}"
            + (f"  TTFT {row['ttft_ms']:.1f} ms" if t_first is not None else "") + f"  ({time.time() - t0:.0f}s)")
        rows.append(row)

    first = models[min(models)]
    run("full", None, first, [ex.prompt("raw") for ex in examples], hay_tokens)
    for cr, lm in sorted(models.items()):
        run("lclm", cr, lm, [ex.prompt("compressed") for ex in examples], [math.ceil(t / cr) for t in hay_tokens])
        budgets = [demo_data.truncation_budget_chars(ex.haystack, cr, count) for ex in examples]
        run("truncated", cr, lm, [ex.prompt("truncated", b) for ex, b in zip(examples, budgets)],
            [count(ex.haystack[len(ex.haystack) - b:]) if b else 0 for ex, b in zip(examples, budgets)])
    return rows


def table(rows) -> str:
    body = [[r["method"], r["cr"] or "-", f"{r['context_tokens']:.0f}", f"{r['accuracy']:.1f}",
             "-" if r["ttft_ms"] is None else f"{r['ttft_ms']:.1f}"] for r in rows]
    return ec.format_table(["method", "cr", "context tokens", "accuracy %", "TTFT ms"], body)


def plot(rows, path, title):
    plt = ec.pyplot()
    if plt is None:
        return None
    ratios = sorted({r["cr"] for r in rows if r["cr"]})
    full = next(r for r in rows if r["method"] == "full")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = range(len(ratios))
    for off, meth, col in ((-0.2, "lclm", "tab:blue"), (0.2, "truncated", "tab:orange")):
        acc = [next(r["accuracy"] for r in rows if r["method"] == meth and r["cr"] == c) for c in ratios]
        a1.bar([i + off for i in x], acc, 0.4, label=meth, color=col)
        tt = [next(r["ttft_ms"] or 0 for r in rows if r["method"] == meth and r["cr"] == c) for c in ratios]
        a2.bar([i + off for i in x], tt, 0.4, label=meth, color=col)
    a1.axhline(full["accuracy"], color="k", ls="--", label="full (uncompressed)")
    if full["ttft_ms"]:
        a2.axhline(full["ttft_ms"], color="k", ls="--", label="full (uncompressed)")
    for ax, lab in ((a1, "needle accuracy (%)"), (a2, "TTFT (ms, this CPU)")):
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"cr {c}" for c in ratios])
        ax.set_ylabel(lab)
        ax.legend(fontsize=8)
    a1.set_ylim(0, 105)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="lclm-jax demo", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--n", type=int, default=64, help="needle questions per condition")
    ap.add_argument("--haystack-tokens", type=int, default=256)
    ap.add_argument("--digits", type=int, default=2, help="needle value digits (the committed model was trained on 2)")
    ap.add_argument("--ratios", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--seed", type=int, default=1234, help="sample seed (training used other draws)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-ttft", action="store_true")
    ap.add_argument("--out", default="results/demo")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.checkpoint):
        ap.error(f"no checkpoint at {a.checkpoint} (train one with: python -m experiments.train_demo)")
    t0 = time.time()
    models = {cr: ec.load_model(a.checkpoint, "float32", compression_ratio=cr) for cr in a.ratios}
    count = ec.token_counter(models[a.ratios[0]])
    rng = random.Random(a.seed)
    examples = [demo_data.needle_example_tokens(rng, a.haystack_tokens, count, a.digits) for _ in range(a.n)]
    print(f"demo: {a.n} needle questions, haystack <= {a.haystack_tokens} tokens, {a.digits}-digit values, "
          f"checkpoint {a.checkpoint}")
    rows = evaluate(models, examples, count, a.batch_size, ttft=not a.no_ttft)
    print()
    print(table(rows))
    ex = rows[1]["examples"][0] if len(rows) > 1 else rows[0]["examples"][0]
    print(f"\nexample (lclm): answer {ex['answer']!r}, model wrote {ex['output']!r}")
    os.makedirs(a.out, exist_ok=True)
    res = {"checkpoint": a.checkpoint, "n": a.n, "haystack_tokens": a.haystack_tokens, "digits": a.digits,
           "seed": a.seed, "rows": rows, "seconds": round(time.time() - t0, 1)}
    ec.write_json(res, os.path.join(a.out, "demo.json"))
    p = plot(rows, os.path.join(a.out, "demo.png"), f"tiny LCLM demo: needle in {a.haystack_tokens}-token haystack")
    print(f"wrote {os.path.join(a.out, 'demo.json')}" + (f" and {p}" if p else "") + f"  ({res['seconds']}s)")
    return res


if __name__ == "__main__":
    main()
