"""The EXPAND(i) agent: compressed chunks with ids, the model answers or asks for raw chunks.

    python -m experiments.agent --checkpoint DIR --lengths 4096 --n 20 [--chunk-size 512] [--max-rounds 5]

The context is split into chunks of at most ``chunk_size`` tokens (sentence boundaries, original
whitespace kept, over-long sentences cut by tokens; never an empty chunk). Each round the model sees
every chunk with its 1-based id, compressed (``<|memory_start|>...<|memory_end|>``) unless it was
expanded, in which case its raw text stands in its place, followed by the question and the protocol:
reply ``EXPAND: i,j`` to see chunks raw, or ``ANSWER: ...``. Rounds are bounded (``max_rounds``); after
the last one, or when a request adds nothing new, a final prompt asks for the answer.

Differences from the reference agent (spec section 13, bugs in 16.1 item 13): chunk latents are not
re-encoded every round: the prompt's spans go through ``LCLM.encode_spans``, whose cache is keyed by
the span's encoder ids, so a chunk is encoded once per question and the run reports cache hits and
misses; the prompt states the model's real compression ratio; an EXPAND on the last round is honoured
before the final answer; the chunker keeps whitespace and splits over-long sentences; an answer before
any expansion is accepted unless ``min_expansions`` is set.

``run_agent`` takes any ``generate(prompt) -> str``, so the loop can be tested with a scripted model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time

from experiments import eval_common as ec
from experiments import ruler

MEM_START, MEM_END = "<|memory_start|>", "<|memory_end|>"
_EXPAND = re.compile(r"EXPAND\s*:\s*([0-9][0-9,\s]*)", re.IGNORECASE)
_ANSWER = re.compile(r"ANSWER\s*:\s*(.+)", re.IGNORECASE | re.DOTALL)
_SENT = re.compile(r"(?<=[.!?])(?=\s)")


# ---------------------------------------------------------------------------------------- chunking
def _split_long(text: str, count_tokens, chunk_size: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``chunk_size`` tokens (longest prefix that fits)."""
    out = []
    while text:
        if count_tokens(text) <= chunk_size:
            out.append(text)
            break
        lo, hi = 1, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(text[:mid]) <= chunk_size:
                lo = mid
            else:
                hi = mid - 1
        out.append(text[:lo])
        text = text[lo:]
    return out


def chunk_text(text: str, count_tokens, chunk_size: int) -> list[str]:
    """Sentence-packed chunks of at most ``chunk_size`` tokens whose concatenation is ``text``;
    chunks that are only whitespace are merged into their neighbour."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    pieces = [p for p in _SENT.split(text) if p]
    units = []
    for p in pieces:
        units += _split_long(p, count_tokens, chunk_size) if count_tokens(p) > chunk_size else [p]
    chunks, cur = [], ""
    for u in units:
        if cur and count_tokens(cur + u) > chunk_size:
            chunks.append(cur)
            cur = u
        else:
            cur += u
    if cur:
        chunks.append(cur)
    merged = []
    for c in chunks:
        if merged and not c.strip():
            merged[-1] += c
        elif merged and not merged[-1].strip():
            merged[-1] += c
        else:
            merged.append(c)
    return [c for c in merged if c]


# ---------------------------------------------------------------------------------------- prompts
def build_round_prompt(prefix: str, chunks, expanded, question: str, rounds_left: int, cr: int,
                       final: bool = False, chat: bool = False) -> str:
    lines = [prefix, ""] if prefix else []
    lines.append(f"[Document in {len(chunks)} chunks. Compressed chunks are lossy {cr}x summaries; "
                 "expanded chunks are shown as raw text.]")
    for i, c in enumerate(chunks):
        if i in expanded:
            lines.append(f"Chunk {i + 1} (expanded): {c}")
        else:
            lines.append(f"Chunk {i + 1}: {MEM_START}{c}{MEM_END}")
    lines += ["", f"Question: {question}", ""]
    if final:
        lines.append("No more expansions are available. Reply with `ANSWER: <your final answer>`.")
    else:
        lines.append("Compressed chunks may blur exact strings such as numbers and codes. If you need the exact "
                     "text of some chunks, reply `EXPAND: <comma-separated chunk numbers>`; otherwise reply "
                     f"`ANSWER: <your final answer>`. Expansion rounds left after this one: {rounds_left}.")
    body = "\n".join(lines)
    if chat:
        return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    return body + "\n"


def parse_response(text: str, n_chunks: int):
    """``("expand", [0-based ids])``, ``("answer", text)``; the later of the last EXPAND / ANSWER wins;
    neither: the whole text is the answer. Ids out of range are dropped."""
    text = text.split("<|im_end|>")[0]
    exp = list(_EXPAND.finditer(text))
    ans = list(_ANSWER.finditer(text))
    if exp and (not ans or exp[-1].start() > ans[-1].start()):
        ids = sorted({int(x) - 1 for x in re.findall(r"\d+", exp[-1].group(1)) if 1 <= int(x) <= n_chunks})
        return "expand", ids
    if ans:
        return "answer", ans[-1].group(1).strip()
    return "answer", text.strip()


@dataclasses.dataclass
class AgentResult:
    response: str
    expanded: list
    rounds: int
    transcript: list
    forced: bool


def run_agent(generate, prefix: str, chunks, question: str, *, max_rounds: int = 5, cr: int = 16,
              min_expansions: int = 0, chat: bool = False) -> AgentResult:
    """The bounded EXPAND loop. ``generate(prompt) -> str``."""
    if not chunks:
        raise ValueError("no chunks")
    expanded: set[int] = set()
    transcript = []
    for r in range(max_rounds):
        rounds_left = max_rounds - r - 1
        prompt = build_round_prompt(prefix, chunks, expanded, question, rounds_left, cr, chat=chat)
        out = generate(prompt)
        action, val = parse_response(out, len(chunks))
        transcript.append({"round": r, "action": action, "value": val, "raw": out})
        if action == "answer" and len(expanded) >= min_expansions:
            return AgentResult(val, sorted(expanded), r + 1, transcript, False)
        if action == "answer":  # too early: expand the chunks its text names, else the first one
            val = [int(x) - 1 for x in re.findall(r"\b\d{1,3}\b", val) if 1 <= int(x) <= len(chunks)][:5] or [0]
        new = set(val) - expanded
        if not new:
            break
        expanded |= new
    prompt = build_round_prompt(prefix, chunks, expanded, question, 0, cr, final=True, chat=chat)
    out = generate(prompt)
    action, val = parse_response(out, len(chunks))
    transcript.append({"round": len(transcript), "action": "final", "value": val, "raw": out})
    return AgentResult(val if action == "answer" else out.strip(), sorted(expanded), len(transcript), transcript,
                       True)


# ---------------------------------------------------------------------------------------- NIAH eval
def evaluate_niah(lm, tasks, lengths, n: int = 10, seed: int = 0, chunk_size: int = 512, max_rounds: int = 5,
                  max_new_tokens: int = 64, chat: bool = False, log=print, digits: int = 7):
    count = ec.token_counter(lm)
    cr = lm.config.compression_ratio
    gen = lambda p: lm.generate([p], max_new_tokens=max_new_tokens)[0]  # noqa: E731
    res = {}
    for length in lengths:
        for task in tasks:
            samples = ruler.generate(task, length, n, seed, count, digits=digits)
            base, agent, rounds, exp_frac = [], [], [], []
            h0, m0 = lm.cache_hits, lm.cache_misses
            t0 = time.time()
            for s in samples:
                base.append(ruler.score(task, gen(s.prompt(chat=chat)), s.answers))
                chunks = chunk_text(s.context, count, chunk_size)
                r = run_agent(gen, s.prefix, chunks, s.question, max_rounds=max_rounds, cr=cr, chat=chat)
                agent.append(ruler.score(task, r.response, s.answers))
                rounds.append(r.rounds)
                exp_frac.append(len(r.expanded) / len(chunks))
            rec = {"baseline": sum(base) / n, "agent": sum(agent) / n, "rounds": sum(rounds) / n,
                   "expanded_frac": sum(exp_frac) / n, "cache_hits": lm.cache_hits - h0,
                   "cache_misses": lm.cache_misses - m0}
            res.setdefault(task, {})[length] = rec
            log(f"{task:16s} {length:6d}  compressed {rec['baseline']:6.1f}  +EXPAND {rec['agent']:6.1f}  "
                f"rounds {rec['rounds']:.1f}  expanded {100 * rec['expanded_frac']:.0f}%  "
                f"latent cache {rec['cache_hits']} hits / {rec['cache_misses']} misses  ({time.time() - t0:.0f}s)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description="NIAH with and without the EXPAND agent")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--tasks", nargs="+", default=list(ruler.NIAH_TASKS))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--max-rounds", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--chat", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--digits", type=int, default=7, help="digits of the NIAH number values (RULER: 7)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="results/agent")
    a = ap.parse_args(argv)
    lm = ec.load_model(a.checkpoint, a.dtype)
    chat = ec.has_chat_tokens(lm) if a.chat == "auto" else a.chat == "yes"
    res = evaluate_niah(lm, a.tasks, a.lengths, a.n, a.seed, a.chunk_size, a.max_rounds, a.max_new_tokens, chat,
                       digits=a.digits)
    rows = [[ruler.SHORT_NAMES[t], L, r["baseline"], r["agent"], r["rounds"], r["cache_hits"], r["cache_misses"]]
            for t, d in res.items() for L, r in d.items()]
    print(ec.format_table(["task", "length", "compressed", "+EXPAND", "rounds", "cache hits", "misses"], rows))
    ec.write_json({"checkpoint": a.checkpoint, "chunk_size": a.chunk_size, "max_rounds": a.max_rounds,
                   "results": {t: {str(k): v for k, v in d.items()} for t, d in res.items()}},
                  os.path.join(a.out, "agent_niah.json"))
    return res


if __name__ == "__main__":
    main()
