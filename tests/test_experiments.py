"""Evaluation code in experiments/: RULER generator and scoring, metrics, agent loop, KV eviction, demo path."""

import json
import random

import numpy as np
import pytest

from experiments import agent, demo_data, eval_longbench, kv_eviction, metrics, ruler

from .conftest import GOLDEN

CKPT = GOLDEN / "mean_causal_cr4_w16" / "checkpoint"


@pytest.fixture(scope="module")
def lm():
    import lclm_jax
    return lclm_jax.load(CKPT, dtype="float32")


@pytest.fixture(scope="module")
def count(lm):
    tok = lm.processor.encoder_tokenizer
    return lambda s: len(tok.encode(s, add_special_tokens=False).ids)


# ---------------------------------------------------------------------------------------- RULER
@pytest.mark.parametrize("task", ruler.TASKS)
def test_ruler_generator_deterministic_and_answers_present(task, count):
    a = ruler.generate_sample(task, 1024, 3, seed=7, count_tokens=count)
    b = ruler.generate_sample(task, 1024, 3, seed=7, count_tokens=count)
    assert a == b
    assert a != ruler.generate_sample(task, 1024, 4, seed=7, count_tokens=count)
    assert a.answers and all(ans in a.context for ans in a.answers)
    p = a.prompt()
    assert p.count(ruler.MEM_START) == 1 and p.count(ruler.MEM_END) == 1
    assert p.index(a.question) > p.index(ruler.MEM_END)  # the question stays outside the memory span
    total = count(a.context) + count(ruler.render_prompt(a.prefix, "", a.question, wrap=False)) + 2
    assert total + ruler.GEN_TOKENS[task] <= 1024
    assert total > 0.6 * (1024 - ruler.GEN_TOKENS[task])  # the haystack fills the budget
    assert a.to_row()["category"] == f"memwrap/ruler/{task}_1024"


def test_ruler_multi_answers_and_scales():
    mv = ruler.generate_sample("niah_multivalue", 2000, 0)
    assert len(mv.answers) == 4
    mq = ruler.generate_sample("niah_multiquery", 2000, 0)
    assert len(mq.answers) == 4 and all(v in mq.context for v in mq.answers)
    assert len(ruler.generate_sample("vt", 2000, 0).answers) == 5
    assert len(ruler.generate_sample("cwe", 2000, 0).answers) == 10
    long = ruler.generate_sample("niah_single_2", 8000, 0)
    assert len(long.context) > 3 * len(ruler.generate_sample("niah_single_2", 2000, 0).context)
    with pytest.raises(ValueError):
        ruler.generate_sample("niah_single_1", 20, 0)
    with pytest.raises(ValueError):
        ruler.generate_sample("nope", 1000, 0)


def test_ruler_scoring_hand_cases():
    assert ruler.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 100.0
    assert ruler.string_match_all("only 123", ["123", "456"]) == 50.0
    assert ruler.string_match_all("ABC-def", ["abc-DEF"]) == 100.0  # case-insensitive
    assert ruler.string_match_all("anything", []) == 0.0
    assert ruler.string_match_part("It is Paris.", ["London", "paris"]) == 100.0
    assert ruler.string_match_part("It is Rome.", ["London", "Paris"]) == 0.0
    assert ruler.score("qa_1", "x Paris", ["Paris", "Lyon"]) == 100.0
    assert ruler.score("niah_multivalue", "1 2", ["1", "2", "3", "4"]) == 50.0


def test_ruler_eval_set_loader(tmp_path):
    rows = [ruler.generate_sample(t, 600, i).to_row() for t in ("niah_single_1", "qa_1") for i in range(3)]
    rows.append({"prompt": "x", "category": "memwrap/gsm8k", "extra_info": {}})
    rows.append({"prompt": "y", "category": "memwrap/ruler/vt_4096",
                 "extra_info": json.dumps({"ground_truth": json.dumps({"answers": ["A", "B"]})})})
    rows.append({"prompt": "z", "category": "ruler/cwe_4096", "extra_info": {"answer": "w"}})
    ruler.write_jsonl(rows, tmp_path / "r.jsonl")
    got = ruler.load_eval_rows(tmp_path / "r.jsonl")
    assert [r["task"] for r in got] == ["niah_single_1"] * 3 + ["qa_1"] * 3 + ["vt", "cwe"]
    assert got[0]["answers"] == list(ruler.generate_sample("niah_single_1", 600, 0).answers)
    assert got[6]["answers"] == ["A", "B"] and got[7]["answers"] == ["w"]
    assert len(ruler.load_eval_rows(tmp_path / "r.jsonl", tasks=["qa_1"], limit=2)) == 2
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows[:6]), tmp_path / "r.parquet")
    got2 = ruler.load_eval_rows(tmp_path / "r.parquet", lengths=[600])
    assert [r["prompt"] for r in got2] == [r["prompt"] for r in got[:6]]


# ---------------------------------------------------------------------------------------- metrics
def test_text_metrics_hand_cases():
    assert metrics.qa_f1("The Eiffel Tower", "eiffel tower") == 1.0
    assert metrics.qa_f1("a red car", "the blue car") == pytest.approx(0.5)
    assert metrics.qa_f1("", "x") == 0.0
    assert metrics.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4
    assert metrics.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert metrics.rouge_l("x", "y") == 0.0
    assert metrics.classification_score("Type: LOC", "LOC", ["LOC", "HUM", "NUM"]) == 1.0
    assert metrics.classification_score("HUM or LOC", "LOC", ["LOC", "HUM"]) == 0.5
    assert metrics.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert metrics.retrieval_score("Paragraph 3 or 4", "Paragraph 3") == 0.5
    assert metrics.count_score("There are 7 unique paragraphs", 7) == 1.0
    assert metrics.best_over_refs(metrics.qa_f1, "blue car", ["red car", "blue car"]) == 1.0
    assert eval_longbench.score_task("hotpotqa", "Paris", ["paris"]) == 100.0
    assert eval_longbench.score_task("trec", "LOC\nmore text", ["LOC"], ["LOC", "HUM"]) == 100.0
    assert eval_longbench.score_task("gov_report", "a b c d", ["a c d e"]) == pytest.approx(75.0)


def test_gsm8k_extraction():
    assert metrics.gsm8k_reference("She has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert metrics.gsm8k_extract("so 5 + 5 = 10\n#### 10") == "10"
    assert metrics.gsm8k_extract("The answer is $1,200.") == "1200"
    assert metrics.gsm8k_extract("first 3 then 4.5") == "4.5"
    assert metrics.gsm8k_extract("no number") is None
    assert metrics.gsm8k_correct("... #### 72", "#### 72")
    assert not metrics.gsm8k_correct("#### 71", "#### 72")
    assert metrics.gsm8k_correct("answer: 18.0", "18")


def test_gsm8k_tfds_mock_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    from experiments import eval_gsm8k
    with tfds.testing.mock_data(num_examples=3):
        rows = eval_gsm8k.load_tfds("test", n=2)
    assert len(rows) == 2 and {"question", "answer"} <= set(rows[0])
    p = eval_gsm8k.build_prompt("What is 2+2?")
    assert p.startswith("<|memory_start|>") and "What is 2+2?" in p and eval_gsm8k.INSTRUCTION in p


# ---------------------------------------------------------------------------------------- agent
def test_chunking_keeps_text_and_bounds(count):
    text = ruler.generate_sample("niah_single_2", 1500, 0, count_tokens=count).context + "  Trailing words" + \
        " x" * 300
    chunks = agent.chunk_text(text, count, 100)
    assert "".join(chunks) == text
    assert all(count(c) <= 100 and c.strip() for c in chunks)
    assert agent.chunk_text("short.", count, 100) == ["short."]


def test_parse_response():
    assert agent.parse_response("EXPAND: 2, 3,2, 99", 5) == ("expand", [1, 2])
    assert agent.parse_response("ANSWER: 42<|im_end|>junk", 5) == ("answer", "42")
    assert agent.parse_response("EXPAND: 1\nANSWER: 7", 5) == ("answer", "7")
    assert agent.parse_response("ANSWER: maybe\nexpand: 4", 5) == ("expand", [3])
    assert agent.parse_response("just text", 5) == ("answer", "just text")


def _scripted(value, needle_chunk, log):
    """Answers when the needle's value is visible raw, else asks for the needle chunk (then chunk 1)."""
    def gen(prompt):
        log.append(prompt)
        raw = prompt
        while agent.MEM_START in raw:  # drop compressed chunks: the scripted model cannot read latents
            a, b = raw.index(agent.MEM_START), raw.index(agent.MEM_END)
            raw = raw[:a] + raw[b + len(agent.MEM_END):]
        if value in raw:
            return f"ANSWER: {value}"
        return f"EXPAND: {needle_chunk + 1}" if len(log) > 1 else "EXPAND: 1"
    return gen


def test_agent_loop_with_scripted_model(count):
    s = ruler.generate_sample("niah_single_1", 1200, 0, count_tokens=count)
    chunks = agent.chunk_text(s.context, count, 128)
    k = next(i for i, c in enumerate(chunks) if s.answers[0] in c)
    assert k != 0
    log = []
    r = agent.run_agent(_scripted(s.answers[0], k, log), s.prefix, chunks, s.question, max_rounds=5, cr=8)
    assert r.response == s.answers[0] and not r.forced
    assert r.expanded == [0, k] and r.rounds == 3
    assert "Chunk 1 (expanded)" in log[1] and f"Chunk {k + 1}: {agent.MEM_START}" in log[1]
    assert "lossy 8x" in log[0] and log[0].count(agent.MEM_START) == len(chunks)
    # bounded rounds: an expansion on the last round is honoured, then the final answer is forced
    log2 = []
    r2 = agent.run_agent(_scripted(s.answers[0], k, log2), s.prefix, chunks, s.question, max_rounds=2, cr=8)
    assert r2.forced and r2.response == s.answers[0] and r2.expanded == [0, k] and len(log2) == 3
    assert "No more expansions" in log2[-1]
    # a request that adds nothing new ends the loop
    r3 = agent.run_agent(lambda p: "EXPAND: 1", s.prefix, chunks, s.question, max_rounds=5)
    assert r3.forced and r3.rounds == 3


def test_agent_reuses_chunk_latents(lm, count):
    s = ruler.generate_sample("niah_single_1", 400, 0, count_tokens=count)
    chunks = agent.chunk_text(s.context, count, 64)
    k = next(i for i, c in enumerate(chunks) if s.answers[0] in c)
    log = []
    script = _scripted(s.answers[0], k, log)

    def gen(prompt):
        lm.generate([prompt], max_new_tokens=2)  # the real encode + decode path
        return script(prompt)

    lm.clear_latent_cache()
    h0, m0 = lm.cache_hits, lm.cache_misses
    r = agent.run_agent(gen, s.prefix, chunks, s.question, max_rounds=4, cr=4)
    assert r.response == s.answers[0]
    misses, hits = lm.cache_misses - m0, lm.cache_hits - h0
    assert misses == len(set(chunks))  # each chunk encoded once across all rounds
    assert hits > 0


# ---------------------------------------------------------------------------------------- KV eviction
def test_kv_eviction_full_budget_matches_generation_and_keeps(lm):
    p = "The river runs north. The hills are quiet. The magic number is 4821. Birds sing at dawn."
    ids = lm.processor.process(p).input_ids
    ref = lm.generate_ids([p], max_new_tokens=6, stop_ids=[-5])[0]
    t = len(ids)
    for m in kv_eviction.METHODS:
        gen, _ = kv_eviction.make_evict_generate_fn(lm.model, m, t, t, 6)
        assert np.asarray(gen(lm.params, ids[None]))[0].tolist() == ref
    out = kv_eviction.evict_generate(lm, ids, "snapkv", 4, 6)
    assert len(out) == 6
    sc = np.zeros((1, 2, 20), np.float32)
    sc[0, :, 3] = 5.0
    keep = np.asarray(kv_eviction._keep_indices("snapkv", sc, 20, 6, 4, 4))
    assert keep.shape == (1, 2, 6) and 3 in keep[0, 0] and list(keep[0, 0, -4:]) == [16, 17, 18, 19]
    keep = np.asarray(kv_eviction._keep_indices("sink", sc, 20, 6, 4, 2))
    assert list(keep[0, 1]) == [0, 1, 16, 17, 18, 19]


# ---------------------------------------------------------------------------------------- demo
def test_demo_data_and_truncation(count):
    rng = random.Random(0)
    ex = demo_data.needle_example_tokens(rng, 120, count)
    assert count(ex.haystack) <= 120 and ex.value in ex.haystack and len(ex.value) == 4
    assert ex.prompt("compressed").count(ruler.MEM_START) == 1 and ruler.MEM_START not in ex.prompt("raw")
    b = demo_data.truncation_budget_chars(ex.haystack, 4, count)
    assert count(ex.haystack[len(ex.haystack) - b:]) <= -(-count(ex.haystack) // 4)
    assert ex.haystack.endswith(ex.prompt("truncated", b).split("\n")[1])
    prompt, target = demo_data.reconstruction_pair(rng, 90, count, (3, 3))
    assert count(target.strip()) <= 90 and f"{ruler.MEM_START}{target.strip()}{ruler.MEM_END}" in prompt
    assert "The special magic number for" in target


def test_demo_tokenizer_is_compact_deterministic_and_committed(tmp_path):
    import pathlib

    from tokenizers import Tokenizer

    from experiments import demo_tokenizer as dt
    from lclm_jax.lclm.processor import LCLMProcessor
    dt.build(str(tmp_path), seed=0)
    enc = Tokenizer.from_file(str(tmp_path / "encoder" / "tokenizer.json"))
    dec = Tokenizer.from_file(str(tmp_path / "decoder" / "tokenizer.json"))
    assert enc.get_vocab_size() == dt.ENCODER_VOCAB and dec.get_vocab_size() == dt.DECODER_VOCAB
    assert [dec.token_to_id(t) for t in (dt.EOS, *dt.MEMORY_TOKENS)] == [0, *range(dt.ENCODER_VOCAB, dt.DECODER_VOCAB)]
    needle = "The special magic number for calm-harbor is: 407."
    e = enc.encode(needle)
    assert enc.decode(e.ids) == needle and e.tokens[-3:] == ["\u0120", "407", "."]  # a value < 1000: one token
    assert len(e.ids) <= 12  # words are single tokens (a character-level vocabulary needs ~40)
    assert all(len(enc.encode(str(i)).ids) == 1 for i in range(1000))
    assert enc.encode("1234567").tokens == ["123", "456", "7"]  # longer numbers: runs of three digits
    odd = "Zürich ☃ tabs\tand 12.5%"  # unseen text still round-trips through the byte alphabet
    assert enc.decode(enc.encode(odd).ids) == odd
    proc = LCLMProcessor.from_checkpoint(tmp_path, compression_ratio=4)
    assert proc.memory_id == dt.DECODER_VOCAB - 1 and proc.eos_id == 0
    committed = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "demo_checkpoint"
    for side in ("encoder", "decoder"):  # the committed model uses exactly what the builder makes
        assert (tmp_path / side / "tokenizer.json").read_bytes() == (committed / side / "tokenizer.json").read_bytes()


def test_demo_evaluation_path(tmp_path):
    from experiments import demo
    res = demo.main(["--checkpoint", str(CKPT), "--n", "2", "--haystack-tokens", "48", "--ratios", "4", "8",
                     "--no-ttft", "--out", str(tmp_path)])
    methods = [(r["method"], r["cr"]) for r in res["rows"]]
    assert methods == [("full", None), ("lclm", 4), ("truncated", 4), ("lclm", 8), ("truncated", 8)]
    assert all(0.0 <= r["accuracy"] <= 100.0 for r in res["rows"])
    lc4, lc8 = res["rows"][1]["context_tokens"], res["rows"][3]["context_tokens"]
    assert lc4 > lc8 and res["rows"][2]["context_tokens"] <= lc4
    assert json.loads((tmp_path / "demo.json").read_text())["n"] == 2
    from lclm_jax import cli  # the README's main job goes through the console script: exit status 0
    assert cli.main(["demo", "--checkpoint", str(CKPT), "--n", "1", "--haystack-tokens", "48", "--ratios", "4",
                     "--no-ttft", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "demo.json").read_text())["n"] == 1


def test_committed_demo_checkpoint_loads():
    import pathlib

    import lclm_jax
    ckpt = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "demo_checkpoint"
    for cr in (4, 8, 16):
        m = lclm_jax.load(ckpt, dtype="float32", compression_ratio=cr)
        assert m.processor.compression_ratio == cr and m.config.encoder_window_size % cr == 0
    assert json.loads((ckpt / "train_info.json").read_text())["steps"] > 0


def test_demo_training_schedule_and_rows():
    """Two-stage learning-rate schedule; the three row kinds and their needle flags in the batch."""
    from experiments import train_demo
    sched = train_demo.schedule(220, 20, 3e-3, 3e-4)  # stage 1: 20 steps at 3e-3; stage 2: 200 at 3e-4
    assert float(sched(0)) == 0.0 and float(sched(1)) == pytest.approx(3e-3)
    assert float(sched(19)) < 3e-3 and float(sched(20)) == 0.0  # stage 2 warms up again
    assert float(sched(30)) == pytest.approx(3e-4) and max(float(sched(i)) for i in range(20, 220)) <= 3e-4 * (1 + 1e-6)
    with pytest.raises(ValueError, match="must exceed"):
        train_demo.schedule(10, 10, 3e-3, 3e-4)
    import pathlib

    from lclm_jax.lclm.processor import LCLMProcessor
    proc = LCLMProcessor.from_checkpoint(pathlib.Path(__file__).resolve().parent.parent / "experiments" /
                                         "demo_checkpoint", compression_ratio=4)
    rng = random.Random(0)
    short = train_demo.DemoTask("c4", proc, 3, 16, 32, (2, 2), recon_frac=0.0, short_frac=1.0)
    for prompt, target, is_needle in short.rows(rng):  # haystack in memory tags, then "Answer:" only
        assert is_needle and prompt.startswith(ruler.MEM_START) and prompt.endswith(f"{ruler.MEM_END}\nAnswer:")
        assert target.strip(" .") in prompt and "What is" not in prompt
    raw_full = train_demo.DemoTask("raw", proc, 3, 16, 32, (2, 2), recon_frac=0.0, short_frac=0.0)
    for prompt, target, is_needle in raw_full.rows(rng):  # the RULER wording, no memory tags
        assert is_needle and ruler.MEM_START not in prompt and "What is the special magic number" in prompt
    recon = train_demo.DemoTask("c4", proc, 3, 16, 32, (2, 2), recon_frac=1.0)
    rows = recon.rows(rng)
    for prompt, target, is_needle in rows:  # reconstruction: the target is the wrapped haystack itself
        assert not is_needle and f"{ruler.MEM_START}{target.strip()}{ruler.MEM_END}" in prompt
    batch = train_demo.make_batch(proc, rows[:2] + short.rows(rng)[:1], recon.seq_len, recon.n_windows,
                                  recon.n_latents)
    assert batch["needle"].tolist() == [False, False, True] and (batch["placeholder_index"] >= 0).sum() > 0


def test_demo_training_runs_both_stages(tmp_path):
    """Three steps (one raw warm-up, then cr 4 and raw) write a loadable checkpoint and a truthful log."""
    import lclm_jax
    from experiments import train_demo
    train_demo.train(str(tmp_path), steps=3, raw_steps=1, batch=2, min_tokens=16, max_tokens=24, log_every=1,
                     kinds=("c4", "raw"), recon_frac=0.5, short_frac=0.5, lr2=1e-4)
    info = json.loads((tmp_path / "train_info.json").read_text())
    assert info["steps"] == 3 and info["raw_steps"] == 1 and info["lr2"] == 1e-4
    assert set(info["final_loss"]) == {"raw-warmup", "c4", "raw"}
    assert all(np.isfinite(v) for v in info["final_loss"].values())
    assert "--raw-steps 1" in info["command"] and "--short-frac 0.5" in info["command"]
    m = lclm_jax.load(tmp_path, dtype="float32", compression_ratio=8)
    assert m.processor.compression_ratio == 8


def test_eval_ruler_value_digits(tmp_path):
    """``--digits`` sets the NIAH value length (RULER's 7 by default) and is recorded in the JSON."""
    from experiments import eval_ruler
    out = eval_ruler.main(["--checkpoint", str(CKPT), "--tasks", "niah_single_1", "--lengths", "1024", "--n", "2",
                           "--digits", "3", "--max-new-tokens", "4", "--out", str(tmp_path)])
    assert out["digits"] == 3 and len(out["samples"]) == 2
    assert all(len(s["answers"]) == 1 and len(s["answers"][0]) == 3 and s["answers"][0].isdigit()
               for s in out["samples"])
    assert json.loads((tmp_path / "ruler.json").read_text())["per_task"]["niah_single_1"]["1024"] is not None
