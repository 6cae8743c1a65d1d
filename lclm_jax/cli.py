"""``lclm-jax`` command line: generate, inspect, convert, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _generate(args) -> int:
    import lclm_jax

    if (args.prompt is None) == (args.prompts_jsonl is None):
        print("error: give exactly one of --prompt or --prompts-jsonl", file=sys.stderr)
        return 2
    records = []
    if args.prompt is not None:
        records = [{"prompt": args.prompt}]
    else:
        with open(args.prompts_jsonl, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    print(f"error: {args.prompts_jsonl}:{n}: not valid JSON ({e})", file=sys.stderr)
                    return 2
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), (str, list)):
                    print(f"error: {args.prompts_jsonl}:{n}: each line needs a \"prompt\" (string or chat "
                          "messages)", file=sys.stderr)
                    return 2
                records.append(rec)
    lm = lclm_jax.load(args.checkpoint, dtype=args.dtype)
    out_f = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        for start in range(0, len(records), args.batch_size):
            chunk = records[start:start + args.batch_size]
            texts = lm.generate([r["prompt"] for r in chunk], max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                repetition_penalty=args.repetition_penalty, chat=args.chat)
            for rec, text in zip(chunk, texts):
                if out_f:
                    out_f.write(json.dumps({**{k: v for k, v in rec.items() if k != "prompt"}, "response": text},
                                           ensure_ascii=False) + "\n")
                else:
                    print(text)
    finally:
        if out_f:
            out_f.close()
    return 0


def _inspect(args) -> int:
    from lclm_jax.checkpoint import lclm_io, safetensors_io
    from lclm_jax.config import LCLMConfig, Qwen3Config

    path = lclm_io.resolve_checkpoint(args.checkpoint)
    cfg = LCLMConfig.from_json_file(path)
    info = {"checkpoint": path, "lclm": cfg.to_dict()}
    for part in ("encoder", "decoder"):
        qc = Qwen3Config.from_json_file(os.path.join(path, part))
        files = safetensors_io.iter_model_files(os.path.join(path, part))
        dtypes, n = {}, 0
        for f in files:
            sf = safetensors_io.SafetensorsFile(f)
            for k in sf.keys():
                dtypes[sf.dtype_tag(k)] = dtypes.get(sf.dtype_tag(k), 0) + 1
                shape = sf.shape(k)
                size = 1
                for s in shape:
                    size *= s
                n += size
        info[part] = {"layers": qc.num_hidden_layers, "hidden": qc.hidden_size, "heads": qc.num_attention_heads,
                      "kv_heads": qc.num_key_value_heads, "head_dim": qc.head_dim, "vocab": qc.vocab_size,
                      "rope_theta": qc.rope_theta, "tied": qc.tie_word_embeddings, "params": n,
                      "dtypes": dtypes, "files": len(files)}
    af = safetensors_io.SafetensorsFile(os.path.join(path, "adapter", "adapter.safetensors"))
    n = 0
    for k in af.keys():
        size = 1
        for s in af.shape(k):
            size *= s
        n += size
    info["adapter"] = {"type": cfg.adapter_type, "params": n, "tensors": len(af.keys()),
                       "dtypes": sorted({af.dtype_tag(k) for k in af.keys()})}
    info["compression"] = {"tokens_per_latent": cfg.compression_ratio, "window": cfg.encoder_window_size,
                           "latents_per_window": cfg.encoder_window_size // cfg.compression_ratio,
                           "pooling": cfg.pooling, "encoder_mask": cfg.encoder_mask_type,
                           "overlap": cfg.boundary_overlap}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"checkpoint  {path}")
        c = info["compression"]
        print(f"compression {c['tokens_per_latent']}x  window {c['window']} ({c['latents_per_window']} latents)  "
              f"pooling {c['pooling']}  encoder mask {c['encoder_mask']}  overlap {c['overlap']}")
        for part in ("encoder", "decoder"):
            p = info[part]
            print(f"{part:<8}    {p['layers']} layers x {p['hidden']}  heads {p['heads']}/{p['kv_heads']}  "
                  f"head_dim {p['head_dim']}  vocab {p['vocab']}  rope_theta {p['rope_theta']:g}  "
                  f"tied {p['tied']}  params {p['params']:,}  dtypes {p['dtypes']}  files {p['files']}")
        a = info["adapter"]
        print(f"adapter     {a['type']}  params {a['params']:,}  tensors {a['tensors']}  dtypes {a['dtypes']}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lclm-jax", description="Latent Context Language Models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate from prompts with <|memory_start|>...<|memory_end|> spans")
    g.add_argument("--checkpoint", required=True, help="LCLM checkpoint directory (official layout) or Hub id")
    g.add_argument("--prompt")
    g.add_argument("--prompts-jsonl", help="JSONL with a 'prompt' per line; other fields are copied to --output")
    g.add_argument("--output", help="write JSONL {..., 'response'} here instead of printing")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--chat", action="store_true", help="wrap each string prompt as one user chat turn")
    i = sub.add_parser("inspect", help="print config, sizes, dtypes and compression settings")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    sub.add_parser("convert", help="convert between Orbax and the official HF layout", add_help=False)
    sub.add_parser("demo", help="offline needle-in-a-haystack demo on CPU", add_help=False)
    if argv and argv[0] in ("convert", "demo"):
        if argv[0] == "convert":
            from lclm_jax.checkpoint.convert import convert_main

            return int(convert_main(argv[1:]) or 0)
        from experiments.demo import main as demo_main

        demo_main(argv[1:])  # returns its result dict; argparse errors exit with status 2 themselves
        return 0
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        return _inspect(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
