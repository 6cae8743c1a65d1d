"""lclm-jax: Latent Context Language Models (encoder-decoder context compression) in JAX/Flax."""

from lclm_jax.config import LCLMConfig, Qwen3Config  # noqa: F401
from lclm_jax.qwen3_api import Qwen3LM, load_qwen3  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):  # the LCLM API imports lazily (it pulls in the processor and tokenizers)
    if name in ("load", "LCLM"):
        from lclm_jax import api

        return getattr(api, name)
    raise AttributeError(name)
