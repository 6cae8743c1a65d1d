"""Context benchmark: TTFT, decode tokens/s and peak memory against context length.

    python -m experiments.bench_context                                   # CPU, small random model
    python -m experiments.bench_context --model released --lengths 4096 16384 65536 262144 1048576

Methods, all with the same decoder: ``lclm-cr{4,8,16}`` (context through the encoder, one latent per
cr tokens), ``full`` (uncompressed decoder), ``snapkv-cr{c}`` and ``sink-cr{c}`` (KV-cache eviction
to ``ceil(T/c)`` positions after a full prefill, ``experiments/kv_eviction.py``; ``--evict-ratios``).
Inputs are random token ids: a context of ``L`` tokens followed by a 32-token raw question.

* TTFT: best-of-``--repeats`` wall time (after a warm-up that compiles) from ids on the host to the first sampled
  token: encoder + adapter + decoder prefill for LCLM, prefill (+ scoring and eviction) otherwise.
  Encoder latents are never cached between runs.
* decode tokens/s: ``(N - 1) / (t_N - t_1)`` with ``N = --decode-tokens`` greedy tokens (no stop).
* memory: ``peak_est_bytes`` = the largest XLA memory estimate (arguments + outputs + temporaries -
  aliased) among the compiled functions one request runs (weights included), from
  ``compiled.memory_analysis()``; it works on CPU and GPU. On a GPU ``device_peak_bytes`` is also read
  from the allocator (a running maximum over the process, so lengths are run in increasing order).
  ``kv_bytes`` is the decoder KV cache size during decoding.

``--model tiny`` (default) is a small random LCLM that runs on CPU; ``--model released`` has the shapes
of the released 0.6B encoder + 4B decoder (random weights, bf16; for a GPU); ``--checkpoint`` uses a
real checkpoint. Each configuration prints one JSON line; ``--out`` collects them with a table and a plot.
A configuration that fails (e.g. out of memory) prints a JSON line with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments import eval_common as ec
from experiments import kv_eviction
from lclm_jax.api import LCLM, _pow2
from lclm_jax.config import LCLMConfig, Qwen3Config, qwen3_4b_instruct_2507, qwen3_embedding_0_6b
from lclm_jax.generate import SamplingConfig, make_generate_fn
from lclm_jax.lclm.model import LCLMModel
from lclm_jax.lclm.processor import LCLMProcessor, ProcessedPrompt

TOKENIZERS = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lclm_golden" / \
    "mean_causal_cr4_w16" / "checkpoint"
QUESTION_TOKENS = 32


def build_model(kind: str, backend: str, cr: int = 4, dtype: str = "float32", seed: int = 0,
                max_encode_batch_size: int = 128):
    jd = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    if kind == "tiny":
        enc = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, architectures=("Qwen3Model",))
        dec = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1 << 21)
        window = 1024
    elif kind == "released":
        enc = qwen3_embedding_0_6b().replace(vocab_size=151669)
        dec = qwen3_4b_instruct_2507()
        window = 1024
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    cfg = LCLMConfig(compression_ratio=cr, encoder_window_size=window)
    model = LCLMModel(cfg, enc, dec, dtype=jd, param_dtype=jd, backend=backend, encoder_backend="xla",
                      max_encode_batch_size=max_encode_batch_size)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed))
    proc = LCLMProcessor.from_checkpoint(TOKENIZERS, compression_ratio=cr)
    return LCLM(model, params, proc)


def with_ratio(lm: LCLM, cr: int) -> LCLM:
    """The same weights with another compression ratio (mean pooling does not depend on it)."""
    import dataclasses
    cfg = lm.model.config.replace(compression_ratio=cr)
    model = dataclasses.replace(lm.model, config=cfg)
    proc = LCLMProcessor(lm.processor.decoder_tokenizer, lm.processor.encoder_tokenizer, cr,
                         eos_token=lm.processor.decoder_tokenizer.id_to_token(lm.processor.eos_id),
                         pad_token=lm.processor.decoder_tokenizer.id_to_token(lm.processor.pad_id))
    return LCLM(model, lm.params, proc)


def _mem(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:
        return None


def _device_peak() -> int | None:
    try:
        st = jax.devices()[0].memory_stats()
        return int(st["peak_bytes_in_use"]) if st and "peak_bytes_in_use" in st else None
    except Exception:
        return None


def _best_time(fn, repeats):
    """Best of ``repeats`` wall times (robust to other load on a shared machine)."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(min(ts))


def _rate(n_tokens, t_n, t_1):
    return n_tokens / (t_n - t_1) if t_n > t_1 else None


def _rows(lm, length, cr, rng):
    p = lm.processor
    dv = lm.model.decoder_config.vocab_size
    q = rng.integers(1, min(dv, 509), QUESTION_TOKENS).astype(np.int32)
    if cr is None:
        ctx = rng.integers(1, min(dv, 509), length).astype(np.int32)
        return ProcessedPrompt(np.concatenate([ctx, q]), [], [], [], None)
    ev = lm.model.encoder_config.vocab_size
    span = rng.integers(1, min(ev, 509), length).astype(np.int32)
    n = math.ceil(length / cr)
    ids = np.concatenate([[p.memory_start_id], np.full(n, p.memory_id), [p.memory_end_id], q]).astype(np.int32)
    return ProcessedPrompt(ids, [span], [(1, 1 + n)], [n], None)


def bench_generate(lm: LCLM, length: int, cr, decode_tokens: int, repeats: int, seed: int = 0) -> dict:
    """LCLM (cr given) or the uncompressed decoder (cr None) through the library's generation path."""
    row = _rows(lm, length, cr, np.random.default_rng(seed))
    stops = np.asarray([-1], np.int32)
    key = jax.random.PRNGKey(0)
    pad = np.int32(lm.processor.pad_id)
    ids, mask, _, lat, pidx = lm._decoder_batch([row], "left", batch_size=1)
    fns, peaks = {}, []
    for n in (1, decode_tokens):  # compile once; the compiled objects also give the memory estimates
        fn = make_generate_fn(lm.model, _pow2(n, 16), SamplingConfig())
        fns[n] = fn.lower(lm.params, ids, mask, lat, pidx, stops, np.int32(n), key, pad).compile()
        peaks.append(_mem(fns[n]))
    if row.span_ids:
        _, enc = lm._encoder_inputs(row.span_ids)
        peaks.append(_mem(lm._latents_fn.lower(lm.params, enc).compile()))

    def run(n):
        lm.clear_latent_cache()
        ids, mask, _, lat, pidx = lm._decoder_batch([row], "left", batch_size=1)
        return fns[n](lm.params, ids, mask, lat, pidx, stops, np.int32(n), key, pad)

    run(1)
    run(decode_tokens)
    t1 = _best_time(lambda: run(1), repeats)
    tn = _best_time(lambda: run(decode_tokens), repeats)
    dcfg = lm.model.decoder_config
    slots = ids.shape[1] + _pow2(decode_tokens, 16)
    kv = 2 * dcfg.num_hidden_layers * slots * dcfg.num_key_value_heads * dcfg.head_dim * jnp.dtype(lm.model.dtype).itemsize
    return {"ttft_s": t1, "decode_tok_s": _rate(decode_tokens - 1, tn, t1),
            "decoder_tokens": int(len(row.input_ids)), "kv_bytes": int(kv),
            "peak_est_bytes": max([p for p in peaks if p is not None], default=None)}


def bench_evict(lm: LCLM, length: int, method: str, cr: int, decode_tokens: int, repeats: int, seed: int = 0):
    row = _rows(lm, length, None, np.random.default_rng(seed))
    ids = row.input_ids[None]
    t = ids.shape[1]
    budget = kv_eviction.budget_for(t, cr)
    gen, first = kv_eviction.make_evict_generate_fn(lm.model, method, t, budget, decode_tokens)
    gen, first = gen.lower(lm.params, ids).compile(), first.lower(lm.params, ids).compile()
    peaks = [_mem(gen), _mem(first)]
    jax.block_until_ready(first(lm.params, ids))
    jax.block_until_ready(gen(lm.params, ids))
    t1 = _best_time(lambda: first(lm.params, ids), repeats)
    tn = _best_time(lambda: gen(lm.params, ids), repeats)
    dcfg = lm.model.decoder_config
    kv = 2 * dcfg.num_hidden_layers * (budget + decode_tokens) * dcfg.num_key_value_heads * dcfg.head_dim * \
        jnp.dtype(lm.model.dtype).itemsize
    return {"ttft_s": t1, "decode_tok_s": _rate(decode_tokens, tn, t1), "decoder_tokens": int(budget),
            "kv_bytes": int(kv), "peak_est_bytes": max([p for p in peaks if p is not None], default=None)}


def run(args, log=print) -> list[dict]:
    base = ec.load_model(args.checkpoint, args.dtype, backend=args.backend) if args.checkpoint else \
        build_model(args.model, args.backend, dtype=args.dtype)
    models = {cr: with_ratio(base, cr) for cr in args.ratios}
    results = []
    for length in sorted(args.lengths):
        todo = [("full", None)] + [(f"lclm-cr{c}", c) for c in args.ratios]
        todo += [(f"{m}-cr{c}", c) for m in args.evict_methods for c in args.evict_ratios]
        for name, cr in todo:
            rec = {"method": name, "context": length, "cr": cr, "model": "checkpoint" if args.checkpoint else args.model,
                   "platform": jax.default_backend()}
            if args.max_full and length > args.max_full and not name.startswith("lclm"):
                rec["error"] = f"skipped: longer than --max-full {args.max_full}"
                log(json.dumps(rec))
                results.append(rec)
                continue
            try:
                if name == "full":
                    rec.update(bench_generate(base, length, None, args.decode_tokens, args.repeats))
                elif name.startswith("lclm"):
                    rec.update(bench_generate(models[cr], length, cr, args.decode_tokens, args.repeats))
                else:
                    rec.update(bench_evict(base, length, name.split("-")[0], cr, args.decode_tokens, args.repeats))
                rec["device_peak_bytes"] = _device_peak()
            except Exception as e:  # OOM and friends: record and go on
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if args.verbose:
                    traceback.print_exc()
            log(json.dumps(rec))
            results.append(rec)
    return results


def table(results) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["method"], r["context"], "-", "-", "-", "-", r["error"][:40]])
            continue
        pk = r.get("device_peak_bytes") or r.get("peak_est_bytes")
        rows.append([r["method"], r["context"], r["decoder_tokens"], f"{r['ttft_s'] * 1000:.1f}",
                     f"{r['decode_tok_s']:.0f}" if r["decode_tok_s"] else "-", f"{(pk or 0) / 2 ** 20:.1f}", f"{r['kv_bytes'] / 2 ** 20:.2f}"])
    return ec.format_table(["method", "context", "dec tokens", "TTFT ms", "decode tok/s", "peak MiB", "KV MiB"], rows)


def plot(results, path):
    plt = ec.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in results))
    for m in methods:
        rs = [r for r in results if r["method"] == m and "error" not in r]
        if not rs:
            continue
        xs = [r["context"] for r in rs]
        style = "-" if m.startswith("lclm") else ("--" if m == "full" else ":")
        axes[0].plot(xs, [r["ttft_s"] * 1000 for r in rs], style, marker="o", label=m)
        axes[1].plot(xs, [r["decode_tok_s"] or float("nan") for r in rs], style, marker="o", label=m)
        axes[2].plot(xs, [(r.get("device_peak_bytes") or r.get("peak_est_bytes") or 0) / 2 ** 20 for r in rs], style,
                     marker="o", label=m)
    for ax, lab in zip(axes, ("TTFT (ms)", "decode tokens/s", "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(lab)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"context benchmark ({results[0]['model']}, {results[0]['platform']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="TTFT / decode speed / memory vs context length")
    ap.add_argument("--model", choices=["tiny", "released"], default="tiny")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--dtype", default=None, help="default: float32 for tiny, bfloat16 otherwise")
    ap.add_argument("--backend", default="blockwise", help="decoder attention backend (xla/blockwise/cudnn/auto)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--ratios", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--evict-methods", nargs="*", default=list(kv_eviction.METHODS))
    ap.add_argument("--evict-ratios", type=int, nargs="+", default=[16])
    ap.add_argument("--max-full", type=int, default=None, help="skip full/eviction runs above this length")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench_context")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.dtype is None:
        a.dtype = "float32" if a.model == "tiny" and not a.checkpoint else "bfloat16"
    os.makedirs(a.out, exist_ok=True)
    lines = open(os.path.join(a.out, "bench_context.jsonl"), "w")

    def log(s):
        print(s, flush=True)
        lines.write(s + "\n")
        lines.flush()

    res = run(a, log)
    lines.close()
    print()
    print(table(res))
    p = plot(res, os.path.join(a.out, "bench_context.png"))
    print(f"wrote {os.path.join(a.out, 'bench_context.jsonl')}" + (f" and {p}" if p else ""))
    return res


if __name__ == "__main__":
    main()
