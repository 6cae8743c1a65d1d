"""The LCLM on device: encoder windows -> pooling -> adapter -> splice -> decoder -> loss / logits.

``LCLMModel`` owns three Flax modules and works on one param tree
``{"encoder": backbone, "adapter": adapter, "decoder": causal LM}``. Every method is a pure function
of params and arrays (jit-able); host-side preparation lives in ``processor.py`` and ``windows.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lclm_jax.config import LCLMConfig, Qwen3Config
from lclm_jax.lclm.adapter import Adapter
from lclm_jax.modeling.attention import AttnMask
from lclm_jax.modeling.layers import RMSNorm
from lclm_jax.modeling.qwen3 import Qwen3ForCausalLM, Qwen3Model, head_matrix, unrolled_layers

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class LCLMModel:
    config: LCLMConfig
    encoder_config: Qwen3Config
    decoder_config: Qwen3Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "xla"  # decoder attention backend
    encoder_backend: str = "xla"
    encoder_remat: str = "none"
    decoder_remat: str = "none"
    max_encode_batch_size: int = 0  # windows per encoder forward (0 = all at once); memory knob only

    @property
    def encoder_dim(self) -> int:
        h = self.encoder_config.hidden_size
        return h * self.config.compression_ratio if self.config.pooling == "concat" else h

    @property
    def encoder(self) -> Qwen3Model:
        return Qwen3Model(self.encoder_config, self.dtype, self.param_dtype, self.encoder_backend, self.encoder_remat)

    @property
    def decoder(self) -> Qwen3ForCausalLM:
        return Qwen3ForCausalLM(self.decoder_config, self.dtype, self.param_dtype, self.backend, self.decoder_remat)

    @property
    def adapter(self) -> Adapter:
        c = self.config
        attn_cfg = {"attn_mlp": self.encoder_config, "mlp_attn": self.decoder_config}.get(c.adapter_type)
        return Adapter(self.encoder_dim, self.decoder_config.hidden_size, c.adapter_type, c.num_adapter_layers,
                       attn_cfg, self.dtype, self.param_dtype, self.encoder_backend)

    # ------------------------------------------------------------------ init
    def init(self, rng):
        k1, k2, k3 = jax.random.split(rng, 3)
        ids = jnp.zeros((1, 8), jnp.int32)
        enc = self.encoder.init(k1, ids)["params"]
        dec = self.decoder.init(k2, ids)["params"]
        c = 4
        ad = self.adapter.init(k3, jnp.zeros((c, self.encoder_dim), self.dtype), jnp.zeros((c,), jnp.int32),
                               jnp.arange(c, dtype=jnp.int32))["params"]
        return {"encoder": enc, "adapter": ad, "decoder": dec}

    # ------------------------------------------------------------------ encoder + pooling + adapter
    def encode_windows(self, enc_params, input_ids, valid, positions):
        """Encoder hidden states ``[NW, L, H]`` for a window grid (rows are independent sequences)."""
        bidirectional = self.config.bidirectional

        def run(ids, val, pos):
            nw, length = ids.shape
            seg = val.astype(jnp.int32)
            idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (nw, length))
            mask = AttnMask(seg, seg, idx, idx, causal=not bidirectional)
            h, _ = self.encoder.apply({"params": enc_params}, ids, positions=pos, mask=mask)
            return h

        nw = input_ids.shape[0]
        mb = self.max_encode_batch_size
        if mb <= 0 or nw <= mb:
            return run(input_ids, valid, positions)
        if nw % mb:
            raise ValueError(f"window count {nw} must be a multiple of max_encode_batch_size {mb} "
                             "(pad windows to that bucket)")
        split = lambda a: a.reshape((nw // mb, mb) + a.shape[1:])  # noqa: E731
        h = jax.lax.map(lambda xs: run(*xs), (split(input_ids), split(valid), split(positions)))
        return h.reshape((nw,) + h.shape[2:])

    def pool(self, hidden, pool_index, pool_mask):
        """``[NW, L, H]`` -> ``[C, H]`` (mean, eos) or ``[C, cr*H]`` (concat); see ``windows.pool_numpy``."""
        nw, length, h = hidden.shape
        flat = hidden.reshape(nw * length, h)
        m = pool_mask[..., None].astype(jnp.float32)
        members = flat[pool_index].astype(jnp.float32) * m
        pooling = self.config.pooling
        if pooling == "mean":
            out = members.sum(1) / jnp.maximum(m.sum(1), 1.0)
        elif pooling == "concat":
            out = members.reshape(members.shape[0], -1)
        else:
            out = members[:, 0]
        return out.astype(hidden.dtype)

    def adapt(self, adapter_params, pooled, span_ids=None, span_pos=None):
        if span_ids is None:
            span_ids = jnp.zeros(pooled.shape[:1], jnp.int32)
            span_pos = jnp.arange(pooled.shape[0], dtype=jnp.int32)
        return self.adapter.apply({"params": adapter_params}, pooled, span_ids, span_pos)

    def encode_and_pool(self, enc_params, input_ids, valid, positions, pool_index, pool_mask):
        """Encoder + pooling, streamed over chunks of ``max_encode_batch_size`` windows.

        Each chunk's hidden states are scattered straight into the pooled output (a sum for ``mean``,
        a slot for ``concat`` / ``eos``), so only one chunk of hidden states is alive at a time: a
        1M-token span needs memory for one chunk plus the ``[C, ...]`` pooled result. Same values as
        ``pool(encode_windows(...))`` up to summation order.
        """
        nw, length = input_ids.shape
        c, g = pool_index.shape
        h_dim = self.encoder_config.hidden_size
        pooling = self.config.pooling
        flat_n = nw * length
        where = jnp.where(pool_mask, pool_index, flat_n)  # masked members -> out of bounds (dropped)
        tok_latent = jnp.full((flat_n,), c, jnp.int32).at[where].set(
            jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[:, None], (c, g)), mode="drop")
        tok_slot = jnp.zeros((flat_n,), jnp.int32).at[where].set(
            jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32)[None, :], (c, g)), mode="drop")
        mb = self.max_encode_batch_size
        mb = nw if mb <= 0 or nw <= mb else mb
        if nw % mb:
            raise ValueError(f"window count {nw} must be a multiple of max_encode_batch_size {mb} "
                             "(pad windows to that bucket)")
        bidirectional = self.config.bidirectional
        acc_dtype = jnp.float32 if pooling == "mean" else self.dtype
        acc0 = jnp.zeros((c, h_dim) if pooling != "concat" else (c, g, h_dim), acc_dtype)

        def chunk(acc, xs):
            ids, val, pos, tl, ts = xs
            seg = val.astype(jnp.int32)
            idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), ids.shape)
            mask = AttnMask(seg, seg, idx, idx, causal=not bidirectional)
            h, _ = self.encoder.apply({"params": enc_params}, ids, positions=pos, mask=mask)
            h = h.reshape(-1, h_dim)
            tl, ts = tl.reshape(-1), ts.reshape(-1)
            if pooling == "mean":
                return acc.at[tl].add(h.astype(jnp.float32), mode="drop"), None
            if pooling == "concat":
                return acc.at[tl, ts].set(h.astype(acc.dtype), mode="drop"), None
            return acc.at[tl].set(h.astype(acc.dtype), mode="drop"), None

        split = lambda a: a.reshape((nw // mb, mb) + a.shape[1:])  # noqa: E731
        xs = (split(input_ids), split(valid), split(positions), split(tok_latent.reshape(nw, length)),
              split(tok_slot.reshape(nw, length)))
        if nw == mb:
            acc, _ = chunk(acc0, jax.tree_util.tree_map(lambda a: a[0], xs))
        else:
            acc, _ = jax.lax.scan(chunk, acc0, xs)
        if pooling == "mean":
            count = jnp.maximum(pool_mask.sum(1, keepdims=True).astype(jnp.float32), 1.0)
            return (acc / count).astype(self.dtype)
        if pooling == "concat":
            return acc.reshape(c, g * h_dim)
        return acc

    def latents(self, params, enc, with_pooled=False):
        """Adapter outputs ``[C, H_dec]`` for an encoder batch dict (keys of ``windows.EncoderBatch`` plus
        ``span_ids`` and ``span_pos`` per latent, -1 / 0 on padded latents)."""
        pooled = self.encode_and_pool(params["encoder"], enc["input_ids"], enc["valid"], enc["positions"],
                                      enc["pool_index"], enc["pool_mask"])
        lat = self.adapt(params["adapter"], pooled, enc["span_ids"], enc["span_pos"])
        return (lat, pooled) if with_pooled else lat

    # ------------------------------------------------------------------ decoder
    def embed_and_splice(self, dec_params, input_ids, latents, placeholder_index):
        """Token embeddings with placeholder rows overwritten by ``latents``.

        ``placeholder_index`` ``[C]``: flat index into ``B*S`` of latent c's placeholder; entries ``< 0``
        (padded latents) are dropped.
        """
        b, s = input_ids.shape
        emb = self.decoder.apply({"params": dec_params}, input_ids, method="embed")
        flat = emb.reshape(b * s, -1)
        idx = jnp.where(placeholder_index >= 0, placeholder_index, b * s)  # out of bounds -> dropped
        flat = flat.at[idx].set(latents.astype(flat.dtype), mode="drop")
        return flat.reshape(b, s, -1)

    def decoder_hidden(self, dec_params, embeds, positions, mask, cache=None, cache_index=0):
        return self.decoder.apply({"params": dec_params}, inputs_embeds=embeds, positions=positions, mask=mask,
                                  cache=cache, cache_index=cache_index, method="hidden")

    def decoder_step_hidden(self, dec_params, layer_params, embeds, positions, mask, caches, cache_index):
        """``decoder_hidden`` for decode steps: ``layer_params`` from ``qwen3.unstack_layers`` and ``caches``
        from ``qwen3.split_cache`` (one per layer); returns ``(hidden after the final norm, caches)``."""
        c = self.decoder_config
        x, caches = unrolled_layers(c, self.dtype, self.param_dtype, self.backend, layer_params,
                                    embeds.astype(self.dtype), caches, positions, mask, cache_index)
        norm = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype, self.param_dtype)
        return norm.apply({"params": dec_params["model"]["norm"]}, x), caches

    def head(self, dec_params, hidden):
        return self.decoder.apply({"params": dec_params}, hidden, method="head")

    def forward_hidden(self, params, batch):
        """Final decoder hidden states ``[B, S, D]`` for a batch dict with ``input_ids``, ``segment_ids``
        (or ``attention_mask``), ``positions``, ``placeholder_index`` and the encoder fields."""
        ids = batch["input_ids"]
        b, s = ids.shape
        lat = self.latents(params, batch["encoder"])
        emb = self.embed_and_splice(params["decoder"], ids, lat, batch["placeholder_index"])
        seg = batch.get("segment_ids")
        mask = AttnMask.make(b, s, causal=True, segment_ids=seg if seg is not None else batch["attention_mask"])
        h, _ = self.decoder_hidden(params["decoder"], emb, batch["positions"], mask)
        return h

    def loss_sums(self, params, batch, chunk_size: int = 1024):
        """``(sum of token CE, number of supervised tokens)``: labels aligned with ``input_ids`` (HF style,
        shifted here), -100 ignored. Never materialises ``[B*S, V]`` logits (chunked over tokens)."""
        h = self.forward_hidden(params, batch)
        labels = batch["labels"]
        return chunked_cross_entropy(h[:, :-1], labels[:, 1:], head_matrix(params["decoder"], self.decoder_config),
                                     chunk_size=chunk_size)


def chunked_cross_entropy(hidden, labels, head, chunk_size: int = 1024):
    """Sum of fp32 cross-entropy over tokens with ``labels != -100`` and their count.

    ``hidden`` ``[..., D]``, ``labels`` ``[...]``, ``head`` ``[D, V]``. Tokens are processed in chunks of
    ``chunk_size`` under ``jax.checkpoint`` so neither the forward nor the backward keeps whole logits.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    y = labels.reshape(-1)
    n = h.shape[0]
    cs = max(1, min(chunk_size, n))
    pad = -n % cs
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        y = jnp.pad(y, (0, pad), constant_values=IGNORE)
    h = h.reshape(-1, cs, d)
    y = y.reshape(-1, cs)

    @jax.checkpoint
    def one(hc, yc):
        logits = jnp.dot(hc, head.astype(hc.dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = yc != IGNORE
        tgt = jnp.take_along_axis(logits, jnp.where(valid, yc, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(valid, lse - tgt, 0.0)), jnp.sum(valid)

    def body(carry, xs):
        s, c = one(*xs)
        return (carry[0] + s, carry[1] + c), None

    (total, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (h, y))
    return total, count
