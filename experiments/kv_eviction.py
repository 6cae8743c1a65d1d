"""KV-cache eviction baselines in JAX, on the same decoder as the LCLM: SnapKV-style and sink + recent.

Both keep ``budget`` of the prompt's ``T`` key/value positions per layer (``budget = ceil(T / cr)`` for
a compression ratio ``cr``, the same decoder-token budget an LCLM spends on latents) and then decode
greedily on the compressed cache:

* ``snapkv``   the observation window (the last ``window`` prompt tokens) is always kept; every other
               position is scored, per layer and per KV head, by the attention it receives from the
               window's queries (softmax probabilities summed over window queries and over the query
               heads of the group), smoothed by a 1-D max-pool of width ``kernel``; the top
               ``budget - window`` positions are kept (query-aware SnapKV when the question is last).
* ``sink``     the first ``sink`` positions plus the most recent ``budget - sink`` positions
               (StreamingLLM-style attention sinks + recent window).

Kept keys carry the RoPE of their original positions; decoding continues at position ``T``. The
prefill runs the decoder layer by layer (``lax.scan`` over the stacked layer params, the same
``DecoderLayer`` module as the model), writing the full cache, and reads the window's queries from
each layer's input to score the keys. Batches are one row (benchmarks time single prompts).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lclm_jax.generate import decode_compiler_options
from lclm_jax.modeling import rope as rope_lib
from lclm_jax.modeling.attention import AttnMask
from lclm_jax.modeling.qwen3 import DecoderLayer, init_cache, split_cache, unstack_layers

METHODS = ("snapkv", "sink")


def budget_for(prompt_len: int, cr: int) -> int:
    return max(1, math.ceil(prompt_len / cr))


def _rms(x, w, eps):
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)
    return w.astype(x.dtype) * y


def _window_scores(cfg, lp, x_in, k_cache, positions, t, window, kernel):
    """Attention mass ``[B, K, T]`` that the last ``window`` queries put on each of the ``t`` keys."""
    b = x_in.shape[0]
    n, kh, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    xw = _rms(x_in[:, t - window:t], lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
    q = (xw @ lp["self_attn"]["q_proj"]["kernel"].astype(xw.dtype)).reshape(b, window, n, h)
    q = _rms(q, lp["self_attn"]["q_norm"]["scale"], cfg.rms_norm_eps)
    cos, sin = rope_lib.cos_sin(positions[:, t - window:t], h, cfg.rope_theta, q.dtype)
    q = rope_lib.apply_rope(q, cos, sin)
    k = k_cache[:, :, :t].astype(q.dtype)  # [B, K, T, H], RoPE applied
    qg = q.reshape(b, window, kh, n // kh, h)
    s = jnp.einsum("bwkgh,bkth->bkgwt", qg, k, preferred_element_type=jnp.float32) * h ** -0.5
    qi = jnp.arange(t - window, t)[:, None]
    ki = jnp.arange(t)[None, :]
    s = jnp.where(ki <= qi, s, -1e30)
    p = jax.nn.softmax(s, axis=-1).sum(axis=(2, 3))  # [B, K, T]
    if kernel > 1:
        p = jax.lax.reduce_window(p, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1), "SAME")
    return p


def _keep_indices(method, scores, t, budget, window, sink):
    """Sorted kept positions ``[B, K, budget]`` (per KV head for SnapKV, shared for sink)."""
    b, kh = scores.shape[:2]
    if method == "sink":
        s = min(sink, budget)
        idx = jnp.concatenate([jnp.arange(s), jnp.arange(t - (budget - s), t)])
        return jnp.broadcast_to(idx, (b, kh, budget))
    w = min(window, budget)
    pre = scores[:, :, :t - w]
    n_sel = budget - w
    if n_sel > 0:
        _, top = jax.lax.top_k(pre, n_sel)
        top = jnp.sort(top, axis=-1)
    else:
        top = jnp.zeros((b, kh, 0), jnp.int32)
    tail = jnp.broadcast_to(jnp.arange(t - w, t), (b, kh, w))
    return jnp.concatenate([top.astype(jnp.int32), tail.astype(jnp.int32)], axis=-1)


@functools.lru_cache(maxsize=32)
def make_evict_generate_fn(model, method: str, prompt_len: int, budget: int, max_new: int, window: int = 32,
                           kernel: int = 7, sink: int = 4):
    """``gen(params, ids [1, T]) -> tokens [1, max_new]`` (greedy): prefill, evict to ``budget``, decode.

    ``model`` is an ``LCLMModel`` (only its decoder is used)."""
    if method not in METHODS:
        raise ValueError(f"unknown eviction method {method!r}; choose from {METHODS}")
    cfg = model.decoder_config
    t = prompt_len
    if budget > t:
        raise ValueError(f"budget {budget} exceeds the prompt length {t}")
    window = min(window, t)
    layer = DecoderLayer(cfg, model.dtype, model.param_dtype, model.backend)

    def prefill(dparams, ids):
        b = ids.shape[0]
        x = model.decoder.apply({"params": dparams}, ids, method="embed")
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = AttnMask.make(b, t, causal=True)
        cache = init_cache(cfg, b, t, model.dtype)

        def body(h, xs):
            lp, lc = xs
            (out, new_c), _ = layer.apply({"params": lp}, (h, lc), None, positions, mask, 0)
            sc = None
            if method == "snapkv":
                sc = _window_scores(cfg, lp, h, new_c["k"], positions, t, window, kernel)
            else:
                sc = jnp.zeros((b, cfg.num_key_value_heads, 1), jnp.float32)
            return out, (new_c, sc)

        h, (cache, scores) = jax.lax.scan(body, x, (dparams["model"]["layers"], cache))
        h = _rms(h, dparams["model"]["norm"]["scale"], cfg.rms_norm_eps)
        logits = model.head(dparams, h[:, -1]).astype(jnp.float32)
        return logits, cache, scores  # cache [L, B, K, T, H]; scores [L, B, K, T or 1]

    def compress(cache, scores):
        keep = jax.vmap(lambda sc: _keep_indices(method, sc, t, budget, window, sink))(scores)  # [L, B, K, n]
        gather = lambda a: jnp.take_along_axis(a, keep[..., None], axis=3)  # noqa: E731  [L,B,K,T,H] <- [L,B,K,n,1]
        total = budget + max_new
        out = {}
        for name in ("k", "v"):
            kept = gather(cache[name])
            pad = jnp.zeros(kept.shape[:3] + (max_new,) + kept.shape[4:], kept.dtype)
            out[name] = jnp.concatenate([kept, pad], axis=3)
        return out, total

    def gen(params, ids):
        dparams = params["decoder"]
        b = ids.shape[0]
        logits, cache, scores = prefill(dparams, ids)
        cache, total = compress(cache, scores)
        layer_params = unstack_layers(dparams["model"]["layers"], cfg.num_hidden_layers)  # once, not per token
        cache = split_cache(cache, cfg.num_hidden_layers)
        kv_seg = jnp.ones((b, total), jnp.int32)
        kv_idx = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (b, total))
        tokens = jnp.zeros((b, max_new), jnp.int32)

        def body(i, st):
            cache, logits, tokens = st
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            tokens = tokens.at[:, i].set(tok)
            e = model.decoder.apply({"params": dparams}, tok[:, None], method="embed")
            slot = budget + i
            qm = AttnMask(jnp.ones((b, 1), jnp.int32), kv_seg, jnp.full((b, 1), slot, jnp.int32), kv_idx, True)
            pos = jnp.full((b, 1), t + i, jnp.int32)
            hh, cache = model.decoder_step_hidden(dparams, layer_params, e, pos, qm, cache, slot)
            return cache, model.head(dparams, hh[:, 0]).astype(jnp.float32), tokens

        _, _, tokens = jax.lax.fori_loop(0, max_new, body, (cache, logits, tokens))
        return tokens

    def first_token(params, ids):
        """Prefill + eviction + first token: what TTFT measures."""
        logits, cache, scores = prefill(params["decoder"], ids)
        cache, _ = compress(cache, scores)
        return jnp.argmax(logits, -1), cache

    return jax.jit(gen, compiler_options=decode_compiler_options()), jax.jit(first_token)


def evict_generate(lm, prompt_ids, method: str, cr: int, max_new_tokens: int = 32, **kw) -> list[int]:
    """Greedy tokens for one raw prompt (decoder ids) with the cache evicted to ``ceil(T / cr)``."""
    import numpy as np
    ids = np.asarray(prompt_ids, np.int32)[None]
    gen, _ = make_evict_generate_fn(lm.model, method, ids.shape[1], budget_for(ids.shape[1], cr), max_new_tokens,
                                    **kw)
    return np.asarray(gen(lm.params, ids))[0].tolist()
