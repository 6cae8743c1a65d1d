"""GSM8K with the whole prompt compressed (as in the paper): answer extraction and accuracy.

    python -m experiments.eval_gsm8k --checkpoint DIR [--data test.jsonl | --tfds-split test] [--n 200]

Data: a local JSONL with ``question`` and ``answer`` (GSM8K's ``answer`` field, final number after
``####``), or the TFDS ``gsm8k`` data source (``tfds.data_source``; needs the prepared array_record
data in the TFDS data dir, no TensorFlow). The whole prompt (instruction + question) sits inside one
memory span; ``--no-wrap`` gives it raw (the uncompressed decoder). The model's answer is the number
after ``####`` / "answer is", else the last number it wrote.
"""

from __future__ import annotations

import argparse
import os

from experiments import eval_common as ec
from experiments import metrics

INSTRUCTION = 'Solve the math problem step by step. Write the final number after "####".'


def load_tfds(split: str = "test", data_dir: str | None = None, n: int | None = None) -> list[dict]:
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text  # noqa: F401  (registers the gsm8k builder)
    src = tfds.data_source("gsm8k", split=split, data_dir=data_dir)
    count = len(src) if n is None else min(n, len(src))
    out = []
    for i in range(count):
        r = src[i]
        dec = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
        out.append({"question": dec(r["question"]), "answer": dec(r["answer"])})
    return out


def build_prompt(question: str, wrap: bool = True, chat: bool = False) -> str:
    body = f"{INSTRUCTION}\n\n{question.strip()}"
    if wrap:
        body = f"<|memory_start|>{body}<|memory_end|>"
    if chat:
        return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    return f"{body}\n"


def evaluate(lm, rows, wrap: bool = True, chat: bool = False, max_new_tokens: int = 512, batch_size: int = 8):
    prompts = [build_prompt(r["question"], wrap, chat) for r in rows]
    outs = ec.generate_batched(lm, prompts, max_new_tokens, batch_size)
    refs = [metrics.gsm8k_reference(r["answer"]) for r in rows]
    per = [metrics.gsm8k_correct(o, ref) for o, ref in zip(outs, refs)]
    acc = 100.0 * sum(per) / max(1, len(per))
    samples = [{"question": r["question"], "reference": ref, "output": o, "extracted": metrics.gsm8k_extract(o),
                "correct": c} for r, ref, o, c in zip(rows, refs, outs, per)]
    return {"accuracy": acc, "n": len(rows), "samples": samples}


def main(argv=None):
    ap = argparse.ArgumentParser(description="GSM8K (whole prompt compressed)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", help="local JSONL with question/answer")
    ap.add_argument("--tfds-split", default="test")
    ap.add_argument("--tfds-data-dir", default=None)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--no-wrap", action="store_true")
    ap.add_argument("--chat", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="results/gsm8k")
    a = ap.parse_args(argv)
    rows = ec.load_jsonl(a.data, a.n) if a.data else load_tfds(a.tfds_split, a.tfds_data_dir, a.n)
    lm = ec.load_model(a.checkpoint, a.dtype)
    chat = ec.has_chat_tokens(lm) if a.chat == "auto" else a.chat == "yes"
    res = evaluate(lm, rows, not a.no_wrap, chat, a.max_new_tokens, a.batch_size)
    print(f"GSM8K  checkpoint={a.checkpoint}  cr={lm.config.compression_ratio}  wrap={not a.no_wrap}  "
          f"n={res['n']}  accuracy={res['accuracy']:.2f}")
    ec.write_json({"checkpoint": a.checkpoint, "wrap": not a.no_wrap, **res}, os.path.join(a.out, "gsm8k.json"))
    return res


if __name__ == "__main__":
    main()
