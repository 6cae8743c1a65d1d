"""Offline packing: raw records -> packed ArrayRecord shards (+ ``meta.json``).

    python -m data_pipelines.prepare --checkpoint CKPT --out OUT_DIR \\
        --stream cpt=0.6@jsonl:web/*.jsonl --stream sft=0.4@tfds:gsm8k:train \\
        --seq-len 16384 --window-size 1024 --max-windows 128 --num-packs 100000 --shard-size 2048

Each record of ``OUT_DIR/packs-XXXXX-of-YYYYY.array_record`` is one pack (see
:mod:`data_pipelines.packing`) encoded with :mod:`data_pipelines.records`. ``meta.json`` keeps
the budgets, streams, seed and skip counts. Read the shards back with
``pipeline.packed_dataset(glob, PipelineConfig(..., batch=BatchConfig(...)))``.
Use ``--demo N`` instead of ``--stream`` to pack N synthetic documents/chats (no data needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time

import numpy as np

from data_pipelines import records
from data_pipelines.batch import BatchConfig
from data_pipelines.common import KIND_NAMES, SKIP_REASONS, Tokenizers
from data_pipelines.packing import PackIterDataset
from data_pipelines.pipeline import PipelineConfig, StreamSpec, example_dataset, parse_stream


def tokenizers_from_args(args) -> Tokenizers:
    if args.checkpoint:
        return Tokenizers.from_checkpoint(args.checkpoint, args.compression_ratio)
    if args.decoder_tokenizer and args.encoder_tokenizer:
        return Tokenizers.from_files(args.decoder_tokenizer, args.encoder_tokenizer,
                                     args.compression_ratio or 16)
    from data_pipelines.testing import tiny_tokenizers

    return tiny_tokenizers(args.compression_ratio or 4)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="LCLM checkpoint dir with {decoder,encoder}/tokenizer.json")
    p.add_argument("--decoder-tokenizer")
    p.add_argument("--encoder-tokenizer")
    p.add_argument("--compression-ratio", type=int)
    p.add_argument("--stream", action="append", default=[], help="KIND=WEIGHT@SOURCE")
    p.add_argument("--options", default="{}", help='JSON {kind: {builder option: value}}')
    p.add_argument("--demo", type=int, default=0, help="use N synthetic documents and chats")
    p.add_argument("--tfds-data-dir")
    p.add_argument("--seed", type=int, default=4231)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--window-size", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=128)
    p.add_argument("--max-latents", type=int)
    p.add_argument("--num-bins", type=int, default=8)


def streams_from_args(args) -> tuple[StreamSpec, ...]:
    options = json.loads(args.options)
    if args.demo:
        from data_pipelines.testing import random_chats, random_documents

        docs = random_documents(args.demo, args.seed, (200, 6000))
        chats = random_chats(args.demo, args.seed + 1)
        out = [StreamSpec("cpt", weight=0.57, records=docs),
               StreamSpec("reconstruction", weight=0.17, records=docs),
               StreamSpec("sft", weight=0.26, records=chats)]
    else:
        out = [parse_stream(s) for s in args.stream]
    if not out:
        raise SystemExit("give at least one --stream (or --demo N)")
    return tuple(dataclasses.replace(s, options={**s.options, **options.get(s.kind, {})})
                 for s in out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--num-packs", type=int, help="stop after this many packs (default: 1 epoch)")
    p.add_argument("--shard-size", type=int, default=2048, help="packs per shard")
    args = p.parse_args(argv)

    from array_record.python.array_record_module import ArrayRecordWriter

    tok = tokenizers_from_args(args)
    bcfg = BatchConfig.for_tokenizers(tok, seq_len=args.seq_len, window_size=args.window_size,
                                      max_windows=args.max_windows, max_latents=args.max_latents,
                                      num_bins=args.num_bins)
    cfg = PipelineConfig(streams=streams_from_args(args), batch=bcfg, seed=args.seed,
                         num_epochs=None if args.num_packs else 1,
                         tfds_data_dir=args.tfds_data_dir, process_index=0, process_count=1)
    pcfg = bcfg.pack_config()
    packs = iter(PackIterDataset(example_dataset(cfg, tok).to_iter_dataset(), pcfg,
                                 tok.memory_start_id))
    os.makedirs(args.out, exist_ok=True)
    for old in glob.glob(os.path.join(args.out, "packs-*.array_record")):
        os.remove(old)
    t0 = time.time()
    n_packs, shard_files, buf = 0, [], []
    totals = {"tokens": 0, "supervised": 0, "enc_tokens": 0, "padding": 0,
              "docs": {k: 0 for k in KIND_NAMES}, "skipped": {k: 0 for k in SKIP_REASONS}}

    def flush():
        path = os.path.join(args.out, f"packs-{len(shard_files):05d}.array_record")
        w = ArrayRecordWriter(path, "group_size:1")
        for rec in buf:
            w.write(rec)
        w.close()
        shard_files.append(path)
        buf.clear()

    for pack in packs:
        for r, c in zip(SKIP_REASONS, pack["skipped"]):
            totals["skipped"][r] += int(c)
        if len(pack["kinds"]) == 0:
            continue
        for k in pack["kinds"]:
            totals["docs"][KIND_NAMES[k]] += 1
        ntok = int(np.count_nonzero(pack["segment_ids"]))
        totals["tokens"] += ntok
        totals["padding"] += pcfg.seq_len - ntok
        totals["supervised"] += int(np.count_nonzero(pack["labels"] != -100))
        totals["enc_tokens"] += int(pack["span_lens"].sum())
        buf.append(records.encode(pack))
        n_packs += 1
        if len(buf) >= args.shard_size:
            flush()
        if args.num_packs and n_packs >= args.num_packs:
            break
    if buf:
        flush()
    final = []  # rename to the usual -of- pattern now that the count is known
    for i, f in enumerate(shard_files):
        g = os.path.join(args.out, f"packs-{i:05d}-of-{len(shard_files):05d}.array_record")
        os.replace(f, g)
        final.append(os.path.basename(g))
    meta = {
        "pack": {**dataclasses.asdict(pcfg), "latent_budget": pcfg.latent_budget},
        "streams": [{"kind": s.kind, "source": s.source or "<in-memory>", "weight": s.weight,
                     "options": s.options} for s in cfg.streams],
        "seed": args.seed, "num_packs": n_packs, "shards": final, "totals": totals,
        "fill": totals["tokens"] / max(1, n_packs * pcfg.seq_len),
        "seconds": round(time.time() - t0, 2),
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps({k: meta[k] for k in ("num_packs", "shards", "fill", "seconds", "totals")}))
    return meta


if __name__ == "__main__":
    main()
