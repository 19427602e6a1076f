"""Tests for clipjax.privacy.accounting against calling dp_accounting directly, for every scheme."""

import logging
import math
import sys

import dp_accounting
import privacy_oracle
import pytest
from dp_accounting import pld, rdp

from clipjax import calibrate_noise, dp_epsilon, poisson_overflow_probability
from clipjax.privacy import accounting

DELTA = 1e-5
NEIGHBOURS = dp_accounting.NeighboringRelation


def _rdp_poisson(sigma, q, steps):
  accountant = rdp.RdpAccountant()
  accountant.compose(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
  )
  return accountant


# clipjax's noise never exceeds sqrt(-2 log 2^-65) standard deviations (rounded down
# to 4 decimals); the accountant spends P(N > edge − 1/z) of δ per step on that edge.
_EDGE = math.floor(math.sqrt(130 * math.log(2)) * 1e4) / 1e4


def _edge_delta(z, steps):
  return steps * 0.5 * math.erfc((_EDGE - 1 / z) / math.sqrt(2))


def _direct_epsilon(sigma, q, steps, delta):
  return _rdp_poisson(sigma, q, steps).get_epsilon(delta - _edge_delta(sigma, steps))


def _direct_pld(event, steps, sigma, delta=DELTA):
  accountant = pld.PLDAccountant(value_discretization_interval=1e-3)
  accountant.compose(event, steps)
  return accountant.get_epsilon(delta - _edge_delta(sigma, steps))


# -- Poisson, RDP: the default, positional as in the design contract.


@pytest.mark.parametrize("sigma, q, steps", [(1.1, 0.01, 1000), (0.8, 0.05, 200), (3.0, 1.0, 10)])
def test_poisson_rdp_matches_dp_accounting(sigma, q, steps):
  expected = _direct_epsilon(sigma, q, steps, DELTA)
  assert dp_epsilon(sigma, q, steps, DELTA) == pytest.approx(expected, rel=1e-12)
  assert dp_epsilon(sigma, q, steps, DELTA, sampling="poisson", accountant="rdp") == (
    pytest.approx(expected, rel=1e-12)
  )


def test_epsilon_is_monotone_and_infinite_without_noise():
  assert dp_epsilon(0.0, 0.01, 10, DELTA) == math.inf
  assert dp_epsilon(0.0, 0.01, 10, DELTA, accountant="pld") == math.inf
  eps = [dp_epsilon(s, 0.01, 100, DELTA) for s in (0.7, 1.0, 2.0)]
  assert eps[0] > eps[1] > eps[2] > 0
  assert dp_epsilon(1.0, 0.01, 50, DELTA) < dp_epsilon(1.0, 0.01, 100, DELTA)


# -- Poisson, PLD.


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.01, 1000), (0.6, 0.2, 20)])
def test_poisson_pld_matches_dp_accounting_and_is_tighter(sigma, q, steps):
  event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
  eps = dp_epsilon(sigma, q, steps, DELTA, sampling="poisson", accountant="pld")
  assert eps == pytest.approx(_direct_pld(event, steps, sigma), rel=1e-12)
  assert eps < dp_epsilon(sigma, q, steps, DELTA, sampling="poisson", accountant="rdp")


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_pld_of_one_gaussian_release_is_the_exact_epsilon(sigma):
  # q = 1, one step: the Gaussian mechanism, whose exact ε has a closed form. The PLD
  # is a pessimistic (upper) estimate, within its discretization of the exact value;
  # RDP is valid but looser.
  exact = privacy_oracle.gaussian_epsilon(1 / sigma, DELTA)
  eps = dp_epsilon(sigma, 1.0, 1, DELTA, sampling="poisson", accountant="pld")
  assert exact <= eps <= exact * (1 + 2e-3)
  assert dp_epsilon(sigma, 1.0, 1, DELTA, sampling="poisson") > eps


# -- Poisson truncated to max_batch_size.


def test_truncated_poisson_pld_matches_dp_accounting():
  n, q, size, sigma, steps = 500, 0.02, 18, 1.0, 100
  eps = dp_epsilon(sigma, q, steps, DELTA, accountant="pld", num_examples=n, max_batch_size=size)
  # The accounting covers the dataset and its neighbours: datasets of up to n + 1.
  event = dp_accounting.TruncatedSubsampledGaussianDpEvent(n + 1, q, size, sigma)
  assert eps == pytest.approx(_direct_pld(event, steps, sigma), rel=1e-12)
  untruncated = dp_epsilon(sigma, q, steps, DELTA, accountant="pld")
  assert eps > untruncated
  # Overflow impossible (more slots than examples): exactly the untruncated ε.
  assert dp_epsilon(
    sigma, q, steps, DELTA, accountant="pld", num_examples=n, max_batch_size=n + 1
  ) == pytest.approx(untruncated, rel=1e-12)


@pytest.mark.parametrize("size", [80, 90])
def test_truncated_poisson_rdp_is_the_coupling_bound(size):
  stats = pytest.importorskip("scipy.stats")
  n, q, sigma, steps = 2000, 0.02, 1.0, 100
  eps = dp_epsilon(sigma, q, steps, DELTA, num_examples=n, max_batch_size=size)
  # Independently: β from SciPy, the untruncated RDP from dp_accounting; ε is valid when
  # the untruncated run is (ε, δ − (1 + e^ε) β)-DP, and (to 1e-3) the smallest such.
  beta = steps * stats.binom.sf(size, n + 1, q)
  accountant = _rdp_poisson(sigma, q, steps)

  def valid(e):
    slack = DELTA - (1 + math.exp(e)) * beta
    return slack > 0 and accountant.get_epsilon(slack) <= e

  assert 0 < beta < DELTA / 2
  assert valid(eps) and not valid(eps * (1 - 1e-3))
  assert eps >= dp_epsilon(sigma, q, steps, DELTA)


@pytest.mark.parametrize("name, n, sizes", [("rdp", 2000, (80, 100)), ("pld", 500, (18, 25))])
def test_truncation_costs_less_with_more_slots(name, n, sizes):
  q, sigma, steps = 0.02, 1.0, 100
  eps = [
    dp_epsilon(sigma, q, steps, DELTA, accountant=name, num_examples=n, max_batch_size=b)
    for b in (*sizes, n + 1)
  ]
  assert eps[0] > eps[1] > eps[2] == dp_epsilon(sigma, q, steps, DELTA, accountant=name)


def test_too_frequent_overflow_gives_infinite_rdp_epsilon():
  # Never a finite wrong ε: β = steps · P[overflow] leaves no room in δ.
  assert dp_epsilon(1.0, 0.02, 100, DELTA, num_examples=2000, max_batch_size=45) == math.inf


# -- Fixed-size batches without replacement (substitution relation).


@pytest.mark.parametrize("n, b, sigma, steps", [(10_000, 100, 1.0, 200), (500, 50, 2.0, 20)])
def test_without_replacement_rdp_matches_dp_accounting(n, b, sigma, steps):
  eps = dp_epsilon(sigma, b / n, steps, DELTA, sampling="without_replacement", num_examples=n)
  # Substitution moves the clipped sum by up to 2C: the event's multiplier is σ / 2.
  accountant = rdp.RdpAccountant(neighboring_relation=NEIGHBOURS.REPLACE_ONE)
  accountant.compose(
    dp_accounting.SampledWithoutReplacementDpEvent(n, b, dp_accounting.GaussianDpEvent(sigma / 2)),
    steps,
  )
  expected = accountant.get_epsilon(DELTA - _edge_delta(sigma / 2, steps))
  assert eps == pytest.approx(expected, rel=1e-12)
  assert eps > dp_epsilon(sigma, b / n, steps, DELTA, sampling="poisson")


def test_without_replacement_of_everyone_is_the_gaussian_with_sensitivity_two():
  # b = n: every step releases the full clipped sum, which substitution moves by 2C.
  sigma, steps = 3.0, 10
  eps = dp_epsilon(sigma, 1.0, steps, DELTA, sampling="without_replacement", num_examples=64)
  assert eps == pytest.approx(_direct_epsilon(sigma / 2, 1.0, steps, DELTA), rel=1e-12)


def test_without_replacement_has_no_pld_event():
  event = dp_accounting.SampledWithoutReplacementDpEvent(
    100, 10, dp_accounting.GaussianDpEvent(1.0)
  )
  assert not any(pld.PLDAccountant(relation).supports(event) for relation in NEIGHBOURS)
  with pytest.raises(ValueError, match="accountant"):
    dp_epsilon(
      1.0, 0.1, 10, DELTA, sampling="without_replacement", accountant="pld", num_examples=100
    )


# -- calibrate_noise, for every scheme.


@pytest.mark.parametrize(
  "target, q, steps, options",
  [
    (2.0, 0.01, 500, {}),
    (8.0, 0.05, 100, {"sampling": "poisson"}),
    (2.0, 0.01, 500, {"accountant": "pld"}),
    (3.0, 0.02, 100, {"num_examples": 2000, "max_batch_size": 90}),
    (4.0, 0.05, 50, {"sampling": "without_replacement", "num_examples": 1000}),
  ],
)
def test_calibrate_noise_meets_target_minimally(target, q, steps, options):
  sigma = calibrate_noise(target, DELTA, q, steps, **options)
  assert dp_epsilon(sigma, q, steps, DELTA, **options) <= target
  # Slightly less noise (by the documented relative tolerance) misses it.
  smaller = sigma * (1 - accounting.CALIBRATION_RTOL)
  assert dp_epsilon(smaller, q, steps, DELTA, **options) > target
  if not options:
    assert _direct_epsilon(sigma, q, steps, DELTA) <= target


def test_calibrate_noise_refuses_overflow_the_rdp_bound_cannot_absorb():
  with pytest.raises(ValueError, match="max_batch_size"):
    calibrate_noise(3.0, DELTA, 0.02, 100, num_examples=2000, max_batch_size=45)


# -- Bad input.


@pytest.mark.parametrize(
  "args, options, name",
  [
    ((-1.0, 0.01, 10, DELTA), {}, "noise_multiplier"),
    ((math.nan, 0.01, 10, DELTA), {}, "noise_multiplier"),
    ((math.inf, 0.01, 10, DELTA), {}, "noise_multiplier"),
    ((1.0, 0.0, 10, DELTA), {}, "sample_rate"),
    ((1.0, 1.5, 10, DELTA), {}, "sample_rate"),
    ((1.0, math.nan, 10, DELTA), {}, "sample_rate"),
    ((1.0, 0.01, 0, DELTA), {}, "steps"),
    ((1.0, 0.01, 2.5, DELTA), {}, "steps"),
    ((1.0, 0.01, 10, 0.0), {}, "delta"),
    ((1.0, 0.01, 10, 1.0), {}, "delta"),
    ((1.0, 0.01, 10, DELTA), {"sampling": "shuffle"}, "sampling"),
    ((1.0, 0.01, 10, DELTA), {"accountant": "moments"}, "accountant"),
    ((1.0, 0.01, 10, DELTA), {"max_batch_size": 10}, "num_examples"),
    ((1.0, 0.01, 10, DELTA), {"num_examples": 1000, "max_batch_size": 0}, "max_batch_size"),
    ((1.0, 0.01, 10, DELTA), {"num_examples": 0}, "num_examples"),
    ((1.0, 0.01, 10, DELTA), {"sampling": "without_replacement"}, "num_examples"),
    (
      (1.0, 0.01, 10, DELTA),
      {"sampling": "without_replacement", "num_examples": 1000, "max_batch_size": 10},
      "max_batch_size",
    ),
    (
      (1.0, 0.015, 10, DELTA),
      {"sampling": "without_replacement", "num_examples": 100},
      "sample_rate",
    ),
  ],
)
def test_dp_epsilon_validates(args, options, name):
  with pytest.raises(ValueError, match=name):
    dp_epsilon(*args, **options)


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


def test_overflow_probability_used_is_that_of_the_sampler():
  # The δ term of the RDP bound uses the same tail as poisson_overflow_probability.
  scheme = accounting._scheme(0.02, 100, DELTA, "poisson", "rdp", 2000, 90)
  assert accounting._overflow(scheme) == pytest.approx(
    100 * poisson_overflow_probability(2001, 0.02, 90), rel=1e-15
  )


def test_missing_dp_accounting_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "dp_accounting", None)
  with pytest.raises(ImportError, match=r'pip install -e "\.\[privacy\]"'):
    dp_epsilon(1.0, 0.01, 10, DELTA)
  with pytest.raises(ImportError, match=r'pip install -e "\.\[privacy\]"'):
    calibrate_noise(1.0, DELTA, 0.01, 10)


def test_rdp_leaves_out_diverging_orders_quietly(caplog):
  # At a small σ dp_accounting's series diverge for orders below 1.5; it leaves them out
  # (ε can only rise) and logs one warning each, which the accountant silences.
  with caplog.at_level(logging.WARNING):
    eps = dp_epsilon(0.5, 0.0475, steps=10, delta=1e-5)
  assert math.isfinite(eps) and eps > 0
  assert not [r for r in caplog.records if r.name == "absl"]


def test_the_noise_edge_is_spent_from_delta():
  # At σ = 0.3 the edge alone spends steps · P(N > 9.49 − 3.33) = 3.7e-10 per step:
  # 10^4 steps leave nothing of δ = 1e-6, and 10 steps leave δ − 3.7e-9.
  assert _edge_delta(0.3, 1) == pytest.approx(3.7e-10, rel=0.05)
  assert dp_epsilon(0.3, 0.01, 10_000, 1e-6) == math.inf
  eps = dp_epsilon(0.3, 0.01, 10, 1e-6)
  assert eps == pytest.approx(_direct_epsilon(0.3, 0.01, 10, 1e-6), rel=1e-12)
  assert eps > _rdp_poisson(0.3, 0.01, 10).get_epsilon(1e-6)
