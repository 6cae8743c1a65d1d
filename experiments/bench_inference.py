"""Inference benchmark: TTFT, decode tokens/s and peak memory, lclm-jax vs transformers ``generate``.

A small random LCLM (encoder 4 x 256, decoder 4 x 512, vocab 32k, W 1024, mean pooling, mlp adapter)
reads one memory span of 4k / 16k / 64k tokens at cr 4 / 8 / 16, and the same decoder reads the raw
tokens. Each row runs twice in fresh processes: lclm-jax, and the pipeline a user would otherwise run
with transformers on the same weights (HF ``Qwen3Model`` over the windows, the adapter in torch, then
``Qwen3ForCausalLM.generate(inputs_embeds=...)``). TTFT = encode + adapter + prefill + first token,
measured warm (after one untimed call; the latent cache is cleared, so the encoder always runs).
Decode tokens/s = (N - 1) / (time(N new tokens) - TTFT), N = 128 by default; each time is the
fastest of ``--repeats`` runs. Peak memory = the process's peak RSS.

Decode floor: at batch 1 every generated token reads all decoder weights (the embedding once, as the
tied LM head) and the KV cache, so no implementation decodes faster than
``mem_bandwidth_gbs / decode_bytes_per_token`` tokens/s. The bandwidth is measured once, in the parent
process before any row runs (a 1 GiB float32 array summed in one chunk per core, best of 5); each row
reports ``decode_bytes_per_token_mb`` (fp32 weights + KV cache at ``decoder_len``) and
``decode_floor_tok_s``. Both frameworks read the same bytes, so this caps any decode speedup too.

    python -m experiments.bench_inference                      # the full grid (slow on 2 CPU cores)
    python -m experiments.bench_inference --spans 4096 --crs 16 raw --new-tokens 16
    python -m experiments.bench_inference --million            # a tiny LCLM over a 1M-token span

Limit (named): raw rows longer than ``--max-raw-tokens`` (default 16384) are not run on CPU, since an
uncompressed 64k-token prefill of this decoder takes minutes per framework on 2 cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

FIXTURE_TOKENIZERS = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "lclm_golden",
                                  "mean_causal_cr4_w16", "checkpoint")
PREFIX, QUESTION = 32, 16


def _peak_mib() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss can carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_bandwidth_gbs(mib: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """Memory read bandwidth in GB/s: a ``mib`` MiB float32 array summed in one chunk per core (numpy
    releases the GIL in reductions, so the chunks stream in parallel), fastest of ``repeats`` passes."""
    threads = threads or os.cpu_count() or 1
    a = np.ones(mib * 2**20 // 4, np.float32)  # written once, so every page is resident
    chunks = np.array_split(a, threads)
    best = math.inf
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def decode_bytes_per_token(dec_cfg, context_len: int, dtype_bytes: int = 4) -> int:
    """Bytes a batch-1 decode step must read: every decoder weight plus the KV cache of ``context_len``."""
    kv = 2 * dec_cfg.num_hidden_layers * dec_cfg.num_key_value_heads * dec_cfg.head_dim * dtype_bytes
    return dec_cfg.num_params() * dtype_bytes + kv * context_len


def make_checkpoint(path, enc_layers=4, enc_hidden=256, dec_layers=4, dec_hidden=512, vocab=32000, window=1024,
                    seed=0):
    import jax

    from lclm_jax import config as C
    from lclm_jax.checkpoint import lclm_io
    from lclm_jax.lclm.model import LCLMModel

    enc = C.Qwen3Config(vocab_size=vocab, hidden_size=enc_hidden, intermediate_size=enc_hidden * 3,
                        num_hidden_layers=enc_layers, num_attention_heads=max(2, enc_hidden // 64),
                        num_key_value_heads=max(1, enc_hidden // 128), head_dim=64, rope_theta=1e6,
                        max_position_embeddings=1 << 21, architectures=("Qwen3Model",))
    dec = C.Qwen3Config(vocab_size=vocab, hidden_size=dec_hidden, intermediate_size=dec_hidden * 3,
                        num_hidden_layers=dec_layers, num_attention_heads=dec_hidden // 64,
                        num_key_value_heads=max(1, dec_hidden // 256), head_dim=64, rope_theta=5e6,
                        max_position_embeddings=1 << 21, architectures=("Qwen3ForCausalLM",))
    cfg = C.LCLMConfig(compression_ratio=16, encoder_window_size=window)
    params = LCLMModel(cfg, enc, dec).init(jax.random.PRNGKey(seed))
    params = jax.tree_util.tree_map(np.asarray, params)
    lclm_io.write_lclm(path, params, cfg, enc, dec, tokenizers_from=FIXTURE_TOKENIZERS)
    return path


def _rows(span, cr, vocab_enc, vocab_dec, mem_ids, seed=0):
    from lclm_jax.lclm.processor import ProcessedPrompt

    rng = np.random.default_rng(seed)
    start, end, mem = mem_ids
    prefix = rng.integers(1, 500, PREFIX).astype(np.int32)
    question = rng.integers(1, 500, QUESTION).astype(np.int32)
    if cr == "raw":
        ids = np.concatenate([prefix, rng.integers(1, vocab_dec - 3, span).astype(np.int32), question])
        return ProcessedPrompt(ids, [], [], [], None), None
    span_ids = rng.integers(1, vocab_enc - 1, span).astype(np.int32)
    n = math.ceil(span / cr)
    ids = np.concatenate([prefix, [start], np.full(n, mem), [end], question]).astype(np.int32)
    return ProcessedPrompt(ids, [span_ids], [(PREFIX + 1, PREFIX + 1 + n)], [n], None), span_ids


def worker_jax(args):
    import jax

    import lclm_jax

    cr = args.cr if args.cr == "raw" else int(args.cr)
    lm = lclm_jax.load(args.ckpt, dtype="float32", backend="auto", max_encode_batch_size=args.encode_batch,
                       **({} if cr == "raw" else {"compression_ratio": cr}))
    lm.stop_ids = []
    p = lm.processor
    row, _ = _rows(args.span, cr, lm.model.encoder_config.vocab_size, lm.model.decoder_config.vocab_size,
                   (p.memory_start_id, p.memory_end_id, p.memory_id))

    def run(n):
        lm.clear_latent_cache()
        t = time.perf_counter()
        out = lm.generate_processed([row], max_new_tokens=n)
        return time.perf_counter() - t, out[0]

    t_first_call, _ = run(1)  # includes compilation
    run(args.new_tokens)
    ttft = min(run(1)[0] for _ in range(args.repeats))
    first = run(1)[1]
    full = min(run(args.new_tokens)[0] for _ in range(args.repeats))
    return {"ttft_s": ttft, "first_call_s": t_first_call, "decode_tok_s": (args.new_tokens - 1) / max(full - ttft, 1e-9),
            "first_token": int(first[0]), "peak_rss_mib": _peak_mib(), "backend": jax.default_backend()}


def worker_torch(args):
    import safetensors.torch
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 2)
    cr = args.cr if args.cr == "raw" else int(args.cr)
    enc = transformers.Qwen3Model.from_pretrained(os.path.join(args.ckpt, "encoder"), torch_dtype=torch.float32,
                                                  attn_implementation="sdpa").eval()
    dec = transformers.Qwen3ForCausalLM.from_pretrained(os.path.join(args.ckpt, "decoder"),
                                                        torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    ad = safetensors.torch.load_file(os.path.join(args.ckpt, "adapter", "adapter.safetensors"))
    norm = torch.nn.RMSNorm(ad["norm.weight"].shape[0], eps=1e-6)
    norm.weight.data = ad["norm.weight"]
    fc1 = torch.nn.Linear(*ad["fc1.weight"].shape[::-1])
    fc1.weight.data, fc1.bias.data = ad["fc1.weight"], ad["fc1.bias"]
    fc2 = torch.nn.Linear(*ad["fc2.weight"].shape[::-1])
    fc2.weight.data, fc2.bias.data = ad["fc2.weight"], ad["fc2.bias"]
    cfg = json.load(open(os.path.join(args.ckpt, "model_config.json")))
    W = cfg["encoder_window_size"]
    start, end, mem = 509, 510, 511
    row, span = _rows(args.span, cr, enc.config.vocab_size, dec.config.vocab_size, (start, end, mem))

    @torch.no_grad()
    def run(n):
        t = time.perf_counter()
        ids = torch.from_numpy(row.input_ids.astype(np.int64))[None]
        emb = dec.get_input_embeddings()(ids)
        if span is not None:
            lat = []
            for i in range(0, len(span), W * args.encode_batch):  # windows in bounded batches
                chunk = span[i:i + W * args.encode_batch]
                nwin = math.ceil(len(chunk) / W)
                padded = np.zeros(nwin * W, np.int64)
                padded[:len(chunk)] = chunk
                mask = np.zeros(nwin * W, np.int64)
                mask[:len(chunk)] = 1
                h = enc(input_ids=torch.from_numpy(padded.reshape(nwin, W)),
                        attention_mask=torch.from_numpy(mask.reshape(nwin, W))).last_hidden_state
                h = h.reshape(-1, h.shape[-1])[:len(chunk)]
                for g in range(0, len(chunk), cr):
                    lat.append(h[g:g + cr].mean(0))
            x = torch.stack(lat)
            x = fc2(torch.nn.functional.gelu(fc1(norm(x))))
            s, e = row.memory_positions[0]
            emb = emb.clone()
            emb[0, s:e] = x
        out = dec.generate(inputs_embeds=emb, attention_mask=torch.ones(ids.shape, dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t, out[0].tolist()

    run(1)
    ttft = min(run(1)[0] for _ in range(args.repeats))
    first = run(1)[1]
    full = min(run(args.new_tokens)[0] for _ in range(args.repeats))
    return {"ttft_s": ttft, "decode_tok_s": (args.new_tokens - 1) / max(full - ttft, 1e-9),
            "first_token": int(first[0]), "peak_rss_mib": _peak_mib()}


def worker_million(args):
    """A tiny LCLM (random weights, the fixtures' tokenizers) over a span of ~1M encoder tokens."""
    import lclm_jax

    lm = lclm_jax.load(args.ckpt, dtype="float32", backend="auto", max_encode_batch_size=args.encode_batch)
    words = ["alpha", "beta", "gamma", "delta", "memory", "window", "latent", "token", "shard", "kernel"]
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(words, size=args.million_tokens // 2))  # ~2.2 tokens per word here
    t = time.perf_counter()
    p = lm.processor.process("Context: <|memory_start|>" + text + "<|memory_end|> What was the first word?")
    t_proc = time.perf_counter() - t
    n_tokens = len(p.span_ids[0])
    times = []
    for _ in range(2):  # first call compiles; the second is the warm TTFT (latent cache cleared)
        lm.clear_latent_cache()
        t = time.perf_counter()
        out = lm.generate_processed([p], max_new_tokens=1)
        times.append(time.perf_counter() - t)
    return {"span_tokens": n_tokens, "latents": int(p.latent_counts[0]), "decoder_len": int(len(p.input_ids)),
            "tokenize_s": round(t_proc, 2), "ttft_first_call_s": round(times[0], 2), "ttft_s": round(times[1], 2),
            "first_token": out[0][0], "peak_rss_mib": round(_peak_mib(), 1),
            "encode_batch_windows": args.encode_batch}


def _spawn(kind, ckpt, extra):
    cmd = [sys.executable, "-m", "experiments.bench_inference", "--worker", kind, "--ckpt", ckpt] + extra
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description="LCLM inference benchmark vs transformers")
    ap.add_argument("--spans", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--crs", nargs="+", default=["4", "8", "16", "raw"])
    ap.add_argument("--new-tokens", type=int, default=128,
                    help="decode tok/s = (N-1) / (time(N tokens) - TTFT); N large so decode dominates noise")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (the fastest counts)")
    ap.add_argument("--encode-batch", type=int, default=16, help="encoder windows per forward (both frameworks)")
    ap.add_argument("--max-raw-tokens", type=int, default=16384)
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="array size for the bandwidth measurement")
    ap.add_argument("--million", action="store_true", help="run the 1M-token tiny-LCLM row instead of the grid")
    ap.add_argument("--million-tokens", type=int, default=1_000_000, help="approximate span length")
    ap.add_argument("--worker", choices=["jax", "torch", "million"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--span", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cr", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        fn = {"jax": worker_jax, "torch": worker_torch, "million": worker_million}[args.worker]
        print(json.dumps(fn(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.million:
            ck = make_checkpoint(os.path.join(tmp, "tiny"), enc_layers=2, enc_hidden=64, dec_layers=2, dec_hidden=64,
                                 vocab=512, window=1024)
            with open(os.path.join(ck, "model_config.json"), "w") as f:  # cr 16, W 1024
                json.dump({"compression_ratio": 16, "encoder_window_size": 1024, "pooling": "mean",
                           "encoder_mask_type": "causal", "boundary_overlap": 0, "adapter_type": "mlp"}, f)
            row = _spawn("million", ck, ["--encode-batch", str(args.encode_batch), "--million-tokens",
                                          str(args.million_tokens)])
            print(json.dumps({"row": "tiny LCLM over a 1M-token span", **row}), flush=True)
            return 0
        ck = make_checkpoint(os.path.join(tmp, "small"))
        from lclm_jax.config import Qwen3Config

        dec_cfg = Qwen3Config.from_json_file(os.path.join(ck, "decoder", "config.json"))
        bandwidth = measure_bandwidth_gbs(args.bandwidth_mib)
        for span in args.spans:
            for cr in args.crs:
                dec_len = PREFIX + QUESTION + (span if cr == "raw" else math.ceil(span / int(cr)) + 2)
                nbytes = decode_bytes_per_token(dec_cfg, dec_len)
                row = {"span_tokens": span, "cr": cr, "decoder_len": dec_len,
                       "mem_bandwidth_gbs": round(bandwidth, 1), "decode_bytes_per_token_mb": round(nbytes / 1e6, 1),
                       "decode_floor_tok_s": round(bandwidth * 1e9 / nbytes, 1)}
                if cr == "raw" and span > args.max_raw_tokens:
                    row["note"] = f"not run on this machine: raw span > --max-raw-tokens {args.max_raw_tokens}"
                    print(json.dumps(row), flush=True)
                    continue
                extra = ["--span", str(span), "--cr", cr, "--new-tokens", str(args.new_tokens),
                         "--encode-batch", str(args.encode_batch), "--repeats", str(args.repeats)]
                ours, theirs = _spawn("jax", ck, extra), _spawn("torch", ck, extra)
                row["lclm_jax"], row["transformers"] = ours, theirs
                if "error" not in ours and "error" not in theirs:
                    row["ttft_speedup"] = round(theirs["ttft_s"] / ours["ttft_s"], 2)
                    row["decode_speedup"] = round(ours["decode_tok_s"] / theirs["decode_tok_s"], 2)
                    row["decode_share_of_floor"] = {k: round(r["decode_tok_s"] / row["decode_floor_tok_s"], 2)
                                                    for k, r in (("lclm_jax", ours), ("transformers", theirs))}
                    row["max_decode_speedup"] = round(row["decode_floor_tok_s"] / theirs["decode_tok_s"], 2)
                    row["first_token_equal"] = ours["first_token"] == theirs["first_token"]
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
