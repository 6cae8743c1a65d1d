"""Weighted mixing of example streams.

Default weights follow the paper's continual-pretraining mix (Table 2, share of trainable
tokens): plain CPT text/code/reasoning/long-context 57.28 %, SFT with compressed prompts 25.49 %,
reconstruction 17.23 %. Weights are per *example*, so pick them with the streams' mean lengths
in mind when token shares matter (``python -m data_pipelines.inspect --stats`` prints them).
"""

from __future__ import annotations

from typing import Sequence

import grain

DEFAULT_WEIGHTS = {"cpt": 0.5728, "sft": 0.2549, "reconstruction": 0.1723}


def mix(streams: Sequence[grain.MapDataset], weights: Sequence[float] | None = None
        ) -> grain.MapDataset:
    """Deterministic weighted interleave (grain ``MapDataset.mix``): element ``i`` of the result
    depends only on ``i``, the weights and the streams, so it is the same with any worker count."""
    if not streams:
        raise ValueError("no streams to mix")
    if len(streams) == 1:
        return streams[0]
    if weights is not None:
        if len(weights) != len(streams) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"bad mixing weights {weights!r}")
        weights = [float(w) / sum(weights) for w in weights]
    return grain.MapDataset.mix(list(streams), weights)
