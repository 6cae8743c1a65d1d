"""Train the tiny demo LCLM on synthetic needle retrieval + reconstruction (CPU, tens of minutes).

    python -m experiments.train_demo --out experiments/demo_checkpoint --steps 3000 --time-limit 3000

One model serves every compression ratio: with mean pooling the device model does not depend on the
ratio (the host decides how many tokens each latent pools), so training cycles through steps at
cr 4, 8 and 16 plus a step with the haystack given raw to the decoder (so the same decoder is also
the "uncompressed" baseline of the demo). Every step mixes needle questions with reconstruction rows
(a short haystack wrapped in memory tags and repeated back exactly; on raw steps it is given raw,
i.e. plain copying), extra signal for reading exact strings out of latents.
Haystack lengths follow a curriculum: the longest haystack drawn grows linearly from
``--min-tokens`` to ``--max-tokens`` over the first ``--warm-frac`` of the steps. Each step type has
fixed shapes, so there are four compiles in all.

The model is tiny (encoder 2x128, decoder 4x128, ~1.6M parameters) and uses its own byte-level BPE
(``experiments.demo_tokenizer``: 2,045 tokens trained on the synthetic texts, decoder vocabulary
2,048 with the three memory tokens). Loss: mean token cross-entropy over the supervised (answer)
tokens, AdamW. The log prints per step type the loss and the teacher-forced answer accuracy (a row
counts when every answer token is the argmax), a cheap proxy for the demo's exact-match accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import demo_data, demo_tokenizer
from lclm_jax.checkpoint import lclm_io
from lclm_jax.config import LCLMConfig, Qwen3Config
from lclm_jax.lclm.model import IGNORE, LCLMModel
from lclm_jax.lclm.processor import LCLMProcessor
from lclm_jax.modeling.qwen3 import head_matrix
from lclm_jax.lclm.windows import WindowConfig, build_encoder_batch

RATIOS = (4, 8, 16)
WINDOW = 64
EOS = "<|endoftext|>"
RECON_TOKENS = (12, 48)  # haystack length range of the reconstruction rows


def model_configs():
    enc = Qwen3Config(vocab_size=demo_tokenizer.ENCODER_VOCAB, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                      tie_word_embeddings=True, max_position_embeddings=4096, architectures=("Qwen3Model",),
                      extra=json.dumps({"eos_token_id": 0, "pad_token_id": 0}))
    dec = Qwen3Config(vocab_size=demo_tokenizer.DECODER_VOCAB, hidden_size=128, intermediate_size=384,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e4,
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
                 digits=(2, 3), recon_frac: float = 0.25):
        self.kind, self.processor, self.batch = kind, processor, batch
        self.min_tokens, self.max_tokens, self.digits, self.recon_frac = min_tokens, max_tokens, digits, recon_frac
        self.count = count_fn(processor)
        overhead = self.count(demo_data.ruler.NIAH_PREFIX) + 40 + 16  # question, answer, tags and slack
        self.cur_max = max_tokens  # the curriculum's current longest haystack
        if kind == "raw":
            self.seq_len = int(math.ceil((max_tokens + overhead) / 64) * 64)
            self.n_windows, self.n_latents = 8, 16
        else:
            cr = processor.compression_ratio
            # the longest row is a reconstruction: its latents plus the repeated text
            longest = max(max_tokens / cr + overhead, RECON_TOKENS[1] / cr + RECON_TOKENS[1] + 24)
            self.seq_len = int(math.ceil(longest / 64) * 64)
            self.n_windows = batch * math.ceil(max_tokens / WINDOW)
            self.n_latents = batch * math.ceil(max_tokens / cr) + 16

    def rows(self, rng: random.Random):
        out = []
        for _ in range(self.batch):
            if rng.random() < self.recon_frac:  # dense copy supervision (raw rows: plain copying)
                prompt, target = demo_data.reconstruction_pair(rng, rng.randint(*RECON_TOKENS), self.count,
                                                              self.digits)
                if self.kind == "raw":
                    prompt = prompt.replace(demo_data.MEM_START, "").replace(demo_data.MEM_END, "")
                out.append((prompt, target))
                continue
            hi = max(self.min_tokens, self.cur_max)
            ex = demo_data.needle_example_tokens(rng, rng.randint(self.min_tokens, hi), self.count,
                                                 rng.randint(*self.digits))
            out.append((ex.prompt("raw" if self.kind == "raw" else "compressed"), ex.target))
        return out

    def batch_for(self, rng):
        return make_batch(self.processor, self.rows(rng), self.seq_len, self.n_windows, self.n_latents)


def train(out: str, steps: int = 3000, batch: int = 16, lr: float = 3e-3, seed: int = 0, min_tokens: int = 16,
          max_tokens: int = 256, log_every: int = 50, time_limit: float | None = None, init: str | None = None,
          digits=(2, 3), kinds=("c4", "c8", "c16", "raw"), warm_frac: float = 0.4, recon_frac: float = 0.25):
    cfg, enc_cfg, dec_cfg = model_configs()
    model = LCLMModel(cfg, enc_cfg, dec_cfg)
    if init:  # continue from a saved demo checkpoint (same shapes)
        _, _, _, params = lclm_io.read_lclm(init, dtype="float32")
        params = jax.tree_util.tree_map(jnp.asarray, params)
    else:
        params = model.init(jax.random.PRNGKey(seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    tok_tmp = tempfile.TemporaryDirectory(prefix="demo_tokenizer_")  # removed when training returns
    tok_dir = demo_tokenizer.build(tok_tmp.name, seed=0)
    procs = {cr: LCLMProcessor.from_checkpoint(tok_dir, compression_ratio=cr) for cr in RATIOS}
    tasks = [DemoTask(k, procs[int(k[1:]) if k != "raw" else 4], batch, min_tokens, max_tokens, tuple(digits),
                      recon_frac) for k in kinds]
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.01))
    opt_state = opt.init(params)

    def loss_fn(p, b):  # logits are small here (vocab 2,048), so take them whole for the accuracy too
        h = model.forward_hidden(p, b)[:, :-1]
        y = b["labels"][:, 1:]
        logits = jnp.einsum("bsd,dv->bsv", h, head_matrix(p["decoder"], dec_cfg), preferred_element_type=jnp.float32)
        valid = y != IGNORE
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.where(valid, y, 0)[..., None], -1)[..., 0]
        loss = jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
        ok = (jnp.argmax(logits, -1) == y) | ~valid
        row_ok = jnp.all(ok, axis=-1) & jnp.any(valid, axis=-1)
        return loss, jnp.sum(row_ok) / jnp.maximum(jnp.sum(jnp.any(valid, axis=-1)), 1)

    @jax.jit
    def step(p, st, b):
        (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
        upd, st = opt.update(g, st, p)
        return optax.apply_updates(p, upd), st, loss, acc

    rng = random.Random(seed)
    hist = {t.kind: [] for t in tasks}
    t0 = time.time()
    print(f"demo model: {n_params:,} parameters; steps {steps}, batch {batch}, haystack {min_tokens}-{max_tokens} "
          f"tokens (curriculum over the first {warm_frac:.0%}), digits {digits[0]}-{digits[1]}", flush=True)
    done = 0
    for i in range(steps):
        task = tasks[i % len(tasks)]
        task.cur_max = int(min_tokens + (max_tokens - min_tokens) * min(1.0, (i + 1) / max(1, warm_frac * steps)))
        params, opt_state, loss, acc = step(params, opt_state, task.batch_for(rng))
        hist[task.kind].append((float(loss), float(acc)))
        done = i + 1
        if (i + 1) % log_every == 0 or i == 0:
            avg = {k: f"{np.mean([x[0] for x in v[-12:]]):.3f}/{100 * np.mean([x[1] for x in v[-12:]]):.0f}%"
                   for k, v in hist.items() if v}
            print(f"step {i + 1:5d}  {time.time() - t0:6.0f}s  max haystack {task.cur_max:4d}  loss/row-acc {avg}",
                  flush=True)
        if time_limit and time.time() - t0 > time_limit:
            print(f"time limit reached after {i + 1} steps", flush=True)
            break
    params = jax.tree_util.tree_map(np.asarray, params)
    lclm_io.write_lclm(out, params, cfg, enc_cfg, dec_cfg, dtype="float32", tokenizers_from=tok_dir,
                       max_memory_length=4096)
    info = {"init": init, "steps": done, "planned_steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "haystack_tokens": [min_tokens, max_tokens], "warm_frac": warm_frac, "recon_frac": recon_frac,
            "digits": list(digits), "kinds": list(kinds), "params": int(n_params),
            "train_seconds": round(time.time() - t0, 1), "ratios": list(RATIOS),
            "final_loss": {k: round(float(np.mean([x[0] for x in v[-20:]])), 4) for k, v in hist.items() if v},
            "final_teacher_forced_row_accuracy": {k: round(float(np.mean([x[1] for x in v[-20:]])), 4)
                                                  for k, v in hist.items() if v},
            "command": f"python -m experiments.train_demo --out {out} --steps {steps} --batch {batch} --lr {lr} "
                       f"--seed {seed} --min-tokens {min_tokens} --max-tokens {max_tokens} "
                       f"--digits {digits[0]} {digits[1]} --kinds {' '.join(kinds)} --warm-frac {warm_frac} "
                       f"--recon-frac {recon_frac}" + (f" --init {init}" if init else "")
                       + (f" --time-limit {time_limit}" if time_limit else "")}
    with open(os.path.join(out, "train_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info), flush=True)
    return params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "demo_checkpoint"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--time-limit", type=float, default=None, help="stop early after this many seconds")
    ap.add_argument("--init", default=None, help="start from this demo checkpoint instead of random weights")
    ap.add_argument("--digits", type=int, nargs=2, default=[2, 3], help="needle value digits (min max; "
                    "values below 1000 are one token of the demo tokenizer)")
    ap.add_argument("--warm-frac", type=float, default=0.4, help="fraction of steps over which the longest "
                    "haystack grows from --min-tokens to --max-tokens")
    ap.add_argument("--recon-frac", type=float, default=0.25, help="fraction of reconstruction rows per batch")
    ap.add_argument("--kinds", nargs="+", default=["c4", "c8", "c16", "raw"], choices=["c4", "c8", "c16", "raw"],
                    help="step types cycled through (cN: compressed at ratio N; raw: context given raw)")
    a = ap.parse_args(argv)
    train(a.out, a.steps, a.batch, a.lr, a.seed, a.min_tokens, a.max_tokens, a.log_every, time_limit=a.time_limit, init=a.init,
          digits=tuple(a.digits), kinds=tuple(a.kinds), warm_frac=a.warm_frac, recon_frac=a.recon_frac)


if __name__ == "__main__":
    main()
