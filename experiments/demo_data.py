"""Synthetic data for the offline demo: needle retrieval over a noise haystack, plus reconstruction.

Everything is generated from a seed (no downloads). A *needle example* hides one sentence
``The special magic number for {key} is: {value}.`` at a random depth in a haystack of short noise
sentences and asks for the value of ``key``. The wording follows the RULER ``niah_single_1`` task of
``experiments/ruler.py`` (same needle, question and answer prefix), so a model trained here can also
be scored by the RULER runner on that task. A *reconstruction example* wraps a short haystack (with
its needle) in memory tags and asks the model to repeat it, which teaches the encoder to keep exact
strings. ``reconstruction_text`` (random words and numbers) feeds the demo tokenizer's corpus.

Three renderings of the same needle example are used by the demo:

* ``compressed``  haystack inside ``<|memory_start|>...<|memory_end|>`` (ceil(T/cr) latents);
* ``raw``         the same haystack as plain decoder tokens (uncompressed decoder);
* ``truncated``   only the last ``budget`` haystack tokens as plain tokens, where ``budget`` is the
                  number of latents the compressed rendering spends (same decoder token budget).
"""

from __future__ import annotations

import dataclasses
import math
import random

from experiments import ruler

MEM_START, MEM_END = "<|memory_start|>", "<|memory_end|>"
RECON_WORDS = ("red", "blue", "tree", "lake", "stone", "wind", "road", "fire", "moon", "gold", "iron", "salt",
               "bird", "fish", "rain", "snow", "door", "hill", "ship", "corn")


@dataclasses.dataclass(frozen=True)
class NeedleExample:
    prefix: str
    haystack: str  # the context text (contains the needle sentence)
    question: str
    value: str

    def prompt(self, mode: str = "compressed", budget_chars: int | None = None) -> str:
        """The prompt text (no answer). ``truncated`` keeps the last ``budget_chars`` characters."""
        if mode == "compressed":
            return ruler.render_prompt(self.prefix, self.haystack, self.question, wrap=True)
        if mode == "raw":
            return ruler.render_prompt(self.prefix, self.haystack, self.question, wrap=False)
        if mode == "truncated":
            if budget_chars is None:
                raise ValueError("truncated mode needs budget_chars")
            tail = self.haystack[len(self.haystack) - budget_chars:] if budget_chars > 0 else ""
            return ruler.render_prompt(self.prefix, tail, self.question, wrap=False)
        raise ValueError(f"unknown mode {mode!r}")

    @property
    def target(self) -> str:
        return f" {self.value}."


def needle_example(rng: random.Random, n_sentences: int, digits: int = 4) -> NeedleExample:
    """RULER ``niah_single_1`` with ``n_sentences`` noise sentences and a ``digits``-digit value."""
    prefix, ctx, q, answers = ruler._niah("niah_single_1", n_sentences, rng, digits)
    return NeedleExample(prefix, ctx, q, answers[0])


def needle_example_tokens(rng: random.Random, target_tokens: int, count_tokens, digits: int = 4) -> NeedleExample:
    """A needle example whose haystack is at most ``target_tokens`` tokens (by ``count_tokens``)."""
    per = max(1.0, count_tokens(" ".join(ruler.NOISE_SENTENCES)) / len(ruler.NOISE_SENTENCES))
    n = max(1, int(target_tokens / per))
    while True:
        state = rng.getstate()
        ex = needle_example(rng, n, digits)
        if count_tokens(ex.haystack) <= target_tokens or n <= 1:
            return ex
        rng.setstate(state)
        n -= 1


def reconstruction_text(rng: random.Random, n_words: int) -> str:
    words = []
    for _ in range(n_words):
        if rng.random() < 0.25:
            words.append(str(rng.randint(0, 99999)))
        else:
            words.append(rng.choice(RECON_WORDS))
    return " ".join(words)


def reconstruction_pair(rng: random.Random, target_tokens: int, count_tokens, digits=(2, 4)):
    """Reconstruction of a short haystack (noise sentences with a needle): copy supervision that teaches
    the decoder to read exact strings, the needle's value included, back out of the latents."""
    ex = needle_example_tokens(rng, target_tokens, count_tokens, rng.randint(*digits))
    return f"{MEM_START}{ex.haystack}{MEM_END}\nRepeat the text above exactly:", f" {ex.haystack}"


def truncation_budget_chars(haystack: str, cr: int, count_tokens) -> int:
    """Characters of the haystack's tail that fit in ceil(T/cr) tokens (the compressed budget)."""
    budget = math.ceil(count_tokens(haystack) / cr)
    lo, hi = 0, len(haystack)
    while lo < hi:  # longest tail with at most ``budget`` tokens
        mid = (lo + hi + 1) // 2
        if count_tokens(haystack[len(haystack) - mid:]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
