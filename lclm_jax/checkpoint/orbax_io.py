"""Orbax training checkpoints: one manager, one directory per step, three items.

    <dir>/<step>/state/    params, optimizer state, step counters, RNG (sharded arrays, OCDBT)
    <dir>/<step>/data/     the data iterator's state (JSON)
    <dir>/<step>/meta/     run metadata (JSON): stage, model_config.json contents, Qwen3 configs, ...

Saves are asynchronous and keep ``keep`` checkpoints. Orbax writes each step into a temporary
directory and renames it when complete, so a save interrupted by a crash or a kill never replaces
the latest good checkpoint; :meth:`TrainCheckpointer.restore_latest` additionally falls back to an
older step when the newest one cannot be read. Restores go into the shardings of the *current* mesh
(a checkpoint written on 8 devices restores on 1 and the reverse).

:func:`read_params` reads the params of such a checkpoint (any step directory or the manager
directory, latest step) as host numpy arrays, together with the model configs from ``meta`` --
this is what ``lclm_jax.load`` and ``lclm-jax convert`` use.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from lclm_jax.config import LCLMConfig, Qwen3Config

log = logging.getLogger(__name__)

META_ITEM = "meta"


class TrainCheckpointer:
    def __init__(self, directory: str, keep: int = 1, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", META_ITEM))

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = True) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
                                  **{META_ITEM: ocp.args.JsonSave(meta)})
        return self.manager.save(int(step), args=args, force=force)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state):
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  **{META_ITEM: ocp.args.JsonRestore()})
        out = self.manager.restore(int(step), args=args)
        return out["state"], out["data"], out[META_ITEM]

    def restore_latest(self, abstract_state):
        """``(step, state, data_state, meta)`` of the newest readable checkpoint, or ``None``."""
        for step in reversed(self.steps()):
            try:
                state, data, meta = self.restore(step, abstract_state)
                return step, state, data, meta
            except Exception as e:  # a damaged step: set it aside, fall back to the previous one
                log.warning("checkpoint step %s in %s is unreadable (%s: %s); trying an older one", step,
                            self.directory, type(e).__name__, e)
                self._set_aside(step)
        return None

    def _set_aside(self, step: int):
        """Rename a damaged step out of the manager's view (so training can save that step again)."""
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst = f"{src}.damaged"
            n = 1
            while os.path.exists(dst):
                dst, n = f"{src}.damaged{n}", n + 1
            os.replace(src, dst)
        self.manager.reload()


# ---------------------------------------------------------------------- read / write params only
def is_orbax_checkpoint(path) -> bool:
    return _step_dir(os.fspath(path)) is not None


def _step_dir(path: str) -> str | None:
    if os.path.isdir(os.path.join(path, META_ITEM)) and (
            os.path.isdir(os.path.join(path, "state")) or os.path.basename(path.rstrip("/")).isdigit()):
        return path
    if not os.path.isdir(path):
        return None
    steps = sorted((int(n) for n in os.listdir(path) if n.isdigit()
                    and os.path.isdir(os.path.join(path, n, "state"))), reverse=True)
    return os.path.join(path, str(steps[0])) if steps else None


def read_meta(path) -> dict:
    d = _step_dir(os.fspath(path))
    if d is None:
        raise FileNotFoundError(f"{path}: not an Orbax training checkpoint")
    meta_dir = os.path.join(d, META_ITEM)
    files = [f for f in os.listdir(meta_dir) if not f.startswith(".")]
    with open(os.path.join(meta_dir, files[0] if len(files) == 1 else "metadata"), encoding="utf-8") as f:
        return json.load(f)


def configs_from_meta(meta: dict):
    return (LCLMConfig.from_dict(meta["model_config"]), Qwen3Config.from_dict(meta["encoder_config"]),
            Qwen3Config.from_dict(meta["decoder_config"]))


def read_params(path, dtype: str | None = "float32"):
    """``(lclm_config, encoder_config, decoder_config, params)`` from an Orbax checkpoint (host numpy).

    Only the ``params`` sub-tree is read (optimizer state is skipped), each array onto the host.
    """
    d = _step_dir(os.fspath(path))
    if d is None:
        raise FileNotFoundError(f"{path}: not an Orbax training checkpoint")
    meta = read_meta(d)
    cfg, enc, dec = configs_from_meta(meta)
    state_dir = os.path.join(d, "state")
    ckptr = ocp.PyTreeCheckpointer()
    tree_meta = ckptr.metadata(state_dir)
    tree_meta = getattr(tree_meta, "item_metadata", tree_meta)
    tree_meta = getattr(tree_meta, "tree", tree_meta)
    params_meta = tree_meta["params"]
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0] if _has_cpu() else jax.devices()[0])

    def restore_args(m):
        return ocp.ArrayRestoreArgs(sharding=cpu, global_shape=tuple(m.shape), dtype=m.dtype)

    item = {"params": jax.tree_util.tree_map(lambda m: m, params_meta)}
    args = {"params": jax.tree_util.tree_map(restore_args, params_meta)}
    out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    target = None if dtype is None else np.dtype(dtype if dtype != "bfloat16" else "bfloat16")
    if dtype == "bfloat16":
        import ml_dtypes

        target = np.dtype(ml_dtypes.bfloat16)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a) if target is None else np.asarray(a).astype(target),
                                    out["params"])
    return cfg, enc, dec, params


def _has_cpu() -> bool:
    try:
        return bool(jax.devices("cpu"))
    except RuntimeError:
        return False


def write_params(path, params, cfg: LCLMConfig, enc: Qwen3Config, dec: Qwen3Config, step: int = 0,
                 extra_meta: dict | None = None):
    """A params-only Orbax checkpoint (``<path>/<step>/{state,meta}``) that :func:`read_params` reads."""
    meta = {"model_config": cfg.to_dict() | {"num_adapter_layers": cfg.num_adapter_layers},
            "encoder_config": enc.to_dict(), "decoder_config": dec.to_dict(), **(extra_meta or {})}
    ck = TrainCheckpointer(path, keep=1000, async_save=False)
    ck.save(step, {"params": params}, {}, meta)
    ck.close()
    return os.path.join(os.path.abspath(path), str(step))
