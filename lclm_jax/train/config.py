"""Run configuration: the reference's experiment YAML schema, one stage resolved into ``RunConfig``.

A reference ``scripts/experiment_config/*.yaml`` runs unchanged. Its sections:

``models``    encoder / decoder (HF id or local dir), pooling, encoder_window_size, mask (or
              encoder_mask_type), adapter_type, num_adapter_layers, boundary_overlap,
              random_init_encoder / random_init_decoder, attention implementations (ignored).
``training``  compression_ratio, max_encode_batch_size, gradient_accumulation_steps, max_steps,
              warmup_steps, max_grad_norm, save_steps, delete_old_checkpoints, seed, auto_resume,
              optimizer, scheduler, adam_epsilon, {decoder,encoder,adapter}_betas ("b1,b2"),
              decoder_gradient_checkpointing, preempt_save_minutes, use_liger_kernel (ignored).
``data``      use_packing, packed_attention_backend, use_memory_wrapping, num_workers (ignored),
              train_wrap_tokens (stages with a frozen decoder train the three memory-token rows).
``logging``   log_interval, log_token_counts, wandb_project / wandb_name (reported, not used).
``stages``    per stage: train_decoder, train_encoder, {adapter,encoder,decoder}_lr, min_lr,
              {decoder,encoder,adapter}_weight_decay, encoder_gradient_checkpointing,
              train_batch_size, dataset, warmup_steps, skip_step_ranges, max_packed_length,
              resume_from_checkpoint, distributed (ignored: the mesh replaces DeepSpeed/FSDP).

An optional ``jax`` section holds what only this implementation needs (all keys have defaults):
``mesh`` {data, fsdp, tensor}; ``dtype`` (compute) / ``param_dtype``; ``encoder_remat`` /
``decoder_remat`` (none|full|dots|dots_no_batch; override the gradient-checkpointing flags);
``ce_chunk_size``; ``backend`` (decoder attention); ``seq_len``, ``max_windows``, ``max_latents``,
``batch_size`` (rows per process; default ``train_batch_size``); ``keep_checkpoints``;
``max_consecutive_skips``; ``async_checkpoints``; ``adapter_attention_group`` ("decoder" reproduces
the reference's grouping of attention-adapter weights, "adapter" routes them to the adapter group);
``lr_offset`` (the schedule is evaluated at ``k = step + lr_offset``; the reference's 1/N for N
processes, default 1); ``init_from`` (an LCLM checkpoint to start stage 0 from instead of the base
models); ``streams`` (pipeline stream specs ``KIND=WEIGHT@SOURCE`` built online with
``data_pipelines.pipeline.build_dataset`` when ``dataset`` is ``stream`` or names no packed shards)
and ``stream_options`` ({kind: {builder option: value}}, e.g. ``cpt: {min_segment_tokens: 16}``);
both may also be set per stage; ``peak_flops`` (per device, for MFU); ``tensorboard``.
``dataset: synthetic`` selects the built-in synthetic source (tests, benchmarks).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Any

import yaml

GROUPS = ("encoder", "adapter", "decoder")

# Keys that only concern the PyTorch tooling: accepted and reported as ignored.
IGNORED = {
    "models": {"decoder_attn_implementation", "embed_attn_implementation", "use_fused_ce"},
    "training": {"use_liger_kernel", "optimizer_offload", "deepspeed", "fsdp"},
    "data": {"num_workers", "packed_attention_backend", "use_packing", "use_memory_wrapping"},
    "logging": {"wandb_project", "wandb_name"},
    "stage": {"distributed", "max_packed_length"},
}


def _betas(text, default=(0.9, 0.95)):
    if text is None:
        return default
    if isinstance(text, (list, tuple)):
        return tuple(float(x) for x in text)
    return tuple(float(x) for x in str(text).split(","))


def parse_ranges(text) -> tuple[tuple[int, int], ...]:
    """``"a-b,c"`` (inclusive) -> ((a, b), (c, c))."""
    if text in (None, ""):
        return ()
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.append((int(lo), int(hi or lo)))
    return tuple(out)


def apply_overrides(raw: dict, overrides) -> dict:
    """``key.sub=value`` pairs (YAML-parsed values) into a copy of the config dict."""
    raw = copy.deepcopy(raw)

    def key(node, p):
        return int(p) if p.isdigit() and int(p) in node else p

    for item in overrides or ():
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = raw
        parts = name.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(key(node, p), {})
        node[key(node, parts[-1])] = yaml.safe_load(value)
    return raw


def experiment_name(raw: dict) -> str:
    m, t = raw.get("models", {}), raw.get("training", {})
    base = lambda s: os.path.basename(str(s).rstrip("/"))  # noqa: E731
    name = (f"{base(m.get('encoder', 'encoder'))}-{base(m.get('decoder', 'decoder'))}-cs{t.get('compression_ratio', 16)}"
            f"-w{m.get('encoder_window_size', 1024)}-{m.get('pooling', 'mean')}-{m.get('adapter_type', 'mlp')}")
    if int(m.get("boundary_overlap", 0) or 0) > 0:
        name += f"-ov{m['boundary_overlap']}"
    return name + f"-{m.get('encoder_mask_type', m.get('mask', 'causal'))}"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    stage: int
    experiment: str
    output_dir: str  # {output_dir}/{experiment}
    # model
    encoder: str
    decoder: str
    random_init_encoder: bool
    random_init_decoder: bool
    compression_ratio: int
    window_size: int
    pooling: str
    mask: str
    overlap: int
    adapter_type: str
    num_adapter_layers: int
    init_from: str | None
    # what trains
    train_encoder: bool
    train_decoder: bool
    train_wrap_tokens: bool
    adapter_attention_group: str
    # optimizer
    lr: dict
    weight_decay: dict
    betas: dict
    eps: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    scheduler: str
    lr_offset: float
    max_grad_norm: float
    optimizer: str
    # batch / step
    batch_size: int
    grad_accum: int
    seq_len: int
    max_windows: int
    max_latents: int | None
    max_encode_batch_size: int
    ce_chunk_size: int
    encoder_remat: str
    decoder_remat: str
    dtype: str
    param_dtype: str
    backend: str
    mesh: dict
    # data
    dataset: str
    streams: tuple
    seed: int
    skip_step_ranges: tuple
    # checkpoints / logging
    save_steps: int
    keep_checkpoints: int
    auto_resume: bool
    async_checkpoints: bool
    max_consecutive_skips: int
    resume_from_checkpoint: str | None
    log_interval: int
    peak_flops: float | None
    tensorboard: bool
    ignored: tuple
    stream_options: dict = dataclasses.field(default_factory=dict)  # {kind: {builder option: value}}

    @property
    def stage_dir(self) -> str:
        return os.path.join(self.output_dir, f"stage{self.stage}")

    @property
    def export_dir(self) -> str:
        return os.path.join(self.output_dir, f"stage{self.stage}-hf")

    def trains(self, group: str) -> bool:
        return {"encoder": self.train_encoder, "adapter": True, "decoder": self.train_decoder}[group]

    @property
    def trains_memory_rows(self) -> bool:
        return (not self.train_decoder) and self.train_wrap_tokens

    def lclm_config(self):
        from lclm_jax.config import LCLMConfig

        return LCLMConfig(self.compression_ratio, self.window_size, self.pooling, self.mask, self.overlap,
                          self.adapter_type, self.num_adapter_layers)


def load_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def stage_keys(raw: dict) -> list[int]:
    return sorted(int(k) for k in (raw.get("stages") or {}))


def resolve(raw: dict, stage: int, output_dir: str | None = None, overrides=()) -> RunConfig:
    """One stage of an experiment config (``overrides``: ``--set key=value`` strings)."""
    raw = apply_overrides(raw, overrides)
    stages = {int(k): v for k, v in (raw.get("stages") or {}).items()}
    if stage not in stages:
        raise ValueError(f"stage {stage} is not defined in the config (stages: {sorted(stages)})")
    m, t, d, lg = (raw.get(k) or {} for k in ("models", "training", "data", "logging"))
    s, jx = stages[stage] or {}, raw.get("jax") or {}
    ignored = sorted({f"models.{k}" for k in m if k in IGNORED["models"]}
                     | {f"training.{k}" for k in t if k in IGNORED["training"]}
                     | {f"data.{k}" for k in d if k in IGNORED["data"]}
                     | {f"logging.{k}" for k in lg if k in IGNORED["logging"]}
                     | {f"stages.{stage}.{k}" for k in s if k in IGNORED["stage"]})
    exp = raw.get("experiment", "auto")
    exp = experiment_name(raw) if exp in (None, "auto") else str(exp)
    out = output_dir or (raw.get("output") or {}).get("dir") or "./checkpoints"
    default_ckpt = bool(t.get("decoder_gradient_checkpointing", True))
    enc_ckpt = bool(s.get("encoder_gradient_checkpointing", False))
    train_bs = int(s.get("train_batch_size", 1))
    return RunConfig(
        stage=stage, experiment=exp, output_dir=os.path.join(out, exp),
        encoder=str(m.get("encoder", "Qwen/Qwen3-Embedding-0.6B")),
        decoder=str(m.get("decoder", "Qwen/Qwen3-4B-Instruct-2507")),
        random_init_encoder=bool(m.get("random_init_encoder", False)),
        random_init_decoder=bool(m.get("random_init_decoder", False)),
        compression_ratio=int(t.get("compression_ratio", 16)),
        window_size=int(m.get("encoder_window_size", 1024)),
        pooling=str(m.get("pooling", "mean")),
        mask=str(m.get("encoder_mask_type", m.get("mask", "causal"))),
        overlap=int(m.get("boundary_overlap", 0) or 0),
        adapter_type=str(m.get("adapter_type", "mlp")),
        num_adapter_layers=int(m.get("num_adapter_layers", 1)),
        init_from=jx.get("init_from"),
        train_encoder=bool(s.get("train_encoder", False)),
        train_decoder=bool(s.get("train_decoder", False)),
        train_wrap_tokens=bool(d.get("train_wrap_tokens", True)),
        adapter_attention_group=str(jx.get("adapter_attention_group", "decoder")),
        lr={g: float(s.get(f"{g}_lr", 1e-3 if g == "adapter" else 6e-5)) for g in GROUPS},
        weight_decay={g: float(s.get(f"{g}_weight_decay") or 0.0) for g in GROUPS},
        betas={g: _betas(t.get(f"{g}_betas")) for g in GROUPS},
        eps=float(t.get("adam_epsilon", 1e-8)),
        min_lr=float(s.get("min_lr", t.get("min_lr", 0.0))),
        warmup_steps=int(s.get("warmup_steps", t.get("warmup_steps", 0))),
        max_steps=int(s.get("max_steps", t.get("max_steps", -1))),
        scheduler=str(t.get("scheduler", "cosine")),
        lr_offset=float(jx.get("lr_offset", 1.0)),
        max_grad_norm=float(t.get("max_grad_norm", 1.0)),
        optimizer=str(t.get("optimizer", "adamw")),
        batch_size=int(jx.get("batch_size", train_bs)),
        grad_accum=int(t.get("gradient_accumulation_steps", 1)),
        seq_len=int(jx.get("seq_len", s.get("max_packed_length") or 16384)),
        max_windows=int(jx.get("max_windows", 128)),
        max_latents=jx.get("max_latents"),
        max_encode_batch_size=int(jx.get("max_encode_batch_size", 0)),
        ce_chunk_size=int(jx.get("ce_chunk_size", 1024)),
        encoder_remat=str(jx.get("encoder_remat", "full" if enc_ckpt else "none")),
        decoder_remat=str(jx.get("decoder_remat", "full" if default_ckpt else "none")),
        dtype=str(jx.get("dtype", "bfloat16")),
        param_dtype=str(jx.get("param_dtype", "float32")),
        backend=str(jx.get("backend", "xla")),
        mesh={"data": 1, "fsdp": -1, "tensor": 1, **(jx.get("mesh") or {})},
        dataset=str(s.get("dataset", "synthetic")),
        streams=tuple(s.get("streams") or jx.get("streams") or ()),
        stream_options=dict(s.get("stream_options") or jx.get("stream_options") or {}),
        seed=int(t.get("seed", 4231)),
        skip_step_ranges=parse_ranges(s.get("skip_step_ranges")),
        save_steps=int(t.get("save_steps", 100)),
        keep_checkpoints=int(jx.get("keep_checkpoints", 1 if t.get("delete_old_checkpoints", True) else 1000)),
        auto_resume=bool(t.get("auto_resume", True)),
        async_checkpoints=bool(jx.get("async_checkpoints", True)),
        max_consecutive_skips=int(jx.get("max_consecutive_skips", 10)),
        resume_from_checkpoint=s.get("resume_from_checkpoint"),
        log_interval=int(lg.get("log_interval", 1)),
        peak_flops=jx.get("peak_flops"),
        tensorboard=bool(jx.get("tensorboard", True)),
        ignored=tuple(ignored),
    )


def total_steps(run: RunConfig, data_len: int | None = None) -> int:
    """``max_steps`` when > 0, else one pass over the data (``ceil(rows / batch) / grad_accum``)."""
    if run.max_steps > 0:
        return run.max_steps
    if data_len is None:
        raise ValueError("max_steps is not set and the data source has no length: set training.max_steps "
                         "(or stages.N.max_steps)")
    return max(1, math.floor(data_len / run.grad_accum))


def summary(run: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(run)
