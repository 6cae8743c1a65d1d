"""RULER-style synthetic evaluation: a local generator for the 13 tasks, the eval-set loader, scoring.

Tasks (names as in RULER): ``niah_single_{1,2,3}``, ``niah_multikey_{1,2,3}``, ``niah_multivalue``,
``niah_multiquery``, ``vt`` (variable tracking), ``cwe`` (common-words extraction), ``fwe``
(frequent-words extraction), ``qa_1`` (single-hop QA) and ``qa_2`` (two-hop QA).

The generator needs no downloads. Haystacks are built from local material only: repeated noise
sentences, an "essay" text generated from a small grammar, or lines of distractor needles; the QA
passages are synthetic biographies / organisations (or come from a local JSONL, see ``load_qa_file``).
Every sample is a pure function of ``(task, length, index, seed)``. The context (haystack) is wrapped
in ``<|memory_start|>...<|memory_end|>`` as in the published ``memwrap`` eval set; the instruction and
the question stay outside the tags. The context is sized so that the whole prompt plus the task's
generation budget fits ``length`` tokens of the given token counter.

Scoring follows RULER: ``string_match_all`` (mean over references of case-insensitive containment,
x100) for the NIAH/VT/CWE/FWE tasks and ``string_match_part`` (any reference contained, x100) for QA.

``load_eval_rows`` reads the published eval-set format (``prompt``, ``category``, ``extra_info``) from
local JSONL or Parquet files; category ``memwrap/ruler/{task}_{length}``, answers in
``extra_info.ground_truth.answers`` (fallbacks ``answer`` / ``answers``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import string
from typing import Callable, Iterable

MEM_START, MEM_END = "<|memory_start|>", "<|memory_end|>"

TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
NIAH_TASKS = TASKS[:8]
SHORT_NAMES = {"niah_single_1": "ns1", "niah_single_2": "ns2", "niah_single_3": "ns3", "niah_multikey_1": "nm1",
               "niah_multikey_2": "nm2", "niah_multikey_3": "nm3", "niah_multivalue": "nmv",
               "niah_multiquery": "nmq", "vt": "vt", "cwe": "cwe", "fwe": "fwe", "qa_1": "qa1", "qa_2": "qa2"}
# Generation budget per task (tokens), as RULER sets them.
GEN_TOKENS = {**{t: 128 for t in NIAH_TASKS}, "vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}

# ---------------------------------------------------------------------------------- templates
NIAH_PREFIX = "Special magic values are hidden in the text below. Remember them: you will be asked about them."
NIAH_NEEDLE = "The special magic {type_v} for {key} is: {value}."
NIAH_QUESTION = "What is the special magic {type_v} for {key} in the text above?"
NIAH_QUESTION_MV = "What are all the special magic {type_v}s for {key} in the text above?"
NIAH_QUESTION_MQ = "What are all the special magic {type_v}s for {keys} in the text above?"
ANSWER_PREFIX = "Answer:"
VT_PREFIX = "Memorize and track the chain of variable assignments hidden in the text below."
VT_QUESTION = "Which variables are assigned the value {value}, directly or through other variables, in the text above?"
CWE_PREFIX = "Below is a numbered list of words. Some words appear many times."
CWE_QUESTION = "What are the {n} most common words in the list above?"
FWE_PREFIX = "Read the coded text below and find the most frequent coded words."
FWE_QUESTION = "What are the three most frequently appearing coded words in the text above?"
QA_PREFIX = "Answer the question using the documents below. Give only the answer."
QA_QUESTION = "Question: {question}"

NOISE_SENTENCES = ("The river runs north.", "The hills are quiet.", "Birds sing at dawn.", "Nothing happens here.",
                   "The day goes on.", "Clouds pass over the field.", "The road is long and dry.")
_ADJ = ("calm", "bold", "quiet", "brave", "rapid", "amber", "silent", "lucky", "gentle", "sharp", "golden", "hollow",
        "frozen", "bright", "misty", "rustic", "tidy", "vivid", "wooden", "noble", "crimson", "dusty", "eager", "fuzzy")
_NOUN = ("harbor", "falcon", "meadow", "lantern", "canyon", "orchard", "beacon", "glacier", "comet", "willow",
         "anchor", "summit", "pebble", "thicket", "voyage", "quarry", "ember", "island", "garden", "tunnel",
         "bridge", "castle", "forest", "valley")
SHORT_KEYS = tuple(f"{a}-{n}" for a in _ADJ[:8] for n in _NOUN[:8])
_SUBJ = ("The author", "A farmer", "The old teacher", "Our neighbour", "The committee", "A young engineer",
         "The traveller", "Every student", "The company", "A careful reader")
_VERB = ("thinks about", "writes about", "remembers", "questions", "builds", "studies", "explains", "ignores",
         "describes", "returns to")
_OBJ = ("the value of small projects", "a quiet afternoon", "the history of the town", "how markets change",
        "an unfinished letter", "the cost of waiting", "the shape of the coast", "a simple machine",
        "the rules of the game", "what makes work good")
_TAIL = ("every spring", "without hurry", "in great detail", "for many years", "with some doubt", "at night",
         "once again", "", "", "")
_SYL = ("ba", "ko", "ri", "mu", "te", "sa", "lo", "ne", "vi", "da", "pu", "ge", "zo", "fa", "hi", "ju")
_CITIES = ("Arlen", "Brisk", "Calder", "Dunmore", "Elston", "Fairhold", "Garrow", "Hollin", "Ivel", "Jarrow",
           "Kestel", "Lorn", "Marrick", "Norland", "Oakes", "Pellam")
_FIRST = ("Ada", "Bram", "Cora", "Dario", "Edda", "Finn", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lev")
_LAST = ("Marsh", "Quill", "Rowe", "Stark", "Thorne", "Vale", "Wren", "Yates", "Zeller", "Brook", "Crane", "Dale")
_JOBS = ("a painter", "a chemist", "a sailor", "a judge", "a baker", "an architect", "a pilot", "a poet")
_ORG_A = ("North", "Blue", "Iron", "Silver", "Green", "First", "Grand", "Bright")
_ORG_B = ("Works", "Labs", "Mills", "Partners", "Holdings", "Foundry", "Guild", "Union")


# ---------------------------------------------------------------------------------- scoring
def string_match_all(pred: str, refs: Iterable[str]) -> float:
    """100 x fraction of references contained (case-insensitively) in ``pred``; 0 with no references."""
    refs = list(refs)
    if not refs:
        return 0.0
    p = pred.lower()
    return 100.0 * sum(1.0 for r in refs if str(r).lower() in p) / len(refs)


def string_match_part(pred: str, refs: Iterable[str]) -> float:
    """100 if any reference is contained (case-insensitively) in ``pred``, else 0."""
    p = pred.lower()
    return 100.0 if any(str(r).lower() in p for r in refs) else 0.0


def metric_for(task: str) -> Callable[[str, list], float]:
    return string_match_part if task.startswith("qa") else string_match_all


def score(task: str, pred: str, refs: list) -> float:
    return metric_for(task)(pred, refs)


# ---------------------------------------------------------------------------------- generator
@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    length: int
    index: int
    prefix: str
    context: str
    question: str
    answers: tuple

    @property
    def category(self) -> str:
        return f"memwrap/ruler/{self.task}_{self.length}"

    def prompt(self, wrap: bool = True, chat: bool = False) -> str:
        return render_prompt(self.prefix, self.context, self.question, wrap=wrap, chat=chat)

    def to_row(self, wrap: bool = True, chat: bool = False) -> dict:
        """A row in the published eval-set format."""
        return {"prompt": self.prompt(wrap, chat), "category": self.category,
                "extra_info": {"ground_truth": {"answers": list(self.answers)}, "index": self.index,
                               "length": self.length}}


def render_prompt(prefix: str, context: str, question: str, wrap: bool = True, chat: bool = False) -> str:
    ctx = f"{MEM_START}{context}{MEM_END}" if wrap else context
    body = f"{prefix}\n{ctx}\n{question}"
    if chat:
        return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n{ANSWER_PREFIX}"
    return f"{body} {ANSWER_PREFIX}"


def approx_tokens(text: str) -> int:
    """Fallback counter (~4 characters per token) when no tokenizer is given."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def word_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"


def uuid_like(rng: random.Random) -> str:
    h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def number_value(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def essay_sentence(rng: random.Random) -> str:
    tail = rng.choice(_TAIL)
    return f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)}{' ' + tail if tail else ''}."


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(_SYL) for _ in range(syllables))


def _insert(units: list, items: list, rng: random.Random) -> list:
    """Insert ``items`` (in order) at sorted random positions among ``units``."""
    at = sorted(rng.randint(0, len(units)) for _ in items)
    out, j = [], 0
    for i in range(len(units) + 1):
        while j < len(items) and at[j] == i:
            out.append(items[j])
            j += 1
        if i < len(units):
            out.append(units[i])
    return out


def _distinct(rng, make, n, avoid=()):
    seen, out = set(avoid), []
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        x = make(rng)
        if x not in seen:
            seen.add(x)
            out.append(x)
    if len(out) < n:
        raise ValueError("could not draw enough distinct values")
    return out


_NIAH_CFG = {  # haystack, key kind, value kind, #keys (1 real + distractors), #values, #queries
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
}


def _niah(task: str, n_units: int, rng: random.Random, digits: int = 7):
    hay, kk, vk, nk, nv, nq = _NIAH_CFG[task]
    make_key = word_key if kk == "words" else uuid_like
    make_val = (lambda r: number_value(r, digits)) if vk == "numbers" else uuid_like
    type_v = "number" if vk == "numbers" else "uuid"
    n_keys = max(nk, nq)
    keys = _distinct(rng, make_key, n_keys)
    values = [[make_val(rng) for _ in range(nv)] for _ in keys]
    needles = [NIAH_NEEDLE.format(type_v=type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = keys[:nq]
    if hay == "noise":
        units = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n_units)]
    elif hay == "essay":
        units = [essay_sentence(rng) for _ in range(n_units)]
    else:  # a haystack of distractor needles (other keys)
        dkeys = _distinct(rng, make_key, n_units, avoid=keys)
        units = [NIAH_NEEDLE.format(type_v=type_v, key=k, value=make_val(rng)) for k in dkeys]
    context = " ".join(_insert(units, needles, rng))
    if nv > 1:
        question = NIAH_QUESTION_MV.format(type_v=type_v, key=asked[0])
    elif nq > 1:
        question = NIAH_QUESTION_MQ.format(type_v=type_v, keys=", ".join(asked[:-1]) + " and " + asked[-1])
    else:
        question = NIAH_QUESTION.format(type_v=type_v, key=asked[0])
    answers = [v for k, vs in zip(keys, values) if k in asked for v in vs]
    return NIAH_PREFIX, context, question, answers


def _vt(n_units: int, rng: random.Random, hops: int = 4):
    names = _distinct(rng, lambda r: "".join(r.choice(string.ascii_uppercase) for _ in range(5)), hops + 1)
    value = number_value(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    units = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n_units)]
    context = " ".join(_insert(units, chain, rng))
    return VT_PREFIX, context, VT_QUESTION.format(value=value), names


def _cwe(n_units: int, rng: random.Random, num_cw: int = 10):
    """``n_units`` = number of uncommon words (each appears ``freq_ucw`` times)."""
    freq_cw, freq_ucw = (30, 3) if n_units >= 30 else (max(2, n_units // 2 + 2), 1)
    words = _distinct(rng, pseudo_word, num_cw + n_units)
    common, rare = words[:num_cw], words[num_cw:]
    seq = [w for w in common for _ in range(freq_cw)] + [w for w in rare for _ in range(freq_ucw)]
    rng.shuffle(seq)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq))
    return CWE_PREFIX, context, CWE_QUESTION.format(n=num_cw), common


def _fwe(n_units: int, rng: random.Random, alpha: float = 2.0, vocab: int = 40):
    """``n_units`` = number of coded words in the text; counts follow Zipf(alpha) over ranks."""
    words = _distinct(rng, lambda r: pseudo_word(r, 2), vocab)
    weights = [1.0 / (i + 1) ** alpha for i in range(vocab)]
    total = sum(weights)
    counts = [max(1, int(n_units * w / total)) for w in weights]
    counts[1] = min(counts[1], counts[0] - 1) if counts[0] > 1 else counts[1]
    seq = [w for w, c in zip(words, counts) for _ in range(c)]
    rng.shuffle(seq)
    top = [w for _, w in sorted(zip(counts, words), key=lambda t: -t[0])[:3]]
    return FWE_PREFIX, " ".join(seq), FWE_QUESTION, top


def _person(rng):
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _qa(task: str, n_units: int, rng: random.Random, qa_pool=None):
    """``n_units`` = number of documents (1 gold, 2 for two-hop, the rest distractors)."""
    if qa_pool:
        item = qa_pool[rng.randrange(len(qa_pool))]
        gold = list(item["passages"])
        pool = [p for it in qa_pool if it is not item for p in it["passages"]]
        distract = [pool[rng.randrange(len(pool))] for _ in range(max(0, n_units - len(gold)))] if pool else []
        docs = _insert(distract, gold, rng)
        question, answers = item["question"], list(item["answers"])
    else:
        people = _distinct(rng, _person, 1)
        people += ["", ""]
        while len(people) < n_units + 2:  # distractor people may repeat, never the asked one
            p = _person(rng)
            if p != people[0]:
                people.append(p)
        if task == "qa_1":
            who, city, job = people[0], rng.choice(_CITIES), rng.choice(_JOBS)
            gold = [f"{who} was born in {city}. Later {who} worked as {job}."]
            question, answers = f"In which city was {who} born?", [city]
        else:
            who = people[0]
            org = f"{rng.choice(_ORG_A)} {rng.choice(_ORG_B)}"
            city = rng.choice(_CITIES)
            gold = [f"{who} founded {org} after years as {rng.choice(_JOBS)}.",
                    f"{org} keeps its main office in {city}."]
            question, answers = f"In which city is the main office of the company founded by {who}?", [city]
        distract = [f"{p} was born in {rng.choice(_CITIES)}. Later {p} worked as {rng.choice(_JOBS)}."
                    for p in people[2:2 + max(0, n_units - len(gold))]]
        docs = _insert(distract, gold, rng)
    context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    return QA_PREFIX, context, QA_QUESTION.format(question=question), answers


def _build(task, n_units, rng, qa_pool=None, digits=7):
    if task in _NIAH_CFG:
        return _niah(task, n_units, rng, digits)
    if task == "vt":
        return _vt(n_units, rng)
    if task == "cwe":
        return _cwe(n_units, rng)
    if task == "fwe":
        return _fwe(n_units, rng)
    if task in ("qa_1", "qa_2"):
        return _qa(task, n_units, rng, qa_pool)
    raise ValueError(f"unknown RULER task {task!r}; choose from {TASKS}")


def _min_units(task):
    return {"cwe": 0, "fwe": 12, "qa_1": 1, "qa_2": 2}.get(task, 1)


def generate_sample(task: str, length: int, index: int, seed: int = 0, count_tokens=None,
                    gen_tokens: int | None = None, qa_pool=None, digits: int = 7) -> Sample:
    """One sample whose prompt + generation budget fits ``length`` tokens (by ``count_tokens``)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {TASKS}")
    count = count_tokens or approx_tokens
    budget = length - (GEN_TOKENS[task] if gen_tokens is None else gen_tokens)
    base = f"{seed}:{task}:{length}:{index}"

    def make(n):
        rng = random.Random(base)
        prefix, ctx, q, ans = _build(task, n, rng, qa_pool, digits)
        total = count(ctx) + count(render_prompt(prefix, "", q, wrap=False)) + 2  # + the two tags
        return total, (prefix, ctx, q, ans)

    lo = _min_units(task)
    total, best = make(lo)
    if total > budget:
        raise ValueError(f"{task}: length {length} is too short for even the smallest sample ({total} tokens)")
    hi = lo + 1
    while make(hi)[0] <= budget:  # exponential search, then bisection on the number of units
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if make(mid)[0] <= budget:
            lo = mid
        else:
            hi = mid
    _, (prefix, ctx, q, ans) = make(lo)
    return Sample(task, length, index, prefix, ctx, q, tuple(ans))


def generate(task: str, length: int, n: int, seed: int = 0, count_tokens=None, **kw) -> list[Sample]:
    return [generate_sample(task, length, i, seed, count_tokens, **kw) for i in range(n)]


def load_qa_file(path) -> list[dict]:
    """Local QA passages for ``qa_1``/``qa_2``: JSONL rows ``{"question", "answers", "passages"}``
    (``passages``: the gold paragraph(s); the other rows' passages serve as distractors)."""
    rows = _read_rows(path)
    for i, r in enumerate(rows):
        if not {"question", "answers", "passages"} <= set(r):
            raise ValueError(f"{path} row {i}: needs question, answers, passages")
    return rows


# ---------------------------------------------------------------------------------- eval-set loader
def _read_rows(path) -> list[dict]:
    path = os.fspath(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def answers_of(extra_info) -> list[str]:
    if isinstance(extra_info, str):
        extra_info = json.loads(extra_info)
    extra_info = extra_info or {}
    gt = extra_info.get("ground_truth") or {}
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except json.JSONDecodeError:
            gt = {"answers": [gt]}
    for src in (gt, extra_info):
        for key in ("answers", "answer"):
            v = src.get(key) if isinstance(src, dict) else None
            if v is not None:
                return [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
    return []


_CAT = re.compile(r"^(?:memwrap/)?ruler/(.+)_(\d+)$")


def load_eval_rows(paths, tasks=None, lengths=None, limit: int | None = None) -> list[dict]:
    """Rows ``{task, length, prompt, answers, index}`` from published-format JSONL/Parquet files.

    ``tasks`` / ``lengths`` filter; ``limit`` caps the rows per (task, length)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out, per = [], {}
    for p in paths:
        for r in _read_rows(p):
            m = _CAT.match(str(r.get("category", "")))
            if not m:
                continue
            task, length = m.group(1), int(m.group(2))
            if (tasks and task not in tasks) or (lengths and length not in lengths):
                continue
            k = (task, length)
            if limit is not None and per.get(k, 0) >= limit:
                continue
            per[k] = per.get(k, 0) + 1
            out.append({"task": task, "length": length, "prompt": r["prompt"],
                        "answers": answers_of(r.get("extra_info")), "index": per[k] - 1})
    return out


def write_jsonl(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
