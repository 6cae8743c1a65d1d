"""LCLMProcessor against the golden fixtures, plus input validation and the chat format."""

import functools
import json
import pathlib
import shutil

import numpy as np
import pytest

from lclm_jax.lclm.processor import IGNORE_INDEX, LCLMProcessor, ProcessedPrompt, PromptError

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "lclm_golden"
GOLDEN_NAMES = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").exists())


@functools.lru_cache(maxsize=None)
def _load(name):
    d = GOLDEN / name
    with open(d / "cases.json", encoding="utf-8") as f:
        cases = json.load(f)
    golden = dict(np.load(d / "golden.npz"))
    return LCLMProcessor.from_checkpoint(d / "checkpoint"), cases, golden


CASES = [(n, i) for n in GOLDEN_NAMES for i in range(len(_load(n)[1]["cases"]))]
SFT_CASES = [(n, i) for n, i in CASES if "target" in _load(n)[1]["cases"][i]]


def test_fixtures_present():
    assert len(GOLDEN_NAMES) == 5


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_special_ids_from_tokenizers(name):
    proc, cases, _ = _load(name)
    tok = cases["tokenizer"]
    mem = tok["memory_token_ids"]
    assert proc.memory_start_id == mem["<|memory_start|>"]
    assert proc.memory_end_id == mem["<|memory_end|>"]
    assert proc.memory_id == mem["<|memory|>"]
    assert proc.eos_id == tok["eos_token_id"]
    assert proc.pad_id == tok["pad_token_id"]
    assert proc.encoder_pad_id == tok["encoder_pad_token_id"]
    assert proc.im_end_id is None  # the tiny tokenizers have no chat tokens
    assert proc.stop_ids == {proc.eos_id}
    with open(GOLDEN / name / "checkpoint" / "model_config.json") as f:
        assert proc.compression_ratio == json.load(f)["compression_ratio"]


@pytest.mark.parametrize("name,i", CASES)
def test_process_matches_golden(name, i):
    proc, cases, g = _load(name)
    case = cases["cases"][i]
    out = proc.process(case["prompt"])
    assert isinstance(out, ProcessedPrompt) and out.labels is None
    assert out.input_ids.dtype == np.int32
    np.testing.assert_array_equal(out.input_ids, g[f"dec_input_ids_{i}"])
    assert len(out.input_ids) == case["dec_len"]
    assert len(out.span_ids) == case["n_spans"]
    for j, ids in enumerate(out.span_ids):
        assert ids.dtype == np.int32
        np.testing.assert_array_equal(ids, g[f"mem_ids_{i}_{j}"])
    assert [len(s) for s in out.span_ids] == case["span_token_counts"]
    assert out.latent_counts == case["latent_counts"]
    assert out.memory_positions == [tuple(p) for p in case["memory_positions"]]
    np.testing.assert_array_equal(
        np.asarray(out.memory_positions, np.int64).reshape(-1, 2), g[f"mem_pos_{i}"].reshape(-1, 2)
    )
    for (s, e), n in zip(out.memory_positions, out.latent_counts):
        assert e - s == n
        assert out.input_ids[s - 1] == proc.memory_start_id and out.input_ids[e] == proc.memory_end_id
        assert np.all(out.input_ids[s:e] == proc.memory_id)


@pytest.mark.parametrize("name,i", SFT_CASES)
def test_process_sft_matches_golden(name, i):
    proc, cases, g = _load(name)
    case = cases["cases"][i]
    out = proc.process_sft(case["prompt"], case["target"])
    np.testing.assert_array_equal(out.input_ids, g[f"loss_input_ids_{i}"])
    np.testing.assert_array_equal(out.labels, g[f"loss_labels_{i}"])
    assert int((out.labels != IGNORE_INDEX).sum()) == case["loss_n_supervised"]
    assert out.memory_positions == [tuple(p) for p in case["memory_positions"]]


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_batch_matches_golden(name):
    proc, cases, g = _load(name)
    b = cases["batch"]
    side = b["padding_side"]
    assert side == cases["tokenizer"]["decoder_padding_side"]
    out = proc.process_batch(b["prompts"], padding_side=side)
    np.testing.assert_array_equal(out["input_ids"], g["batch_input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], g["batch_attention_mask"])
    assert out["labels"] is None
    assert out["memory_positions"] == [[tuple(p) for p in row] for row in b["memory_positions"]]
    assert out["latent_counts"] == b["latent_counts"]
    assert list(out["input_ids"].shape) == b["shape"]
    for row, k in enumerate(b["case_indices"]):
        for j, ids in enumerate(out["span_ids"][row]):
            np.testing.assert_array_equal(ids, g[f"mem_ids_{k}_{j}"])

    ref = proc.process_batch(b["prompts"], b["targets"], padding_side=side, reference_left_pad_labels=True)
    np.testing.assert_array_equal(ref["input_ids"], g["batch_loss_input_ids"])
    np.testing.assert_array_equal(ref["attention_mask"], g["batch_loss_attention_mask"])
    np.testing.assert_array_equal(ref["labels"], g["batch_loss_labels"])

    # Default labels: each row's own SFT labels, moved with its padding; padding ignored.
    out = proc.process_batch(b["prompts"], b["targets"], padding_side=side)
    np.testing.assert_array_equal(out["input_ids"], g["batch_loss_input_ids"])
    width = out["input_ids"].shape[1]
    for row, (p, t) in enumerate(zip(b["prompts"], b["targets"])):
        single = proc.process_sft(p, t)
        n = len(single.input_ids)
        off = width - n if side == "left" else 0
        expect = np.full(width, IGNORE_INDEX, np.int32)
        expect[off : off + n] = single.labels
        np.testing.assert_array_equal(out["labels"][row], expect)
        assert out["memory_positions"][row] == [(s + off, e + off) for s, e in single.memory_positions]
    if side == "right":  # the reference quirk only matters with left padding
        np.testing.assert_array_equal(out["labels"], g["batch_loss_labels"])
    else:
        assert not np.array_equal(out["labels"], g["batch_loss_labels"])


def test_batch_pad_to_multiple_and_errors():
    proc, cases, _ = _load("mean_causal_cr4_w16")
    prompts = cases["batch"]["prompts"]
    out = proc.process_batch(prompts, pad_to_multiple_of=16)
    assert out["input_ids"].shape == (3, 32)
    assert np.all(out["input_ids"][out["attention_mask"] == 0] == proc.pad_id)
    with pytest.raises(ValueError, match="padding_side"):
        proc.process_batch(prompts, padding_side="middle")
    with pytest.raises(ValueError, match="targets"):
        proc.process_batch(prompts, ["x"])
    with pytest.raises(TypeError):
        proc.process_batch("a single prompt")


@pytest.mark.parametrize("name,i", CASES)
def test_process_cpt_labels(name, i):
    proc, cases, _ = _load(name)
    out = proc.process_cpt(cases["cases"][i]["prompt"])
    expect = out.input_ids.copy()
    for s, e in out.memory_positions:
        expect[s - 1 : e + 1] = IGNORE_INDEX
    np.testing.assert_array_equal(out.labels, expect)
    tags = {proc.memory_start_id, proc.memory_end_id, proc.memory_id}
    assert not any(int(x) in tags for x in out.labels)


def test_cpt_worked_layout():
    proc, _, _ = _load("mean_causal_cr4_w16")
    out = proc.process_cpt("A B <|memory_start|>one two three four five six<|memory_end|> C D")
    (s, e), n = out.memory_positions[0], out.latent_counts[0]
    assert n == -(-len(out.span_ids[0]) // 4) and e - s == n
    assert np.all(out.labels[s - 1 : e + 1] == IGNORE_INDEX)
    assert np.all(out.labels[: s - 1] == out.input_ids[: s - 1])
    assert np.all(out.labels[e + 1 :] == out.input_ids[e + 1 :])


BAD_PROMPTS = [
    ("abc <|memory_start|>never closed", "no matching <|memory_end|>", "character 4"),
    ("text<|memory_end|> more", "without a matching <|memory_start|>", "character 4"),
    ("<|memory_start|>a<|memory_end|> b<|memory_end|>", "without a matching", "character 33"),
    ("x<|memory_start|>a<|memory_start|>b<|memory_end|><|memory_end|>", "nested", "character 18"),
    ("hello <|memory|> world", "outside any span", "character 6"),
    ("<|memory_start|>a <|memory|> b<|memory_end|>", "inside the span", "character 18"),
    ("before <|memory_start|><|memory_end|> after", "empty memory span", "character 7"),
    ("<|memory_start|>ok<|memory_end|><|memory_start|><|memory_end|>", "empty memory span", "character 32"),
]


@pytest.mark.parametrize("prompt,what,where", BAD_PROMPTS)
def test_bad_prompts(prompt, what, where):
    proc, _, _ = _load("mean_causal_cr4_w16")
    for fn in (proc.process, proc.process_cpt, lambda p: proc.process_sft(p, " t")):
        with pytest.raises(PromptError) as err:
            fn(prompt)
        assert what in str(err.value) and where in str(err.value), str(err.value)
    with pytest.raises(ValueError):  # PromptError is a ValueError
        proc.process_batch(["<|memory_start|>fine<|memory_end|>", prompt])


def test_bad_target_and_types():
    proc, _, _ = _load("mean_causal_cr4_w16")
    with pytest.raises(PromptError, match=r"target contains .*<\|memory_start\|> at character 3"):
        proc.process_sft("q", "an <|memory_start|>x<|memory_end|>")
    with pytest.raises(PromptError, match="target must be a str"):
        proc.process_sft("q", None)
    with pytest.raises(PromptError, match="prompt must be a str"):
        proc.process(b"bytes")


def test_max_span_tokens():
    d = GOLDEN / "mean_causal_cr4_w16" / "checkpoint"
    proc = LCLMProcessor.from_checkpoint(d, max_span_tokens=5)
    proc.process("a <|memory_start|>Token<|memory_end|>")
    with pytest.raises(PromptError, match=r"character 2 has \d+ encoder tokens, more than max_span_tokens=5"):
        proc.process("a <|memory_start|>" + "one two three four five six seven" + "<|memory_end|>")


def test_compression_ratio_override_and_text_verbatim():
    d = GOLDEN / "mean_causal_cr4_w16" / "checkpoint"
    proc = LCLMProcessor.from_checkpoint(d, compression_ratio=1)
    content = "\n  spaced \t content  \n"
    out = proc.process(f"x<|memory_start|>{content}<|memory_end|>y")
    ids = proc.encoder_tokenizer.encode(content, add_special_tokens=False).ids
    np.testing.assert_array_equal(out.span_ids[0], ids)
    assert out.latent_counts == [len(ids)]
    assert proc.process("plain text").memory_positions == []


def test_missing_memory_token_names_file(tmp_path):
    src = GOLDEN / "mean_causal_cr4_w16" / "checkpoint"
    shutil.copytree(src / "encoder", tmp_path / "encoder")
    shutil.copytree(src / "encoder", tmp_path / "decoder")  # no memory tokens in the encoder tokenizer
    shutil.copy(src / "model_config.json", tmp_path / "model_config.json")
    with pytest.raises(ValueError, match=r"decoder[/\\]tokenizer\.json has no <\|memory_start\|> token"):
        LCLMProcessor.from_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        LCLMProcessor.from_checkpoint(tmp_path / "nowhere")


def test_configured_special_tokens():
    proc, _, _ = _load("mean_causal_cr4_w16")
    dec, enc = proc.decoder_tokenizer, proc.encoder_tokenizer
    p = LCLMProcessor(dec, enc, 4, eos_token="<|memory_end|>")
    assert p.eos_id == p.pad_id == 510 and p.stop_ids == {510} and p.encoder_pad_id == 0
    assert LCLMProcessor(dec, enc, 4).eos_id == 0  # falls back to <|endoftext|>
    with pytest.raises(ValueError, match="eos token '<nope>' is not in the vocabulary"):
        LCLMProcessor(dec, enc, 4, eos_token="<nope>")
    with pytest.raises(ValueError, match="compression_ratio"):
        LCLMProcessor(dec, enc, 0)


def test_chat_template_two_turns():
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "<|memory_start|>doc<|memory_end|> Q?"},
        {"role": "assistant", "content": "A."},
        {"role": "user", "content": "More?"},
    ]
    text = LCLMProcessor.apply_chat_template(messages)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\n<|memory_start|>doc<|memory_end|> Q?<|im_end|>\n"
        "<|im_start|>assistant\nA.<|im_end|>\n"
        "<|im_start|>user\nMore?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_gen = LCLMProcessor.apply_chat_template(messages[:2], add_generation_prompt=False)
    assert no_gen.endswith("Q?<|im_end|>\n")
    # One user turn equals the reference's hand-written inference wrapper.
    assert LCLMProcessor.apply_chat_template([{"role": "user", "content": "P"}]) == (
        "<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\n"
    )
    tools = [{"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}]
    assert LCLMProcessor.apply_chat_template(tools, add_generation_prompt=False) == (
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>"
        "\n<tool_response>\nr2\n</tool_response><|im_end|>\n"
    )
    assert LCLMProcessor.sft_target_text("ans") == "ans<|im_end|>\n"


@pytest.mark.parametrize(
    "messages,match",
    [
        ([{"role": "robot", "content": "x"}], "message 0 has role 'robot'"),
        ([{"role": "user", "content": ["x"]}], r"message 0 \(user\) content must be a str"),
        ([{"role": "user", "content": "a"}, "b"], "message 1 must be a dict"),
        ({"role": "user", "content": "x"}, "messages must be a list"),
    ],
)
def test_chat_template_validation(messages, match):
    with pytest.raises(PromptError, match=match):
        LCLMProcessor.apply_chat_template(messages)


def test_process_chat_supervises_answer_and_im_end():
    proc, _, _ = _load("mean_causal_cr4_w16")
    messages = [{"role": "user", "content": "<|memory_start|>some document text<|memory_end|> Q?"}]
    out = proc.process_chat(messages, "ans")
    prompt = proc.apply_chat_template(messages)
    assert out.memory_positions == proc.process(prompt).memory_positions
    supervised = out.input_ids[out.labels != IGNORE_INDEX]
    first = int(np.argmax(out.labels != IGNORE_INDEX))
    assert np.all(out.labels[first:] == out.input_ids[first:])
    assert proc.decoder_tokenizer.decode(supervised.tolist(), skip_special_tokens=False) == "ans<|im_end|>\n"
