"""Data-pipeline throughput next to the tiny model's train step, one JSON line per row.

    taskset -c 0,1 python -m experiments.bench_data [--batches 30] [--workers 0 2]

Rows: ``pipeline`` (examples/s, decoder tokens/s without padding, encoder tokens/s, batches/s,
fill, start-up seconds) per worker count, steady state after ``--warmup`` batches; ``train_step``:
jitted forward+backward+AdamW of the tiny demo LCLM (``experiments.train_demo.model_configs``,
decoder vocabulary 514 for the two chat tokens)
on the same batches (cr 4, W 64, S 2048, B 2).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def pipeline_config(workers: int):
    from data_pipelines.batch import BatchConfig
    from data_pipelines.pipeline import PipelineConfig, StreamSpec
    from data_pipelines.testing import random_chats, random_documents, tiny_tokenizers

    tok = tiny_tokenizers(4)
    docs = random_documents(400, seed=0, words=(150, 1500))
    chats = random_chats(400, seed=1)
    bcfg = BatchConfig.for_tokenizers(tok, batch_size=2, seq_len=2048, window_size=64,
                                      max_windows=48, num_bins=8)
    cfg = PipelineConfig(streams=(
        StreamSpec("cpt", weight=0.57, records=docs, options={"min_segment_tokens": 32}),
        StreamSpec("reconstruction", weight=0.17, records=docs, options={"max_span_tokens": 512}),
        StreamSpec("sft", weight=0.26, records=chats)), batch=bcfg, worker_count=workers)
    return tok, cfg


def bench_pipeline(workers: int, batches: int, warmup: int):
    from data_pipelines.pipeline import build_dataset

    tok, cfg = pipeline_config(workers)
    t0 = time.perf_counter()
    it = iter(build_dataset(cfg, tok))
    for _ in range(warmup):
        next(it)
    start = time.perf_counter() - t0
    t1 = time.perf_counter()
    ex = tokens = enc = 0
    kept = []
    for _ in range(batches):
        b = next(it)
        ex += int(b["num_docs"].sum())
        tokens += int(b["num_tokens"].sum())
        enc += int(b["num_enc_tokens"].sum())
        kept.append(b)
    dt = time.perf_counter() - t1
    S = cfg.batch.seq_len * cfg.batch.batch_size
    row = {"row": "pipeline", "workers": workers, "cpus": len(os.sched_getaffinity(0)),
           "batches": batches, "batch_shape": [cfg.batch.batch_size, cfg.batch.seq_len],
           "examples_per_s": round(ex / dt, 1), "tokens_per_s": round(tokens / dt),
           "encoder_tokens_per_s": round(enc / dt), "batches_per_s": round(batches / dt, 2),
           "fill": round(tokens / (batches * S), 3), "startup_s": round(start, 2)}
    return row, kept, cfg


def bench_train_step(batches, steps: int):
    import jax
    import jax.numpy as jnp
    import optax

    from data_pipelines.batch import to_model_inputs
    from experiments.train_demo import model_configs
    from lclm_jax.lclm.model import LCLMModel

    import dataclasses

    cfg, enc, dec = model_configs()
    # the benchmark tokenizer adds <|im_start|>/<|im_end|> (ids 512/513) for the SFT stream
    model = LCLMModel(cfg, enc, dataclasses.replace(dec, vocab_size=514))
    params = model.init(jax.random.PRNGKey(0))
    opt = optax.adamw(1e-3)
    st = opt.init(params)

    def loss_fn(p, b):
        s, c = model.loss_sums(p, b, chunk_size=512)
        return s / jnp.maximum(c, 1)

    @jax.jit
    def step(p, st, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        upd, st = opt.update(g, st, p)
        return optax.apply_updates(p, upd), st, loss

    inputs = [jax.tree_util.tree_map(jnp.asarray, to_model_inputs(b)) for b in batches]
    t0 = time.perf_counter()
    params, st, loss = step(params, st, inputs[0])
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(steps):
        params, st, loss = step(params, st, inputs[(i + 1) % len(inputs)])
    jax.block_until_ready(loss)
    dt = (time.perf_counter() - t1) / steps
    tokens = np.mean([int(b["num_tokens"].sum()) for b in batches])
    return {"row": "train_step", "model": "tiny demo LCLM (enc 2x64, dec 3x128)",
            "step_s": round(dt, 4), "tokens_per_s": round(tokens / dt), "compile_s": round(compile_s, 1),
            "loss": round(float(loss), 3), "steps": steps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-train-step", action="store_true")
    args = p.parse_args(argv)
    from data_pipelines.pipeline import mark_flags_parsed

    mark_flags_parsed()
    kept = None
    for w in args.workers:
        row, batches, _ = bench_pipeline(w, args.batches, args.warmup)
        kept = kept or batches
        print(json.dumps(row), flush=True)
    if not args.no_train_step:
        print(json.dumps(bench_train_step(kept, args.steps)), flush=True)


if __name__ == "__main__":
    main()
