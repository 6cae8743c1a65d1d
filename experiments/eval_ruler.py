"""RULER evaluation of an LCLM checkpoint: per-task table, average, JSON and an accuracy-vs-length plot.

    python -m experiments.eval_ruler --checkpoint DIR --lengths 4096 8192 16384 [--tasks ...] [--n 50]
    python -m experiments.eval_ruler --checkpoint DIR --data ruler.parquet --lengths 4096   # published set

Without ``--data`` the samples come from the local generator (``experiments/ruler.py``; lengths are
counted in the checkpoint's encoder tokens). With ``--data`` (JSONL or Parquet rows ``prompt``,
``category``, ``extra_info``) the published prompts are used as they are. Generation is greedy;
``--chat auto`` wraps generated prompts in the chat template when the decoder tokenizer has
``<|im_start|>``. ``--no-wrap`` evaluates the uncompressed decoder (context given raw).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from experiments import eval_common as ec
from experiments import ruler


def evaluate(lm, tasks, lengths, n: int = 20, seed: int = 0, batch_size: int = 8, chat: bool = False,
             wrap: bool = True, data=None, max_new_tokens: int | None = None, log=print, keep_outputs: int = 3,
             digits: int = 7):
    """Returns ``{"scores": {task: {length: score}}, "average": {length: avg}, "samples": [...]}``."""
    count = ec.token_counter(lm)
    rows = ruler.load_eval_rows(data, tasks, lengths, limit=n) if data else None
    scores, examples = {}, []
    for length in lengths:
        for task in tasks:
            if rows is not None:
                sel = [r for r in rows if r["task"] == task and r["length"] == length]
                prompts = [r["prompt"] for r in sel]
                answers = [r["answers"] for r in sel]
            else:
                try:
                    samples = ruler.generate(task, length, n, seed, count, digits=digits)
                except ValueError as e:
                    log(f"skip {task}@{length}: {e}")
                    continue
                prompts = [s.prompt(wrap=wrap, chat=chat) for s in samples]
                answers = [list(s.answers) for s in samples]
            if not prompts:
                continue
            t0 = time.time()
            mnt = max_new_tokens or ruler.GEN_TOKENS.get(task, 64)
            outs = ec.generate_batched(lm, prompts, mnt, batch_size)
            per = [ruler.score(task, o, a) for o, a in zip(outs, answers)]
            sc = sum(per) / len(per)
            scores.setdefault(task, {})[length] = sc
            examples += [{"task": task, "length": length, "output": o, "answers": a, "score": s}
                         for o, a, s in list(zip(outs, answers, per))[:keep_outputs]]
            log(f"{task:16s} {length:6d}  {sc:6.1f}  ({len(prompts)} samples, {time.time() - t0:.1f}s)")
    avg = {}
    for length in lengths:
        vals = [scores[t][length] for t in scores if length in scores[t]]
        if vals:
            avg[length] = sum(vals) / len(vals)
    return {"scores": scores, "average": avg, "samples": examples}


def table(result, lengths) -> str:
    header = ["task"] + [str(x) for x in lengths]
    order = [t for t in ruler.TASKS if t in result["scores"]] + [t for t in result["scores"] if t not in ruler.TASKS]
    rows = [[ruler.SHORT_NAMES.get(t, t)] + [result["scores"][t].get(x, "-") for x in lengths] for t in order]
    rows.append(["average"] + [result["average"].get(x, "-") for x in lengths])
    return ec.format_table(header, rows)


def plot(result, lengths, path, title="RULER"):
    plt = ec.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t, per in result["scores"].items():
        xs = [x for x in lengths if x in per]
        ax.plot(xs, [per[x] for x in xs], marker=".", lw=1, alpha=0.6, label=ruler.SHORT_NAMES.get(t, t))
    xs = [x for x in lengths if x in result["average"]]
    ax.plot(xs, [result["average"][x] for x in xs], marker="o", lw=3, color="black", label="average")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="RULER evaluation of an LCLM checkpoint")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--tasks", nargs="+", default=list(ruler.TASKS))
    ap.add_argument("--n", type=int, default=20, help="samples per task and length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", nargs="*", help="published-format JSONL/Parquet files instead of the generator")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: RULER's budget per task")
    ap.add_argument("--chat", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--no-wrap", action="store_true", help="give the context raw (uncompressed decoder)")
    ap.add_argument("--compression-ratio", type=int, default=None, help="override the checkpoint's ratio")
    ap.add_argument("--digits", type=int, default=7, help="digits of the NIAH number values (RULER: 7); the "
                    "generator only")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="results/ruler")
    a = ap.parse_args(argv)
    for t in a.tasks:
        if t not in ruler.TASKS:
            ap.error(f"unknown task {t!r}; choose from {', '.join(ruler.TASKS)}")
    overrides = {"compression_ratio": a.compression_ratio} if a.compression_ratio else {}
    lm = ec.load_model(a.checkpoint, a.dtype, **overrides)
    chat = ec.has_chat_tokens(lm) if a.chat == "auto" else a.chat == "yes"
    res = evaluate(lm, a.tasks, a.lengths, a.n, a.seed, a.batch_size, chat, not a.no_wrap, a.data, a.max_new_tokens,
                   digits=a.digits)
    cr = lm.config.compression_ratio
    print(f"\nRULER  checkpoint={a.checkpoint}  cr={cr}  wrap={not a.no_wrap}  n={a.n}")
    print(table(res, a.lengths))
    os.makedirs(a.out, exist_ok=True)
    out = {"checkpoint": a.checkpoint, "compression_ratio": cr, "wrap": not a.no_wrap, "n": a.n, "seed": a.seed,
           "digits": None if a.data else a.digits, "source": a.data or "generator", "lengths": a.lengths,
           "per_task": {t: {str(k): v for k, v in d.items()} for t, d in res["scores"].items()},
           "average": {str(k): v for k, v in res["average"].items()}, "samples": res["samples"]}
    ec.write_json(out, os.path.join(a.out, "ruler.json"))
    p = plot(res, a.lengths, os.path.join(a.out, "ruler.png"), f"RULER, cr {cr}")
    print(f"wrote {os.path.join(a.out, 'ruler.json')}" + (f" and {p}" if p else ""))
    return out


if __name__ == "__main__":
    main()
