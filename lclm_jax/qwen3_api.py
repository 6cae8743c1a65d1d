"""Public API for plain Qwen3 checkpoints: ``load_qwen3(path)`` -> ``Qwen3LM``."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from lclm_jax.checkpoint.hf_io import np_dtype, read_qwen3, write_qwen3
from lclm_jax.config import Qwen3Config
from lclm_jax.modeling.attention import AttnMask
from lclm_jax.modeling.qwen3 import Qwen3ForCausalLM, Qwen3Model

JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def positions_from_mask(attention_mask):
    """HF generation convention: ``cumsum(mask) - 1`` (0 on left padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def _check_inputs(input_ids, attention_mask, vocab_size):
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array [B, T], got dtype {ids.dtype} shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), found range [{ids.min()}, {ids.max()}]")
    if attention_mask is None:
        mask = np.ones_like(ids, dtype=np.int32)
    else:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    return ids.astype(np.int32), mask.astype(np.int32)


class Qwen3LM:
    """A loaded Qwen3 model (causal LM or headless backbone) with numpy-in / numpy-out helpers."""

    def __init__(self, config: Qwen3Config, params, *, dtype="float32", backend: str = "xla",
                 causal_lm: bool | None = None):
        self.config = config
        self.causal_lm = config.is_causal_lm if causal_lm is None else causal_lm
        self.dtype = dtype
        jd = JNP_DTYPES[dtype]
        cls = Qwen3ForCausalLM if self.causal_lm else Qwen3Model
        self.module = cls(config, dtype=jd, param_dtype=jd, backend=backend)
        self.params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jd), params)

    @functools.cached_property
    def _forward(self):
        def fwd(params, ids, mask, bidirectional, want_logits):
            b, t = ids.shape
            m = AttnMask.make(b, t, causal=not bidirectional, attention_mask=mask)
            pos = positions_from_mask(mask)
            if self.causal_lm:
                h, _ = self.module.apply({"params": params}, ids, positions=pos, mask=m, method="hidden")
                if want_logits:
                    return self.module.apply({"params": params}, h, method="head").astype(jnp.float32)
                return h.astype(jnp.float32)
            h, _ = self.module.apply({"params": params}, ids, positions=pos, mask=m)
            return h.astype(jnp.float32)

        return jax.jit(fwd, static_argnums=(3, 4))

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """float32 ``[B, T, V]`` logits (HF mask convention: 1 = token, 0 = padding, left padding)."""
        if not self.causal_lm:
            raise ValueError("this checkpoint is a headless backbone (Qwen3Model); it has no logits — "
                             "use hidden_states()")
        ids, mask = _check_inputs(input_ids, attention_mask, self.config.vocab_size)
        return np.asarray(self._forward(self.params, ids, mask, False, True))

    def hidden_states(self, input_ids, attention_mask=None, bidirectional: bool = False) -> np.ndarray:
        """float32 ``[B, T, D]`` hidden states after the final norm."""
        ids, mask = _check_inputs(input_ids, attention_mask, self.config.vocab_size)
        if self.causal_lm and bidirectional:
            raise ValueError("bidirectional attention is for headless backbones, not causal LMs")
        return np.asarray(self._forward(self.params, ids, mask, bidirectional, False))

    def save_pretrained(self, path, dtype=None):
        params = jax.tree_util.tree_map(np.asarray, self.params)
        write_qwen3(params, self.config, path, causal_lm=self.causal_lm, dtype=dtype)


def load_qwen3(path: str | os.PathLike, dtype: str = "float32", backend: str = "xla") -> Qwen3LM:
    """Load a HF Qwen3 directory (``Qwen3ForCausalLM`` or headless ``Qwen3Model``)."""
    np_dtype(dtype)  # validates the name
    config, params = read_qwen3(path, dtype=dtype)
    return Qwen3LM(config, params, dtype=dtype, backend=backend)
