"""Jitted prefill + KV-cache decode loop, entirely inside JAX (no per-token Python round trip).

Prompts are left-padded so every row shares cache slots; positions are ``cumsum(mask) - 1`` (HF's
generation convention). Sampling applies, in HF's order: repetition penalty (over generated ids only,
as the reference's ``inputs_embeds`` generation does), temperature, top-k, top-p. Temperature 0 is
greedy. A row stops after emitting any stop id; the loop ends when all rows stopped or after
``max_new_tokens`` steps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lclm_jax.modeling.attention import AttnMask
from lclm_jax.modeling.qwen3 import init_cache, split_cache, unstack_layers


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits, seen, penalty):
    pen = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, pen, logits)


def sample_token(logits, rng, cfg: SamplingConfig):
    """One token per row from fp32 ``[B, V]`` logits (penalty already applied)."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    neg = jnp.finfo(jnp.float32).min
    if cfg.top_k > 0:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        drop_sorted = (cum - probs) >= cfg.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def make_generate_fn(model, max_new_bucket: int, sampling: SamplingConfig):
    """``gen(params, ids [B,S], mask [B,S], latents [C,H], placeholder_index [C], stop_ids [E], max_new,
    rng, pad_id) -> (tokens [B, max_new_bucket], lengths [B])``, jitted. ``model`` is an ``LCLMModel``."""
    dcfg = model.decoder_config

    def gen(params, ids, mask, latents, placeholder_index, stop_ids, max_new, rng, pad_id):
        b, s = ids.shape
        total = s + max_new_bucket
        dparams = params["decoder"]
        emb = model.embed_and_splice(dparams, ids, latents, placeholder_index)
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
        kv_seg = jnp.concatenate([mask.astype(jnp.int32), jnp.ones((b, max_new_bucket), jnp.int32)], axis=1)
        kv_idx = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (b, total))
        q_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        pmask = AttnMask(mask.astype(jnp.int32), kv_seg, q_idx, kv_idx, True)
        cache = init_cache(dcfg, b, total, model.dtype)
        h, cache = model.decoder_hidden(dparams, emb, positions, pmask, cache, 0)
        logits = model.head(dparams, h[:, -1]).astype(jnp.float32)
        n_layers = dcfg.num_hidden_layers
        layer_params = unstack_layers(dparams["model"]["layers"], n_layers)  # sliced once, not per token
        cache = split_cache(cache, n_layers)
        row_alive = mask.sum(-1) > 0
        state = dict(step=jnp.int32(0), cache=cache, logits=logits,
                     tokens=jnp.full((b, max_new_bucket), pad_id, jnp.int32), done=~row_alive,
                     lengths=jnp.zeros((b,), jnp.int32), seen=jnp.zeros(logits.shape, bool), rng=rng,
                     pos=positions[:, -1] + 1)

        def cond(st):
            return (st["step"] < max_new) & ~jnp.all(st["done"])

        def body(st):
            step = st["step"]
            lg = st["logits"]
            if sampling.repetition_penalty != 1.0:
                lg = apply_repetition_penalty(lg, st["seen"], sampling.repetition_penalty)
            rng, sub = jax.random.split(st["rng"])
            tok = sample_token(lg, sub, sampling)
            tok = jnp.where(st["done"], pad_id, tok)
            tokens = st["tokens"].at[:, step].set(tok)
            lengths = jnp.where(st["done"], st["lengths"], step + 1)
            done = st["done"] | jnp.isin(tok, stop_ids)
            seen = st["seen"].at[jnp.arange(b), tok].set(True)
            e = model.decoder.apply({"params": dparams}, tok[:, None], method="embed")
            slot = s + step
            qm = AttnMask(jnp.ones((b, 1), jnp.int32), kv_seg, jnp.full((b, 1), slot, jnp.int32), kv_idx, True)
            hh, cache = model.decoder_step_hidden(dparams, layer_params, e, st["pos"][:, None], qm, st["cache"],
                                                  slot)
            logits = model.head(dparams, hh[:, 0]).astype(jnp.float32)
            return dict(step=step + 1, cache=cache, logits=logits, tokens=tokens, done=done, lengths=lengths,
                        seen=seen, rng=rng, pos=st["pos"] + 1)

        out = jax.lax.while_loop(cond, body, state)
        return out["tokens"], out["lengths"]

    return jax.jit(gen, compiler_options=decode_compiler_options())


def decode_compiler_options() -> dict:
    """XLA options for functions holding a decode loop. On CPU, copy insertion with region analysis: without
    it XLA copies every loop-carried KV-cache buffer twice per generated token (it cannot prove that the
    step's cache reads precede the in-place slot write), which made decode time grow with the context."""
    if jax.default_backend() == "cpu":
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    return {}
