"""Text metrics: LongBench-style QA F1, ROUGE-L, classification / retrieval / count accuracy, GSM8K.

Normalisation for F1 follows the usual SQuAD recipe (lower-case, drop punctuation and the articles
a/an/the, collapse whitespace). ROUGE-L is the F-measure of the longest common subsequence over
lower-cased word tokens (beta = 1). Scores are in [0, 1]; the evaluation scripts report x100.
"""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _f1(pred_tokens, ref_tokens) -> float:
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p = same / len(pred_tokens)
    r = same / len(ref_tokens)
    return 2 * p * r / (p + r)


def qa_f1(pred: str, ref: str) -> float:
    return _f1(normalize_answer(pred).split(), normalize_answer(ref).split())


def _lcs(a, b) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (punctuation split off)."""
    tok = lambda s: re.findall(r"\w+", s.lower())  # noqa: E731
    p, r = tok(pred), tok(ref)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def classification_score(pred: str, ref: str, all_classes=None) -> float:
    """1 if ``ref`` is the class named in ``pred`` (a class that is a substring of another named
    class does not count), 0 otherwise; without ``all_classes``, plain containment."""
    if not all_classes:
        return float(ref.lower() in pred.lower())
    hits = [c for c in all_classes if c in pred]
    hits = [c for c in hits if not (c in ref and c != ref)]
    return 1.0 / len(hits) if ref in hits else 0.0


def retrieval_score(pred: str, ref: str) -> float:
    """Passage retrieval ("Paragraph 3"): fraction of the numbers in ``pred`` equal to the reference's."""
    want = re.findall(r"\d+", ref)
    if not want:
        return 0.0
    got = re.findall(r"\d+", pred)
    return sum(1 for g in got if g == want[0]) / len(got) if got else 0.0


def count_score(pred: str, ref: str) -> float:
    got = re.findall(r"\d+", pred)
    return sum(1 for g in got if g == str(ref)) / len(got) if got else 0.0


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def best_over_refs(metric, pred: str, refs, **kw) -> float:
    refs = [refs] if isinstance(refs, str) else list(refs)
    return max((metric(pred, r, **kw) for r in refs), default=0.0)


# ---------------------------------------------------------------------------------------- GSM8K
_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _clean_number(s: str) -> str:
    s = s.replace("$", "").replace(",", "").strip()
    if s.endswith("."):
        s = s[:-1]
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else repr(v)


def gsm8k_reference(answer_field: str) -> str:
    """The final number of a GSM8K ``answer`` field (after ``####``)."""
    tail = answer_field.split("####")[-1]
    return _clean_number(tail)


def gsm8k_extract(text: str) -> str | None:
    """The model's final answer: after ``####`` or "answer is", else the last number in the text."""
    for pat in (r"####\s*(" + _NUM.pattern + ")", r"answer is[:\s]*(" + _NUM.pattern + ")",
                r"\\boxed\{(" + _NUM.pattern + r")\}"):
        m = re.findall(pat, text, flags=re.IGNORECASE)
        if m:
            return _clean_number(m[-1])
    nums = _NUM.findall(text)
    return _clean_number(nums[-1]) if nums else None


def gsm8k_correct(text: str, reference: str) -> bool:
    got = gsm8k_extract(text)
    return got is not None and got == gsm8k_reference(reference)  # a raw answer field or a bare number
