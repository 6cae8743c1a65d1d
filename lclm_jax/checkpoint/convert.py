"""``lclm-jax convert``: Orbax training checkpoints <-> the official HF layout.

    lclm-jax convert --src RUN/stage2/checkpoints --dst out-hf --to hf [--dtype bfloat16]
    lclm-jax convert --src out-hf --dst out-orbax --to orbax

``--to hf`` reads only the ``params`` of the newest step (or of the step directory given) -- the
optimizer state is never loaded -- and writes the official layout with the tokenizers the run used,
so the result loads in the PyTorch reference, in transformers (``decoder/``, ``encoder/``) and in
``lclm_jax.load``. Tensors are written one at a time from the host copy (safetensors shards of at most
``--max_shard_gb``). ``--to orbax`` writes a params-only Orbax checkpoint that ``lclm_jax.load`` and
the train loop (``jax.init_from``) accept.
"""

from __future__ import annotations

import argparse
import os
import shutil

from lclm_jax.checkpoint import lclm_io, orbax_io


def to_hf(src: str, dst: str, dtype: str | None = None, max_shard_gb: float = 5.0) -> str:
    cfg, enc, dec, params = orbax_io.read_params(src, dtype=None)
    tok = lclm_io.tokenizer_root(src)
    tok = tok if os.path.isdir(os.path.join(tok, "decoder")) else None
    return lclm_io.write_lclm(dst, params, cfg, enc, dec, dtype=dtype, tokenizers_from=tok,
                              max_shard_bytes=int(max_shard_gb * 1024 ** 3))


def to_orbax(src: str, dst: str, dtype: str | None = None) -> str:
    cfg, enc, dec, params = lclm_io.read_lclm(src, dtype=dtype or "float32")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    return orbax_io.write_params(dst, params, cfg, enc, dec, extra_meta={"tokenizers_from": os.path.abspath(src)})


def convert(src: str, dst: str, to: str, dtype: str | None = None, max_shard_gb: float = 5.0) -> str:
    if to == "hf":
        if not orbax_io.is_orbax_checkpoint(src):
            raise ValueError(f"{src}: not an Orbax training checkpoint")
        return to_hf(src, dst, dtype, max_shard_gb)
    if to == "orbax":
        return to_orbax(src, dst, dtype)
    raise ValueError(f"--to must be hf or orbax, got {to!r}")


def convert_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lclm-jax convert", description="Convert between Orbax training "
                                 "checkpoints and the official HF LCLM layout.")
    ap.add_argument("--src", required=True, help="Orbax checkpoint (manager dir or step dir) or HF-layout dir")
    ap.add_argument("--dst", required=True)
    ap.add_argument("--to", required=True, choices=("hf", "orbax"))
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="tensor dtype of the output (default: keep)")
    ap.add_argument("--max_shard_gb", type=float, default=5.0)
    args = ap.parse_args(argv)
    out = convert(args.src, args.dst, args.to, args.dtype, args.max_shard_gb)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(convert_main())
