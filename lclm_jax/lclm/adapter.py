"""The adapter: encoder latents -> decoder embedding space.

MLP path, always present: RMSNorm(eps 1e-6) -> Linear(+bias) -> exact (erf) GELU -> Linear(+bias).
``attn_mlp`` runs ``num_layers`` Qwen3 layers in encoder space before the MLP, ``mlp_attn`` after it in
decoder space. Attention layers are bidirectional within each span's latents (key padding and span
boundaries from ``span_ids``), with RoPE positions counting 0, 1, ... inside each span.

Reference numerics reproduced on purpose: each attention layer casts its input to bf16 even in fp32
runs, so the layer input/residual, the normalised value of ``input_layernorm`` (before its weight)
and the RoPE tables are bf16-rounded; everything after the first fp32 weight is fp32 again.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from lclm_jax.config import Qwen3Config
from lclm_jax.modeling.attention import AttnMask
from lclm_jax.modeling.layers import MLP, RMSNorm
from lclm_jax.modeling.qwen3 import Attention


class AdapterAttentionLayer(nn.Module):
    config: Qwen3Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "xla"
    round_dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x, positions, mask):
        c = self.config
        xr = x.astype(self.round_dtype)
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype, self.param_dtype, name="input_layernorm")(xr)
        a, _ = Attention(c, self.dtype, self.param_dtype, self.backend, rope_round_dtype=self.round_dtype,
                         name="self_attn")(h, positions, mask)
        x = xr.astype(self.dtype) + a
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(x)
        return x + MLP(c.hidden_size, c.intermediate_size, self.dtype, self.param_dtype, c.initializer_range,
                       name="mlp")(h)


class Adapter(nn.Module):
    encoder_dim: int
    decoder_dim: int
    adapter_type: str = "mlp"
    num_layers: int = 1
    attn_config: Qwen3Config | None = None  # encoder config (attn_mlp) or decoder config (mlp_attn)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "xla"

    def _attention(self, x, span_ids, span_pos):
        if self.attn_config is None:
            raise ValueError(f"adapter_type {self.adapter_type!r} needs attn_config")
        seg = (span_ids + 1).astype(jnp.int32)[None]  # 0 = padded latent
        idx = jnp.zeros_like(seg)
        mask = AttnMask(seg, seg, idx, idx, causal=False)
        pos = span_pos.astype(jnp.int32)[None]
        h = x[None]
        for i in range(self.num_layers):
            h = AdapterAttentionLayer(self.attn_config, self.dtype, self.param_dtype, self.backend,
                                      name=f"attention_layers_{i}")(h, pos, mask)
        return h[0]

    @nn.compact
    def __call__(self, x, span_ids=None, span_pos=None):
        """x: ``[C, encoder_dim]`` latents of all spans; ``span_ids`` ``[C]`` (-1 = padding) and
        ``span_pos`` ``[C]`` (index inside the span) are needed by the attention variants."""
        x = x.astype(self.dtype)
        if self.adapter_type == "attn_mlp":
            x = self._attention(x, span_ids, span_pos)
        x = RMSNorm(self.encoder_dim, 1e-6, self.dtype, self.param_dtype, name="norm")(x)
        init = nn.initializers.lecun_normal()
        x = nn.Dense(self.decoder_dim, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init,
                     bias_init=nn.initializers.zeros, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Dense(self.decoder_dim, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init,
                     bias_init=nn.initializers.zeros, name="fc2")(x)
        if self.adapter_type == "mlp_attn":
            x = self._attention(x, span_ids, span_pos)
        return x
