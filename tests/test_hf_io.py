"""Safetensors I/O: round trips, sharding, dtypes, and strict errors that name the tensor."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import lclm_jax
from lclm_jax.checkpoint import safetensors_io as st
from lclm_jax.checkpoint.hf_io import CheckpointError, read_qwen3, write_qwen3
from tests import hf_models


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_models.make_causal_lm(path, tie=False, seed=5)
    return path


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _same_files(a, b):
    fa = st.SafetensorsFile(a)
    fb = st.SafetensorsFile(b)
    assert sorted(fa.keys()) == sorted(fb.keys())
    for k in fa.keys():
        assert fa.dtype_tag(k) == fb.dtype_tag(k) and fa.shape(k) == fb.shape(k)
        assert fa.get(k).tobytes() == fb.get(k).tobytes(), k


def test_read_write_read_bit_exact(hf_dir, tmp_path):
    cfg, params = read_qwen3(hf_dir)
    write_qwen3(params, cfg, tmp_path / "out")
    cfg2, params2 = read_qwen3(tmp_path / "out")
    assert cfg2 == cfg
    a, b = _flat(params), _flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    _same_files(hf_dir / "model.safetensors", tmp_path / "out" / "model.safetensors")
    # the config keys HF wrote survive
    orig = json.load(open(hf_dir / "config.json"))
    new = json.load(open(tmp_path / "out" / "config.json"))
    assert set(orig) <= set(new)


def test_sharded_and_bf16(hf_dir, tmp_path):
    cfg, params = read_qwen3(hf_dir)
    write_qwen3(params, cfg, tmp_path / "sh", dtype="bfloat16", max_shard_bytes=40_000)
    index = json.load(open(tmp_path / "sh" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    f = st.SafetensorsFile(tmp_path / "sh" / sorted(set(index["weight_map"].values()))[0])
    assert {f.dtype_tag(k) for k in f.keys()} == {"BF16"}
    cfg2, p2 = read_qwen3(tmp_path / "sh", dtype="bfloat16")
    for k, v in _flat(p2).items():
        assert v.dtype == np.dtype(ml_dtypes.bfloat16)
        assert np.array_equal(v, _flat(params)[k].astype(ml_dtypes.bfloat16)), k
    # bf16 -> write -> read is bit-exact too
    write_qwen3(p2, cfg2, tmp_path / "sh2", max_shard_bytes=40_000)
    for name in sorted(set(index["weight_map"].values())):
        _same_files(tmp_path / "sh" / name, tmp_path / "sh2" / name)


def test_reads_files_written_by_torch_bf16(tmp_path):
    import torch
    model = hf_models.make_causal_lm(tmp_path / "f32", tie=True, seed=6)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    lm = lclm_jax.load_qwen3(tmp_path / "bf16", dtype="float32")
    emb = model.model.embed_tokens.weight.detach().float().numpy()
    assert np.array_equal(np.asarray(lm.params["model"]["embed_tokens"]["embedding"]), emb)


def test_our_writer_is_read_by_safetensors(hf_dir, tmp_path):
    cfg, params = read_qwen3(hf_dir)
    write_qwen3(params, cfg, tmp_path / "o")
    loaded = safetensors.numpy.load_file(str(tmp_path / "o" / "model.safetensors"))
    ref = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
    assert loaded.keys() == ref.keys()
    assert all(np.array_equal(loaded[k], ref[k]) for k in ref)


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    t = safetensors.numpy.load_file(str(src / "model.safetensors"))
    edit(t)
    safetensors.numpy.save_file(t, str(dst / "model.safetensors"))


def test_missing_tensor_named(hf_dir, tmp_path):
    _rewrite(hf_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model.layers.1.mlp.up_proj.weight"):
        lclm_jax.load_qwen3(tmp_path / "m")


def test_unexpected_tensor_named(hf_dir, tmp_path):
    _rewrite(hf_dir, tmp_path / "u", lambda t: t.__setitem__("model.layers.9.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="unexpected tensors.*model.layers.9.extra.weight"):
        lclm_jax.load_qwen3(tmp_path / "u")


def test_misshaped_tensor_named(hf_dir, tmp_path):
    def edit(t):
        t["model.norm.weight"] = np.ones(65, np.float32)
    _rewrite(hf_dir, tmp_path / "s", edit)
    with pytest.raises(CheckpointError, match=r"wrong shape model.norm.weight: expected \[64\], found \[65\]"):
        lclm_jax.load_qwen3(tmp_path / "s")


def test_bad_config_and_files(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path / "c")
    cfg = json.load(open(tmp_path / "c" / "config.json"))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(tmp_path / "c" / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        lclm_jax.load_qwen3(tmp_path / "c")
    cfg["model_type"] = "qwen3"
    del cfg["rope_theta"]
    json.dump(cfg, open(tmp_path / "c" / "config.json", "w"))
    with pytest.raises(ValueError, match="missing required field 'rope_theta'"):
        lclm_jax.load_qwen3(tmp_path / "c")
    # truncated safetensors file
    shutil.copytree(hf_dir, tmp_path / "t")
    data = open(tmp_path / "t" / "model.safetensors", "rb").read()
    open(tmp_path / "t" / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="byte range|header"):
        lclm_jax.load_qwen3(tmp_path / "t")
    os.makedirs(tmp_path / "empty")
    shutil.copy(hf_dir / "config.json", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        lclm_jax.load_qwen3(tmp_path / "empty")
    with pytest.raises(ValueError, match="unsupported dtype"):
        lclm_jax.load_qwen3(hf_dir, dtype="int8")


def test_bad_inputs(hf_dir):
    lm = lclm_jax.load_qwen3(hf_dir)
    with pytest.raises(ValueError, match="must lie in"):
        lm.logits(np.array([[1, 2, 99999]]))
    with pytest.raises(ValueError, match="does not match"):
        lm.logits(np.array([[1, 2, 3]]), np.array([[1, 1]]))
    with pytest.raises(ValueError, match="integer array"):
        lm.logits(np.array([[1.5, 2.0]]))
