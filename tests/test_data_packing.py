"""Packing and batch collation: packed == unpacked, no label crosses a boundary, static shapes."""

import grain
import numpy as np
import pytest

from data_pipelines import records
from data_pipelines.batch import BatchConfig, check_batch, collate
from data_pipelines.common import IGNORE, SKIP_REASONS, check_example, skip_example, split_spans
from data_pipelines.cpt import CPTBuilder, CPTConfig
from data_pipelines.packing import PackIterDataset, example_cost, pack_examples, unpack
from data_pipelines.sft import SFTBuilder
from data_pipelines.testing import random_chats, random_documents, tiny_tokenizers
from lclm_jax.lclm.windows import build_encoder_batch


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizers(4)


@pytest.fixture(scope="module")
def examples(tok):
    rng = np.random.default_rng(0)
    cpt = CPTBuilder(tok, CPTConfig(min_segment_tokens=16, max_chars=10**6))
    sft = SFTBuilder(tok)
    out = [cpt(d, rng) for d in random_documents(40, seed=1, words=(60, 900))]
    out += [sft(c, rng) for c in random_chats(30, seed=2)]
    out = [e for e in out if e["skip"] < 0]
    order = np.random.default_rng(3).permutation(len(out))
    return [out[i] for i in order]


def _cfg(tok, **kw):
    base = dict(batch_size=2, seq_len=1024, window_size=16, max_windows=96, num_bins=4)
    base.update(kw)
    return BatchConfig.for_tokenizers(tok, **base)


def _packs(tok, examples, cfg):
    ds = PackIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), cfg.pack_config(),
                         tok.memory_start_id)
    return list(ds)


def test_pack_unpack_roundtrip_and_budgets(tok, examples):
    cfg = _cfg(tok)
    pcfg = cfg.pack_config()
    packs = _packs(tok, examples, cfg)
    got = [ex for p in packs for ex in unpack(p, tok.memory_start_id)]
    fits = [e for e in examples
            if all(c <= b for c, b in zip(example_cost(e, pcfg),
                                          (pcfg.seq_len, pcfg.max_windows, pcfg.latent_budget)))]
    assert sum(int(p["skipped"][SKIP_REASONS.index("too_long")]) for p in packs) == \
        len(examples) - len(fits)
    # Every example that fits comes back exactly once, unchanged (order within groups may vary).
    key = lambda e: (e["input_ids"].tobytes(), e["enc_ids"].tobytes())  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, fits))
    for e in got:
        check_example(e, tok)
    for p in packs:
        cost = np.sum([example_cost(e, pcfg) for e in unpack(p, tok.memory_start_id)], 0)
        assert cost[0] <= pcfg.seq_len and cost[1] <= pcfg.max_windows
        assert cost[2] <= pcfg.latent_budget
        assert records.decode(records.encode(p)).keys() == p.keys()
        for k, v in records.decode(records.encode(p)).items():
            assert np.array_equal(v, p[k]) and v.dtype == p[k].dtype


def test_no_supervised_label_crosses_a_boundary(tok, examples):
    cfg = _cfg(tok)
    for p in _packs(tok, examples, cfg):
        seg, lab, pos = p["segment_ids"], p["labels"], p["positions"]
        sup = lab != IGNORE
        starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
        assert not sup[starts].any()  # first label of every document (and of padding)
        t = np.flatnonzero(sup)
        assert np.all(seg[t] > 0) and np.all(seg[t - 1] == seg[t])  # predicted from same doc
        assert np.all(pos[seg > 0][np.diff(np.concatenate([[0], seg]))[seg > 0] != 0] == 0)
        assert np.all(lab[seg == 0] == IGNORE) and np.all(p["input_ids"][seg == 0] == cfg.pad_id)


def test_packed_batch_equals_its_unpacked_examples(tok, examples):
    cfg = _cfg(tok)
    packs = _packs(tok, examples, cfg)[:2]
    b = collate(packs, cfg)
    check_batch(b, cfg)
    d = cfg.dims()
    for r, p in enumerate(packs):
        exs = unpack(p, tok.memory_start_id)
        n = sum(len(e["input_ids"]) for e in exs)
        assert b["num_tokens"][r] == n  # padding is never counted
        assert b["num_supervised"][r] == sum(int((e["labels"] != IGNORE).sum()) for e in exs)
        assert np.array_equal(b["input_ids"][r, :n], np.concatenate([e["input_ids"] for e in exs]))
        # placeholders in latent order, latents pooled from the spans in the same order
        spans = [s for e in exs for s in split_spans(e)]
        eb = build_encoder_batch(spans, cfg.window_config(), cfg.encoder_pad_id,
                                 window_bucket=d["W"], length_bucket=d["L"], latent_bucket=d["C"])
        ph = b["placeholder_index"][r][b["placeholder_valid"][r]]
        assert len(ph) == eb.num_latents == int(b["latent_valid"][r].sum())
        assert np.all(b["input_ids"][r, ph] == tok.memory_id)
        assert np.all(np.diff(ph) > 0)
        assert np.array_equal(b["enc_input_ids"][r], eb.input_ids)
        assert np.array_equal(b["pool_index"][r], eb.pool_index)
        # per example: the same grid built from that example alone pools the same tokens
        c0 = 0
        for e in exs:
            es = split_spans(e)
            if not es:
                continue
            one = build_encoder_batch(es, cfg.window_config(), cfg.encoder_pad_id)
            flat_all = b["enc_input_ids"][r].reshape(-1)
            flat_one = one.input_ids.reshape(-1)
            k = one.num_latents
            got = np.where(b["pool_mask"][r, c0:c0 + k], flat_all[b["pool_index"][r, c0:c0 + k]], -1)
            want = np.where(one.pool_mask[:k], flat_one[one.pool_index[:k]], -1)
            assert np.array_equal(got, want)
            c0 += k


def test_empty_rows_and_skip_counts(tok):
    cfg = _cfg(tok)
    b = collate([pack_examples([], cfg.pack_config())], cfg)
    check_batch(b, cfg)
    assert b["num_tokens"].sum() == 0 and not b["placeholder_valid"].any()
    ds = grain.MapDataset.source([skip_example("empty"), skip_example("invalid_utf8")])
    packs = list(PackIterDataset(ds.to_iter_dataset(), cfg.pack_config(), tok.memory_start_id))
    assert sum(p["skipped"].sum() for p in packs) == 2


def test_to_model_inputs_flattens_rows(tok, examples):
    from data_pipelines.batch import to_model_inputs

    cfg = _cfg(tok)
    b = collate(_packs(tok, examples, cfg)[:2], cfg)
    m = to_model_inputs(b)
    S, C = cfg.seq_len, cfg.dims()["C"]
    flat = m["placeholder_index"]
    assert np.all(b["input_ids"].reshape(-1)[flat[flat >= 0]] == tok.memory_id)
    sid, spos = m["encoder"]["span_ids"], m["encoder"]["span_pos"]
    n_spans = sum(len(e["span_lens"]) for p in _packs(tok, examples, cfg)[:2]
                  for e in unpack(p, tok.memory_start_id))
    assert sid.max() + 1 == n_spans and np.all(sid[flat < 0] == -1)
    for s in range(n_spans):  # latent ranks within each span are 0..n-1
        assert np.array_equal(spos[sid == s], np.arange(np.sum(sid == s)))
    assert m["encoder"]["input_ids"].shape == (2 * cfg.max_windows, cfg.window_len)
    assert flat.shape == (2 * C,) and S == b["input_ids"].shape[1]


def test_to_global_shards_rows_over_the_mesh(tok, examples):
    import jax

    from data_pipelines.batch import DEVICE_KEYS, to_global

    n = min(jax.device_count(), 8)
    cfg = _cfg(tok, batch_size=n, seq_len=512, max_windows=32)
    b = collate(_packs(tok, examples, cfg)[:n], cfg)
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    g = to_global(b, mesh)
    assert set(g) == set(DEVICE_KEYS)
    for k, v in g.items():
        assert v.shape == b[k].shape and np.array_equal(np.asarray(v), b[k])
        assert len(v.sharding.device_set) == n
