"""The demo model's own tokenizer: a small byte-level BPE trained on the synthetic task texts.

A 509-token character-level vocabulary spends ~4 tokens per word, so a needle sentence costs ~40
tokens and a tiny model has to learn retrieval over very long, very redundant sequences. Training a
BPE on the texts the demo and RULER generators produce makes common words single tokens and every
number below 1000 one token (numbers are cut in runs of up to three digits), which shortens every
sequence ~3-4x and lets a needle value of up to three digits be found by content alone (no induction
circuit needed), so the demo is learnable in tens of minutes on a CPU. Any text still tokenizes (byte fallback through the
byte-level alphabet).

    python -m experiments.demo_tokenizer OUT_DIR    # writes OUT_DIR/encoder/ and OUT_DIR/decoder/

Layout and special tokens follow the official checkpoint: ``<|endoftext|>`` (id 0, eos and pad) in
both tokenizers; the decoder adds ``<|memory_start|>``, ``<|memory_end|>``, ``<|memory|>`` at the
end of the vocabulary. ``ENCODER_VOCAB`` + 3 = ``DECODER_VOCAB``.
"""

from __future__ import annotations

import argparse
import json
import os
import random

ENCODER_VOCAB = 2045
DECODER_VOCAB = ENCODER_VOCAB + 3
EOS = "<|endoftext|>"
MEMORY_TOKENS = ("<|memory_start|>", "<|memory_end|>", "<|memory|>")
# Qwen3's pre-tokenizer split (words with one leading non-letter, punctuation runs), except that
# numbers are cut in runs of up to three digits (as in Llama 3's), so every number below 1000 is one token.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus(seed: int = 0, n: int = 400):
    """Texts of every synthetic generator the demo and RULER runner use (deterministic)."""
    from experiments import demo_data, ruler

    rng = random.Random(seed)
    texts = [ruler.NIAH_PREFIX, ruler.ANSWER_PREFIX, " ".join(ruler.NOISE_SENTENCES)]
    # every needle key, so "calm-harbor" is two tokens (" calm", "-harbor") whatever the sample
    texts += [" ".join(f"{a}-{b}" for a in ruler._ADJ for b in ruler._NOUN)] * 8
    # every number below 1000, often enough that each becomes one token
    texts += [" ".join(str(i) for i in range(1000))] * 200
    for i in range(n):
        s = ruler.generate_sample(ruler.TASKS[i % len(ruler.TASKS)], 512, i, seed)
        texts.append(ruler.render_prompt(s.prefix, s.context, s.question, wrap=False) + " " + " ".join(s.answers))
        texts.append(demo_data.reconstruction_text(rng, 24))
    return texts


def _tokenizer_config(special: dict[int, str], extra: tuple[str, ...]) -> dict:
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    cfg = {"added_tokens_decoder": {str(i): {"content": c, **entry} for i, c in special.items()},
           "clean_up_tokenization_spaces": False, "eos_token": EOS, "extra_special_tokens": {},
           "model_max_length": 131072, "pad_token": EOS, "padding_side": "right",
           "tokenizer_class": "PreTrainedTokenizerFast"}
    if extra:
        cfg["additional_special_tokens"] = list(extra)
    return cfg


def build(out_dir: str, seed: int = 0) -> str:
    """Train the BPE and write ``out_dir/{encoder,decoder}/`` tokenizer files. Returns ``out_dir``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=ENCODER_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    if tok.get_vocab_size() != ENCODER_VOCAB or tok.token_to_id(EOS) != 0:
        raise RuntimeError(f"demo tokenizer has {tok.get_vocab_size()} tokens (want {ENCODER_VOCAB}) "
                           f"and eos id {tok.token_to_id(EOS)} (want 0)")
    enc_dir, dec_dir = os.path.join(out_dir, "encoder"), os.path.join(out_dir, "decoder")
    os.makedirs(enc_dir, exist_ok=True)
    os.makedirs(dec_dir, exist_ok=True)
    tok.save(os.path.join(enc_dir, "tokenizer.json"))
    tok.add_special_tokens(list(MEMORY_TOKENS))
    ids = [tok.token_to_id(t) for t in MEMORY_TOKENS]
    if ids != list(range(ENCODER_VOCAB, DECODER_VOCAB)):
        raise RuntimeError(f"memory tokens got ids {ids}, expected {ENCODER_VOCAB}..{DECODER_VOCAB - 1}")
    tok.save(os.path.join(dec_dir, "tokenizer.json"))
    for d, special, extra in ((enc_dir, {0: EOS}, ()),
                              (dec_dir, {0: EOS, **dict(zip(ids, MEMORY_TOKENS))}, MEMORY_TOKENS)):
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(_tokenizer_config(special, extra), f, indent=2)
        smap = {"eos_token": EOS, "pad_token": EOS}
        if extra:
            smap["additional_special_tokens"] = list(extra)
        with open(os.path.join(d, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(smap, f, indent=2)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    build(a.out_dir, a.seed)
    print(f"wrote {a.out_dir}/encoder and {a.out_dir}/decoder ({ENCODER_VOCAB} / {DECODER_VOCAB} tokens)")


if __name__ == "__main__":
    main()
