"""Qwen3 in Flax Linen: headless backbone (``Qwen3Model``) and causal LM (``Qwen3ForCausalLM``).

Pure-functional: parameters are one explicit pytree whose names mirror Hugging Face
(``embed_tokens``, ``layers/self_attn/{q,k,v,o}_proj``, ``q_norm``, ``k_norm``,
``mlp/{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``norm``,
``lm_head``); kernels are ``[in, out]``. The layer stack is one ``nn.scan`` (leading ``layers`` axis
on every layer parameter) around an ``nn.remat``-wrapped block, so a 36-layer model compiles once.

A KV cache is explicit data: ``{"k": [L, B, K, S_max, H], "v": ...}`` is passed in and the updated
cache is returned; new keys are written at slot ``cache_index`` (the same for every row: batches are
left-padded so rows share slots). See ``attention.AttnMask`` for how masks and slots interact. The
cache is stored kv-head-major (``K`` before ``S``) because that is the operand layout of the attention
dots: with ``[.., S, K, H]`` storage every decode step transposed each layer's whole cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclm_jax.config import Qwen3Config
from lclm_jax.modeling import rope as rope_lib
from lclm_jax.modeling.attention import AttnMask, attention, cached_attention
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
    def __call__(self, x, positions, mask: AttnMask, cache=None, cache_index=None, layer_index=None):
        """``cache``: None, one layer's ``{"k", "v"}`` of ``[B, K, S, H]`` (``layer_index`` None), or the whole
        stacked cache ``[L, B, K, S, H]`` with this layer at ``layer_index``. Returns ``(out, cache)``."""
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
        if cache is not None and t == 1:  # decode step: attend to the cache as read, then write the new slot
            k_old, v_old = (_cache_read(cache[name], layer_index).astype(self.dtype) for name in ("k", "v"))
            o = cached_attention(q, k, v, k_old, v_old, mask, cache_index, h ** -0.5)
            cache = {name: _cache_write(cache[name], new, cache_index, layer_index)
                     for name, new in (("k", k), ("v", v))}
        else:
            if cache is not None:  # prefill: write, then attend over the cache with the chosen backend
                cache = {name: _cache_write(cache[name], new, cache_index, layer_index)
                         for name, new in (("k", k), ("v", v))}
                k, v = (_cache_read(cache[name], layer_index).swapaxes(1, 2).astype(self.dtype)
                        for name in ("k", "v"))
            o = attention(q, k, v, mask, scale=h ** -0.5, backend=self.backend)
        o = dense(c.hidden_size, "o_proj")(o.reshape(b, t, n * h))
        return o, cache


def _cache_write(buf, new, cache_index, layer_index):
    """Write ``new`` ``[B, T, K, H]`` at slot ``cache_index`` of a ``[B, K, S, H]`` (or stacked ``[L, ...]``)
    cache buffer. Inside the decode ``while_loop`` this is an in-place update of the loop-carried buffer."""
    new = new.swapaxes(1, 2).astype(buf.dtype)  # [B, K, T, H]
    if layer_index is None:
        return jax.lax.dynamic_update_slice(buf, new, (0, 0, cache_index, 0))
    return jax.lax.dynamic_update_slice(buf, new[None], (layer_index, 0, 0, cache_index, 0))


def _cache_read(buf, layer_index):
    """One layer's keys or values in the ``[B, K, S, H]`` storage layout."""
    if layer_index is not None:
        buf = jax.lax.dynamic_index_in_dim(buf, layer_index, axis=0, keepdims=False)
    return buf


class DecoderLayer(nn.Module):
    config: Qwen3Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "xla"

    @nn.compact
    def __call__(self, carry, layer_index, positions, mask, cache_index):
        """``carry = (x, cache)`` -> ``((x, cache), None)`` (the shape ``nn.scan`` wants). The cache rides in
        the scan carry, so each layer updates its slots in place (see ``Attention`` for the cache forms)."""
        x, cache = carry
        c = self.config
        norm = lambda name: RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        a, cache = Attention(c, self.dtype, self.param_dtype, self.backend, name="self_attn")(
            norm("input_layernorm")(x), positions, mask, cache, cache_index, layer_index)
        x = x + a
        x = x + MLP(c.hidden_size, c.intermediate_size, self.dtype, self.param_dtype, c.initializer_range,
                    name="mlp")(norm("post_attention_layernorm")(x))
        return (x, cache), None


def scanned_layers(config: Qwen3Config, dtype, param_dtype, backend: str, remat_policy: str, name="layers"):
    """``num_hidden_layers`` decoder layers as one scan (params stacked on a leading axis).

    Call as ``layers((x, cache), jnp.arange(L), positions, mask, cache_index)``. The whole stacked KV cache
    is part of the carry (not a scanned input/output): scanned outputs would be written to a fresh buffer
    and copied back every step, i.e. several full passes over the cache per generated token.
    """
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
        layer_index = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
        (x, new_cache), _ = self.layers((x, cache), layer_index, positions, mask, cache_index)
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


def unstack_layers(layer_params, num_layers: int):
    """The scan's stacked layer params (``params["model"]["layers"]``) as one tree per layer."""
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], layer_params) for i in range(num_layers)]


def split_cache(cache, num_layers: int):
    """A stacked ``{"k", "v": [L, B, K, S, H]}`` cache as one ``{"k", "v": [B, K, S, H]}`` dict per layer."""
    return [{name: buf[i] for name, buf in cache.items()} for i in range(num_layers)]


def unrolled_layers(config: Qwen3Config, dtype, param_dtype, backend: str, layer_params, x, caches, positions,
                    mask: AttnMask, cache_index):
    """The layer stack as a Python loop over per-layer params and per-layer caches (for decode steps).

    Same math as the scanned stack. Inside a decode ``while_loop`` the per-layer weights (sliced once,
    outside the loop, by ``unstack_layers``) and caches are separate loop-carried buffers, so a step
    reads each weight and cache entry once: the scan would slice (copy) every layer's weights and
    cache out of the stacked arrays at each token, several times the bytes a step has to read.
    """
    layer = DecoderLayer(config, dtype, param_dtype, backend)
    new_caches = []
    for lp, cache in zip(layer_params, caches):
        (x, cache), _ = layer.apply({"params": lp}, (x, cache), None, positions, mask, cache_index)
        new_caches.append(cache)
    return x, new_caches


def init_cache(config: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32):
    """An empty KV cache for ``batch`` rows of ``max_len`` slots."""
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def head_matrix(params, config: Qwen3Config):
    """The ``[D, V]`` output projection of a causal-LM param tree (tied: the embedding transposed)."""
    if config.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]
