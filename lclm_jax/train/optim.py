"""Optimizer: global-norm clipping, then one AdamW per parameter group, each with its own schedule.

The optimizer only ever sees the *trainable* tree (see ``state.split``): frozen parts get no
gradient and no optimizer state. Groups follow the reference (§9.4): ``encoder``, ``adapter``,
``decoder`` (and ``frozen``, an empty ``set_to_zero`` group kept so the label set is fixed). By default
attention-adapter weights land in the ``decoder`` group exactly as in the released runs
(``adapter_attention_group: adapter`` routes them to the adapter group instead). The three
trainable memory-token rows of stages 0-1 (``memory_rows``) belong to the decoder group.

Learning rates are injected hyperparameters, written into the state each step from the schedule
evaluated at the run's own schedule counter (which also advances on ``skip_step_ranges`` steps but
not on non-finite skips, as in the reference).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lclm_jax.train.config import GROUPS, RunConfig


def lr_schedule(base: float, min_lr: float, warmup: int, total: int, kind: str = "cosine", offset: float = 1.0):
    """The reference's ``CosineWithMinLRScheduler`` evaluated at ``k = step + offset`` (§9.5).

    ``k <= warmup``: ``base * k / max(1, warmup)``; then cosine from ``base`` to ``min_lr`` at ``total``;
    ``min_lr`` afterwards. ``kind="constant"``: linear warmup, then ``base``.
    """

    def f(step):
        k = jnp.asarray(step, jnp.float32) + offset
        warm = base * k / max(1, warmup)
        if kind == "constant":
            return jnp.where(k <= warmup, warm, base).astype(jnp.float32)
        p = jnp.minimum(1.0, (k - warmup) / max(1, total - warmup))
        cos = min_lr + (base - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * p))
        return jnp.where(k <= warmup, warm, cos).astype(jnp.float32)

    return f


def group_of(path: tuple[str, ...], attention_group: str = "decoder") -> str:
    top = path[0]
    if top == "memory_rows":
        return "decoder"
    if top == "adapter" and len(path) > 1 and str(path[1]).startswith("attention_layers"):
        return attention_group
    return top


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def labels(train_tree, run: RunConfig):
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(_names(p), run.adapter_attention_group),
                                            train_tree)


def schedules(run: RunConfig, total: int) -> dict:
    return {g: lr_schedule(run.lr[g], run.min_lr, run.warmup_steps, total, run.scheduler, run.lr_offset)
            for g in GROUPS}


def group_transform(run: RunConfig, g: str):
    b1, b2 = run.betas[g]
    if run.optimizer == "adamw":
        return optax.inject_hyperparams(optax.adamw)(learning_rate=run.lr[g], b1=b1, b2=b2, eps=run.eps,
                                                    weight_decay=run.weight_decay[g])
    if run.optimizer == "sgd":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=run.lr[g], momentum=0.9)
    raise ValueError(f"optimizer {run.optimizer!r} is not supported (adamw, sgd)")


def make_optimizer(run: RunConfig, train_tree) -> optax.GradientTransformation:
    transforms = {g: group_transform(run, g) for g in GROUPS}
    transforms["frozen"] = optax.set_to_zero()
    parts = [optax.partition(transforms, labels(train_tree, run))]
    if run.max_grad_norm and run.max_grad_norm > 0:
        parts.insert(0, optax.clip_by_global_norm(run.max_grad_norm))
    return optax.chain(*parts)


def _partition_state(opt_state):
    return opt_state[-1]


def set_learning_rates(opt_state, lrs: dict):
    """A copy of ``opt_state`` whose per-group injected learning rates are ``lrs[group]``."""
    part = _partition_state(opt_state)
    inner = dict(part.inner_states)
    for g, lr in lrs.items():
        masked = inner[g]
        hyper = dict(masked.inner_state.hyperparams)
        hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype)
        inner[g] = masked._replace(inner_state=masked.inner_state._replace(hyperparams=hyper))
    part = part._replace(inner_states=inner)
    return tuple(opt_state[:-1]) + (part,)


def learning_rates(opt_state) -> dict:
    part = _partition_state(opt_state)
    return {g: s.inner_state.hyperparams["learning_rate"] for g, s in part.inner_states.items()
            if g != "frozen"}
