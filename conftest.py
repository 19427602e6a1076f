"""Doctest configuration: NumPy printing kept short so docstring examples stay readable."""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_printing():
    with np.printoptions(precision=4, suppress=True):
        yield
