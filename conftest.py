"""Doctests run as a user would see them: default float32 JAX, short NumPy printing.

The unit tests in tests/ enable float64; pytest may run doctests in the same
process, so each doctest switches it off for its duration.
"""

import jax
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_defaults(request):
  if not isinstance(request.node, pytest.DoctestItem):
    yield
    return
  x64 = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", False)
  with np.printoptions(precision=4, suppress=True):
    yield
  jax.config.update("jax_enable_x64", x64)
