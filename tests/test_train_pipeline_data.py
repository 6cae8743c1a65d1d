"""The train loop on grain pipeline batches: unusable data fails loudly instead of hanging; training reads
``build_dataset`` streams and ``prepare``'d shards; kill -> resume is bit-identical with pipeline data."""

import os
import signal
import time

import numpy as np
import pytest

from data_pipelines import prepare
from data_pipelines.batch import BatchConfig
from data_pipelines.packing import NothingFitsError
from data_pipelines.pipeline import PipelineConfig, StreamSpec, build_dataset
from data_pipelines.testing import random_documents, tiny_tokenizers
from lclm_jax.train.config import resolve
from lclm_jax.train.loop import Preempted, train_stage
from tests.test_train_step import CKPT, tiny_raw

# Builder options scaled to 64-token rows with 4 x 16-token encoder windows (tiny_raw's shapes).
STREAMS = ["cpt=0.7@demo:docs:300:15-60:1", "reconstruction=0.3@demo:docs:300:8-30:2"]
OPTIONS = {"cpt": {"min_segment_tokens": 12, "max_document_tokens": 80, "long_document_policy": "truncate"},
           "reconstruction": {"min_span_tokens": 8, "max_span_tokens": 24}}


@pytest.mark.parametrize("words,opts,reason,knob", [
    ((150, 400), {"long_document_policy": "truncate", "min_segment_tokens": 16}, "too_long", "seq_len"),
    ((3, 30), {}, "too_short", "min_segment_tokens"),
])
def test_pipeline_that_never_emits_raises(words, opts, reason, knob):
    tok = tiny_tokenizers(4)
    bcfg = BatchConfig.for_tokenizers(tok, batch_size=2, seq_len=64, window_size=16, max_windows=4,
                                      max_skips_in_a_row=300)
    cfg = PipelineConfig(streams=(StreamSpec("cpt", records=random_documents(40, 0, words), options=opts),),
                         batch=bcfg)  # repeats forever: without the guard next() never returns
    t0 = time.time()
    with pytest.raises(NothingFitsError) as e:
        next(iter(build_dataset(cfg, tok)))
    assert time.time() - t0 < 30
    msg = str(e.value)
    assert f"'{reason}'" in msg and knob in msg and "300 records in a row" in msg


def _grain_run(out, dataset="stream", steps=6):
    raw = tiny_raw(dataset=dataset, train_batch_size=4)
    raw["training"].update(max_steps=steps, save_steps=3)
    raw["jax"].update(streams=STREAMS, stream_options=OPTIONS, async_checkpoints=True, keep_checkpoints=3,
                      tensorboard=False)
    return resolve(raw, 0, out)


def test_kill_and_resume_on_pipeline_stream_is_bit_identical(tmp_path):
    seen = {}

    def record(step, m, stop):
        seen[step] = (m["decoder_tokens"], m["encoder_tokens"], m["latents"])

    full = train_stage(_grain_run(str(tmp_path / "full")), quiet=True, callback=record)
    # real pipeline rows: several documents' tokens, encoder spans and latents in every batch
    assert all(d > 4 * 20 and e > 0 and lat > 0 for d, e, lat in seen.values())
    run = _grain_run(str(tmp_path / "killed"))
    with pytest.raises(Preempted):  # SIGTERM after step 2: checkpoint (with the data state), then stop
        train_stage(run, quiet=True, callback=lambda step, m, stop: step == 2 and os.kill(os.getpid(), signal.SIGTERM))
    rest = train_stage(run, quiet=True, export_final=False)
    assert sorted(rest["losses"]) == [3, 4, 5, 6]
    for k, v in rest["losses"].items():
        assert v == full["losses"][k]  # bit-identical: same batches, same updates
    assert len(set(full["losses"].values())) == 6  # not a constant batch


def test_trains_from_prepared_shards(tmp_path):
    import json

    packs = str(tmp_path / "packs")
    meta = prepare.main(["--checkpoint", CKPT, "--out", packs, "--seq-len", "64", "--window-size", "16",
                         "--max-windows", "4", "--num-packs", "40", "--options", json.dumps(OPTIONS)]
                        + sum([["--stream", s] for s in STREAMS], []))
    assert meta["num_packs"] == 40 and meta["fill"] > 0.5
    res = train_stage(_grain_run(str(tmp_path / "run"), dataset=packs, steps=3), quiet=True, export_final=False)
    assert sorted(res["losses"]) == [1, 2, 3] and all(np.isfinite(v) for v in res["losses"].values())
