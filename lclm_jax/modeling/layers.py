"""Small building blocks with Hugging Face Qwen3 numerics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """RMSNorm in HF/torch order: normalise in fp32, cast back to the input dtype, then scale."""

    dim: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (self.dim,), self.param_dtype)
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = y.astype(in_dtype)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                         kernel_init=nn.initializers.normal(self.init_std), name=name)
        gate = dense(self.intermediate_size, "gate_proj")(x)
        up = dense(self.intermediate_size, "up_proj")(x)
        return dense(self.hidden_size, "down_proj")(nn.silu(gate) * up)
