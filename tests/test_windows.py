"""Encoder windowing: the spec's worked examples, pooling indices, bucketing invariance."""

import json
import pathlib

import numpy as np
import pytest

from lclm_jax.lclm.windows import (
    EncoderBatch,
    WindowConfig,
    build_encoder_batch,
    default_length,
    num_latents,
    pool_numpy,
)

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "lclm_golden"
GOLDEN_NAMES = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").exists())

PAD = 0


def _span(T, seed=0):
    return np.random.default_rng(seed).integers(1, 500, size=T).astype(np.int32)


def _describe(batch: EncoderBatch, cfg: WindowConfig):
    """Per real window: (offset, left, pool, right, full length, latents), read back from a mean or
    concat batch (eos batches pool markers, not the pool region)."""
    assert cfg.pooling != "eos"
    L = batch.input_ids.shape[1]
    owner = batch.pool_index[: batch.num_latents, 0] // L
    rows, offset = [], 0
    for w in range(batch.num_windows):
        lat = np.flatnonzero(owner == w)
        full = int(batch.valid[w].sum())
        members = batch.pool_index[lat][batch.pool_mask[lat]] - w * L
        left, pool = int(members.min()), int(batch.pool_mask[lat].sum())
        right = full - left - pool
        assert np.array_equal(members, np.arange(left, left + pool))  # contiguous pool region
        rows.append((offset, left, pool, right, full, len(lat)))
        offset += pool
    return rows


def test_worked_example_causal_mean():
    cfg = WindowConfig(16, 1024, 0, False, "mean")
    b = build_encoder_batch([_span(2500)], cfg, PAD)
    assert _describe(b, cfg) == [
        (0, 0, 1024, 0, 1024, 64),
        (1024, 0, 1024, 0, 1024, 64),
        (2048, 0, 452, 0, 452, 29),
    ]
    assert b.span_latent_counts == (157,) and b.num_latents == 157 and b.num_windows == 3
    assert b.pool_mask[156].sum() == 4 and b.pool_mask[:156].all()  # last group: 452 = 28*16 + 4
    assert b.input_ids.shape == (3, 1024)


def test_worked_example_bidirectional_overlap():
    cfg = WindowConfig(16, 1024, 256, True, "mean")
    ids = _span(2500)
    b = build_encoder_batch([ids], cfg, PAD)
    assert _describe(b, cfg) == [
        (0, 0, 1024, 256, 1280, 64),
        (1024, 256, 1024, 256, 1536, 64),
        (2048, 256, 452, 0, 708, 29),
    ]
    assert b.input_ids.shape == (3, 1536)  # batch width 1536
    np.testing.assert_array_equal(b.input_ids[1, :1536], ids[768:2304])
    np.testing.assert_array_equal(b.input_ids[2, :708], ids[1792:2500])
    assert b.positions[1, 256] == 256  # pool tokens of a later window start at position O


def test_worked_example_eos_markers():
    cfg = WindowConfig(16, 1024, 0, False, "eos")
    ids = _span(2500)
    b = build_encoder_batch([ids], cfg, PAD)
    assert [int(v) for v in b.valid.sum(1)] == [1088, 1088, 481]
    assert b.pool_index.shape == (157, 1) and b.pool_mask.all()
    L = b.input_ids.shape[1]
    flat_ids, flat_valid = b.input_ids.reshape(-1), b.valid.reshape(-1)
    assert np.all(flat_ids[b.pool_index[:, 0]] == PAD) and flat_valid[b.pool_index[:, 0]].all()
    np.testing.assert_array_equal(b.pool_index[:64, 0], np.arange(1024, 1088))
    np.testing.assert_array_equal(b.pool_index[128:, 0], 2 * L + np.arange(452, 481))
    np.testing.assert_array_equal(b.positions[2, :481], np.arange(481))  # markers continue the positions
    np.testing.assert_array_equal(b.input_ids[2, :452], ids[2048:])


def test_worked_example_small_windows():
    cfg = WindowConfig(16, 256, 64, True, "mean")
    b = build_encoder_batch([_span(2500)], cfg, PAD)
    rows = _describe(b, cfg)
    assert len(rows) == 10
    assert rows[0] == (0, 0, 256, 64, 320, 16)
    assert rows[1:9] == [(256 * k, 64, 256, 64, 384, 16) for k in range(1, 9)]
    assert rows[9] == (2304, 64, 196, 0, 260, 13)
    assert sum(r[-1] for r in rows) == 157


def test_right_overlap_only_when_bidirectional():
    assert WindowConfig(16, 1024, 256, False).right_overlap == 0
    assert WindowConfig(16, 1024, 256, True).right_overlap == 256
    cfg = WindowConfig(16, 1024, 256, False, "mean")
    rows = _describe(build_encoder_batch([_span(2500)], cfg, PAD), cfg)
    assert [r[1:5] for r in rows] == [(0, 1024, 0, 1024), (256, 1024, 0, 1280), (256, 452, 0, 708)]


def test_default_length():
    assert default_length(WindowConfig(16, 1024, 256, True, "eos")) == 1024 + 512 + 64
    assert default_length(WindowConfig(16, 1024, 256, False, "mean")) == 1280
    assert default_length(WindowConfig(4, 16, 4, True, "eos")) == 28
    cfg = WindowConfig(16, 256, 64, True, "eos")
    b = build_encoder_batch([_span(2500)], cfg, PAD, length_bucket=default_length(cfg))
    assert int(b.valid.sum(1).max()) == default_length(cfg) == b.input_ids.shape[1]


def test_partial_last_group_and_padding_layout():
    cfg = WindowConfig(4, 16, 0, False, "mean")
    b = build_encoder_batch([_span(10), _span(3, 1)], cfg, PAD)
    assert b.span_latent_counts == (3, 1)
    np.testing.assert_array_equal(b.pool_mask.sum(1), [4, 4, 2, 3])
    assert b.input_ids.shape == (2, 16)  # longest row 10 rounded up to 8
    assert b.valid[0, :10].all() and not b.valid[0, 10:].any()  # real tokens first
    assert np.all(b.input_ids[~b.valid] == PAD) and np.all(b.positions[~b.valid] == 0)
    np.testing.assert_array_equal(b.positions[1, :3], [0, 1, 2])
    assert np.all(b.pool_index[~b.pool_mask] == 0)


def _reference_pool(spans, cfg, hidden_of):
    """The spec's per-window algorithm on unpadded hidden states; hidden_of(w, n) -> [n, H]."""
    W, O, R, cr = cfg.window_size, cfg.overlap, cfg.right_overlap, cfg.compression_ratio
    out, rows, w = [], [], 0
    for ids in spans:
        T = len(ids)
        for off in range(0, T, W):
            pool_len = min(W, T - off)
            n_lat = -(-pool_len // cr)
            left = off - max(0, off - O)
            right = min(T, off + pool_len + R) - (off + pool_len)
            seq_len = left + pool_len + right + (n_lat if cfg.pooling == "eos" else 0)
            hs = hidden_of(w, seq_len)
            markers = [PAD] * (seq_len - left - pool_len - right)
            rows.append(np.concatenate([ids[off - left : off + pool_len + right], markers]))
            if cfg.pooling == "eos":
                out += list(hs[seq_len - n_lat :])
            else:
                region = hs[left : left + pool_len]
                for g in range(0, pool_len, cr):
                    grp = region[g : g + cr]
                    if cfg.pooling == "mean":
                        out.append(grp.mean(0))
                    else:
                        flat = grp.reshape(-1)
                        out.append(np.concatenate([flat, np.zeros(cr * hs.shape[1] - flat.size)]))
            w += 1
    return np.stack(out), rows


CONFIGS = [
    WindowConfig(4, 16, 0, False, "mean"),
    WindowConfig(4, 16, 4, True, "mean"),
    WindowConfig(4, 16, 4, False, "concat"),
    WindowConfig(4, 16, 4, True, "eos"),
    WindowConfig(4, 8, 3, False, "eos"),
    WindowConfig(8, 32, 8, True, "mean"),
    WindowConfig(16, 32, 0, False, "concat"),
]


def _cfg_id(c):
    mask = "bi" if c.bidirectional else "causal"
    return f"{c.pooling}-cr{c.compression_ratio}-w{c.window_size}-o{c.overlap}-{mask}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_pool_numpy_matches_reference_and_buckets(cfg):
    rng = np.random.default_rng(0)
    spans = [_span(t, s) for s, t in enumerate([1, 3, 16, 17, 43, 7])]
    H = 5
    table = rng.standard_normal((64, 96, H)).astype(np.float64)  # hidden state per (window, row position)
    expect, rows = _reference_pool(spans, cfg, lambda w, n: table[w, :n])

    plain = build_encoder_batch(spans, cfg, PAD)
    for w, row in enumerate(rows):
        n = len(row)
        np.testing.assert_array_equal(plain.input_ids[w, :n], row)
        np.testing.assert_array_equal(plain.positions[w, :n], np.arange(n))
        assert plain.valid[w, :n].all() and not plain.valid[w, n:].any()
    nw, L = plain.input_ids.shape
    got = pool_numpy(table[:nw, :L], plain, cfg.pooling)
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-12)
    assert got.shape[1] == (cfg.compression_ratio * H if cfg.pooling == "concat" else H)

    bucketed = build_encoder_batch(
        spans, cfg, PAD, window_bucket=8, length_bucket=default_length(cfg) + 5, latent_bucket=32
    )
    nwb, Lb = bucketed.input_ids.shape
    assert nwb % 8 == 0 and Lb == default_length(cfg) + 5 and bucketed.pool_index.shape[0] % 32 == 0
    assert bucketed.num_windows == plain.num_windows == nw
    assert not bucketed.valid[nw:].any() and np.all(bucketed.input_ids[nw:] == PAD)
    assert bucketed.span_latent_counts == plain.span_latent_counts
    gotb = pool_numpy(table[:nwb, :Lb], bucketed, cfg.pooling)
    C = plain.num_latents
    np.testing.assert_allclose(gotb[:C], got, rtol=0, atol=1e-12)
    assert np.all(gotb[C:] == 0)
    assert bucketed.latent_valid[:C].all() and not bucketed.latent_valid[C:].any()
    assert not bucketed.pool_mask[C:].any()


def test_concat_zero_fill():
    cfg = WindowConfig(4, 16, 0, False, "concat")
    b = build_encoder_batch([_span(6)], cfg, PAD)  # groups of 4 and 2
    hidden = np.arange(1, 1 + 8 * 3, dtype=np.float32).reshape(1, 8, 3)
    out = pool_numpy(hidden, b, "concat")
    assert out.shape == (2, 12)
    np.testing.assert_array_equal(out[0], hidden[0, :4].reshape(-1))
    np.testing.assert_array_equal(out[1], np.concatenate([hidden[0, 4:6].reshape(-1), np.zeros(6)]))
    mean = pool_numpy(hidden, build_encoder_batch([_span(6)], WindowConfig(4, 16), PAD), "mean")
    np.testing.assert_allclose(mean[1], hidden[0, 4:6].mean(0))  # partial group averaged over 2 rows


def test_latent_count_consistency():
    rng = np.random.default_rng(3)
    for cfg in CONFIGS:
        lens = [int(t) for t in rng.integers(1, 200, size=7)]
        b = build_encoder_batch([_span(t) for t in lens], cfg, PAD)
        cr = cfg.compression_ratio
        assert b.span_latent_counts == tuple(num_latents(t, cr) for t in lens)
        assert sum(b.span_latent_counts) == sum(-(-t // cr) for t in lens) == b.num_latents


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_fixture_latent_counts(name):
    with open(GOLDEN / name / "checkpoint" / "model_config.json") as f:
        mc = json.load(f)
    with open(GOLDEN / name / "cases.json") as f:
        cases = json.load(f)["cases"]
    golden = np.load(GOLDEN / name / "golden.npz")
    cfg = WindowConfig(
        mc["compression_ratio"], mc["encoder_window_size"], mc.get("boundary_overlap", 0),
        mc["encoder_mask_type"] == "bidirectional", mc["pooling"],
    )
    for i, case in enumerate(cases):
        spans = [golden[f"mem_ids_{i}_{j}"] for j in range(case["n_spans"])]
        b = build_encoder_batch(spans, cfg, 0)
        assert list(b.span_latent_counts) == case["latent_counts"]
        if f"pooled_{i}" in golden and spans:
            assert golden[f"pooled_{i}"].shape[0] == b.num_latents


def test_validation_errors():
    with pytest.raises(ValueError, match="multiple of compression_ratio"):
        WindowConfig(16, 1000)
    with pytest.raises(ValueError, match="pooling must be one of"):
        WindowConfig(4, 16, pooling="max")
    with pytest.raises(ValueError, match="overlap"):
        WindowConfig(4, 16, overlap=-1)
    with pytest.raises(ValueError, match="compression_ratio"):
        WindowConfig(0, 16)
    cfg = WindowConfig(4, 16)
    with pytest.raises(ValueError, match="span 1 is empty"):
        build_encoder_batch([_span(3), np.zeros(0, np.int32)], cfg, PAD)
    with pytest.raises(ValueError, match="length_bucket"):
        build_encoder_batch([_span(16)], cfg, PAD, length_bucket=8)
    with pytest.raises(ValueError, match="positive"):
        num_latents(0, 4)
    b = build_encoder_batch([_span(5)], cfg, PAD)
    with pytest.raises(ValueError, match="does not match"):
        pool_numpy(np.zeros((1, 8, 2)), b, "eos")
    with pytest.raises(ValueError, match="window grid"):
        pool_numpy(np.zeros((2, 8, 2)), b, "mean")


def test_no_spans_gives_empty_or_bucketed_grid():
    cfg = WindowConfig(4, 16)
    b = build_encoder_batch([], cfg, PAD)
    assert b.num_windows == 0 and b.num_latents == 0 and b.input_ids.shape[0] == 0
    b = build_encoder_batch([], cfg, PAD, window_bucket=2, latent_bucket=4, length_bucket=16)
    assert b.input_ids.shape == (2, 16) and b.pool_index.shape == (4, 4) and not b.latent_valid.any()
