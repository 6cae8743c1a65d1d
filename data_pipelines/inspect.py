"""Show what the pipelines make: decoded examples and rule statistics.

    python -m data_pipelines.inspect --demo 1                 # one CPT, reconstruction, SFT example
    python -m data_pipelines.inspect --stream cpt@jsonl:docs.jsonl --num 2 --checkpoint CKPT
    python -m data_pipelines.inspect --packs 'OUT/packs-*.array_record' --num 1
    python -m data_pipelines.inspect --rule-stats 1000        # CPT interleaving rules, JSON

Notation in the decoded text: ``[[MEM enc=N lat=K| text ]]`` is a compressed span (its encoder
text, replaced in the decoder by ``<|memory_start|> K x <|memory|> <|memory_end|>``);
``{{...}}`` is raw context that is not supervised; plain text is supervised (loss) text.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from data_pipelines.common import IGNORE, KIND_NAMES, SKIP_REASONS, Tokenizers, split_spans


def render(ex: dict[str, np.ndarray], tok: Tokenizers, max_chars: int = 160) -> str:
    """Human-readable view of one example (see the module docstring for the notation)."""
    ids, labels = ex["input_ids"], ex["labels"]
    spans = split_spans(ex)
    dec = lambda a: tok.decoder.decode([int(x) for x in a], skip_special_tokens=False)  # noqa
    short = lambda s: s if len(s) <= max_chars else s[:max_chars // 2] + " ... " + s[-max_chars // 2:]  # noqa
    out, i, k, n = [], 0, 0, len(ids)
    while i < n:
        if ids[i] == tok.memory_start_id:
            j = i + 1
            while ids[j] == tok.memory_id:
                j += 1
            text = tok.encoder.decode([int(x) for x in spans[k]], skip_special_tokens=False)
            out.append(f"[[MEM enc={len(spans[k])} lat={j - i - 1}| {short(text)} ]]")
            k += 1
            i = j + 1
            continue
        sup = labels[i] != IGNORE
        j = i
        while j < n and ids[j] != tok.memory_start_id and (labels[j] != IGNORE) == sup:
            j += 1
        # the first token of a document never carries a label; show it with its run
        text = short(dec(ids[i:j]))
        out.append(text if sup else "{{" + text + "}}")
        i = j
    return "".join(out)


def summary(ex: dict[str, np.ndarray], tok: Tokenizers) -> dict:
    return {
        "kind": KIND_NAMES[int(ex["kind"])],
        "decoder_tokens": int(len(ex["input_ids"])),
        "supervised": int(np.count_nonzero(ex["labels"] != IGNORE)),
        "spans": int(len(ex["span_lens"])),
        "encoder_tokens": int(ex["span_lens"].sum()),
        "latents": int(np.count_nonzero(ex["input_ids"] == tok.memory_id)),
    }


def rule_stats(n_docs: int, seed: int = 0, tok: Tokenizers | None = None, cpt_config=None) -> dict:
    """CPT interleaving rules over ``n_docs`` synthetic documents (50 - 30,000 words)."""
    from data_pipelines.cpt import CPTBuilder, CPTConfig, check_plan, pair_range
    from data_pipelines.common import SkipRecord
    from data_pipelines.testing import random_documents, tiny_tokenizers

    tok = tok or tiny_tokenizers(4)
    cfg = cpt_config or CPTConfig(max_chars=10**7)
    b = CPTBuilder(tok, cfg)
    docs = random_documents(n_docs, seed, (40, 30000))
    rng = np.random.default_rng(seed)
    counts = {"documents": n_docs, "built": 0, "skipped": {}, "plan_violations": {},
              "realised_violations": {}, "realised_max_shift_tokens": 0,
              "pairs_in_bucket": 0, "pairs_lowered": 0}
    f1, fk, mins, ratio, pairs_by_bucket = [], [], [], [], {}
    for d in docs:
        try:
            ex, plan = b.build(d, rng)
        except SkipRecord as e:
            counts["skipped"][e.reason] = counts["skipped"].get(e.reason, 0) + 1
            continue
        n = sum(l for _, l in plan)
        counts["built"] += 1
        for v in check_plan(n, b.last_plan, cfg):
            counts["plan_violations"][v] = counts["plan_violations"].get(v, 0) + 1
        for v in check_plan(n, plan, cfg):
            counts["realised_violations"][v] = counts["realised_violations"].get(v, 0) + 1
        shift = max(abs(x[1] - y[1]) for x, y in zip(plan, b.last_plan))
        counts["realised_max_shift_tokens"] = max(counts["realised_max_shift_tokens"], shift)
        wraps = [l for w, l in plan if w]
        raws = [l for w, l in plan if not w]
        lo, hi = pair_range(n, cfg)
        counts["pairs_in_bucket" if lo <= len(wraps) <= hi else "pairs_lowered"] += 1
        key = f"{lo}-{hi}"
        pairs_by_bucket.setdefault(key, []).append(len(wraps))
        if len(wraps) >= 2:
            f1.append(wraps[0] / sum(wraps))
            fk.append(raws[-1] / sum(raws))
        mins.append(min(l for _, l in plan))
        sup = int(np.count_nonzero(ex["labels"] != IGNORE))
        assert sup == sum(raws)
        ratio.append(sup / n)
    q = lambda a: [round(float(x), 4) for x in (np.min(a), np.mean(a), np.max(a))] if a else None  # noqa
    counts.update({
        "first_wrapped_frac_min_mean_max": q(f1),
        "last_raw_frac_min_mean_max": q(fk),
        "min_segment_tokens_min_mean_max": q(mins),
        "trainable_frac_min_mean_max": q(ratio),
        "pairs_by_bucket": {k: {str(p): v.count(p) for p in sorted(set(v))}
                            for k, v in sorted(pairs_by_bucket.items())},
    })
    return counts


def main(argv=None):
    from data_pipelines.prepare import add_common_args, streams_from_args, tokenizers_from_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--num", type=int, default=1, help="examples per stream (or packs)")
    p.add_argument("--packs", help="glob of packed ArrayRecord shards to show instead")
    p.add_argument("--rule-stats", type=int, default=0, help="CPT rule statistics over N docs")
    p.add_argument("--max-chars", type=int, default=160)
    args = p.parse_args(argv)
    tok = tokenizers_from_args(args)
    if args.rule_stats:
        print(json.dumps(rule_stats(args.rule_stats, args.seed, tok)))
        return
    if args.packs:
        from data_pipelines import records, sources
        from data_pipelines.packing import unpack

        src = sources.ArrayRecordSource(args.packs)
        for i in range(min(args.num, len(src))):
            pack = records.decode(src[i])
            skipped = {r: int(c) for r, c in zip(SKIP_REASONS, pack["skipped"]) if c}
            print(f"=== pack {i}: {int(np.count_nonzero(pack['segment_ids']))} tokens, "
                  f"{len(pack['kinds'])} docs, skipped before it: {skipped}")
            for ex in unpack(pack, tok.memory_start_id):
                print(json.dumps(summary(ex, tok)))
                print(render(ex, tok, args.max_chars))
        return
    from data_pipelines.pipeline import make_builder
    from data_pipelines.sources import record_stream

    if not args.stream and not args.demo:
        args.demo = max(args.num, 1) * 4
    for s in streams_from_args(args):
        from data_pipelines.pipeline import open_source

        src = s.records if s.records is not None else open_source(s.source, args.tfds_data_dir)
        ds = record_stream(src, seed=args.seed, num_epochs=1, process_index=0, process_count=1)
        ds = ds.random_map(make_builder(s, tok), seed=args.seed)
        shown = 0
        for ex in ds:
            if int(ex["skip"]) >= 0:
                print(f"--- {s.kind}: skipped record ({SKIP_REASONS[int(ex['skip'])]})")
                continue
            print(f"=== {s.kind} {json.dumps(summary(ex, tok))}")
            print(render(ex, tok, args.max_chars))
            shown += 1
            if shown >= args.num:
                break


if __name__ == "__main__":
    main()
