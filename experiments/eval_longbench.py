"""LongBench-style evaluation from local files in the LongBench format, with its metrics.

    python -m experiments.eval_longbench --checkpoint DIR --data-dir longbench/ [--tasks hotpotqa qasper ...]

Each task is read from ``{data_dir}/{task}.jsonl`` with LongBench's fields ``input`` (the question),
``context``, ``answers`` (list) and optionally ``all_classes``. The context is wrapped in memory tags
and the question stays outside. Metrics (x100, best over references, mean over samples): QA F1 for
single-/multi-doc QA and TriviaQA, ROUGE-L for summarisation and SAMSum, classification accuracy for
TREC, passage count / retrieval accuracy, and an edit-similarity for the code tasks. Few-shot tasks
(TREC, TriviaQA, SAMSum) are scored on the first line of the answer, as LongBench does.
``--max-context-tokens`` truncates the context in the middle (encoder tokens) like LongBench.
"""

from __future__ import annotations

import argparse
import difflib
import os

from experiments import eval_common as ec
from experiments import metrics

QA = "single-doc QA"
MQA = "multi-doc QA"
SUM = "summarisation"
FEW = "few-shot"
SYN = "synthetic"
CODE = "code"
# task: (category, metric, max new tokens, instruction before the context, text after the context)
TASKS = {
    "narrativeqa": (QA, "f1", 128, "Read the story below and answer the question as briefly as possible.",
                    "Question: {input}\nAnswer briefly:"),
    "qasper": (QA, "f1", 128, "Read the scientific article below. Answer the question with a short phrase or "
               "sentence; write \"unanswerable\" if it cannot be answered, or yes/no for a yes/no question.",
               "Question: {input}\nAnswer:"),
    "multifieldqa_en": (QA, "f1", 64, "Read the text below and answer the question.",
                        "Answer the question from the text, as briefly as possible.\nQuestion: {input}\nAnswer:"),
    "hotpotqa": (MQA, "f1", 32, "Answer the question using the passages below. Give only the answer.",
                 "Question: {input}\nAnswer:"),
    "2wikimqa": (MQA, "f1", 32, "Answer the question using the passages below. Give only the answer.",
                 "Question: {input}\nAnswer:"),
    "musique": (MQA, "f1", 32, "Answer the question using the passages below. Give only the answer.",
                "Question: {input}\nAnswer:"),
    "gov_report": (SUM, "rouge", 512, "Below is a report by a government agency.",
                   "Write a one-page summary of the report.\nSummary:"),
    "qmsum": (SUM, "rouge", 512, "Below is a meeting transcript.",
              "Answer the query about the transcript in one or more sentences.\nQuery: {input}\nAnswer:"),
    "multi_news": (SUM, "rouge", 512, "Below are several news articles.",
                   "Write a one-page summary of all the news.\nSummary:"),
    "trec": (FEW, "classification", 64, "Classify the type of the question. Examples:", "{input}"),
    "triviaqa": (FEW, "f1", 32, "Answer the question from the passage. Examples:", "{input}"),
    "samsum": (FEW, "rouge", 128, "Summarise the dialogue. Examples:", "{input}"),
    "passage_count": (SYN, "count", 32, "Below are several paragraphs, some of which may be duplicates.",
                      "How many unique paragraphs are there? Answer with the number only.\nAnswer:"),
    "passage_retrieval_en": (SYN, "retrieval", 32, "Below are 30 paragraphs and an abstract.",
                             "Abstract: {input}\nWhich paragraph is the abstract from? Answer like "
                             "\"Paragraph 1\".\nAnswer:"),
    "lcc": (CODE, "code_sim", 64, "Complete the code.", "Next line of code:\n"),
    "repobench-p": (CODE, "code_sim", 64, "Complete the code.", "{input}Next line of code:\n"),
}
DEFAULT_TASKS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report",
                 "qmsum", "multi_news")
FIRST_LINE = {"trec", "triviaqa", "samsum"}


def code_sim(pred: str, ref: str) -> float:
    line = next((ln for ln in pred.lstrip("\n").split("\n") if "`" not in ln and "#" not in ln and "//" not in ln),
                "")
    return difflib.SequenceMatcher(None, line, ref).ratio()


METRICS = {"f1": metrics.qa_f1, "rouge": metrics.rouge_l, "classification": metrics.classification_score,
           "count": metrics.count_score, "retrieval": metrics.retrieval_score, "code_sim": code_sim}


def score_task(task: str, pred: str, answers, all_classes=None) -> float:
    metric = METRICS[TASKS[task][1]]
    if task in FIRST_LINE:
        pred = pred.lstrip("\n").split("\n")[0]
    kw = {"all_classes": all_classes} if TASKS[task][1] == "classification" else {}
    return 100.0 * metrics.best_over_refs(metric, pred, answers, **kw)


def truncate_middle(text: str, max_tokens: int | None, tokenizer) -> str:
    if not max_tokens:
        return text
    enc = tokenizer.encode(text, add_special_tokens=False)
    if len(enc.ids) <= max_tokens:
        return text
    half = max_tokens // 2
    offs = enc.offsets
    return text[:offs[half - 1][1]] + text[offs[len(offs) - (max_tokens - half)][0]:]


def build_prompt(task: str, row: dict, wrap: bool = True, chat: bool = False, max_context_tokens=None,
                 tokenizer=None) -> str:
    _, _, _, before, after = TASKS[task]
    ctx = truncate_middle(row["context"], max_context_tokens, tokenizer) if max_context_tokens else row["context"]
    if not ctx:
        ctx = " "
    ctx = f"<|memory_start|>{ctx}<|memory_end|>" if wrap else ctx
    body = f"{before}\n\n{ctx}\n\n{after.format(input=row.get('input', ''))}"
    if chat and TASKS[task][0] not in (FEW, CODE):
        return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    return body


def load_task(data_dir, task, n=None) -> list[dict]:
    return ec.load_jsonl(os.path.join(data_dir, f"{task}.jsonl"), n)


def evaluate(lm, data_dir, tasks, n=None, wrap=True, chat=False, batch_size=4, max_context_tokens=None, log=print):
    tok = lm.processor.encoder_tokenizer
    scores, samples = {}, []
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown LongBench task {task!r}; choose from {sorted(TASKS)}")
        rows = load_task(data_dir, task, n)
        prompts = [build_prompt(task, r, wrap, chat, max_context_tokens, tok) for r in rows]
        outs = ec.generate_batched(lm, prompts, TASKS[task][2], batch_size)
        per = [score_task(task, o, r["answers"], r.get("all_classes")) for o, r in zip(outs, rows)]
        scores[task] = sum(per) / max(1, len(per))
        samples += [{"task": task, "output": o, "answers": r["answers"], "score": s}
                    for o, r, s in list(zip(outs, rows, per))[:3]]
        log(f"{task:22s} {TASKS[task][1]:14s} {scores[task]:6.2f}  ({len(rows)} samples)")
    avg = sum(scores.values()) / max(1, len(scores))
    return {"scores": scores, "average": avg, "samples": samples}


def main(argv=None):
    ap = argparse.ArgumentParser(description="LongBench-format evaluation")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-dir", required=True, help="folder with {task}.jsonl in the LongBench format")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--no-wrap", action="store_true")
    ap.add_argument("--chat", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--max-context-tokens", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="results/longbench")
    a = ap.parse_args(argv)
    lm = ec.load_model(a.checkpoint, a.dtype)
    chat = ec.has_chat_tokens(lm) if a.chat == "auto" else a.chat == "yes"
    res = evaluate(lm, a.data_dir, a.tasks, a.n, not a.no_wrap, chat, a.batch_size, a.max_context_tokens)
    print(ec.format_table(["task", "metric", "score"],
                          [[t, TASKS[t][1], s] for t, s in res["scores"].items()] + [["average", "", res["average"]]]))
    ec.write_json({"checkpoint": a.checkpoint, "wrap": not a.no_wrap, **res}, os.path.join(a.out, "longbench.json"))
    return res


if __name__ == "__main__":
    main()
