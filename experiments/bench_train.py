"""Train-step throughput: tokens/s and MFU, one JSON line per row.

    python -m experiments.bench_train [--configs tiny,small] [--steps 5] [--real]

Rows (all with random weights and synthetic TrainBatches, stage 2 = everything trains):
``tiny``   the golden tiny shapes (decoder hidden 64, 2 layers), S=128, 8 rows;
``small``  a small model (encoder/decoder hidden 256, 4 layers, vocab 4096), S=512, 4 rows;
``baseline`` for each: the same model's plain decoder-only causal-LM step (no encoder, no adapter,
same rows and length, same optimizer) in the same run -- the cost the LCLM machinery adds on top.
``--real`` adds the released shapes (0.6B encoder + 4B decoder, S=16384, W=1024, cr 16) for a GPU.
MFU = model FLOPs of the step (see ``lclm_jax.train.metrics``) / time / peak (table by device kind;
on CPU a measured fp32 matmul rate).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _shapes(name):
    from lclm_jax.config import LCLMConfig, qwen3_4b_instruct_2507, qwen3_embedding_0_6b, tiny

    if name == "tiny":
        enc = tiny(509, causal_lm=False, hidden_size=48, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, num_hidden_layers=2)
        dec = tiny(512, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32, num_hidden_layers=2)
        return LCLMConfig(4, 16), enc, dec, dict(rows=8, seq_len=128, max_windows=8, dtype="float32")
    if name == "small":
        enc = tiny(4096, causal_lm=False, hidden_size=256, intermediate_size=768, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, num_hidden_layers=4)
        dec = tiny(4096, hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, num_hidden_layers=4)
        return LCLMConfig(8, 64), enc, dec, dict(rows=4, seq_len=512, max_windows=16, dtype="float32")
    if name == "real":
        return (LCLMConfig(16, 1024), qwen3_embedding_0_6b(), qwen3_4b_instruct_2507(),
                dict(rows=jax.device_count(), seq_len=16384, max_windows=256, dtype="bfloat16"))
    raise ValueError(name)


def _run_cfg(cfg, rows, seq_len, max_windows, dtype):
    from lclm_jax.train.config import resolve

    raw = {"experiment": "bench", "models": {"pooling": cfg.pooling, "encoder_window_size": cfg.encoder_window_size,
                                             "mask": cfg.encoder_mask_type, "adapter_type": "mlp"},
           "training": {"compression_ratio": cfg.compression_ratio, "max_steps": 100, "warmup_steps": 2,
                        "decoder_gradient_checkpointing": dtype == "bfloat16"},
           "stages": {2: {"train_decoder": True, "train_encoder": True, "train_batch_size": rows,
                          "encoder_gradient_checkpointing": dtype == "bfloat16", "dataset": "synthetic"}},
           "jax": {"dtype": dtype, "seq_len": seq_len, "max_windows": max_windows}}
    return resolve(raw, 2, "/tmp/bench_train")


def _time(fn, state, batch, steps):
    for _ in range(2):  # compile + a second call (settles weak types / donation layouts)
        state, m = fn(state, batch)
        jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = fn(state, batch)
    jax.block_until_ready(m)
    return (time.perf_counter() - t) / steps, float(m["loss"])


def bench(name, steps, peak):
    from lclm_jax import sharding as sh
    from lclm_jax.lclm.model import LCLMModel, chunked_cross_entropy
    from lclm_jax.modeling.attention import AttnMask
    from lclm_jax.modeling.qwen3 import head_matrix
    from lclm_jax.train import metrics as mx
    from lclm_jax.train import optim
    from lclm_jax.train.data import SyntheticSource, batch_config
    from lclm_jax.train.state import TrainSpec, new_state, split
    from lclm_jax.train.step import DEVICE_KEYS, jit_train_step, make_train_step

    cfg, enc, dec, o = _shapes(name)
    run = _run_cfg(cfg, o["rows"], o["seq_len"], o["max_windows"], o["dtype"])
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[o["dtype"]]
    model = LCLMModel(cfg, enc, dec, dtype=dt, param_dtype=jnp.float32, encoder_remat=run.encoder_remat,
                      decoder_remat=run.decoder_remat)
    mesh = sh.make_mesh(**run.mesh)
    mem = (dec.vocab_size - 3, dec.vocab_size - 2, dec.vocab_size - 1)
    spec = TrainSpec.from_run(run, mem)
    src = SyntheticSource(batch_config(run, memory_ids=mem), seed=0, memory_end_id=mem[1],
                          span_tokens=(o["seq_len"] // 8, o["seq_len"] // 3), text_vocab=min(enc.vocab_size, 256))
    host = next(src)
    batch = {k: host[k] for k in DEVICE_KEYS}
    shapes = {k: v.shape for k, v in batch.items()}
    bsh = {k: sh.batch_sharding(mesh, len(v), shape=v) for k, v in shapes.items()}
    batch = {k: jax.device_put(v, bsh[k]) for k, v in batch.items()}
    params = jax.jit(model.init, out_shardings=sh.param_shardings(jax.eval_shape(model.init, jax.random.PRNGKey(0)),
                                                                    mesh))(jax.random.PRNGKey(0))
    opt = optim.make_optimizer(run, jax.eval_shape(lambda p: split(p, spec)[0], params))
    state = new_state(params, opt, spec, 0, mesh)
    fn = jit_train_step(make_train_step(model, opt, spec, run, 100), jax.tree_util.tree_map(lambda a: a.sharding, state), bsh)
    sec, loss = _time(fn, state, batch, steps)
    flops = mx.step_flops(model, spec, shapes)
    dec_tokens = int(np.sum(host["num_tokens"]))
    enc_tokens = int(np.sum(host["num_enc_tokens"]))
    rows = [{"bench": "train_step", "config": name, "model": "lclm", "devices": jax.device_count(),
             "platform": jax.devices()[0].platform, "rows": o["rows"], "seq_len": o["seq_len"],
             "step_s": round(sec, 5), "decoder_tokens_per_s": round(dec_tokens / sec, 1),
             "encoder_tokens_per_s": round(enc_tokens / sec, 1),
             "total_tokens_per_s": round((dec_tokens + enc_tokens) / sec, 1),
             "model_tflops_per_step": round(flops / 1e12, 4),
             "mfu": round(flops / sec / peak, 4) if peak else None, "loss": round(loss, 4)}]

    # baseline: the decoder alone as a causal LM on the same rows (same optimizer settings)
    dm = model.decoder
    dparams = params["decoder"]
    dopt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, 0.9, 0.95, 1e-8, 0.0))

    def dstep(st, ids, labels, seg, pos):
        def loss_fn(p):
            mask = AttnMask.make(ids.shape[0], ids.shape[1], causal=True, segment_ids=seg)
            h, _ = dm.apply({"params": p}, ids, positions=pos, mask=mask, method="hidden")
            s, c = chunked_cross_entropy(h[:, :-1], labels[:, 1:], head_matrix(p, dec), 1024)
            return s / jnp.maximum(c, 1)

        loss, g = jax.value_and_grad(loss_fn)(st[0])
        u, os_ = dopt.update(g, st[1], st[0])
        return (optax.apply_updates(st[0], u), os_), {"loss": loss}

    dstate = (dparams, dopt.init(dparams))
    djit = jax.jit(dstep, donate_argnums=(0,))
    args = [batch[k] for k in ("input_ids", "labels", "segment_ids", "positions")]
    f2 = lambda st, _b: djit(st, *args)  # noqa: E731
    sec2, loss2 = _time(f2, dstate, None, steps)
    from lclm_jax.train.metrics import forward_flops

    dflops = 3 * forward_flops(dec, o["rows"], o["seq_len"], True, head=True)
    rows.append({"bench": "train_step", "config": name, "model": "decoder_only_baseline",
                 "devices": jax.device_count(), "platform": jax.devices()[0].platform, "rows": o["rows"],
                 "seq_len": o["seq_len"], "step_s": round(sec2, 5),
                 "decoder_tokens_per_s": round(dec_tokens / sec2, 1),
                 "model_tflops_per_step": round(dflops / 1e12, 4),
                 "mfu": round(dflops / sec2 / peak, 4) if peak else None, "loss": round(float(loss2), 4),
                 "lclm_step_time_ratio": round(sec / sec2, 3)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--real", action="store_true", help="also the released 0.6B+4B shapes (GPU)")
    ap.add_argument("--peak_flops", type=float, default=None, help="per device")
    args = ap.parse_args(argv)
    from lclm_jax.train.metrics import device_peak_flops

    peak = device_peak_flops(args.peak_flops)
    print(json.dumps({"bench": "peak", "devices": jax.device_count(), "kind": jax.devices()[0].device_kind,
                      "peak_flops_total": peak}), flush=True)
    names = [n for n in args.configs.split(",") if n] + (["real"] if args.real else [])
    for n in names:
        for row in bench(n, args.steps, peak):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
