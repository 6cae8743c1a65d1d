"""Public LCLM API: ``lm = lclm_jax.load(path)``; ``encode_prompt``, ``logits``, ``loss``, ``generate``.

Host work (tokenising, windowing, padding to buckets) is numpy; device work is jitted and keyed by
bucketed shapes, so repeated calls with new prompt lengths rarely recompile. Bucket sizes: decoder
length to a multiple of 64 (at least 64), windows and latents to powers of two (latents at least 16),
new tokens to a power of two (at least 16), batch to a power of two.
"""

from __future__ import annotations

import collections
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from lclm_jax.checkpoint import lclm_io
from lclm_jax.generate import SamplingConfig, make_generate_fn
from lclm_jax.lclm.model import IGNORE, LCLMModel, chunked_cross_entropy
from lclm_jax.modeling.attention import AttnMask
from lclm_jax.modeling.qwen3 import head_matrix
from lclm_jax.lclm.processor import LCLMProcessor, ProcessedPrompt
from lclm_jax.lclm.windows import WindowConfig, build_encoder_batch, default_length
from lclm_jax.qwen3_api import JNP_DTYPES


def _pow2(n: int, minimum: int) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def _mult(n: int, m: int) -> int:
    return max(m, -(-int(n) // m) * m)


class LCLM:
    """A loaded LCLM: processor (host) + ``LCLMModel`` (device) + params."""

    def __init__(self, model: LCLMModel, params, processor: LCLMProcessor, *, source: str | None = None,
                 latent_cache_size: int = 4096, default_stop_ids=None):
        self.model = model
        self.params = params
        self.processor = processor
        self.source = source
        c = model.config
        self.window_config = WindowConfig(c.compression_ratio, c.encoder_window_size, c.boundary_overlap,
                                          c.bidirectional, c.pooling)
        self.latent_cache_size = latent_cache_size
        self._cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self.stop_ids = sorted(default_stop_ids if default_stop_ids is not None else processor.stop_ids)

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        return self.model.config

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, value):
        self._params = value
        self._cache = collections.OrderedDict()  # latents depend on the params

    def clear_latent_cache(self):
        self._cache.clear()

    # ------------------------------------------------------------------ encoder side
    @functools.cached_property
    def _latents_fn(self):
        return jax.jit(lambda p, enc: self.model.latents(p, enc, with_pooled=True))

    def _encoder_inputs(self, spans):
        wc = self.window_config
        mb = self.model.max_encode_batch_size
        nw = sum(-(-len(s) // wc.window_size) for s in spans)
        wb = _pow2(nw, 1)  # powers of two: few shapes, at most 2x padding (none for 2^k windows)
        if mb > 0 and wb > mb:
            wb = _mult(nw, mb)
        n_lat = sum(-(-len(s) // wc.compression_ratio) for s in spans)
        eb = build_encoder_batch(spans, wc, self.processor.encoder_pad_id, window_bucket=wb,
                                 length_bucket=_mult(default_length(wc), 8), latent_bucket=_pow2(n_lat, 16))
        span_ids = np.full(eb.latent_valid.shape, -1, np.int32)
        span_pos = np.zeros(eb.latent_valid.shape, np.int32)
        start = 0
        for j, n in enumerate(eb.span_latent_counts):
            span_ids[start:start + n] = j
            span_pos[start:start + n] = np.arange(n)
            start += n
        return eb, {"input_ids": eb.input_ids, "valid": eb.valid, "positions": eb.positions,
                    "pool_index": eb.pool_index, "pool_mask": eb.pool_mask, "span_ids": span_ids,
                    "span_pos": span_pos}

    def encode_spans(self, spans, *, use_cache: bool = True, return_pooled: bool = False):
        """Adapter outputs (float32 ``[n_j, H_dec]``) for each span (encoder id arrays), in order.

        Spans seen before (same encoder ids, same params) come from the latent cache.
        """
        keys = [np.asarray(s, np.int32).tobytes() for s in spans]
        todo = [i for i, k in enumerate(keys) if return_pooled or not use_cache or k not in self._cache]
        results: dict[int, np.ndarray] = {}
        pooled_out: dict[int, np.ndarray] = {}
        if todo:
            uniq = list(dict.fromkeys(keys[i] for i in todo))
            spans_u = [np.frombuffer(k, np.int32) for k in uniq]
            eb, enc = self._encoder_inputs(spans_u)
            lat, pooled = self._latents_fn(self.params, enc)
            lat = np.asarray(lat, np.float32)
            pooled = np.asarray(pooled, np.float32)
            start, by_key, pooled_by_key = 0, {}, {}
            for k, n in zip(uniq, eb.span_latent_counts):
                by_key[k] = lat[start:start + n]
                pooled_by_key[k] = pooled[start:start + n]
                start += n
            for i in todo:
                results[i] = by_key[keys[i]]
                pooled_out[i] = pooled_by_key[keys[i]]
            self.cache_misses += len(uniq)
            if use_cache:
                for k in uniq:
                    self._cache[k] = by_key[k]
                    self._cache.move_to_end(k)
                while len(self._cache) > self.latent_cache_size:
                    self._cache.popitem(last=False)
        for i, k in enumerate(keys):
            if i not in results:
                results[i] = self._cache[k]
                self._cache.move_to_end(k)
                self.cache_hits += 1
        lats = [results[i] for i in range(len(spans))]
        if return_pooled:
            return lats, [pooled_out[i] for i in range(len(spans))]
        return lats

    # ------------------------------------------------------------------ prompts
    def _process(self, prompt, chat: bool = False) -> ProcessedPrompt:
        if isinstance(prompt, list):  # chat messages
            prompt = self.processor.apply_chat_template(prompt, add_generation_prompt=True)
        elif not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a str or a list of chat messages, got {type(prompt).__name__}")
        elif chat:
            prompt = self.processor.apply_chat_template([{"role": "user", "content": prompt}])
        return self.processor.process(prompt)

    def encode_prompt(self, prompt: str) -> dict:
        """Decoder ids of the processed prompt and the adapter outputs of all its spans, in order."""
        p = self._process(prompt)
        lats = self.encode_spans(p.span_ids) if p.span_ids else []
        h = self.model.decoder_config.hidden_size
        latents = np.concatenate(lats, 0) if lats else np.zeros((0, h), np.float32)
        return {"input_ids": p.input_ids.astype(np.int32), "latents": latents.astype(np.float32)}

    def _decoder_batch(self, rows, side: str, length: int | None = None, batch_size: int | None = None):
        """Pad processed rows to ``[B, S]`` and gather latents + flat placeholder indices."""
        b = batch_size or len(rows)
        s = length or _mult(max(len(r.input_ids) for r in rows), 64)
        ids = np.full((b, s), self.processor.pad_id, np.int32)
        mask = np.zeros((b, s), np.int32)
        labels = np.full((b, s), IGNORE, np.int32)
        all_spans, flat_idx = [], []
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            off = s - n if side == "left" else 0
            ids[i, off:off + n] = r.input_ids
            mask[i, off:off + n] = 1
            if r.labels is not None:
                labels[i, off:off + n] = r.labels
            for (st, en), span in zip(r.memory_positions, r.span_ids):
                all_spans.append(span)
                flat_idx.append(i * s + off + np.arange(st, en))
        h = self.model.decoder_config.hidden_size
        lats = self.encode_spans(all_spans) if all_spans else []
        c = sum(len(x) for x in lats)
        cb = _pow2(c, 16)
        latents = np.zeros((cb, h), np.float32)
        pidx = np.full((cb,), -1, np.int32)
        if c:
            latents[:c] = np.concatenate(lats, 0)
            pidx[:c] = np.concatenate(flat_idx)
        return ids, mask, labels, latents, pidx

    def _hidden(self, params, ids, mask, latents, pidx):
        """Final decoder hidden states for a padded batch with latents spliced in (traced inside jit)."""
        m = self.model
        b, s = ids.shape
        emb = m.embed_and_splice(params["decoder"], ids, latents.astype(m.dtype), pidx)
        pos = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0).astype(jnp.int32)
        h, _ = m.decoder_hidden(params["decoder"], emb, pos, AttnMask.make(b, s, attention_mask=mask))
        return h

    @functools.cached_property
    def _forward_fn(self):
        def fwd(params, ids, mask, latents, pidx):
            h = self._hidden(params, ids, mask, latents, pidx)
            return self.model.head(params["decoder"], h).astype(jnp.float32)

        return jax.jit(fwd)

    @functools.cached_property
    def _loss_fn(self):
        def loss(params, ids, mask, labels, latents, pidx):
            h = self._hidden(params, ids, mask, latents, pidx)
            head = head_matrix(params["decoder"], self.model.decoder_config)
            return chunked_cross_entropy(h[:, :-1], labels[:, 1:], head)

        return jax.jit(loss)

    def logits(self, prompt: str) -> np.ndarray:
        """float32 ``[S, V]`` logits over exactly the processed prompt (no chat template added)."""
        return self.logits_processed(self._process(prompt))

    def logits_processed(self, p: ProcessedPrompt) -> np.ndarray:
        """float32 ``[S, V]`` logits for an already processed prompt (e.g. with appended token ids)."""
        ids, mask, _, lat, pidx = self._decoder_batch([p], "right")
        out = self._forward_fn(self.params, ids, mask, lat, pidx)
        return np.asarray(out[0, :len(p.input_ids)])

    def logits_batch(self, prompts, padding_side: str = "right"):
        """``(logits [B, S, V], attention_mask [B, S])`` for prompts padded together (S = longest)."""
        rows = [self._process(p) for p in prompts]
        s = max(len(r.input_ids) for r in rows)
        ids, mask, _, lat, pidx = self._decoder_batch(rows, padding_side, length=s)
        return np.asarray(self._forward_fn(self.params, ids, mask, lat, pidx)), mask

    def loss(self, prompt: str, target: str) -> float:
        """The reference's loss: mean token cross-entropy of ``target`` after the processed ``prompt``."""
        return self.loss_batch([prompt], [target])

    def loss_batch(self, prompts, targets, padding_side: str = "right", reference_left_pad_labels: bool = False):
        """Mean cross-entropy over all supervised tokens of the batch (reference batching semantics)."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        batch = self.processor.process_batch(list(prompts), list(targets), padding_side=padding_side,
                                             reference_left_pad_labels=reference_left_pad_labels)
        rows = []
        for i in range(len(prompts)):
            keep = batch["attention_mask"][i].astype(bool)
            rows.append(ProcessedPrompt(batch["input_ids"][i][keep], batch["span_ids"][i],
                                        [(a - (0 if padding_side == "right" else int((~keep).sum())),
                                          b - (0 if padding_side == "right" else int((~keep).sum())))
                                         for a, b in batch["memory_positions"][i]],
                                        batch["latent_counts"][i], batch["labels"][i][keep]))
        s = batch["input_ids"].shape[1]
        ids, mask, labels, lat, pidx = self._decoder_batch(rows, padding_side, length=_mult(s, 64))
        if padding_side == "left":  # keep the processor's own label layout (incl. the reference quirk)
            pad = ids.shape[1] - s
            labels = np.full_like(labels, IGNORE)
            labels[:, pad:] = batch["labels"]
        total, count = self._loss_fn(self.params, ids, mask, labels, lat, pidx)
        count = int(count)
        if count == 0:
            raise ValueError("no supervised tokens: the targets are empty")
        return float(total) / count

    # ------------------------------------------------------------------ generation
    def generate_ids(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                     top_k: int = 0, seed: int = 0, repetition_penalty: float = 1.0, chat: bool = False,
                     stop_ids=None) -> list[list[int]]:
        """New token ids per prompt (stop token included when one was emitted)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rows = [self._process(p, chat=chat) for p in prompts]
        return self.generate_processed(rows, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                       seed=seed, repetition_penalty=repetition_penalty, stop_ids=stop_ids)

    def generate_processed(self, rows, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                           top_k: int = 0, seed: int = 0, repetition_penalty: float = 1.0,
                           stop_ids=None) -> list[list[int]]:
        """``generate_ids`` for already processed prompts (``ProcessedPrompt``: ids, spans, positions)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling = SamplingConfig(float(temperature), float(top_p), int(top_k), float(repetition_penalty))
        b = _pow2(len(rows), 1)
        ids, mask, _, lat, pidx = self._decoder_batch(rows, "left", batch_size=b)
        stops = np.asarray(sorted(stop_ids if stop_ids is not None else self.stop_ids) or [-1], np.int32)
        fn = make_generate_fn(self.model, _pow2(max_new_tokens, 16), sampling)
        toks, lens = fn(self.params, ids, mask, lat, pidx, stops, np.int32(max_new_tokens),
                        jax.random.PRNGKey(seed), np.int32(self.processor.pad_id))
        toks, lens = np.asarray(toks), np.asarray(lens)
        return [toks[i, :lens[i]].tolist() for i in range(len(rows))]

    def generate(self, prompts, max_new_tokens: int = 64, skip_special_tokens: bool = True, **kw) -> list[str]:
        out = self.generate_ids(prompts, max_new_tokens, **kw)
        tok = self.processor.decoder_tokenizer
        return [tok.decode(ids, skip_special_tokens=skip_special_tokens) for ids in out]

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path, dtype=None):
        """Write the official layout (loadable by the PyTorch reference and transformers)."""
        params = jax.tree_util.tree_map(lambda a: np.asarray(a), self.params)
        lclm_io.write_lclm(path, params, self.model.config, self.model.encoder_config, self.model.decoder_config,
                           dtype=dtype, tokenizers_from=self.source)


def load(path, dtype: str = "bfloat16", *, backend: str = "auto", max_encode_batch_size: int = 64,
         **overrides) -> LCLM:
    """Load an LCLM checkpoint (official HF layout or an Orbax training checkpoint; a local directory or a
    Hub id)."""
    if dtype not in JNP_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose from {sorted(JNP_DTYPES)}")
    path = lclm_io.resolve_checkpoint(os.fspath(path))
    cfg, enc_cfg, dec_cfg, params = lclm_io.read_lclm(path, dtype=dtype)
    if overrides:
        cfg = cfg.replace(**overrides)
    jd = JNP_DTYPES[dtype]
    model = LCLMModel(cfg, enc_cfg, dec_cfg, dtype=jd, param_dtype=jd, backend=backend,
                      encoder_backend=backend, max_encode_batch_size=max_encode_batch_size)
    tok_root = lclm_io.tokenizer_root(path)  # an Orbax training checkpoint keeps its tokenizers elsewhere
    processor = LCLMProcessor.from_checkpoint(tok_root, compression_ratio=cfg.compression_ratio)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jd), params)
    return LCLM(model, params, processor, source=tok_root)
