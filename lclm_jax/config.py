"""Frozen configuration dataclasses read from and written to Hugging Face JSON files.

``Qwen3Config`` mirrors the fields of a Hugging Face ``config.json`` with ``model_type: qwen3`` that
the model uses; every other key of the file is kept verbatim (``extra``) so that writing a config
back reproduces the original file. ``LCLMConfig`` mirrors the official ``model_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# Fields the model needs, with the type each must have in config.json.
_REQUIRED = {
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "rms_norm_eps": float,
    "rope_theta": float,
}


class ConfigError(ValueError):
    """A configuration file is missing a field, has a wrong value, or describes an unsupported model."""


def _load_json(path, filename: str) -> tuple[str, dict]:
    """``(path, object)`` of a JSON config file (``path`` may be its directory); clear errors."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    if not os.path.exists(path):
        raise ConfigError(f"no {filename} at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return path, json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    architectures: tuple[str, ...] = ("Qwen3ForCausalLM",)
    # Every other key of config.json, as a JSON object string (kept for a faithful round trip).
    extra: str = "{}"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"Qwen3Config.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_causal_lm(self) -> bool:
        return not self.architectures or any("CausalLM" in a for a in self.architectures)

    def replace(self, **kw) -> "Qwen3Config":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF JSON
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Qwen3Config":
        mt = d.get("model_type")
        if mt != "qwen3":
            raise ConfigError(f"{source}: unsupported model_type {mt!r}; lclm-jax implements 'qwen3'")
        for key, typ in _REQUIRED.items():
            if key not in d:
                raise ConfigError(f"{source}: missing required field {key!r}")
            if typ is int and (not isinstance(d[key], int) or isinstance(d[key], bool)):
                raise ConfigError(f"{source}: field {key!r} must be an integer, got {d[key]!r}")
            if typ is float and not isinstance(d[key], (int, float)):
                raise ConfigError(f"{source}: field {key!r} must be a number, got {d[key]!r}")
        if d.get("rope_scaling"):
            raise ConfigError(f"{source}: rope_scaling={d['rope_scaling']!r} is not supported")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: sliding-window attention is not supported")
        if d.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported (Qwen3 has none)")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={d['hidden_act']!r} is not supported (expected 'silu')")
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        known = ({f.name for f in dataclasses.fields(cls)} - {"extra"}) | {"model_type"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"],
            head_dim=int(head_dim),
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope_theta=float(d["rope_theta"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            architectures=tuple(d.get("architectures") or ()),
            extra=json.dumps(extra, sort_keys=True),
        )

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(self.extra)
        d.update(
            model_type="qwen3",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            architectures=list(self.architectures),
        )
        return dict(sorted(d.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Qwen3Config":
        path, d = _load_json(path, "config.json")
        return cls.from_dict(d, source=path)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def num_params(self) -> int:
        d, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        n, k, h = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d + 2 * h
        head = 0 if (self.tie_word_embeddings or not self.is_causal_lm) else v * d
        return v * d + L * per_layer + d + head


# ---------------------------------------------------------------------------------------- presets
def qwen3_embedding_0_6b() -> Qwen3Config:
    """Qwen3-Embedding-0.6B as used as the LCLM encoder (headless backbone)."""
    return Qwen3Config(vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                       rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768,
                       architectures=("Qwen3Model",))


def qwen3_4b_instruct_2507(vocab_size: int = 151672) -> Qwen3Config:
    """Qwen3-4B-Instruct-2507 as the LCLM decoder (vocabulary resized to 151,672 for the memory tokens)."""
    return Qwen3Config(vocab_size=vocab_size, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                       rope_theta=5e6, tie_word_embeddings=True, max_position_embeddings=262144,
                       architectures=("Qwen3ForCausalLM",))


def tiny(vocab_size: int = 512, causal_lm: bool = True, **kw) -> Qwen3Config:
    """A tiny shape for tests: head_dim differs from hidden/heads and attention is grouped (GQA)."""
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                rope_theta=5e6 if causal_lm else 1e6, tie_word_embeddings=True, max_position_embeddings=4096,
                architectures=("Qwen3ForCausalLM",) if causal_lm else ("Qwen3Model",))
    base.update(kw)
    return Qwen3Config(**base)


PRESETS = {
    "qwen3-embedding-0.6b": qwen3_embedding_0_6b,
    "qwen3-4b-instruct-2507": qwen3_4b_instruct_2507,
    "tiny": tiny,
}


# --------------------------------------------------------------------------------------- LCLM
POOLINGS = ("mean", "concat", "eos")
MASK_TYPES = ("causal", "bidirectional")
ADAPTER_TYPES = ("mlp", "mlp_attn", "attn_mlp")


@dataclasses.dataclass(frozen=True)
class LCLMConfig:
    """The official ``model_config.json``: compression and architecture settings of an LCLM."""

    compression_ratio: int
    encoder_window_size: int = 1024
    pooling: str = "mean"
    encoder_mask_type: str = "causal"
    boundary_overlap: int = 0
    adapter_type: str = "mlp"
    num_adapter_layers: int = 1

    def __post_init__(self):
        cr, w = self.compression_ratio, self.encoder_window_size
        if not isinstance(cr, int) or cr <= 0:
            raise ConfigError(f"compression_ratio must be a positive integer, got {cr!r}")
        if not isinstance(w, int) or w <= 0 or w % cr:
            raise ConfigError(f"encoder_window_size ({w!r}) must be a positive multiple of compression_ratio ({cr})")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.encoder_mask_type not in MASK_TYPES:
            raise ConfigError(f"encoder_mask_type must be one of {MASK_TYPES}, got {self.encoder_mask_type!r}")
        if not isinstance(self.boundary_overlap, int) or self.boundary_overlap < 0:
            raise ConfigError(f"boundary_overlap must be a non-negative integer, got {self.boundary_overlap!r}")
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError(f"adapter_type must be one of {ADAPTER_TYPES}, got {self.adapter_type!r}")
        if not isinstance(self.num_adapter_layers, int) or self.num_adapter_layers < 0:
            raise ConfigError(f"num_adapter_layers must be a non-negative integer, got {self.num_adapter_layers!r}")

    @property
    def bidirectional(self) -> bool:
        return self.encoder_mask_type == "bidirectional"

    def num_latents(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.compression_ratio)

    def replace(self, **kw) -> "LCLMConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model_config.json") -> "LCLMConfig":
        if "compression_ratio" not in d:
            raise ConfigError(f"{source}: missing required field 'compression_ratio'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"encoder_name", "decoder_name"})
        if unknown:
            raise ConfigError(f"{source}: unknown fields {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """Exactly the keys the reference writes (``num_adapter_layers`` only for attention adapters)."""
        d = {
            "compression_ratio": self.compression_ratio,
            "encoder_window_size": self.encoder_window_size,
            "pooling": self.pooling,
            "encoder_mask_type": self.encoder_mask_type,
            "boundary_overlap": self.boundary_overlap,
            "adapter_type": self.adapter_type,
        }
        if self.adapter_type != "mlp":
            d["num_adapter_layers"] = self.num_adapter_layers
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LCLMConfig":
        path, d = _load_json(path, "model_config.json")
        return cls.from_dict(d, source=path)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
