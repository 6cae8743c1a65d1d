"""Parity with transformers' Qwen3 on tiny random configs (fp32, max abs logit difference <= 1e-4)."""

import numpy as np
import pytest
import torch

import lclm_jax
from tests import hf_models

TOL = 1e-4


def _ids(rng, b, t, vocab=300):
    return rng.integers(0, vocab, size=(b, t)).astype(np.int64)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tied")
    model = hf_models.make_causal_lm(path, tie=True, seed=1)
    return path, model


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("untied")
    model = hf_models.make_causal_lm(path, tie=False, seed=2, num_attention_heads=8, num_key_value_heads=2,
                                     head_dim=16)
    return path, model


def _report(name, diff):
    print(f"[parity] {name}: max |logit diff| = {diff:.3e}")


@pytest.mark.parametrize("which", ["tied_dir", "untied_dir"])
def test_long_prompt_logits(which, request):
    path, hf = request.getfixturevalue(which)
    ids = _ids(np.random.default_rng(0), 1, 288)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    ours = lclm_jax.load_qwen3(path).logits(ids)
    diff = float(np.abs(ours - ref).max())
    _report(f"{which} T=288", diff)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert diff <= TOL


def test_left_padded_batch(tied_dir):
    path, hf = tied_dir
    rng = np.random.default_rng(1)
    ids = _ids(rng, 3, 40)
    mask = np.ones_like(ids)
    mask[1, :13] = 0
    mask[2, :39] = 0
    ids[mask == 0] = 0
    lm = lclm_jax.load_qwen3(path)
    ours = lm.logits(ids, mask)
    with torch.no_grad():
        tm = torch.from_numpy(mask)
        pos = (tm.cumsum(-1) - 1).clamp(min=0)
        ref = hf(torch.from_numpy(ids), attention_mask=tm, position_ids=pos).logits.numpy()
    valid = mask.astype(bool)
    diff = float(np.abs(ours - ref)[valid].max())
    _report("left-padded batch", diff)
    assert diff <= TOL
    # each row equals the same prompt run alone, unpadded
    for b in range(3):
        alone = lm.logits(ids[b:b + 1, ~(mask[b] == 0)])
        assert np.abs(alone[0] - ours[b, valid[b]]).max() <= TOL


@pytest.mark.parametrize("bidirectional", [False, True])
def test_backbone_hidden_states(tmp_path, bidirectional):
    hf = hf_models.make_backbone(tmp_path, seed=3)
    rng = np.random.default_rng(2)
    ids = _ids(rng, 2, 24)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ours = lclm_jax.load_qwen3(tmp_path).hidden_states(ids, mask, bidirectional=bidirectional)
    tm = torch.from_numpy(mask)
    pos = (tm.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        am = hf_models.bidirectional_4d_mask(tm) if bidirectional else tm
        ref = hf(torch.from_numpy(ids), attention_mask=am, position_ids=pos).last_hidden_state.numpy()
    diff = float(np.abs(ours - ref)[mask.astype(bool)].max())
    _report(f"backbone bidirectional={bidirectional}", diff)
    assert diff <= TOL
    # bidirectional really differs from causal (the mask is not silently causal)
    other = lclm_jax.load_qwen3(tmp_path).hidden_states(ids, mask, bidirectional=not bidirectional)
    assert np.abs(other - ours)[mask.astype(bool)].max() > 1e-3


def test_backbone_has_no_logits(tmp_path):
    hf_models.make_backbone(tmp_path, seed=4)
    with pytest.raises(ValueError, match="headless"):
        lclm_jax.load_qwen3(tmp_path).logits(np.zeros((1, 4), np.int64))
