"""Train step invariances: schedule, accumulation, sharding, frozen parts, memory rows, NaN skipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclm_jax import sharding as sh
from lclm_jax.train import optim
from lclm_jax.train.config import resolve
from lclm_jax.train.data import SyntheticSource, batch_config
from lclm_jax.train.loop import build_model, init_source, initial_params
from lclm_jax.train.state import TrainSpec, new_state, split
from lclm_jax.train.step import (DEVICE_KEYS, grads_and_loss, jit_train_step, make_train_step,
                                 span_ids_and_positions)

CKPT = "tests/fixtures/lclm_golden/mean_causal_cr4_w16/checkpoint"
MEM = (509, 510, 511)


def tiny_raw(**stage):
    return {"experiment": "t",
            "models": {"encoder": f"{CKPT}/encoder", "decoder": f"{CKPT}/decoder", "pooling": "mean",
                       "encoder_window_size": 16, "mask": "causal", "adapter_type": "mlp"},
            "training": {"compression_ratio": 4, "max_steps": 6, "save_steps": 3, "warmup_steps": 2,
                         "decoder_gradient_checkpointing": False},
            "stages": {0: {"train_decoder": False, "train_encoder": False, "adapter_lr": 3e-3, "decoder_lr": 1e-3,
                           "min_lr": 1e-5, "train_batch_size": 8, "dataset": "synthetic", **stage},
                       2: {"train_decoder": True, "train_encoder": True, "adapter_lr": 1e-3, "encoder_lr": 1e-3,
                           "decoder_lr": 1e-3, "min_lr": 1e-5, "train_batch_size": 8, "dataset": "synthetic",
                           "decoder_weight_decay": 0.01}},
            "jax": {"dtype": "float32", "seq_len": 64, "max_windows": 4}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train_step"))
    run0 = resolve(tiny_raw(), 0, out)
    src = init_source(run0)
    model = build_model(run0, src)
    batch = next(SyntheticSource(batch_config(run0, memory_ids=MEM), seed=1, memory_end_id=MEM[1]))
    return {"run0": run0, "run2": resolve(tiny_raw(), 2, out), "src": src, "model": model,
            "batch": {k: batch[k] for k in DEVICE_KEYS}}


def _state_and_step(s, run, mesh, total=6):
    """A fresh state; the compiled step is cached per (stage, mesh) in the module fixture."""
    spec = TrainSpec.from_run(run, MEM)
    key = ("fn", run.stage, mesh.devices.size)
    params = initial_params(s["model"], s["src"], run.seed, mesh)
    abstract = jax.eval_shape(lambda p: split(p, spec)[0], params)
    opt = optim.make_optimizer(run, abstract)
    state = new_state(params, opt, spec, run.seed, mesh)
    shard = jax.tree_util.tree_map(lambda a: a.sharding, state)
    bsh = {k: sh.batch_sharding(mesh, v.ndim, shape=v.shape) for k, v in s["batch"].items()}
    if key not in s:
        s[key] = jit_train_step(make_train_step(s["model"], opt, spec, run, total), shard, bsh)
    return state, s[key], spec, opt


def test_lr_schedule_values():
    f = optim.lr_schedule(1e-3, 1e-6, warmup=10, total=110, offset=1.0)
    assert float(f(0)) == pytest.approx(1e-4)  # k = 1
    assert float(f(9)) == pytest.approx(1e-3)  # k = 10, end of warmup
    assert float(f(59)) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
    assert float(f(109)) == pytest.approx(1e-6, rel=1e-4)  # k = total
    assert float(f(500)) == pytest.approx(1e-6, rel=1e-4)
    c = optim.lr_schedule(2e-3, 0.0, warmup=4, total=100, kind="constant")
    assert float(c(1)) == pytest.approx(1e-3) and float(c(50)) == pytest.approx(2e-3)


def test_span_ids_from_placeholders():
    ph = jnp.array([[3, 4, 5, 9, 10, 0], [1, 2, 7, 0, 0, 0]])
    valid = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)
    ids, pos = span_ids_and_positions(ph, valid)
    assert ids.tolist() == [0, 0, 0, 1, 1, -1, 6, 6, 7, -1, -1, -1]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 0, 1, 0, 0, 0, 0]


def test_grad_accumulation_equals_big_batch(setup):
    s = setup
    run = s["run0"]  # adapter + memory rows: gradients still flow through the whole decoder
    spec = TrainSpec.from_run(run, MEM)
    params = s["model"].init(jax.random.PRNGKey(0))
    train, frozen = split(params, spec)
    f = jax.jit(lambda t, fr, b, n: grads_and_loss(s["model"], spec, t, fr, b, n, 32), static_argnums=3)
    l1, g1, c1 = f(train, frozen, s["batch"], 1)
    l4, g4, c4 = f(train, frozen, s["batch"], 2)
    assert int(c1) == int(c4) > 0
    np.testing.assert_allclose(float(l4), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g4)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7)


def test_sharded_step_equals_single_device(setup):
    s = setup
    out = {}
    for name, mesh in (("8", sh.make_mesh(1, 8, 1)), ("1", sh.make_mesh(1, 1, 1, devices=jax.devices()[:1]))):
        state, fn, _, _ = _state_and_step(s, s["run2"], mesh)
        losses = []
        for _ in range(2):
            state, m = fn(state, s["batch"])
            losses.append(float(m["loss"]))
        out[name] = (losses, float(m["grad_norm"]), jax.tree_util.tree_map(np.asarray, state["params"]))
    np.testing.assert_allclose(out["8"][0], out["1"][0], rtol=1e-5)
    np.testing.assert_allclose(out["8"][1], out["1"][1], rtol=1e-4)
    # Adam's first steps divide each gradient by its own magnitude, so a parameter with a near-zero gradient
    # turns summation-order noise between the two compilations into ~1e-5 absolute; loss and grad norm above
    # are the tight checks.
    for a, b in zip(jax.tree_util.tree_leaves(out["8"][2]), jax.tree_util.tree_leaves(out["1"][2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_stage0_trains_only_adapter_and_memory_rows(setup):
    s = setup
    mesh = sh.make_mesh(1, 8, 1)
    state, fn, spec, _ = _state_and_step(s, s["run0"], mesh)
    before = jax.tree_util.tree_map(np.array, state["params"])
    losses = []
    for _ in range(4):
        state, m = fn(state, s["batch"])
        losses.append(float(m["loss"]))
    after = jax.tree_util.tree_map(np.asarray, state["params"])
    # frozen encoder: bit-identical
    for a, b in zip(jax.tree_util.tree_leaves(before["encoder"]), jax.tree_util.tree_leaves(after["encoder"])):
        assert np.array_equal(a, b)
    # decoder: only the three memory-token embedding rows moved
    eb = before["decoder"]["model"]["embed_tokens"]["embedding"]
    ea = after["decoder"]["model"]["embed_tokens"]["embedding"]
    changed = np.flatnonzero(np.any(ea != eb, axis=1))
    assert set(changed.tolist()) <= set(MEM) and len(changed) >= 2
    dec_b = dict(before["decoder"]["model"]); dec_b.pop("embed_tokens")
    dec_a = dict(after["decoder"]["model"]); dec_a.pop("embed_tokens")
    for a, b in zip(jax.tree_util.tree_leaves(dec_b), jax.tree_util.tree_leaves(dec_a)):
        assert np.array_equal(a, b)
    # adapter trains; no optimizer state for frozen parts
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before["adapter"]),
                                                         jax.tree_util.tree_leaves(after["adapter"])))
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]))
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(split(state["params"], spec)[0]))
    assert n_opt < 2 * n_train + 64
    assert losses[-1] < losses[0]  # same batch: the loss must fall


def test_nonfinite_step_is_skipped(setup):
    s = setup
    mesh = sh.make_mesh(1, 8, 1)
    state, fn, _, _ = _state_and_step(s, s["run0"], mesh)
    state, m = fn(state, s["batch"])
    assert bool(m["finite"])
    bad = jax.tree_util.tree_map(lambda a: a, state)
    k = bad["params"]["adapter"]["fc1"]["kernel"]
    bad["params"]["adapter"]["fc1"]["kernel"] = k.at[0, 0].set(jnp.nan)
    before = jax.tree_util.tree_map(np.array, bad["opt_state"])
    new, m = fn(bad, s["batch"])
    assert not bool(m["finite"]) and int(m["skipped"]) == 1 and int(m["skips_in_a_row"]) == 1
    assert int(new["sched_step"]) == 1 and int(new["step"]) == 2
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(new["opt_state"])):
        assert np.array_equal(a, np.asarray(b), equal_nan=True)


def test_reference_yaml_schema_and_overrides():
    from lclm_jax.train.config import load_yaml

    raw = load_yaml("experiments/configs/0.6b-4b-cs16-mean-w1024-causal-mlp-O0.yaml")
    r0 = resolve(raw, 0, "/tmp/x", ["training.max_steps=7", "stages.0.adapter_lr=5e-4", "jax.mesh.fsdp=2"])
    assert r0.experiment == "Qwen3-Embedding-0.6B-Qwen3-4B-Instruct-2507-cs16-w1024-mean-mlp-causal"
    assert (r0.max_steps, r0.lr["adapter"], r0.mesh["fsdp"], r0.warmup_steps) == (7, 5e-4, 2, 250)
    assert not r0.train_encoder and not r0.train_decoder and r0.trains_memory_rows
    assert "training.use_liger_kernel" in r0.ignored and "stages.0.distributed" in r0.ignored
    r2 = resolve(raw, 2, "/tmp/x")
    assert r2.train_decoder and r2.lr["decoder"] == 1e-5 and r2.encoder_remat == "full"
    assert r2.betas["decoder"] == (0.9, 0.95) and r2.weight_decay["encoder"] == 0.01
