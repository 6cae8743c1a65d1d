"""lclm-jax: Latent Context Language Models in JAX/Flax."""

from setuptools import find_packages, setup

# The tested set. Pinned so that a fresh ``pip install -e ".[test]"`` on Python 3.11 resolves
# the same versions every time (see README, "Tested versions").
RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "einops==0.8.2",
    "tensorflow-datasets==4.9.10",
    "numpy==2.4.6",
    "safetensors==0.8.0",
    # transformers 4.57 (the PyTorch interop extra) accepts tokenizers <= 0.23.0.
    "tokenizers==0.22.1",
    "ml-dtypes>=0.5,<0.8",
    "pyyaml>=6,<7",
    "pyarrow>=20,<27",
]
TORCH = [
    # 2.13.0 is a CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "transformers==4.57.1",
]
TEST = ["pytest>=9,<10"] + TORCH

setup(
    name="lclm-jax",
    version="0.1.0",
    description="Latent Context Language Models (encoder-decoder context compression) in JAX/Flax",
    packages=find_packages(include=["lclm_jax*", "data_pipelines*", "experiments*"]),
    package_data={"experiments": ["configs/*.yaml", "demo_checkpoint/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=RUNTIME,
    extras_require={"test": TEST, "torch": TORCH, "plot": ["matplotlib>=3.8,<4"]},
    entry_points={"console_scripts": ["lclm-jax=lclm_jax.cli:main"]},
)
