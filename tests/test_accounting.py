"""Tests for clipjax.accounting against calling dp_accounting directly."""

import sys

import dp_accounting
import pytest

from clipjax import accounting, calibrate_noise, dp_epsilon

DELTA = 1e-5


def _direct_epsilon(sigma, q, steps, delta):
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
    steps,
  )
  return accountant.get_epsilon(delta)


@pytest.mark.parametrize("sigma, q, steps", [(1.1, 0.01, 1000), (0.8, 0.05, 200), (3.0, 1.0, 10)])
def test_epsilon_matches_dp_accounting(sigma, q, steps):
  assert dp_epsilon(sigma, q, steps, DELTA) == pytest.approx(
    _direct_epsilon(sigma, q, steps, DELTA), rel=1e-12
  )


def test_epsilon_is_monotone_and_infinite_without_noise():
  assert dp_epsilon(0.0, 0.01, 10, DELTA) == float("inf")
  eps = [dp_epsilon(s, 0.01, 100, DELTA) for s in (0.7, 1.0, 2.0)]
  assert eps[0] > eps[1] > eps[2] > 0
  assert dp_epsilon(1.0, 0.01, 50, DELTA) < dp_epsilon(1.0, 0.01, 100, DELTA)


@pytest.mark.parametrize("target, q, steps", [(2.0, 0.01, 500), (8.0, 0.05, 100)])
def test_calibrate_noise_meets_target_minimally(target, q, steps):
  sigma = calibrate_noise(target, DELTA, q, steps)
  assert _direct_epsilon(sigma, q, steps, DELTA) <= target
  # Slightly less noise (by the documented relative tolerance) misses it.
  smaller = sigma * (1 - accounting.CALIBRATION_RTOL)
  assert _direct_epsilon(smaller, q, steps, DELTA) > target


@pytest.mark.parametrize(
  "args, name",
  [
    ((-1.0, 0.01, 10, DELTA), "noise_multiplier"),
    ((1.0, 0.0, 10, DELTA), "sample_rate"),
    ((1.0, 1.5, 10, DELTA), "sample_rate"),
    ((1.0, 0.01, 0, DELTA), "steps"),
    ((1.0, 0.01, 2.5, DELTA), "steps"),
    ((1.0, 0.01, 10, 0.0), "delta"),
    ((1.0, 0.01, 10, 1.0), "delta"),
  ],
)
def test_dp_epsilon_validates(args, name):
  with pytest.raises(ValueError, match=name):
    dp_epsilon(*args)


@pytest.mark.parametrize(
  "args, name",
  [
    ((0.0, DELTA, 0.01, 10), "target_epsilon"),
    ((float("inf"), DELTA, 0.01, 10), "target_epsilon"),
    ((1.0, 2.0, 0.01, 10), "delta"),
    ((1.0, DELTA, -0.1, 10), "sample_rate"),
    ((1.0, DELTA, 0.01, -3), "steps"),
  ],
)
def test_calibrate_noise_validates(args, name):
  with pytest.raises(ValueError, match=name):
    calibrate_noise(*args)


def test_missing_dp_accounting_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "dp_accounting", None)
  with pytest.raises(ImportError, match=r'pip install "clipjax\[privacy\]"'):
    dp_epsilon(1.0, 0.01, 10, DELTA)
  with pytest.raises(ImportError, match=r'pip install "clipjax\[privacy\]"'):
    calibrate_noise(1.0, DELTA, 0.01, 10)
