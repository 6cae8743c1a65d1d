"""Every attention backend against the xla reference, on one mask description."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclm_jax.modeling.attention import AttnMask, attention, cached_attention


def _qkv(seed, b=2, t=37, s=37, n=4, k=2, h=16, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, n, h)), dtype)
    kk = jnp.asarray(r.normal(size=(b, s, k, h)), dtype)
    v = jnp.asarray(r.normal(size=(b, s, k, h)), dtype)
    return q, kk, v


def _packed_mask(causal):
    seg = np.array([[1] * 10 + [2] * 20 + [3] * 5 + [0] * 2,
                    [0] * 7 + [1] * 30], np.int32)
    return AttnMask.make(2, 37, causal=causal, segment_ids=seg)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_blockwise_matches_xla_packed(causal, dtype, tol):
    q, k, v = _qkv(0, dtype=dtype)
    mask = _packed_mask(causal)
    ref = attention(q, k, v, mask, backend="xla")
    out = attention(q, k, v, mask, backend="blockwise", block_size=8)  # 37 keys -> 5 blocks, last padded
    valid = np.asarray(mask.q_segment) > 0
    diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))[valid].max()
    assert diff <= tol


def test_segments_are_isolated():
    """Changing one packed segment's keys must not change another segment's outputs."""
    q, k, v = _qkv(1)
    mask = _packed_mask(True)
    base = np.asarray(attention(q, k, v, mask, backend="blockwise", block_size=8))
    v2 = v.at[0, 10:30].add(5.0)  # segment 2 of row 0
    out = np.asarray(attention(q, k, v2, mask, backend="blockwise", block_size=8))
    assert np.array_equal(out[0, :10], base[0, :10])
    assert np.abs(out[0, 10:30] - base[0, 10:30]).max() > 1e-2


def test_cache_slots_and_causality():
    """A decode step against a cache equals the full causal forward's last row."""
    q, k, v = _qkv(2, b=1, t=12, s=12)
    full = attention(q, k, v, AttnMask.make(1, 12, causal=True), backend="xla")
    buf_len = 16
    kc = jnp.zeros((1, buf_len, 2, 16)).at[:, :12].set(k)
    vc = jnp.zeros((1, buf_len, 2, 16)).at[:, :12].set(v)
    kv_seg = (jnp.arange(buf_len) < 12).astype(jnp.int32)[None]
    mask = AttnMask(jnp.ones((1, 1), jnp.int32), kv_seg, jnp.full((1, 1), 11, jnp.int32),
                    jnp.arange(buf_len, dtype=jnp.int32)[None], True)
    for backend in ("xla", "blockwise"):
        step = attention(q[:, 11:12], kc, vc, mask, backend=backend, block_size=4)
        assert np.abs(np.asarray(step[0, 0]) - np.asarray(full[0, 11])).max() <= 1e-5


@pytest.mark.parametrize("t", [1, 3])
def test_cached_attention_matches_write_then_attend(t):
    """Attending to the cache as read plus the new keys == writing them first and attending (xla), with
    left padding in one row and stale values in the slots being written."""
    r = np.random.default_rng(5)
    b, s, n, kh, h, ci = 2, 20, 4, 2, 16, 12
    q = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32)
    k_new, v_new = (jnp.asarray(r.normal(size=(b, t, kh, h)), jnp.float32) for _ in range(2))
    kc, vc = (jnp.asarray(r.normal(size=(b, kh, s, h)), jnp.float32) for _ in range(2))  # [B, K, S, H]
    seg = np.ones((b, s), np.int32)
    seg[1, :5] = 0  # left padding
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_idx = jnp.broadcast_to(jnp.arange(ci, ci + t, dtype=jnp.int32), (b, t))
    mask = AttnMask(jnp.ones((b, t), jnp.int32), jnp.asarray(seg), q_idx, idx, True)
    out = cached_attention(q, k_new, v_new, kc, vc, mask, ci, h ** -0.5)
    write = lambda c, new: jax.lax.dynamic_update_slice(c, new.swapaxes(1, 2), (0, 0, ci, 0))  # noqa: E731
    ref = attention(q, write(kc, k_new).swapaxes(1, 2), write(vc, v_new).swapaxes(1, 2), mask, backend="xla")
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 1e-5


def test_bad_backend_and_cudnn_guard():
    q, k, v = _qkv(3, t=4, s=4)
    mask = AttnMask.make(2, 4)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, mask, backend="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="needs a GPU"):
            attention(q, k, v, mask, backend="cudnn")
    else:  # parity on GPU
        out = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask,
                        backend="cudnn")
        ref = attention(q, k, v, mask, backend="xla")
        assert np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max() < 3e-2


def test_blockwise_gradients_match_xla():
    q, k, v = _qkv(4)
    mask = _packed_mask(True)
    w = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32) * (mask.q_segment > 0)[..., None, None]

    def f(backend):
        return jax.grad(lambda a, b, c: (attention(a, b, c, mask, backend=backend, block_size=8) * w).sum(),
                        argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(f("blockwise"), f("xla")):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4
