"""Qwen3 in Flax Linen: headless backbone (``Qwen3Model``) and causal LM (``Qwen3ForCausalLM``).

Pure-functional: parameters are one explicit pytree whose names mirror Hugging Face
(``embed_tokens``, ``layers/self_attn/{q,k,v,o}_proj``, ``q_norm``, ``k_norm``,
``mlp/{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``norm``,
``lm_head``); kernels are ``[in, out]``. The layer stack is one ``nn.scan`` (leading ``layers`` axis
on every layer parameter) around an ``nn.remat``-wrapped block, so a 36-layer model compiles once.

A KV cache is explicit data: ``{"k": [L, B, S_max, K, H], "v": ...}`` is passed in and the updated
cache is returned; new keys are written at slot ``cache_index`` (the same for every row: batches are
left-padded so rows share slots). See ``attention.AttnMask`` for how masks and slots interact.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclm_jax.config import Qwen3Config
from lclm_jax.modeling import rope as rope_lib
from lclm_jax.modeling.attention import AttnMask, attention
from lclm_jax.modeling.layers import MLP, RMSNorm

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nn.Module):
    config: Qwen3Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "xla"
    rope_round_dtype: jnp.dtype | None = None  # round cos/sin to this dtype (reference adapter layers)

    @nn.compact
    def __call__(self, x, positions, mask: AttnMask, layer_cache=None, cache_index=None):
        c = self.config
        b, t, _ = x.shape
        n, kh, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        dense = lambda f, name: nn.Dense(f, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                         kernel_init=nn.initializers.normal(c.initializer_range), name=name)
        q = dense(n * h, "q_proj")(x).reshape(b, t, n, h)
        k = dense(kh * h, "k_proj")(x).reshape(b, t, kh, h)
        v = dense(kh * h, "v_proj")(x).reshape(b, t, kh, h)
        q = RMSNorm(h, c.rms_norm_eps, self.dtype, self.param_dtype, name="q_norm")(q)
        k = RMSNorm(h, c.rms_norm_eps, self.dtype, self.param_dtype, name="k_norm")(k)
        cos, sin = rope_lib.cos_sin(positions, h, c.rope_theta, self.rope_round_dtype or self.dtype)
        cos, sin = cos.astype(self.dtype), sin.astype(self.dtype)
        q = rope_lib.apply_rope(q, cos, sin)
        k = rope_lib.apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:
            ck = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                              (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                              (0, cache_index, 0, 0))
            new_cache = {"k": ck, "v": cv}
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)
        o = attention(q, k, v, mask, scale=h ** -0.5, backend=self.backend)
        o = dense(c.hidden_size, "o_proj")(o.reshape(b, t, n * h))
        return o, new_cache


class DecoderLayer(nn.Module):
    config: Qwen3Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "xla"

    @nn.compact
    def __call__(self, x, layer_cache, positions, mask, cache_index):
        c = self.config
        norm = lambda name: RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        a, new_cache = Attention(c, self.dtype, self.param_dtype, self.backend, name="self_attn")(
            norm("input_layernorm")(x), positions, mask, layer_cache, cache_index)
        x = x + a
        x = x + MLP(c.hidden_size, c.intermediate_size, self.dtype, self.param_dtype, c.initializer_range,
                    name="mlp")(norm("post_attention_layernorm")(x))
        return x, new_cache


def scanned_layers(config: Qwen3Config, dtype, param_dtype, backend: str, remat_policy: str, name="layers"):
    """``num_hidden_layers`` decoder layers as one scan (params stacked on a leading axis)."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
    block = DecoderLayer
    if remat_policy != "none":
        block = nn.remat(DecoderLayer, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=config.num_hidden_layers)
    return scanned(config, dtype, param_dtype, backend, name=name)


class Qwen3Model(nn.Module):
    """Headless backbone: embeddings -> layers -> final norm (HF ``Qwen3Model``)."""

    config: Qwen3Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "xla"
    remat_policy: str = "none"

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                     embedding_init=nn.initializers.normal(c.initializer_range))
        self.layers = scanned_layers(c, self.dtype, self.param_dtype, self.backend, self.remat_policy)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype, self.param_dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids=None, *, inputs_embeds=None, positions=None, mask: AttnMask | None = None,
                 cache=None, cache_index=0):
        """Returns ``(hidden [B, T, D] after the final norm, updated cache or None)``."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if mask is None:
            mask = AttnMask.make(b, t, causal=True)
        x, new_cache = self.layers(x, cache, positions, mask, cache_index)
        return self.norm(x), new_cache


class Qwen3ForCausalLM(nn.Module):
    """Causal LM: ``model`` backbone + tied or untied ``lm_head`` (HF ``Qwen3ForCausalLM``)."""

    config: Qwen3Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "xla"
    remat_policy: str = "none"

    def setup(self):
        c = self.config
        self.model = Qwen3Model(c, self.dtype, self.param_dtype, self.backend, self.remat_policy)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                    kernel_init=nn.initializers.normal(c.initializer_range))

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def head(self, hidden):
        """Logits ``[..., V]`` (in the compute dtype) from final hidden states."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def hidden(self, input_ids=None, **kw):
        return self.model(input_ids, **kw)

    def __call__(self, input_ids=None, **kw):
        """Returns ``(logits [B, T, V], updated cache or None)``."""
        h, cache = self.model(input_ids, **kw)
        return self.head(h), cache


def init_cache(config: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32):
    """An empty KV cache for ``batch`` rows of ``max_len`` slots."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def head_matrix(params, config: Qwen3Config):
    """The ``[D, V]`` output projection of a causal-LM param tree (tied: the embedding transposed)."""
    if config.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]
