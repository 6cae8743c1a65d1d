"""Property tests (seeded numpy RNGs) for the example builders' rules."""

import numpy as np
import pytest

from data_pipelines.common import IGNORE, SKIP_REASONS, SkipRecord, check_example, split_spans
from data_pipelines.cpt import CPTBuilder, CPTConfig, check_plan, pair_range, plan_segments, trainable_tokens
from data_pipelines.reconstruction import ReconstructionBuilder, ReconstructionConfig
from data_pipelines.sft import SFTBuilder, SFTConfig, plan_regions
from data_pipelines.testing import bad_records, random_chats, random_documents, tiny_tokenizers


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizers(4)


def test_cpt_plan_rules_hold_for_many_lengths():
    cfg = CPTConfig()
    rng = np.random.default_rng(0)
    lengths = np.concatenate([np.arange(256, 600), rng.integers(256, 200_000, 3000),
                              [2047, 2048, 4095, 4096, 8191, 8192, 16384, 16385]])
    for n in lengths:
        plan = plan_segments(int(n), cfg, rng)
        assert check_plan(int(n), plan, cfg) == [], (n, plan)
        lo, hi = pair_range(int(n), cfg)
        assert lo <= len(plan) // 2 <= hi, (n, plan)  # never lowered for the default rules
        raws = [l for w, l in plan if not w]
        assert sum(raws) == (8192 if n > 16384 else n // 2)


def test_cpt_plan_uses_every_pair_count():
    cfg = CPTConfig()
    rng = np.random.default_rng(1)
    seen = {n: set() for n in (3000, 6000, 12000, 50000)}
    for n in seen:
        for _ in range(300):
            seen[n].add(len(plan_segments(n, cfg, rng)) // 2)
    assert seen == {3000: {1, 2}, 6000: {2, 3, 4}, 12000: {4, 5, 6}, 50000: set(range(4, 9))}


def test_cpt_too_short_documents_are_skipped():
    with pytest.raises(SkipRecord) as e:
        plan_segments(255, CPTConfig(), np.random.default_rng(0))
    assert e.value.reason == "too_short"


def test_cpt_examples(tok):
    cfg = CPTConfig(max_chars=10**6)
    b = CPTBuilder(tok, cfg)
    rng = np.random.default_rng(2)
    built = 0
    for d in random_documents(60, seed=3, words=(100, 6000)):
        try:
            ex, realised = b.build(d, rng)
        except SkipRecord as e:
            assert e.reason == "too_short"
            continue
        built += 1
        check_example(ex, tok)
        n = sum(l for _, l in realised)
        # Cuts move at most 3 tokens to a character boundary; the plan itself is exact.
        assert check_plan(n, b.last_plan, cfg) == []
        assert max(abs(a[1] - p[1]) for a, p in zip(realised, b.last_plan)) <= 3
        assert min(l for _, l in realised) >= cfg.min_segment_tokens
        # loss on raw tokens only: supervised count == raw tokens; the text round-trips
        sup = ex["labels"] != IGNORE
        assert sup.sum() == sum(l for w, l in realised if not w)
        assert len(split_spans(ex)) == len(realised) // 2
        assert [len(s) > 0 for s in split_spans(ex)] == [True] * (len(realised) // 2)
    assert built > 40


def test_cpt_reconstructs_document_text(tok):
    """Concatenating span texts and raw texts in order gives the document back."""
    b = CPTBuilder(tok, CPTConfig(min_segment_tokens=16, max_chars=10**6))
    rng = np.random.default_rng(4)
    for d in random_documents(20, seed=5, words=(200, 2000)):
        ex, realised = b.build(d, rng)
        spans = split_spans(ex)
        ids, out, k, i = ex["input_ids"], [], 0, 0
        while i < len(ids):
            if ids[i] == tok.memory_start_id:
                out.append(tok.encoder.decode(spans[k].tolist()))
                i += 1 + tok.num_latents(len(spans[k])) + 1
                k += 1
            else:
                j = i
                while j < len(ids) and ids[j] != tok.memory_start_id:
                    j += 1
                out.append(tok.decoder.decode(ids[i:j].tolist()))
                i = j
        assert "".join(out) == d["text"]


def test_sft_region_plans():
    cfg = SFTConfig()
    rng = np.random.default_rng(6)
    full = 0
    for _ in range(4000):
        n = int(rng.integers(1, 3000))
        plan = plan_regions(n, cfg, rng)
        assert sum(l for _, l in plan) == n and all(l > 0 for _, l in plan)
        wrapped = [l for w, l in plan if w]
        assert 1 <= len(wrapped) <= 3
        if plan == [(True, n)]:
            full += 1
        else:
            assert 0.8 - 1 / n <= sum(wrapped) / n <= 1.0 + 1e-9
        # wrapped regions are separated by raw tokens
        assert all(not (a[0] and b[0]) for a, b in zip(plan, plan[1:]))
    assert 0.45 < full / 4000 < 0.6  # p=0.5 plus partial plans that collapse to one full region


def test_sft_examples_supervise_assistant_turns_only(tok):
    b = SFTBuilder(tok)
    rng = np.random.default_rng(7)
    for rec in random_chats(40, seed=8):
        ex = b(rec, rng)
        assert ex["skip"] == -1
        check_example(ex, tok)
        sup_text = tok.decoder.decode(ex["labels"][ex["labels"] != IGNORE].tolist(),
                                      skip_special_tokens=False)
        want = "".join(m["content"] + "<|im_end|>\n" for m in rec["messages"]
                       if m["role"] == "assistant")
        assert sup_text == want
        n_user = sum(m["role"] == "user" for m in rec["messages"])
        assert len(ex["span_lens"]) >= n_user  # every user message is compressed


def test_sft_reference_tagged_format(tok):
    rec = {"compression_prompt": [{"role": "user",
                                   "content": "<|memory_start|>some doc<|memory_end|> Q?"}],
           "target": "ans"}
    ex = SFTBuilder(tok)(rec, np.random.default_rng(0))
    check_example(ex, tok)
    assert tok.encoder.decode(ex["enc_ids"].tolist()) == "some doc"
    text = tok.decoder.decode(ex["input_ids"].tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\n<|memory_start|><|memory|><|memory|><|memory_end|> Q?")
    assert text.endswith("<|im_start|>assistant\nans<|im_end|>\n")


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_reconstruction_examples(tok, fmt):
    b = ReconstructionBuilder(tok, ReconstructionConfig(min_span_tokens=8, max_span_tokens=300,
                                                        format=fmt))
    rng = np.random.default_rng(9)
    for d in random_documents(30, seed=10, words=(20, 800)):
        ex = b(d, rng)
        if ex["skip"] >= 0:
            assert SKIP_REASONS[int(ex["skip"])] == "too_short"
            continue
        check_example(ex, tok)
        assert len(ex["span_lens"]) == 1
        span_text = tok.encoder.decode(ex["enc_ids"].tolist())
        target = tok.decoder.decode(ex["labels"][ex["labels"] != IGNORE].tolist(),
                                    skip_special_tokens=False)
        end = "<|endoftext|>" if fmt == "plain" else "<|im_end|>\n"
        assert target == span_text + end and span_text in d["text"]
        prompt = tok.decoder.decode(ex["input_ids"].tolist(), skip_special_tokens=False)
        assert any(t in prompt for t in b.cfg.templates)


def test_bad_records_are_skipped_and_counted(tok):
    rng = np.random.default_rng(0)
    builders = [CPTBuilder(tok, CPTConfig(max_chars=100_000)),
                ReconstructionBuilder(tok, ReconstructionConfig(max_chars=100_000)),
                SFTBuilder(tok, SFTConfig(max_chars=100_000))]
    for b in builders:
        reasons = [SKIP_REASONS[int(b(r, rng)["skip"])] for r in bad_records()]
        assert all(r in SKIP_REASONS for r in reasons)
    cpt = [SKIP_REASONS[int(builders[0](r, rng)["skip"])] for r in bad_records()]
    assert cpt[:4] == ["empty", "empty", "invalid_utf8", "invalid_utf8"]
    assert cpt[-2:] == ["too_long", "invalid_utf8"]
    sft = [SKIP_REASONS[int(builders[2](r, rng)["skip"])] for r in bad_records()]
    assert "empty_span" in sft and "bad_format" in sft
