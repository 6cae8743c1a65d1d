"""The official LCLM checkpoint layout, read and written exactly.

    <ckpt>/model_config.json              compression / architecture settings (``LCLMConfig``)
    <ckpt>/processor_config.json          informational (written, never required)
    <ckpt>/decoder/                       HF Qwen3ForCausalLM (``model.`` keys) + tokenizer files
    <ckpt>/encoder/                       HF Qwen3Model (keys without prefix) + tokenizer files
    <ckpt>/adapter/adapter.safetensors    Adapter state dict (torch layout, loaded strictly)

The adapter's key table (``adapter_entries``) is the single description used in both directions.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lclm_jax.checkpoint.hf_io import (LAYER_TABLE, CheckpointError, _get, _set, copy_side_files, np_dtype,
                                       read_qwen3, write_qwen3)
from lclm_jax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from lclm_jax.config import LCLMConfig, Qwen3Config


def adapter_entries(cfg: LCLMConfig, enc: Qwen3Config, dec: Qwen3Config):
    """(hf name, tree path, transpose, hf shape) of every adapter tensor."""
    enc_dim = enc.hidden_size * (cfg.compression_ratio if cfg.pooling == "concat" else 1)
    d = dec.hidden_size
    out = [("norm.weight", ("norm", "scale"), False, (enc_dim,)),
           ("fc1.weight", ("fc1", "kernel"), True, (d, enc_dim)),
           ("fc1.bias", ("fc1", "bias"), False, (d,)),
           ("fc2.weight", ("fc2", "kernel"), True, (d, d)),
           ("fc2.bias", ("fc2", "bias"), False, (d,))]
    attn_cfg = {"attn_mlp": enc, "mlp_attn": dec}.get(cfg.adapter_type)
    if attn_cfg is not None:
        for i in range(cfg.num_adapter_layers):
            for name, path, tr, shape in LAYER_TABLE:
                out.append((f"attention_layers.{i}.decoder_layer.{name}", (f"attention_layers_{i}",) + path, tr,
                            shape(attn_cfg)))
    return out


def read_adapter(path, cfg: LCLMConfig, enc: Qwen3Config, dec: Qwen3Config, dtype="float32"):
    target = np_dtype(dtype)
    if not os.path.exists(path):
        raise CheckpointError(f"missing adapter weights: {path}")
    try:
        f = SafetensorsFile(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e
    entries = adapter_entries(cfg, enc, dec)
    expected = {e[0] for e in entries}
    missing, unexpected = sorted(expected - set(f.keys())), sorted(set(f.keys()) - expected)
    bad = [f"{n}: expected {list(s)}, found {list(f.shape(n))}" for n, _, _, s in entries
           if n in f.entries and tuple(f.shape(n)) != tuple(s)]
    if missing or unexpected or bad:
        lines = [f"{path}: adapter weights do not match model_config.json "
                 f"(adapter_type={cfg.adapter_type!r}, pooling={cfg.pooling!r})"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        lines += [f"  wrong shape {b}" for b in bad]
        raise CheckpointError("\n".join(lines))
    params: dict = {}
    for name, p, tr, _ in entries:
        a = f.get(name)
        _set(params, p, np.ascontiguousarray((a.T if tr else a).astype(target)))
    return params


def adapter_tensors(params, cfg: LCLMConfig, enc: Qwen3Config, dec: Qwen3Config, dtype=None):
    tensors = {}
    for name, p, tr, shape in adapter_entries(cfg, enc, dec):
        a = np.asarray(_get(params, p))
        a = a.T if tr else a
        if dtype is not None:
            a = a.astype(np_dtype(dtype))
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"adapter param for {name} has shape {list(a.shape)}, expected {list(shape)}")
        tensors[name] = np.ascontiguousarray(a)
    return tensors


def read_lclm(path, dtype="float32"):
    """Read ``(lclm_config, encoder_config, decoder_config, params)`` from the official layout."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint directory")
    if not os.path.isdir(os.path.join(path, "decoder")):  # an Orbax training checkpoint (lclm_jax.train)
        from lclm_jax.checkpoint import orbax_io

        if orbax_io.is_orbax_checkpoint(path):
            return orbax_io.read_params(path, dtype)
    for sub in ("decoder", "encoder", "adapter"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise CheckpointError(f"{path}: missing {sub}/ (expected model_config.json, decoder/, encoder/, "
                                  "adapter/adapter.safetensors)")
    cfg = LCLMConfig.from_json_file(path)
    dec_cfg, dec = read_qwen3(os.path.join(path, "decoder"), causal_lm=True, dtype=dtype)
    enc_cfg, enc = read_qwen3(os.path.join(path, "encoder"), causal_lm=False, dtype=dtype)
    if not dec_cfg.is_causal_lm:
        raise CheckpointError(f"{path}/decoder/config.json: architectures {list(dec_cfg.architectures)} "
                              "is not a causal LM")
    ad = read_adapter(os.path.join(path, "adapter", "adapter.safetensors"), cfg, enc_cfg, dec_cfg, dtype)
    return cfg, enc_cfg, dec_cfg, {"encoder": enc, "adapter": ad, "decoder": dec}


def write_lclm(path, params, cfg: LCLMConfig, enc_cfg: Qwen3Config, dec_cfg: Qwen3Config, *, dtype=None,
               tokenizers_from=None, max_shard_bytes: int = 5 * 1024 ** 3, max_memory_length: int = 8192):
    """Write the official layout. ``tokenizers_from``: a checkpoint dir whose tokenizer/generation files
    are copied into ``decoder/`` and ``encoder/``."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    src_dec = os.path.join(tokenizers_from, "decoder") if tokenizers_from else None
    src_enc = os.path.join(tokenizers_from, "encoder") if tokenizers_from else None
    write_qwen3(params["decoder"], dec_cfg, os.path.join(path, "decoder"), causal_lm=True, dtype=dtype,
                max_shard_bytes=max_shard_bytes, extra_files_from=src_dec)
    write_qwen3(params["encoder"], enc_cfg, os.path.join(path, "encoder"), causal_lm=False, dtype=dtype,
                max_shard_bytes=max_shard_bytes, extra_files_from=src_enc)
    os.makedirs(os.path.join(path, "adapter"), exist_ok=True)
    save_file(adapter_tensors(params["adapter"], cfg, enc_cfg, dec_cfg, dtype),
              os.path.join(path, "adapter", "adapter.safetensors"))
    cfg.to_json_file(os.path.join(path, "model_config.json"))
    with open(os.path.join(path, "processor_config.json"), "w", encoding="utf-8") as f:
        json.dump({"compression_ratio": cfg.compression_ratio, "max_memory_length": max_memory_length,
                   "use_memory_wrapping": True, "memory_placeholder": "<|memory|>",
                   "memory_start": "<|memory_start|>", "memory_end": "<|memory_end|>"}, f, indent=2)
    return path


def copy_tokenizers(src, dst):
    for sub in ("decoder", "encoder"):
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
        copy_side_files(os.path.join(src, sub), os.path.join(dst, sub))


def tokenizer_root(path) -> str:
    """The directory holding ``decoder/`` and ``encoder/`` tokenizer files for a checkpoint (an Orbax
    training checkpoint records where its tokenizers came from)."""
    path = os.fspath(path)
    if not os.path.isdir(os.path.join(path, "decoder")):
        from lclm_jax.checkpoint import orbax_io

        if orbax_io.is_orbax_checkpoint(path):
            return orbax_io.read_meta(path).get("tokenizers_from") or path
    return path


def resolve_checkpoint(path_or_id: str) -> str:
    """A local directory as is; otherwise a Hub id through ``huggingface_hub`` when installed and online."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise CheckpointError(f"{path_or_id} is a file, not a checkpoint directory")
    if "/" not in path_or_id or path_or_id.startswith(("/", ".")):
        raise CheckpointError(f"no checkpoint directory at {path_or_id}")
    try:
        import huggingface_hub
    except ImportError as e:
        raise CheckpointError(f"{path_or_id!r} is not a local directory and huggingface_hub is not installed "
                              "to download it") from e
    try:
        return huggingface_hub.snapshot_download(path_or_id)
    except Exception as e:  # network errors, missing repo
        raise CheckpointError(f"could not download {path_or_id!r} from the Hub: {e}") from e


__all__ = ["read_lclm", "write_lclm", "adapter_entries", "resolve_checkpoint", "copy_tokenizers"]
