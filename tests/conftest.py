"""Test setup: 8 fake CPU devices (must be set before jax is imported) and parsed absl flags."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

try:  # grain's worker processes read absl flags.
    from absl import flags as _absl_flags

    _absl_flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover - absl is a dependency of grain
    pass

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "lclm_golden"
GOLDEN_NAMES = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").exists())


@pytest.fixture(scope="session")
def golden_dir():
    return GOLDEN
