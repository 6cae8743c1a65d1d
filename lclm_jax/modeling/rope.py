"""Rotary position embeddings, rotate-half convention (HF ``Qwen3RotaryEmbedding``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/head_dim) for i < head_dim/2, in fp32 (HF computes it with int64 arange then float)."""
    return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))).astype(
        np.float32)


def cos_sin(positions, head_dim: int, theta: float, dtype=jnp.float32):
    """cos/sin tables ``[B, T, head_dim]`` computed in fp32 and cast to ``dtype``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(head_dim, theta))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, cos, sin):
    """x: [B, T, heads, head_dim]; cos/sin: [B, T, head_dim]."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
