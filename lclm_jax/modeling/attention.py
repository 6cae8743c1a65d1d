"""One attention dispatcher with one mask description and several backends.

The mask is described, never materialised by callers: ``AttnMask`` holds per-query and per-key
segment ids (0 = padding / empty cache slot, equal ids may attend to each other) and per-query and
per-key slot indices used for causality (a query at slot ``i`` sees keys at slots ``<= i``). This one
description covers causal and bidirectional attention, HF-style key padding, left-padded batches,
packed sequences (segment ids) and decoding against a KV cache (key slots = cache slots).

Backends:
  * ``xla``       einsum + explicit boolean mask; the reference every other backend is tested against.
  * ``blockwise`` online softmax over key blocks (``lax.scan``); memory linear in the key length, so
                  long prefills never hold a ``[T, S]`` score matrix; runs on any device.
  * ``cudnn``     ``jax.nn.dot_product_attention(implementation="cudnn")`` on GPU with the same mask;
                  rejected with a clear error on other platforms.
  * ``auto``      ``cudnn`` on GPU for bf16/fp16; elsewhere ``blockwise`` for prefills of >= 256 queries
                  over >= 2 key blocks (faster and smaller than ``xla`` from ~1k tokens on CPU), else ``xla``.

Shapes: q ``[B, T, N, H]``, k/v ``[B, S, K, H]`` with ``N % K == 0`` (grouped-query attention).
Softmax is computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

BACKENDS = ("xla", "blockwise", "cudnn", "auto")
_NEG = -1e30  # finite "minus infinity": fully masked (padding) rows stay finite instead of NaN


@flax.struct.dataclass
class AttnMask:
    q_segment: jax.Array  # int32 [B, T]
    kv_segment: jax.Array  # int32 [B, S]
    q_index: jax.Array  # int32 [B, T]
    kv_index: jax.Array  # int32 [B, S]
    causal: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def make(cls, batch: int, length: int, *, causal: bool = True, attention_mask=None, segment_ids=None):
        """Mask for a plain forward over ``length`` tokens.

        ``attention_mask`` follows HF (1 = token, 0 = padding, any side); ``segment_ids`` (1-based,
        0 = padding) describes packed rows. Give at most one of them.
        """
        if attention_mask is not None and segment_ids is not None:
            raise ValueError("give attention_mask or segment_ids, not both")
        if segment_ids is None:
            segment_ids = (jnp.ones((batch, length), jnp.int32) if attention_mask is None
                           else jnp.asarray(attention_mask).astype(jnp.int32))
        seg = jnp.asarray(segment_ids, jnp.int32)
        if seg.shape != (batch, length):
            raise ValueError(f"mask shape {seg.shape} does not match (batch, length) = {(batch, length)}")
        idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        return cls(seg, seg, idx, idx, causal)

    def dense(self) -> jax.Array:
        """The boolean ``[B, T, S]`` mask this description stands for."""
        return _block_mask(self, self.kv_segment, self.kv_index)


def _block_mask(mask: AttnMask, kv_segment, kv_index):
    ok = (mask.q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
    if mask.causal:
        ok &= kv_index[:, None, :] <= mask.q_index[:, :, None]
    return ok


def _group(q, k):
    b, t, n, h = q.shape
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kh})")
    return q.reshape(b, t, kh, n // kh, h)


def xla_attention(q, k, v, mask: AttnMask, scale: float):
    b, t, n, h = q.shape
    qg = _group(q, k).transpose(0, 2, 3, 1, 4)  # head-major [b, kh, g, t, h]: see blockwise_attention
    s = jnp.einsum("bkgth,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    ok = mask.dense()[:, None, None, :, :]
    s = jnp.where(ok, s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskh->bkgth", p, v, preferred_element_type=jnp.float32)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def cached_attention(q, k_new, v_new, k_cache, v_cache, mask: AttnMask, cache_index, scale: float):
    """Attention of ``T`` new queries over a KV cache that does not hold their own keys yet.

    ``k_new``/``v_new`` ``[B, T, K, H]`` belong at cache slots ``[cache_index, cache_index + T)``;
    ``k_cache``/``v_cache`` are the cache *before* that write, in its storage layout ``[B, K, S, H]``.
    One softmax runs over the cache's other slots and the new keys, so the result equals ``xla`` attention
    over the cache after the write (up to summation order). Reading the cache before writing it is what
    lets a decode loop update the cache in place: a read of the freshly written cache made XLA copy every
    layer's whole cache at each generated token. Masking follows ``mask`` over all ``S`` slots.
    """
    b, t, n, h = q.shape
    kh, s_len = k_cache.shape[1], k_cache.shape[2]
    g = n // kh
    qg = _group(q, k_new)
    slots = jnp.arange(s_len, dtype=jnp.int32)
    fresh = (slots >= cache_index) & (slots < cache_index + t)  # stale slots: their keys are k_new
    ok_old = _block_mask(mask, mask.kv_segment, mask.kv_index) & ~fresh[None, None, :]
    new_seg = jax.lax.dynamic_slice_in_dim(mask.kv_segment, cache_index, t, axis=1)
    new_idx = jax.lax.dynamic_slice_in_dim(mask.kv_index, cache_index, t, axis=1)
    ok_new = _block_mask(mask, new_seg, new_idx)
    s_old = jnp.einsum("btkgh,bksh->bkgts", qg, k_cache, preferred_element_type=jnp.float32) * scale
    s_new = jnp.einsum("btkgh,bukh->bkgtu", qg, k_new, preferred_element_type=jnp.float32) * scale
    s_old = jnp.where(ok_old[:, None, None], s_old, _NEG)
    s_new = jnp.where(ok_new[:, None, None], s_new, _NEG)
    m = jnp.maximum(s_old.max(axis=-1), s_new.max(axis=-1))[..., None]
    p_old, p_new = jnp.exp(s_old - m), jnp.exp(s_new - m)
    den = p_old.sum(axis=-1) + p_new.sum(axis=-1)
    o = (jnp.einsum("bkgts,bksh->bkgth", p_old.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
         + jnp.einsum("bkgtu,bukh->bkgth", p_new.astype(v_new.dtype), v_new, preferred_element_type=jnp.float32))
    o = o / den[..., None]
    return jnp.einsum("bkgth->btkgh", o).reshape(b, t, kh * g, h).astype(q.dtype)


def blockwise_attention(q, k, v, mask: AttnMask, scale: float, block_size: int = 512,
                        q_block_size: int | None = None):
    """Online-softmax attention tiled over query blocks x key blocks.

    Only ``[q_block, block]`` scores live at once, so memory is linear in length. Key blocks that no
    query of the current query block may see (wholly padding, or wholly in the causal future) are
    skipped with ``lax.cond``, which halves causal prefill work; the skip is differentiable.
    """
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    bs = min(block_size, s_len)
    bq = min(q_block_size or block_size, t)
    nblocks, nq = -(-s_len // bs), -(-t // bq)
    kv_seg, kv_idx, q_seg, q_idx = mask.kv_segment, mask.kv_index, mask.q_segment, mask.q_index
    if nblocks * bs - s_len:
        pad = nblocks * bs - s_len
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)))  # segment 0: never attended
        kv_idx = jnp.pad(kv_idx, ((0, 0), (0, pad)))
    if nq * bq - t:
        pad = nq * bq - t
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_seg = jnp.pad(q_seg, ((0, 0), (0, pad)))
        q_idx = jnp.pad(q_idx, ((0, 0), (0, pad)))
    # Head-major operands ([b, kh, g, t, h] queries, [b, kh, s, h] keys/values), transposed once here: the
    # block dots then produce [b, kh, g, bq, bs] scores in their natural layout. With the [b, t, k, g, h]
    # layout the score dot came out as [kh, s, (t, g)] and every elementwise pass (mask, max, exp) over
    # the scores read it through a strided transpose, which cost ~4x the dots on CPU.
    kb = k.reshape(b, nblocks, bs, kh, h).transpose(1, 0, 3, 2, 4)  # [nblocks, b, kh, bs, h]
    vb = v.reshape(b, nblocks, bs, kh, h).transpose(1, 0, 3, 2, 4)
    segb = kv_seg.reshape(b, nblocks, bs).swapaxes(0, 1)
    idxb = kv_idx.reshape(b, nblocks, bs).swapaxes(0, 1)
    big = jnp.iinfo(jnp.int32).max

    def one_q_block(xs):
        qg, qs, qi = xs  # [b, kh, g, bq, h], [b, bq], [b, bq]
        sub = AttnMask(qs, qs, qi, qi, mask.causal)
        q_max = jnp.max(jnp.where(qs != 0, qi, -1))

        def compute(carry, kblk, vblk, seg, idx):
            m, l, acc = carry
            sc = jnp.einsum("bkgth,bksh->bkgts", qg, kblk, preferred_element_type=jnp.float32) * scale
            ok = _block_mask(sub, seg, idx)[:, None, None, :, :]
            sc = jnp.where(ok, sc, _NEG)
            m_new = jnp.maximum(m, sc.max(axis=-1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(sc - m_new[..., None])
            l = l * corr + p.sum(axis=-1)
            pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(vblk.dtype), vblk, preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        def body(carry, kv):
            kblk, vblk, seg, idx = kv
            needed = jnp.any(seg != 0)
            if mask.causal:
                needed &= jnp.min(jnp.where(seg != 0, idx, big)) <= q_max
            carry = jax.lax.cond(needed, jax.checkpoint(compute), lambda c, *_: c, carry, kblk, vblk, seg, idx)
            return carry, None

        init = (jnp.full((b, kh, g, bq), _NEG, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, h), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(body, init, (kb, vb, segb, idxb))
        return (acc / jnp.maximum(l, 1e-30)[..., None]).astype(q.dtype)  # [b, kh, g, bq, h]

    qb = q.reshape(b, nq, bq, kh, g, h).transpose(1, 0, 3, 4, 2, 5)  # [nq, b, kh, g, bq, h]
    qsb = q_seg.reshape(b, nq, bq).swapaxes(0, 1)
    qib = q_idx.reshape(b, nq, bq).swapaxes(0, 1)
    out = jax.lax.map(one_q_block, (qb, qsb, qib))  # [nq, b, kh, g, bq, h]
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, n, h)[:, :t]


def cudnn_attention(q, k, v, mask: AttnMask, scale: float):
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"attention backend 'cudnn' needs a GPU; this process runs on {jax.default_backend()!r}")
    dense = mask.dense()[:, None, :, :]
    return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale, implementation="cudnn")


def attention(q, k, v, mask: AttnMask, *, scale: float | None = None, backend: str = "xla",
              block_size: int = 512):
    """Dispatch to a backend. See the module docstring for shapes and semantics."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "auto":
        if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            backend = "cudnn"
        elif q.shape[1] >= 256 and k.shape[1] >= 2 * block_size:
            backend = "blockwise"  # long prefills: less memory and, with block skipping, less work
        else:
            backend = "xla"  # short sequences and decode steps
    if backend == "xla":
        return xla_attention(q, k, v, mask, scale)
    if backend == "blockwise":
        return blockwise_attention(q, k, v, mask, scale, block_size=block_size)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, mask, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False
