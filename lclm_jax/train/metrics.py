"""Training metrics: FLOP/MFU estimate, JSONL (always), TensorBoard (when installed), a progress line.

MFU counts *model* FLOPs (no rematerialisation) of the shapes the step really computes (padded rows
and window grids): matmuls ``2 * params * tokens`` forward, attention ``2 * 2 * T * T * heads *
head_dim / 2`` per causal layer (``/1`` for bidirectional windows), the tied/untied head on every
decoder position. Backward costs twice the forward for a part whose weights train, once for a
frozen part that still passes gradients upstream (the decoder in stages 0-1), zero for a frozen
encoder (nothing upstream of it trains).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

PEAK_FLOPS = {  # dense bf16 per device
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
    "TPU v4": 275e12, "TPU v6 lite": 918e12, "MI300": 1307e12,
}


def _layer_matmul_params(c) -> int:
    d, h = c.hidden_size, c.head_dim
    return d * h * (c.num_attention_heads * 2 + c.num_key_value_heads * 2) + 3 * d * c.intermediate_size


def forward_flops(c, rows: int, length: int, causal: bool, head: bool) -> float:
    tokens = rows * length
    f = 2.0 * _layer_matmul_params(c) * c.num_hidden_layers * tokens
    f += 4.0 * rows * length * length * c.num_attention_heads * c.head_dim * c.num_hidden_layers * (0.5 if causal else 1.0)
    if head:
        f += 2.0 * c.hidden_size * c.vocab_size * tokens
    return f


def step_flops(model, spec, batch_shape: dict) -> float:
    """Model FLOPs of one optimizer step for a global batch with the given shapes."""
    b, s = batch_shape["input_ids"]
    _, nw, length = batch_shape["enc_input_ids"]
    c = batch_shape["pool_index"][1]
    enc = forward_flops(model.encoder_config, b * nw, length, not model.config.bidirectional, head=False)
    dec = forward_flops(model.decoder_config, b, s, True, head=True)
    d_in, d_out = model.encoder_dim, model.decoder_config.hidden_size
    ad = 2.0 * (d_in * d_out + d_out * d_out) * b * c
    enc_bw = 2.0 if "encoder" in spec.groups else 0.0
    dec_bw = 2.0 if "decoder" in spec.groups else 1.0
    return enc * (1 + enc_bw) + dec * (1 + dec_bw) + ad * 3


def device_peak_flops(override=None) -> float | None:
    """Peak FLOP/s of all devices: ``override`` per device, else a table by device kind, else (CPU) a
    short matmul measurement."""
    n = jax.device_count()
    if override:
        return float(override) * n
    kind = jax.devices()[0].device_kind
    for k, v in PEAK_FLOPS.items():
        if k.lower() in kind.lower():
            return v * n
    if jax.devices()[0].platform == "cpu":
        return measure_cpu_flops()
    return None


_CPU_PEAK = None


def measure_cpu_flops(n: int = 1024, reps: int = 20) -> float:
    """fp32 matmul FLOP/s of this host (all fake CPU devices share the same cores)."""
    global _CPU_PEAK
    if _CPU_PEAK is None:
        import jax.numpy as jnp

        dev = jax.devices()[0]
        a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
        f = jax.jit(lambda x: x @ x)
        for _ in range(3):
            f(a).block_until_ready()
        t = time.perf_counter()
        for _ in range(reps):
            f(a).block_until_ready()
        _CPU_PEAK = 2.0 * n ** 3 * reps / (time.perf_counter() - t)
    return _CPU_PEAK


class MetricsWriter:
    """JSONL always; TensorBoard if ``tensorboardX`` or ``torch.utils.tensorboard`` is importable."""

    def __init__(self, directory: str | None, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled and directory is not None
        self.jsonl = None
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            self.tb = _tensorboard(os.path.join(directory, "tensorboard"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(path):
    for mod in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            m = __import__(mod, fromlist=["SummaryWriter"])
            return m.SummaryWriter(path)
        except Exception:  # not installed (torch's writer needs the tensorboard package)
            continue
    return None


def _py(v):
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "dtype"):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def progress_line(step: int, total: int, m: dict, stream=sys.stdout):
    width = 24
    done = int(width * step / max(1, total))
    bar = "#" * done + "." * (width - done)
    text = (f"[{bar}] {step}/{total} loss {m.get('loss', float('nan')):.4f} gnorm {m.get('grad_norm', 0):.3f} "
            f"tok/s {m.get('tokens_per_s', 0):.0f} mfu {m.get('mfu', 0) or 0:.3f} skipped {m.get('skipped', 0)}")
    print(text, file=stream, flush=True)
