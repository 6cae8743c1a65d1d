"""Train the tiny demo LCLM on synthetic needle retrieval + reconstruction (CPU, about an hour).

    python -m experiments.train_demo --out experiments/demo_checkpoint

One model serves every compression ratio: with mean pooling the device model does not depend on the
ratio (the host decides how many tokens each latent pools). Training has two stages:

1. ``--raw-steps`` steps of needle questions over *raw* haystacks only, at ``--lr``: the decoder learns
   to find the one number in its context and copy it (a tiny transformer needs a few hundred steps of
   this before accuracy leaves chance; mixed with compressed steps from the start it never did here).
2. the rest cycles through steps at cr 4, 8 and 16 plus a raw step (so the same decoder stays the
   demo's "uncompressed" baseline), at the lower ``--lr2``. Measured on this model: at 1e-3 or 3e-3
   the encoder path does not even overfit 16 compressed examples (the loss is very sharp in the
   encoder weights), at 3e-4 it does, and fresh-data accuracy leaves chance within 250 steps.

Needle rows follow RULER ``niah_single_1``; ``--short-frac`` of them drop the instruction and the
question (haystack then ``Answer:``), so fewer tokens compete for the decoder's attention; ``--recon-frac``
of each batch are reconstruction rows (a short haystack in memory tags repeated back exactly).
Haystack lengths follow a curriculum per stage: the longest haystack drawn grows linearly from
``--min-tokens`` to ``--max-tokens`` over the first ``--warm-frac`` of the stage's steps. Each step
type has fixed shapes, so there are four compiles in all.

The model is tiny (encoder 2x128, decoder 4x128, ~1.6M parameters) and uses its own byte-level BPE
(``experiments.demo_tokenizer``: 2,045 tokens trained on the synthetic texts, decoder vocabulary
2,048 with the three memory tokens). Loss: mean token cross-entropy over the supervised (answer)
tokens, AdamW. The log prints per step type the loss, the teacher-forced needle accuracy (every
answer token is the argmax: a cheap proxy for the demo's exact-match accuracy) and the same for
reconstruction rows. ``train_info.json`` in the output records the exact command and final numbers.
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
    """Fixed-shape training batch for ``(prompt, target, is_needle)`` rows (targets supervised, eos
    appended; ``is_needle`` marks needle questions for the accuracy split in the log)."""
    prompts = [r[0] for r in rows]
    targets = [r[1] + EOS for r in rows]
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
    needle = np.array([bool(r[2]) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "positions": positions,
            "placeholder_index": pidx, "encoder": enc, "needle": needle}


class DemoTask:
    """Draws batches for one step type: ``c4`` / ``c8`` / ``c16`` (compressed) or ``raw``."""

    def __init__(self, kind: str, processor: LCLMProcessor, batch: int, min_tokens: int, max_tokens: int,
                 digits=(2, 3), recon_frac: float = 0.25, short_frac: float = 0.0):
        self.kind, self.processor, self.batch, self.short_frac = kind, processor, batch, short_frac
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
                out.append((prompt, target, False))
                continue
            hi = max(self.min_tokens, self.cur_max)
            ex = demo_data.needle_example_tokens(rng, rng.randint(self.min_tokens, hi), self.count,
                                                 rng.randint(*self.digits))
            if rng.random() < self.short_frac:  # the haystack and the answer prefix only: few tokens compete
                ctx = ex.haystack if self.kind == "raw" else f"{demo_data.MEM_START}{ex.haystack}{demo_data.MEM_END}"
                out.append((f"{ctx}\n{demo_data.ruler.ANSWER_PREFIX}", ex.target, True))
            else:
                out.append((ex.prompt("raw" if self.kind == "raw" else "compressed"), ex.target, True))
        return out

    def batch_for(self, rng):
        return make_batch(self.processor, self.rows(rng), self.seq_len, self.n_windows, self.n_latents)


def schedule(steps: int, raw_steps: int, lr: float, lr2: float):
    """One warm-up + cosine schedule per stage: stage 1 (``raw_steps``) peaks at ``lr``, stage 2 at ``lr2``
    (the encoder path diverges at the stage-1 rate: measured on this model, 1e-3 and 3e-3 never leave
    the "answer without reading" plateau)."""
    stage2 = steps - raw_steps
    if stage2 < 1:
        raise ValueError(f"--steps ({steps}) must exceed --raw-steps ({raw_steps})")

    def one(peak, n):  # warm-up over 5 % of the stage (at least one step), then cosine to 5 % of the peak
        warm = max(1, n // 20)
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(n, warm + 1), peak * 0.05)

    sched2 = one(lr2, stage2)
    if not raw_steps:
        return sched2
    sched1 = one(lr, raw_steps)
    return optax.join_schedules([sched1, sched2], [raw_steps])


def train(out: str, steps: int = 4500, batch: int = 16, lr: float = 3e-3, seed: int = 0, min_tokens: int = 16,
          max_tokens: int = 256, log_every: int = 50, time_limit: float | None = None, init: str | None = None,
          digits=(2, 2), kinds=("c4", "c8", "c16", "raw"), warm_frac: float = 0.4, recon_frac: float = 0.1,
          raw_steps: int = 600, short_frac: float = 0.3, lr2: float | None = 3e-4):
    """Two-stage training (see the module docstring); defaults are the committed checkpoint's recipe."""
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
                      recon_frac, short_frac) for k in kinds]
    # stage 1: needle questions over raw haystacks only (the decoder learns to find and copy the value)
    warmup_task = DemoTask("raw", procs[4], batch, min_tokens, max_tokens, tuple(digits), 0.0)
    lr2 = lr if lr2 is None else lr2
    sched = schedule(steps, raw_steps, lr, lr2)
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
        needle = b["needle"]
        return loss, jnp.stack([jnp.sum(row_ok & needle), jnp.sum(needle), jnp.sum(row_ok & ~needle),
                                jnp.sum(~needle)]).astype(jnp.float32)

    @jax.jit
    def step(p, st, b):
        (loss, counts), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
        upd, st = opt.update(g, st, p)
        return optax.apply_updates(p, upd), st, loss, counts

    def summary(v):  # mean loss, needle and reconstruction teacher-forced accuracy over recent steps
        c = np.sum([x[1] for x in v], axis=0)
        acc = lambda k, n: f"{100 * c[k] / c[n]:.0f}%" if c[n] else "-"
        return f"{np.mean([x[0] for x in v]):.3f} {acc(0, 1)} {acc(2, 3)}"

    rng = random.Random(seed)
    hist = {"raw-warmup": [], **{t.kind: [] for t in tasks}}
    t0 = time.time()
    print(f"demo model: {n_params:,} parameters; steps {steps} ({raw_steps} raw needle warm-up), batch {batch}, "
          f"haystack {min_tokens}-{max_tokens} tokens (curriculum over the first {warm_frac:.0%} of each stage), "
          f"digits {digits[0]}-{digits[1]}", flush=True)
    print("log: per step type, mean loss / needle accuracy / reconstruction accuracy (teacher forced, last "
          f"{log_every} steps)", flush=True)
    done = 0
    for i in range(steps):
        stage_i, stage_n = (i, raw_steps) if i < raw_steps else (i - raw_steps, steps - raw_steps)
        task = warmup_task if i < raw_steps else tasks[stage_i % len(tasks)]
        task.cur_max = int(min_tokens + (max_tokens - min_tokens) * min(1.0, (stage_i + 1) / max(1, warm_frac * stage_n)))
        params, opt_state, loss, counts = step(params, opt_state, task.batch_for(rng))
        hist["raw-warmup" if i < raw_steps else task.kind].append((float(loss), np.asarray(counts), i))
        done = i + 1
        if (i + 1) % log_every == 0 or i == 0:
            avg = {k: summary([x for x in v if x[2] > i - log_every]) for k, v in hist.items()
                   if v and v[-1][2] > i - log_every}
            print(f"step {i + 1:5d}  {time.time() - t0:6.0f}s  max haystack {task.cur_max:4d}  {avg}", flush=True)
        if time_limit and time.time() - t0 > time_limit:
            print(f"time limit reached after {i + 1} steps", flush=True)
            break
    params = jax.tree_util.tree_map(np.asarray, params)
    lclm_io.write_lclm(out, params, cfg, enc_cfg, dec_cfg, dtype="float32", tokenizers_from=tok_dir,
                       max_memory_length=4096)

    def final(v, k, n):
        c = np.sum([x[1] for x in v[-20:]], axis=0)
        return round(float(c[k] / c[n]), 4) if c[n] else None

    info = {"init": init, "steps": done, "planned_steps": steps, "raw_steps": raw_steps, "batch": batch, "lr": lr, "lr2": lr2,
            "seed": seed, "haystack_tokens": [min_tokens, max_tokens], "warm_frac": warm_frac,
            "recon_frac": recon_frac, "digits": list(digits), "kinds": list(kinds), "params": int(n_params),
            "train_seconds": round(time.time() - t0, 1), "ratios": list(RATIOS),
            "final_loss": {k: round(float(np.mean([x[0] for x in v[-20:]])), 4) for k, v in hist.items() if v},
            "final_teacher_forced_needle_accuracy": {k: final(v, 0, 1) for k, v in hist.items() if v},
            "final_teacher_forced_reconstruction_accuracy": {k: final(v, 2, 3) for k, v in hist.items() if v},
            "command": f"python -m experiments.train_demo --out {out} --steps {steps} --raw-steps {raw_steps} "
                       f"--batch {batch} --lr {lr} --lr2 {lr2} --seed {seed} --min-tokens {min_tokens} --max-tokens {max_tokens} "
                       f"--digits {digits[0]} {digits[1]} --kinds {' '.join(kinds)} --warm-frac {warm_frac} "
                       f"--recon-frac {recon_frac} --short-frac {short_frac}" + (f" --init {init}" if init else "")
                       + (f" --time-limit {time_limit}" if time_limit else "")}
    with open(os.path.join(out, "train_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info), flush=True)
    return params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "demo_checkpoint"))
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr2", type=float, default=3e-4, help="peak learning rate of stage 2 (compressed steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--time-limit", type=float, default=None, help="stop early after this many seconds")
    ap.add_argument("--init", default=None, help="start from this demo checkpoint instead of random weights")
    ap.add_argument("--digits", type=int, nargs=2, default=[2, 2], help="needle value digits (min max; "
                    "values below 1000 are one token of the demo tokenizer)")
    ap.add_argument("--warm-frac", type=float, default=0.4, help="fraction of steps over which the longest "
                    "haystack grows from --min-tokens to --max-tokens")
    ap.add_argument("--recon-frac", type=float, default=0.1, help="fraction of reconstruction rows per batch")
    ap.add_argument("--short-frac", type=float, default=0.3, help="fraction of needle rows shown without the "
                    "instruction and question (haystack, then 'Answer:'): fewer tokens compete for attention")
    ap.add_argument("--raw-steps", type=int, default=600, help="first steps spent on needle questions over raw "
                    "haystacks only (stage 1), before cycling through --kinds (stage 2)")
    ap.add_argument("--kinds", nargs="+", default=["c4", "c8", "c16", "raw"], choices=["c4", "c8", "c16", "raw"],
                    help="step types cycled through (cN: compressed at ratio N; raw: context given raw)")
    a = ap.parse_args(argv)
    train(a.out, a.steps, a.batch, a.lr, a.seed, a.min_tokens, a.max_tokens, a.log_every, time_limit=a.time_limit, init=a.init,
          digits=tuple(a.digits), kinds=tuple(a.kinds), warm_frac=a.warm_frac, recon_frac=a.recon_frac,
          raw_steps=a.raw_steps, short_frac=a.short_frac, lr2=a.lr2)


if __name__ == "__main__":
    main()
