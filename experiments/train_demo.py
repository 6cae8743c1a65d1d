"""Train the tiny demo LCLM on synthetic needle retrieval + reconstruction (CPU, a few minutes).

    python -m experiments.train_demo --out experiments/demo_checkpoint --steps 800

One model serves every compression ratio: with mean pooling the device model does not depend on the
ratio (the host decides how many tokens each latent pools), so training cycles through steps at
cr 4, 8 and 16 plus a step with the haystack given raw to the decoder (so the same decoder is also
the "uncompressed" baseline of the demo). Every step mixes needle questions (75%) with
reconstruction rows (25%; on raw steps the text to repeat is given raw, i.e. plain copying). Each step type has fixed shapes, so there are four compiles in all.

The model is tiny (encoder 2x64, decoder 3x128, ~0.6M parameters) and uses the 509-token byte-level
BPE of the test fixtures (decoder vocabulary 512 with the three memory tokens). Loss is
``LCLMModel.loss_sums`` (sum CE / token count over the answer tokens only) with AdamW.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import demo_data
from lclm_jax.checkpoint import lclm_io
from lclm_jax.config import LCLMConfig, Qwen3Config
from lclm_jax.lclm.model import IGNORE, LCLMModel
from lclm_jax.lclm.processor import LCLMProcessor
from lclm_jax.lclm.windows import WindowConfig, build_encoder_batch

REPO = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER_SOURCE = REPO / "tests" / "fixtures" / "lclm_golden" / "mean_causal_cr4_w16" / "checkpoint"
RATIOS = (4, 8, 16)
WINDOW = 64
EOS = "<|endoftext|>"


def model_configs():
    enc = Qwen3Config(vocab_size=509, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                      tie_word_embeddings=True, max_position_embeddings=4096, architectures=("Qwen3Model",),
                      extra=json.dumps({"eos_token_id": 0, "pad_token_id": 0}))
    dec = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e4,
                      tie_word_embeddings=True, max_position_embeddings=8192,
                      architectures=("Qwen3ForCausalLM",), extra=json.dumps({"eos_token_id": 0, "pad_token_id": 0}))
    cfg = LCLMConfig(compression_ratio=4, encoder_window_size=WINDOW, pooling="mean", encoder_mask_type="causal",
                     boundary_overlap=0, adapter_type="mlp")
    return cfg, enc, dec


def count_fn(processor):
    tok = processor.encoder_tokenizer
    return lambda s: len(tok.encode(s, add_special_tokens=False).ids)


def make_batch(processor: LCLMProcessor, rows, seq_len: int, n_windows: int, n_latents: int) -> dict:
    """Fixed-shape training batch for ``(prompt, target)`` rows (targets supervised, eos appended)."""
    prompts = [p for p, _ in rows]
    targets = [t + EOS for _, t in rows]
    pb = processor.process_batch(prompts, targets, "right")
    b, width = pb["input_ids"].shape
    if width > seq_len:
        raise ValueError(f"batch needs {width} decoder tokens > seq_len {seq_len}")
    pad = seq_len - width
    ids = np.pad(pb["input_ids"], ((0, 0), (0, pad)), constant_values=processor.pad_id)
    mask = np.pad(pb["attention_mask"], ((0, 0), (0, pad)))
    labels = np.pad(pb["labels"], ((0, 0), (0, pad)), constant_values=IGNORE)
    spans, flat = [], []
    for i in range(b):
        for (s, e), sp in zip(pb["memory_positions"][i], pb["span_ids"][i]):
            spans.append(sp)
            flat.append(i * seq_len + np.arange(s, e))
    cr = processor.compression_ratio
    pidx = np.full((n_latents,), -1, np.int32)
    if spans:
        wc = WindowConfig(cr, WINDOW)
        eb = build_encoder_batch(spans, wc, processor.encoder_pad_id, window_bucket=n_windows, length_bucket=WINDOW,
                                 latent_bucket=n_latents)
        if eb.input_ids.shape[0] != n_windows or eb.pool_index.shape[0] != n_latents:
            raise ValueError("encoder batch exceeds its fixed bucket")
        fi = np.concatenate(flat)
        pidx[:len(fi)] = fi
        enc = {"input_ids": eb.input_ids, "valid": eb.valid, "positions": eb.positions, "pool_index": eb.pool_index,
               "pool_mask": eb.pool_mask}
    else:  # raw rows: a dummy encoder batch whose latents are all dropped
        enc = {"input_ids": np.zeros((n_windows, WINDOW), np.int32), "valid": np.zeros((n_windows, WINDOW), bool),
               "positions": np.zeros((n_windows, WINDOW), np.int32),
               "pool_index": np.zeros((n_latents, cr), np.int32), "pool_mask": np.zeros((n_latents, cr), bool)}
    enc["span_ids"] = np.where(pidx >= 0, 0, -1).astype(np.int32)
    enc["span_pos"] = np.zeros((n_latents,), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len)).copy()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "positions": positions,
            "placeholder_index": pidx, "encoder": enc}


class DemoTask:
    """Draws batches for one step type: ``c4`` / ``c8`` / ``c16`` (compressed) or ``raw``."""

    def __init__(self, kind: str, processor: LCLMProcessor, batch: int, min_tokens: int, max_tokens: int,
                 digits=(4, 7), recon_frac: float = 0.25):
        self.kind, self.processor, self.batch = kind, processor, batch
        self.min_tokens, self.max_tokens, self.digits, self.recon_frac = min_tokens, max_tokens, digits, recon_frac
        self.count = count_fn(processor)
        overhead = self.count(demo_data.ruler.NIAH_PREFIX) + 90 + 16  # question, answer, tags and slack
        if kind == "raw":
            self.seq_len = int(math.ceil((max_tokens + overhead) / 64) * 64)
            self.n_windows, self.n_latents = 8, 16
        else:
            cr = processor.compression_ratio
            self.seq_len = int(math.ceil((max_tokens / cr + overhead + 8) / 64) * 64)
            self.n_windows = batch * math.ceil(max_tokens / WINDOW)
            self.n_latents = batch * math.ceil(max_tokens / cr) + 16

    def rows(self, rng: random.Random):
        out = []
        for _ in range(self.batch):
            if rng.random() < self.recon_frac:  # dense copy supervision (raw rows: plain copying)
                prompt, target = demo_data.reconstruction_pair(rng, rng.randint(4, 14))
                if self.kind == "raw":
                    prompt = prompt.replace(demo_data.MEM_START, "").replace(demo_data.MEM_END, "")
                out.append((prompt, target))
                continue
            ex = demo_data.needle_example_tokens(rng, rng.randint(self.min_tokens, self.max_tokens), self.count,
                                                 rng.randint(*self.digits))
            out.append((ex.prompt("raw" if self.kind == "raw" else "compressed"), ex.target))
        return out

    def batch_for(self, rng):
        return make_batch(self.processor, self.rows(rng), self.seq_len, self.n_windows, self.n_latents)


def train(out: str, steps: int = 800, batch: int = 16, lr: float = 3e-3, seed: int = 0, min_tokens: int = 32,
          max_tokens: int = 256, log_every: int = 50, time_limit: float | None = None, init: str | None = None,
          digits=(4, 7), kinds=("c4", "c8", "c16", "raw")):
    cfg, enc_cfg, dec_cfg = model_configs()
    model = LCLMModel(cfg, enc_cfg, dec_cfg)
    if init:  # continue from a saved demo checkpoint (same shapes)
        _, _, _, params = lclm_io.read_lclm(init, dtype="float32")
        params = jax.tree_util.tree_map(jnp.asarray, params)
    else:
        params = model.init(jax.random.PRNGKey(seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    procs = {cr: LCLMProcessor.from_checkpoint(TOKENIZER_SOURCE, compression_ratio=cr) for cr in RATIOS}
    tasks = [DemoTask(k, procs[int(k[1:]) if k != "raw" else 4], batch, min_tokens, max_tokens, tuple(digits))
             for k in kinds]
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.01))
    opt_state = opt.init(params)

    def loss_fn(p, b):
        s, c = model.loss_sums(p, b, chunk_size=512)
        return s / jnp.maximum(c, 1), c

    @jax.jit
    def step(p, st, b):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
        upd, st = opt.update(g, st, p)
        return optax.apply_updates(p, upd), st, loss

    rng = random.Random(seed)
    hist = {t.kind: [] for t in tasks}
    t0 = time.time()
    print(f"demo model: {n_params:,} parameters; steps {steps}, batch {batch}, haystack {min_tokens}-{max_tokens} "
          f"tokens", flush=True)
    done = 0
    for i in range(steps):
        task = tasks[i % len(tasks)]
        params, opt_state, loss = step(params, opt_state, task.batch_for(rng))
        hist[task.kind].append(float(loss))
        done = i + 1
        if (i + 1) % log_every == 0 or i == 0:
            avg = {k: round(float(np.mean(v[-10:])), 3) for k, v in hist.items() if v}
            print(f"step {i + 1:5d}  {time.time() - t0:6.0f}s  loss {avg}", flush=True)
        if time_limit and time.time() - t0 > time_limit:
            print(f"time limit reached after {i + 1} steps", flush=True)
            break
    params = jax.tree_util.tree_map(np.asarray, params)
    lclm_io.write_lclm(out, params, cfg, enc_cfg, dec_cfg, dtype="float32", tokenizers_from=str(TOKENIZER_SOURCE),
                       max_memory_length=4096)
    info = {"init": init, "steps": done, "batch": batch, "lr": lr, "seed": seed,
            "haystack_tokens": [min_tokens, max_tokens], "digits": list(digits), "kinds": list(kinds),
            "params": int(n_params), "train_seconds": round(time.time() - t0, 1), "ratios": list(RATIOS),
            "final_loss": {k: round(float(np.mean(v[-20:])), 4) for k, v in hist.items() if v},
            "command": f"python -m experiments.train_demo --out {out} --steps {steps} --batch {batch} --lr {lr} "
                       f"--seed {seed} --min-tokens {min_tokens} --max-tokens {max_tokens} "
                       f"--digits {digits[0]} {digits[1]} --kinds {' '.join(kinds)}" + (f" --init {init}" if init else "")
                       + (f" --time-limit {time_limit}" if time_limit else "")}
    with open(os.path.join(out, "train_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info), flush=True)
    return params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "demo_checkpoint"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--time-limit", type=float, default=None, help="stop early after this many seconds")
    ap.add_argument("--init", default=None, help="start from this demo checkpoint instead of random weights")
    ap.add_argument("--digits", type=int, nargs=2, default=[4, 7], help="needle value digits (min max)")
    ap.add_argument("--kinds", nargs="+", default=["c4", "c8", "c16", "raw"], choices=["c4", "c8", "c16", "raw"],
                    help="step types cycled through (cN: compressed at ratio N; raw: context given raw)")
    a = ap.parse_args(argv)
    train(a.out, a.steps, a.batch, a.lr, a.seed, a.min_tokens, a.max_tokens, time_limit=a.time_limit, init=a.init,
          digits=a.digits, kinds=tuple(a.kinds))


if __name__ == "__main__":
    main()
