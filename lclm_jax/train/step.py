"""The jitted train step: token-weighted gradient accumulation, clipping, grouped AdamW, NaN skipping.

Batch layout (``data_pipelines.batch.TrainBatch``, device keys): per row an encoder window grid
``[NW, L]``, pooling indices into that row's ``NW*L`` grid and placeholder positions in the row.
:func:`loss_sums` flattens the rows' grids into one encoder batch, offsets the pooling indices by
``row * NW * L`` and the placeholders by ``row * S`` and runs the model pieces of ``LCLMModel``.

The loss is ``sum(token CE) / N`` where ``N`` is the number of supervised tokens of the whole global
batch (all microbatches, all devices): every supervised token weighs the same, whatever row or
microbatch it sits in. Microbatches are a ``lax.scan`` over ``gradient_accumulation_steps`` slices
of the batch rows; the gradients of the per-microbatch sums divided by the global ``N`` add up to
exactly the gradient of the big-batch loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lclm_jax.lclm.model import IGNORE, LCLMModel, chunked_cross_entropy
from lclm_jax.modeling.attention import AttnMask
from lclm_jax.modeling.qwen3 import head_matrix
from lclm_jax.train import optim
from lclm_jax.train.state import TrainSpec, merge, split

DEVICE_KEYS = ("input_ids", "labels", "segment_ids", "positions", "placeholder_index", "placeholder_valid",
               "enc_input_ids", "enc_valid", "enc_positions", "pool_index", "pool_mask", "latent_valid")


def span_ids_and_positions(placeholder_index, valid):
    """Per latent: a span id unique over the batch (-1 on padding) and its index inside the span.

    Spans of one row are separated by end/start tags, so a new span starts wherever a placeholder
    does not directly follow the previous one.
    """
    b, c = placeholder_index.shape
    prev = jnp.concatenate([jnp.full((b, 1), -2, placeholder_index.dtype), placeholder_index[:, :-1]], axis=1)
    new = placeholder_index != prev + 1
    local = jnp.cumsum(new.astype(jnp.int32), axis=1) - 1
    cidx = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    start = jax.lax.cummax(jnp.where(new, cidx, 0), axis=1)
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    span_ids = jnp.where(valid, local + rows * c, -1)
    span_pos = jnp.where(valid, cidx - start, 0)
    return span_ids.reshape(-1), span_pos.reshape(-1)


def latents(model: LCLMModel, params, batch):
    """Adapter outputs ``[B*C, D_dec]`` for the batch's per-row encoder grids."""
    b, nw, length = batch["enc_input_ids"].shape
    flat = lambda a: a.reshape((b * nw,) + a.shape[2:])  # noqa: E731
    hidden = model.encode_windows(params["encoder"], flat(batch["enc_input_ids"]), flat(batch["enc_valid"]),
                                  flat(batch["enc_positions"]))
    c, g = batch["pool_index"].shape[1:]
    offset = (jnp.arange(b, dtype=jnp.int32) * (nw * length))[:, None, None]
    pool_index = (batch["pool_index"] + offset).reshape(b * c, g)
    pooled = model.pool(hidden, pool_index, batch["pool_mask"].reshape(b * c, g))
    span_ids, span_pos = span_ids_and_positions(batch["placeholder_index"], batch["latent_valid"])
    return model.adapt(params["adapter"], pooled, span_ids, span_pos)


def decoder_hidden(model: LCLMModel, params, batch):
    ids = batch["input_ids"]
    b, s = ids.shape
    lat = latents(model, params, batch)
    rows = jnp.arange(b, dtype=jnp.int32)[:, None] * s
    pidx = jnp.where(batch["placeholder_valid"], batch["placeholder_index"] + rows, -1).reshape(-1)
    emb = model.embed_and_splice(params["decoder"], ids, lat, pidx)
    mask = AttnMask.make(b, s, causal=True, segment_ids=batch["segment_ids"])
    h, _ = model.decoder_hidden(params["decoder"], emb, batch["positions"], mask)
    return h


def loss_sums(model: LCLMModel, params, batch, chunk_size: int = 1024):
    """``(sum of token CE, supervised-token count)`` of a TrainBatch (labels aligned, shifted here)."""
    h = decoder_hidden(model, params, batch)
    head = head_matrix(params["decoder"], model.decoder_config)
    return chunked_cross_entropy(h[:, :-1], batch["labels"][:, 1:], head, chunk_size=chunk_size)


def supervised_count(labels):
    return jnp.sum(labels[:, 1:] != IGNORE)


def microbatches(batch, n: int):
    """``[B, ...] -> [n, B/n, ...]``; microbatch ``i`` holds rows ``i, n+i, 2n+i, ...`` (keeps the row
    sharding of the leading axis)."""

    def one(a):
        b = a.shape[0]
        if b % n:
            raise ValueError(f"batch rows {b} are not divisible by gradient_accumulation_steps {n}")
        return jnp.swapaxes(a.reshape((b // n, n) + a.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(one, batch)


def grads_and_loss(model: LCLMModel, spec: TrainSpec, train, frozen, batch, grad_accum: int, chunk_size: int):
    """``(loss, grads, count)``: global-token-mean loss and its gradient w.r.t. ``train`` only."""
    denom = jnp.maximum(supervised_count(batch["labels"]), 1).astype(jnp.float32)

    def micro(train, mb):
        s, c = loss_sums(model, merge(train, frozen, spec), mb, chunk_size)
        return s / denom, (s, c)

    vg = jax.value_and_grad(micro, has_aux=True)
    if grad_accum <= 1:
        (_, (s, c)), g = vg(train, batch)
    else:
        def body(carry, mb):
            gacc, sacc, cacc = carry
            (_, (s, c)), g = vg(train, mb)
            return (jax.tree_util.tree_map(jnp.add, gacc, g), sacc + s, cacc + c), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, train)
        (g, s, c), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.int32(0)), microbatches(batch, grad_accum))
    return s / denom, g, c


def make_train_step(model: LCLMModel, optimizer, spec: TrainSpec, run, total_steps: int):
    """``step(state, batch) -> (state, metrics)`` (not jitted; see :func:`jit_train_step`)."""
    scheds = optim.schedules(run, total_steps)

    def step(state, batch):
        train, frozen = split(state["params"], spec)
        trained = sorted(set(jax.tree_util.tree_leaves(optim.labels(train, run))))
        loss, grads, count = grads_and_loss(model, spec, train, frozen, batch, run.grad_accum, run.ce_chunk_size)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        lrs = {g: scheds[g](state["sched_step"]) for g in trained}
        opt_state = optim.set_learning_rates(state["opt_state"], lrs)
        updates, new_opt = optimizer.update(grads, opt_state, train)
        new_train = optax.apply_updates(train, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_train = keep(new_train, train)
        new_opt = keep(new_opt, state["opt_state"])
        rng, _ = jax.random.split(state["rng"])
        new_state = {
            "params": merge(new_train, frozen, spec),
            "opt_state": new_opt,
            "step": state["step"] + 1,
            "sched_step": state["sched_step"] + finite.astype(jnp.int32),
            "rng": rng,
            "skips_in_a_row": jnp.where(finite, 0, state["skips_in_a_row"] + 1),
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = {"loss": loss, "grad_norm": gnorm, "supervised": count, "finite": finite,
                   "skipped": new_state["skipped"], "skips_in_a_row": new_state["skips_in_a_row"],
                   **{f"lr/{g}": v for g, v in lrs.items()}}
        return new_state, metrics

    return step


def skip_step(state):
    """A ``skip_step_ranges`` step: data consumed, no forward/backward, the schedule still advances."""
    return {**state, "step": state["step"] + 1, "sched_step": state["sched_step"] + 1}


def jit_train_step(step_fn, state_shardings, batch_shardings):
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))

