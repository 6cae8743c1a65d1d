"""Checkpoints: kill -> resume is bit-identical, signal saves, damaged checkpoints, mesh changes, convert."""

import os
import shutil
import signal

import jax
import numpy as np
import pytest

from lclm_jax import sharding as sh
from lclm_jax.train.config import resolve
from lclm_jax.train.loop import Preempted, train_stage

from tests.test_train_step import tiny_raw


def _run(out, **jx):
    raw = tiny_raw()
    raw["jax"].update(async_checkpoints=True, keep_checkpoints=3, tensorboard=False, **jx)
    return resolve(raw, 0, out)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    res = train_stage(_run(out), quiet=True)
    return out, res


def test_kill_and_resume_is_bit_identical(uninterrupted, tmp_path):
    _, full = uninterrupted
    run = _run(str(tmp_path))
    with pytest.raises(Preempted):  # SIGTERM after step 2: checkpoint, then stop
        train_stage(run, quiet=True, callback=lambda step, m, stop: step == 2 and os.kill(os.getpid(), signal.SIGTERM))
    ckdir = os.path.join(run.stage_dir, "checkpoints")
    assert "2" in os.listdir(ckdir)
    rest = train_stage(run, quiet=True)
    assert sorted(rest["losses"]) == [3, 4, 5, 6]
    for k, v in rest["losses"].items():
        assert v == full["losses"][k]  # bit-identical
    for a, b in zip(jax.tree_util.tree_leaves(full["state"]["params"]), jax.tree_util.tree_leaves(rest["state"]["params"])):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_damaged_latest_checkpoint_falls_back(uninterrupted, tmp_path):
    src, full = uninterrupted
    run = _run(str(tmp_path))
    shutil.copytree(src, str(tmp_path), dirs_exist_ok=True)
    ckdir = os.path.join(run.stage_dir, "checkpoints")
    assert sorted(os.listdir(ckdir))[-2:] == ["3", "6"]
    shutil.rmtree(os.path.join(ckdir, "6", "state"))  # a damaged newest step
    os.makedirs(os.path.join(ckdir, "7.orbax-checkpoint-tmp-1"))  # an interrupted save
    shutil.rmtree(run.export_dir)
    rest = train_stage(run, quiet=True)
    assert sorted(rest["losses"]) == [4, 5, 6]
    assert all(rest["losses"][k] == full["losses"][k] for k in (4, 5, 6))


def test_restore_into_other_mesh(uninterrupted, tmp_path):
    from lclm_jax.checkpoint.orbax_io import TrainCheckpointer
    from lclm_jax.train.state import abstract_state

    src, full = uninterrupted
    state8 = full["state"]
    ck = TrainCheckpointer(str(tmp_path / "ck"), keep=2, async_save=False)
    ck.save(1, state8, {"index": 1}, {"m": 1})
    one = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    step, st1, data, _ = ck.restore_latest(abstract_state(state8, one))
    assert step == 1 and data == {"index": 1}
    assert all(len(a.sharding.device_set) == 1 for a in jax.tree_util.tree_leaves(st1))
    ck.save(2, st1, {"index": 2}, {"m": 2})  # 1 device -> 8 devices
    eight = sh.make_mesh(1, 8, 1)
    st8, _, _ = ck.restore(2, abstract_state(state8, eight))
    emb = st8["params"]["decoder"]["model"]["embed_tokens"]["embedding"]
    assert len(emb.sharding.device_set) == 8
    for a, b in zip(jax.tree_util.tree_leaves(state8), jax.tree_util.tree_leaves(st8)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    ck.close()


def test_convert_orbax_to_hf_same_logits(uninterrupted, tmp_path):
    import lclm_jax
    from lclm_jax.checkpoint.convert import convert_main

    src, full = uninterrupted
    ckdir = os.path.join(_run(src).stage_dir, "checkpoints")
    convert_main(["--src", ckdir, "--dst", str(tmp_path / "hf"), "--to", "hf"])
    a = lclm_jax.load(ckdir, dtype="float32")
    b = lclm_jax.load(str(tmp_path / "hf"), dtype="float32")
    prompt = "the river <|memory_start|>memory latent context encoder decoder window<|memory_end|> and"
    la, lb = a.logits(prompt), b.logits(prompt)
    assert np.array_equal(la, lb)
    # the trained params themselves went through unchanged
    emb = np.asarray(full["state"]["params"]["decoder"]["model"]["embed_tokens"]["embedding"])
    assert np.array_equal(np.asarray(b.params["decoder"]["model"]["embed_tokens"]["embedding"]), emb)
