"""lclm-jax: Latent Context Language Models (encoder-decoder context compression) in JAX/Flax.

Public entry points (imported lazily, so host-only modules such as the processor and the data
pipelines do not pull in JAX): ``load`` / ``LCLM`` for LCLM checkpoints, ``load_qwen3`` / ``Qwen3LM``
for plain Qwen3 checkpoints, ``LCLMConfig`` / ``Qwen3Config``.
"""

from lclm_jax.config import LCLMConfig, Qwen3Config  # noqa: F401  (no JAX import)

__version__ = "0.1.0"
_LAZY = {"load": "lclm_jax.api", "LCLM": "lclm_jax.api", "load_qwen3": "lclm_jax.qwen3_api",
         "Qwen3LM": "lclm_jax.qwen3_api"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lclm_jax' has no attribute {name!r}")


__all__ = ["load", "LCLM", "load_qwen3", "Qwen3LM", "LCLMConfig", "Qwen3Config"]
