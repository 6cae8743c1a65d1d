"""Train LCLM stages from an experiment YAML (the reference's schema).

    python -m experiments.train --config CONFIG.yaml --stage N --output_dir DIR [--set key=value ...]
    python -m experiments.train --config CONFIG.yaml --pipeline --output_dir DIR   # stages 0 -> 3

``--set`` overrides any YAML key by its dotted path (``training.max_steps=100``,
``stages.0.adapter_lr=5e-4``, ``jax.mesh.fsdp=8``). A stage auto-resumes from its latest checkpoint;
SIGTERM/SIGINT write a checkpoint before exiting (exit code 143 / 130). Multi-host: pass
``--distributed`` (calls ``jax.distributed.initialize()``; each process reads its own data shard).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--stage", type=int, default=None)
    ap.add_argument("--pipeline", action="store_true", help="run every stage in order (0 -> 3)")
    ap.add_argument("--output_dir", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() first")
    args, unknown = ap.parse_known_args(argv)
    unknown = [a for a in unknown if not a.startswith("--local_rank")]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.stage is None and not args.pipeline:
        ap.error("give --stage N or --pipeline")
    try:
        from absl import flags

        flags.FLAGS.mark_as_parsed()
    except Exception:
        pass
    import jax

    if args.distributed:
        jax.distributed.initialize()
    from lclm_jax.train.config import load_yaml, resolve
    from lclm_jax.train.loop import Preempted, run_pipeline, train_stage

    raw = load_yaml(args.config)
    try:
        if args.pipeline:
            results = run_pipeline(raw, args.output_dir, args.set)
        else:
            run = resolve(raw, args.stage, args.output_dir, args.set)
            res = train_stage(run)
            res.pop("state", None)
            results = [res]
    except Preempted as e:
        print(str(e), flush=True)
        return 143 if "15" in str(e) or "SIGTERM" in str(e) else 130
    if jax.process_index() == 0:
        for r in results:
            losses = r.get("losses") or {}
            first = losses[min(losses)] if losses else None
            last = losses[max(losses)] if losses else None
            print(json.dumps({"stage": r["stage"], "steps": len(losses), "first_loss": first, "last_loss": last,
                              "export": r.get("export")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
