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
from hypothesis import settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

settings.register_profile("default", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("default")
