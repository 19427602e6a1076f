"""Test configuration: float64 is enabled so the float64 paths and oracles can run.

Tests that check float32 behaviour build float32 arrays explicitly.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The suite is compile-bound: LLVM's optimisations cost a fifth of its time and change
# no result a test checks (XLA's HLO passes still run). Benchmarks do not use this.
os.environ["XLA_FLAGS"] = " ".join(
  filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"])
)

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

settings.register_profile("default", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("default")


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "calibrated_costs: the ghost cost weights of this machine's backend apply"
  )


@pytest.fixture(autouse=True)
def _ghost_multiply_add_costs(request, monkeypatch):
  """``clipped_grad`` chooses each use's form by multiply-add counts in the tests (the
  shapes of the ghost tests are chosen to exercise a given form with them), not by this
  machine's calibrated weights; a test marked ``calibrated_costs`` keeps those."""
  if "calibrated_costs" not in request.keywords:
    from clipjax.privacy.ghost import _cost

    monkeypatch.setattr(_cost, "CALIBRATED", {})
