"""Train state: one pytree ``{params, opt_state, step, sched_step, rng, skips_in_a_row, skipped}``.

``params`` is the full model tree ``{"encoder", "adapter", "decoder"}``. What trains is described by
a :class:`TrainSpec` and extracted with :func:`split`: whole sub-trees for trained parts, plus, in
stages with a frozen decoder and ``train_wrap_tokens``, a ``memory_rows`` array ``[3, D]`` holding the
decoder embedding rows of ``<|memory_start|>``, ``<|memory_end|>`` and ``<|memory|>``. Training those
rows directly is the reference's 0/1 gradient row mask on the whole embedding (§9.3, §14.5) without
the gradient and optimizer state of the other rows: Adam on a zero gradient leaves a row unchanged
when its weight decay is 0, which is the case in every released stage 0-1 (a decoder weight decay > 0
there would decay all rows in the reference; here only the three rows).

Everything is created already sharded: ``jax.jit(..., out_shardings=...)`` from abstract shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lclm_jax import sharding as sh


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    groups: tuple[str, ...]  # whole trained sub-trees among encoder / adapter / decoder
    memory_ids: tuple[int, ...] = ()  # embedding rows trained while the decoder is frozen

    @classmethod
    def from_run(cls, run, memory_ids) -> "TrainSpec":
        groups = tuple(g for g in ("encoder", "adapter", "decoder") if run.trains(g))
        return cls(groups, tuple(int(i) for i in memory_ids) if run.trains_memory_rows else ())


def _embedding(dec):
    return dec["model"]["embed_tokens"]["embedding"]


def _with_embedding(dec, emb):
    model = dict(dec["model"])
    model["embed_tokens"] = {**model["embed_tokens"], "embedding": emb}
    return {**dec, "model": model}


def split(params, spec: TrainSpec):
    """``(trainable, frozen)``; ``frozen`` keeps the untouched sub-trees (the decoder too in stage 0)."""
    train = {g: params[g] for g in spec.groups}
    if spec.memory_ids:
        train["memory_rows"] = _embedding(params["decoder"])[jnp.asarray(spec.memory_ids)]
    frozen = {g: v for g, v in params.items() if g not in spec.groups}
    return train, frozen


def merge(train, frozen, spec: TrainSpec):
    """The full param tree from the two halves (memory rows written into the embedding)."""
    params = {**frozen, **{g: v for g, v in train.items() if g != "memory_rows"}}
    if spec.memory_ids:
        dec = params["decoder"]
        emb = _embedding(dec).at[jnp.asarray(spec.memory_ids)].set(train["memory_rows"].astype(_embedding(dec).dtype))
        params["decoder"] = _with_embedding(dec, emb)
    return {k: params[k] for k in ("encoder", "adapter", "decoder")}


def state_shardings(abstract_state, mesh, rules=None):
    """NamedShardings for a (possibly abstract) state; optimizer moments follow their params' rules."""
    return sh.param_shardings(abstract_state, mesh, rules)


def new_state(params, optimizer, spec: TrainSpec, seed: int, mesh, rules=None):
    """A sharded train state around ``params`` (host numpy or device arrays), fresh optimizer."""
    pshard = sh.param_shardings(params, mesh, rules)
    params = jax.tree_util.tree_map(lambda a, s: jax.device_put(a, s), params, pshard)

    def build(params):
        train, _ = split(params, spec)
        return {"params": params, "opt_state": optimizer.init(train), "step": jnp.int32(0),
                "sched_step": jnp.int32(0), "rng": jax.random.PRNGKey(seed),
                "skips_in_a_row": jnp.int32(0), "skipped": jnp.int32(0)}

    abstract = jax.eval_shape(build, params)
    shardings = state_shardings(abstract, mesh, rules)
    shardings["params"] = pshard
    return jax.jit(build, out_shardings=shardings, donate_argnums=())(params)


def abstract_state(state_like, mesh, rules=None):
    """ShapeDtypeStructs carrying concrete NamedShardings on ``mesh`` (Orbax restore target)."""
    abstract = jax.eval_shape(lambda s: s, state_like)
    shardings = state_shardings(abstract, mesh, rules)
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)


def count_params(tree) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))
