"""Peak memory and time of ``blockwise`` vs ``xla`` attention for sequence lengths 1k -> 32k.

One JSON line per (backend, length). Memory is XLA's compiled plan for the jitted call
(``memory_analysis``: temporaries + arguments + outputs), which is what the device must hold at peak;
time is the median of a few runs after compilation. A row whose planned memory exceeds
``--max-gib`` is compiled (to report its plan) but not run.

    python -m experiments.bench_attention [--lengths 1024 2048 ... 32768] [--heads 8 --kv-heads 2 --head-dim 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from lclm_jax.modeling.attention import AttnMask, attention


def bench(backend, t, args):
    q = jax.ShapeDtypeStruct((1, t, args.heads, args.head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, args.kv_heads, args.head_dim), jnp.float32)

    def fn(q, k, v):
        return attention(q, k, v, AttnMask.make(1, t, causal=True), backend=backend, block_size=args.block)

    compiled = jax.jit(fn).lower(q, kv, kv).compile()
    mem = compiled.memory_analysis()
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    row = {"backend": backend, "seq_len": t, "heads": args.heads, "kv_heads": args.kv_heads,
           "head_dim": args.head_dim, "block": args.block if backend == "blockwise" else None,
           "peak_bytes": int(peak), "peak_mib": round(peak / 2**20, 2), "temp_mib": round(mem.temp_size_in_bytes / 2**20, 2)}
    if peak > args.max_gib * 2**30:
        row.update(ms=None, note=f"not run: plan exceeds --max-gib {args.max_gib}")
        return row
    r = jax.random.normal(jax.random.PRNGKey(0), (3,))
    qa = jnp.full(q.shape, r[0]) * jnp.arange(t)[None, :, None, None] / t
    ka = jnp.full(kv.shape, r[1]) * jnp.arange(t)[None, :, None, None] / t
    va = jnp.full(kv.shape, r[2])
    compiled(qa, ka, va).block_until_ready()
    times = []
    for _ in range(args.repeats):
        s = time.perf_counter()
        compiled(qa, ka, va).block_until_ready()
        times.append(time.perf_counter() - s)
    row["ms"] = round(statistics.median(times) * 1e3, 2)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gib", type=float, default=6.0)
    args = p.parse_args(argv)
    rows = []
    for t in args.lengths:
        for backend in ("xla", "blockwise"):
            row = bench(backend, t, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    bw = [r for r in rows if r["backend"] == "blockwise"]
    if len(bw) >= 2:
        growth = [round(b["peak_bytes"] / a["peak_bytes"], 2) for a, b in zip(bw, bw[1:])]
        ratio = bw[-1]["seq_len"] / bw[-2]["seq_len"]
        print(json.dumps({"summary": "blockwise peak-memory growth per length step", "length_ratio": ratio,
                          "memory_ratios": growth}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
