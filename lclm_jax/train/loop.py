"""The stage loop: build model and sharded state, resume, train, checkpoint, export; and the pipeline.

A stage starts from (in order): its own latest Orbax checkpoint (auto-resume: params, optimizer,
counters, RNG, data position), ``resume_from_checkpoint`` of the stage, the previous stage's export
``{output_dir}/stage{N-1}-hf`` (fresh optimizer), ``jax.init_from``, or the base encoder/decoder
(``models.encoder`` / ``models.decoder``, HF directories or Hub ids) with a fresh adapter. It ends
with a final checkpoint and an export in the official layout ``{output_dir}/stage{N}-hf`` that the
next stage, ``lclm_jax.load``, the PyTorch reference and transformers read.

SIGTERM / SIGINT: the current step finishes, a checkpoint is written (and waited for), and
:class:`Preempted` is raised; the next run resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from lclm_jax import sharding as sh
from lclm_jax.checkpoint import lclm_io, orbax_io
from lclm_jax.checkpoint.hf_io import copy_side_files, read_qwen3
from lclm_jax.config import Qwen3Config, qwen3_4b_instruct_2507, qwen3_embedding_0_6b
from lclm_jax.lclm.model import LCLMModel
from lclm_jax.train import metrics as mx
from lclm_jax.train import optim
from lclm_jax.train.config import RunConfig, stage_keys, total_steps
from lclm_jax.train.data import make_source
from lclm_jax.train.state import TrainSpec, abstract_state, count_params, new_state, split, state_shardings
from lclm_jax.train.step import DEVICE_KEYS, jit_train_step, make_train_step, skip_step

log = logging.getLogger(__name__)
MEMORY_TOKENS = ("<|memory_start|>", "<|memory_end|>", "<|memory|>")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Preempted(RuntimeError):
    """Raised after the checkpoint written on SIGTERM/SIGINT is complete."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


# ---------------------------------------------------------------------- model sources
def _tokenizer_ids(tok_json: str, vocab_size: int):
    if os.path.exists(tok_json):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tok_json)
        ids = [tok.token_to_id(t) for t in MEMORY_TOKENS]
        if all(i is not None for i in ids):
            return tuple(int(i) for i in ids)
    log.warning("no memory tokens in %s: assuming the last three vocabulary rows", tok_json)
    return (vocab_size - 3, vocab_size - 2, vocab_size - 1)


def _base_model(name: str, random_init: bool, causal_lm: bool, preset, seed: int):
    path = name if os.path.isdir(name) else None
    if path is None and not random_init:
        path = lclm_io.resolve_checkpoint(name)
    if random_init:
        cfg = Qwen3Config.from_json_file(path) if path else preset()
        if not causal_lm:
            cfg = cfg.replace(architectures=("Qwen3Model",))
        return cfg, None, path
    cfg, params = read_qwen3(path, causal_lm=causal_lm)
    return cfg, params, path


def _add_memory_tokens(dec_dir: str, dec_cfg: Qwen3Config, dec_params, out_dir: str):
    """Base decoder without the three memory tokens: add them to the tokenizer (saved under
    ``out_dir/decoder``) and resize the vocabulary to the tokenizer's size like the reference
    (new rows = mean of the old rows)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(os.path.join(dec_dir, "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MEMORY_TOKENS])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    os.makedirs(os.path.join(out_dir, "decoder"), exist_ok=True)
    copy_side_files(dec_dir, os.path.join(out_dir, "decoder"))
    tok.save(os.path.join(out_dir, "decoder", "tokenizer.json"))

    def resize(a, axis):
        a = np.asarray(a)
        old = a.shape[axis]
        keep = np.take(a, np.arange(min(old, vocab)), axis=axis)
        if vocab <= old:
            return keep
        mean = a.mean(axis=axis, keepdims=True)
        return np.concatenate([keep, np.repeat(mean, vocab - old, axis=axis)], axis=axis)

    if dec_params is not None:
        emb = dec_params["model"]["embed_tokens"]
        emb["embedding"] = resize(emb["embedding"], 0)
        if "lm_head" in dec_params:
            dec_params["lm_head"]["kernel"] = resize(dec_params["lm_head"]["kernel"], 1)
    return dec_cfg.replace(vocab_size=vocab), dec_params


@dataclasses.dataclass
class ModelSource:
    cfg: object
    enc_cfg: Qwen3Config
    dec_cfg: Qwen3Config
    params: dict | None  # host numpy; None -> random init (or restored from a checkpoint)
    tokenizers_from: str | None  # dir with decoder/ and encoder/ tokenizer files
    origin: str


def init_source(run: RunConfig, previous_export: str | None = None) -> ModelSource:
    """Where a stage's weights come from when it does not auto-resume (see module docstring)."""
    src = run.resume_from_checkpoint or previous_export or run.init_from
    if src:
        cfg, enc_cfg, dec_cfg, params = read_any(src)
        tok = src if os.path.isdir(os.path.join(src, "decoder")) else orbax_io.read_meta(src).get("tokenizers_from")
        return ModelSource(run.lclm_config() if cfg is None else cfg, enc_cfg, dec_cfg, params, tok, src)
    enc_cfg, enc, enc_dir = _base_model(run.encoder, run.random_init_encoder, False, qwen3_embedding_0_6b, run.seed)
    dec_cfg, dec, dec_dir = _base_model(run.decoder, run.random_init_decoder, True, qwen3_4b_instruct_2507, run.seed)
    tok_dir = os.path.join(run.output_dir, "base_tokenizers")
    os.makedirs(tok_dir, exist_ok=True)
    for sub in ("encoder", "decoder"):
        os.makedirs(os.path.join(tok_dir, sub), exist_ok=True)
    if enc_dir:
        copy_side_files(enc_dir, os.path.join(tok_dir, "encoder"))
    if dec_dir and os.path.exists(os.path.join(dec_dir, "tokenizer.json")):
        from tokenizers import Tokenizer

        if Tokenizer.from_file(os.path.join(dec_dir, "tokenizer.json")).token_to_id(MEMORY_TOKENS[2]) is None:
            dec_cfg, dec = _add_memory_tokens(dec_dir, dec_cfg, dec, tok_dir)
        else:
            copy_side_files(dec_dir, os.path.join(tok_dir, "decoder"))
    params = None
    if enc is not None and dec is not None:
        params = {"encoder": enc, "decoder": dec, "adapter": None}
    return ModelSource(run.lclm_config(), enc_cfg, dec_cfg, params, tok_dir, "base models")


def read_any(path):
    """``(cfg, enc_cfg, dec_cfg, params)`` from the official layout or an Orbax checkpoint."""
    if orbax_io.is_orbax_checkpoint(path):
        return orbax_io.read_params(path)
    return lclm_io.read_lclm(path)


def build_model(run: RunConfig, src: ModelSource) -> LCLMModel:
    return LCLMModel(src.cfg, src.enc_cfg, src.dec_cfg, dtype=DTYPES[run.dtype], param_dtype=DTYPES[run.param_dtype],
                     backend=run.backend, encoder_backend="xla", encoder_remat=run.encoder_remat,
                     decoder_remat=run.decoder_remat, max_encode_batch_size=run.max_encode_batch_size)


def initial_params(model: LCLMModel, src: ModelSource, seed: int, mesh):
    """Sharded params: loaded tensors are placed straight into their shardings; missing parts (a fresh
    adapter, random-init models) are initialised already sharded."""
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(seed))
    shardings = sh.param_shardings(abstract, mesh)
    host = src.params or {}
    missing = [k for k in ("encoder", "adapter", "decoder") if host.get(k) is None]
    out = {}
    if missing:
        init = jax.jit(lambda r: {k: v for k, v in model.init(r).items() if k in missing},
                       out_shardings={k: shardings[k] for k in missing})
        out.update(init(jax.random.PRNGKey(seed)))
    pdt = model.param_dtype
    for k in ("encoder", "adapter", "decoder"):
        if k not in out:
            out[k] = jax.tree_util.tree_map(lambda a, s: jax.device_put(np.asarray(a, pdt), s), host[k], shardings[k])
    return out


# ---------------------------------------------------------------------- helpers
def host_params(params):
    """Params as host numpy on every process (multi-host: gathered)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree_util.tree_map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), params)
    return jax.tree_util.tree_map(np.asarray, params)


def export(path: str, params, model: LCLMModel, tokenizers_from: str | None, dtype=None):
    host = host_params(params)
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lclm_io.write_lclm(tmp, host, model.config, model.encoder_config, model.decoder_config, dtype=dtype,
                           tokenizers_from=tokenizers_from)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


def to_device_batch(batch, shardings):
    out = {}
    for k in DEVICE_KEYS:
        a = np.asarray(batch[k])
        s = shardings[k]
        out[k] = (jax.device_put(a, s) if jax.process_count() == 1
                  else jax.make_array_from_process_local_data(s, a))
    return out


def batch_shardings(mesh, shapes: dict):
    return {k: sh.batch_sharding(mesh, len(v), shape=v) for k, v in shapes.items()}


class _StopFlag:
    def __init__(self):
        self.signal = None
        self._old = {}

    def install(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        print(f"\nreceived signal {signum}: saving a checkpoint after this step", flush=True)

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)


# ---------------------------------------------------------------------- one stage
def train_stage(run: RunConfig, *, mesh=None, source=None, previous_export: str | None = None,
                callback=None, quiet: bool = False, export_final: bool = True) -> dict:
    """Train one stage. ``callback(step, metrics, stop)`` runs after every step (``stop()`` requests a
    preemption-style stop). Returns a summary with per-step losses."""
    mesh = mesh or sh.make_mesh(**run.mesh)
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(run.stage_dir, exist_ok=True)
        with open(os.path.join(run.stage_dir, "run_config.json"), "w") as f:
            json.dump(dataclasses.asdict(run), f, indent=2, default=str)
    if run.ignored and primary and not quiet:
        print(f"ignored config keys (PyTorch tooling only): {', '.join(run.ignored)}", flush=True)
    ckpt = orbax_io.TrainCheckpointer(os.path.join(run.stage_dir, "checkpoints"), keep=run.keep_checkpoints,
                                      async_save=run.async_checkpoints)
    resumable = run.auto_resume and ckpt.latest_step() is not None
    if resumable:  # configs from the checkpoint; weights come from the restore below
        meta = None
        for st in reversed(ckpt.steps()):
            try:
                meta = orbax_io.read_meta(os.path.join(ckpt.directory, str(st)))
                break
            except (OSError, ValueError, IndexError):
                continue
        if meta is None:
            raise RuntimeError(f"no readable checkpoint metadata in {ckpt.directory}")
        cfg, enc_cfg, dec_cfg = orbax_io.configs_from_meta(meta)
        src = ModelSource(cfg, enc_cfg, dec_cfg, None, meta.get("tokenizers_from"), "auto-resume")
    else:
        src = init_source(run, previous_export)
    model = build_model(run, src)
    tok_json = os.path.join(src.tokenizers_from or "", "decoder", "tokenizer.json")
    memory_ids = _tokenizer_ids(tok_json, src.dec_cfg.vocab_size)
    spec = TrainSpec.from_run(run, memory_ids)
    abstract_params = jax.eval_shape(model.init, jax.random.PRNGKey(run.seed))
    train_abstract = jax.eval_shape(lambda p: split(p, spec)[0], abstract_params)
    optimizer = optim.make_optimizer(run, train_abstract)
    if source is None:
        source = make_source(run, src.tokenizers_from, memory_ids, process_index=jax.process_index(),
                             process_count=jax.process_count())
    total = total_steps(run, len(source) if hasattr(source, "__len__") else None)

    abstract = _abstract_state(abstract_params, optimizer, spec, run.seed, mesh)
    state, start = None, 0
    if resumable:
        restored = ckpt.restore_latest(abstract)
        if restored is not None:
            start, state, data_state, _ = restored
            if data_state:
                source.set_state(data_state)
            if not quiet and primary:
                print(f"resumed stage {run.stage} from step {start} ({ckpt.directory})", flush=True)
    if state is None:
        if resumable:  # every checkpoint unreadable: start over from the stage's sources
            src = init_source(run, previous_export)
        params = initial_params(model, src, run.seed, mesh)
        state = new_state(params, optimizer, spec, run.seed, mesh)
        del params
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, abstract)
    meta = {"stage": run.stage, "experiment": run.experiment, "model_config": {**src.cfg.to_dict(),
            "num_adapter_layers": src.cfg.num_adapter_layers}, "encoder_config": src.enc_cfg.to_dict(),
            "decoder_config": src.dec_cfg.to_dict(), "tokenizers_from": src.tokenizers_from,
            "memory_ids": list(memory_ids), "total_steps": total}

    step_fn = None
    writer = mx.MetricsWriter(run.stage_dir if primary else None, run.tensorboard)
    stop = _StopFlag().install()
    flops = None
    peak = mx.device_peak_flops(run.peak_flops)
    losses, t_last = {}, time.perf_counter()
    n_trainable = count_params(train_abstract)
    if not quiet and primary:
        print(f"stage {run.stage}: {src.origin}; trainable {n_trainable:,} of {count_params(abstract_params):,} "
              f"params ({', '.join(spec.groups)}{', memory rows' if spec.memory_ids else ''}); "
              f"{total} steps; mesh {dict(mesh.shape)}", flush=True)
    try:
        for step in range(start, total):
            batch = next(source)
            data_state = source.get_state()
            in_skip = any(lo <= step + 1 <= hi for lo, hi in run.skip_step_ranges)
            t0 = time.perf_counter()
            if in_skip:
                state = jax.jit(skip_step, donate_argnums=(0,))(state)
                m = {"skipped_range": 1}
            else:
                if step_fn is None:
                    shapes = {k: tuple(np.asarray(batch[k]).shape) for k in DEVICE_KEYS}
                    if jax.process_count() > 1:
                        shapes = {k: (v[0] * jax.process_count(),) + v[1:] for k, v in shapes.items()}
                    bsh = batch_shardings(mesh, shapes)
                    step_fn = jit_train_step(make_train_step(model, optimizer, spec, run, total), shardings, bsh)
                    flops = mx.step_flops(model, spec, shapes)
                state, m = step_fn(state, to_device_batch(batch, bsh))
                m = jax.device_get(m)
            dt = time.perf_counter() - t0
            host = _host_counts(batch)
            m.update(host)
            m["step_time_s"] = dt
            m["tokens_per_s"] = host["decoder_tokens"] * jax.process_count() / dt
            m["encoder_tokens_per_s"] = host["encoder_tokens"] * jax.process_count() / dt
            if flops and peak and not in_skip:
                m["mfu"] = flops / dt / peak
            losses[step + 1] = float(m.get("loss", float("nan")))
            if not in_skip and int(m["skips_in_a_row"]) >= run.max_consecutive_skips:
                raise NonFiniteError(f"stage {run.stage}: {int(m['skips_in_a_row'])} consecutive steps with a "
                                     f"non-finite loss or gradient (last at step {step + 1}); stopping")
            if primary:
                writer.write(step + 1, m)
                if not quiet and ((step + 1) % run.log_interval == 0 or step + 1 == total):
                    mx.progress_line(step + 1, total, m)
            if callback is not None:
                callback(step + 1, m, lambda: setattr(stop, "signal", "callback"))
            if stop.signal is not None and step + 1 < total:
                ckpt.save(step + 1, state, data_state, meta)
                ckpt.wait()
                raise Preempted(f"stopped by {stop.signal} after step {step + 1}; checkpoint in {ckpt.directory}")
            if run.save_steps > 0 and (step + 1) % run.save_steps == 0 and step + 1 < total:
                ckpt.save(step + 1, state, data_state, meta)
            t_last = time.perf_counter()
        if total > start or ckpt.latest_step() != total:
            ckpt.save(total, state, source.get_state(), meta)
        ckpt.wait()
        out = {"stage": run.stage, "losses": losses, "total_steps": total, "checkpoints": ckpt.directory}
        if export_final:
            out["export"] = export(run.export_dir, state["params"], model, src.tokenizers_from)
        out["state"] = state
        del t_last
        return out
    finally:
        stop.restore()
        writer.close()
        ckpt.close()


def _abstract_state(abstract_params, optimizer, spec, seed, mesh):
    def build(params):
        train, _ = split(params, spec)
        return {"params": params, "opt_state": optimizer.init(train), "step": jnp.int32(0),
                "sched_step": jnp.int32(0), "rng": jax.random.PRNGKey(seed),
                "skips_in_a_row": jnp.int32(0), "skipped": jnp.int32(0)}

    return abstract_state(jax.eval_shape(build, abstract_params), mesh)


def _host_counts(batch) -> dict:
    return {"decoder_tokens": int(np.sum(batch["num_tokens"])),
            "decoder_tokens_padded": int(np.asarray(batch["input_ids"]).size),
            "encoder_tokens": int(np.sum(batch["num_enc_tokens"])),
            "latents": int(np.sum(batch["latent_valid"])),
            "supervised_tokens": int(np.sum(batch["num_supervised"]))}


# ---------------------------------------------------------------------- all stages
def run_pipeline(raw: dict, output_dir: str | None, overrides=(), stages=None, **kw) -> list[dict]:
    """Stages in order, each from the previous stage's export with a fresh optimizer (skips stages whose
    export already exists, like ``run_pipeline.sh``)."""
    from lclm_jax.train.config import resolve

    results, previous = [], None
    for n in (stages if stages is not None else stage_keys(raw)):
        run = resolve(raw, n, output_dir, overrides)
        if os.path.exists(os.path.join(run.export_dir, "model_config.json")):
            print(f"stage {n}: export {run.export_dir} exists, skipping", flush=True)
            results.append({"stage": n, "export": run.export_dir, "losses": {}})
        else:
            res = train_stage(run, previous_export=previous, **kw)
            res.pop("state", None)
            results.append(res)
        previous = run.export_dir
    return results


__all__ = ["train_stage", "run_pipeline", "Preempted", "NonFiniteError", "read_any", "state_shardings"]
