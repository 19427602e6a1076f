"""Tests for clipjax.privacy.audit: exact Clopper-Pearson bounds, coverage, audits that can fail."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import privacy_oracle
import pytest

from clipjax import audit_epsilon, dp_aggregate, dp_epsilon
from clipjax.privacy import audit

DELTA = 1e-5
CONFIDENCE = 0.95


def _exact_cdf(n, p, k):
  """P[Binomial(n, p) <= k] in exact rational arithmetic."""
  p = Fraction(p)
  return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))


@pytest.mark.parametrize(
  "k, n, alpha",
  [(0, 1, 0.025), (0, 10, 0.025), (3, 100, 0.025), (99, 100, 0.05), (0, 500, 0.01), (7, 60, 1e-6)],
)
def test_clopper_pearson_against_exact_binomial_sums(k, n, alpha):
  upper = audit._clopper_pearson_upper(k, n, alpha)
  # The bound has tail probability alpha: at it, P[X <= k] <= alpha; just below, > alpha.
  assert _exact_cdf(n, upper, k) <= alpha < _exact_cdf(n, upper * (1 - 1e-9), k)
  if k == 0:
    assert upper == pytest.approx(1 - alpha ** (1 / n), rel=1e-12)


def test_clopper_pearson_against_scipy():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  for _ in range(30):
    n = int(rng.choice([5, 100, 5000, 50_000]))
    k = int(rng.integers(0, n))
    alpha = float(rng.choice([0.025, 0.005, 1e-4]))
    assert audit._clopper_pearson_upper(k, n, alpha) == pytest.approx(
      stats.beta.ppf(1 - alpha, k + 1, n - k), rel=1e-8
    )
  assert audit._clopper_pearson_upper(10, 10, 0.025) == 1.0


def test_chernoff_ranking_bounds_are_valid_and_looser():
  counts = np.array([0, 1, 5, 50, 500, 999, 1000])
  chernoff = audit._chernoff_upper(counts, 1000, 0.025)
  exact = np.array([audit._clopper_pearson_upper(int(k), 1000, 0.025) for k in counts])
  assert np.all(chernoff >= exact - 1e-12) and np.all(chernoff <= np.minimum(1, 3 * exact))


def test_perfect_separation_certifies_what_the_trial_count_allows():
  # Every test decision right: at the best threshold the certifying halves (500 each)
  # have 0 errors, and the bound is log((1 − δ − u) / u), u = 1 − α^(1/500).
  n = 1000
  u = 1 - ((1 - CONFIDENCE) / 2) ** (1 / (n // 2))
  eps = audit_epsilon(np.ones(n), np.zeros(n), DELTA, confidence=CONFIDENCE)
  assert eps == pytest.approx(math.log((1 - DELTA - u) / u), rel=1e-9)


def test_identical_distributions_certify_nothing():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(2, 20_000))
  assert audit_epsilon(scores[0], scores[1], DELTA) < 0.1


def test_coverage_on_randomized_response():
  # Randomized response with ε = 1 is (1, 0)-DP and its scores attain the bound exactly:
  # "in" reports 1 with probability e / (1 + e), "out" with 1 / (1 + e). The audit
  # may exceed ε = 1 in at most 5% of experiments; point estimates without confidence
  # bounds exceed it in about half.
  eps, trials, experiments = 1.0, 4000, 200
  rng = np.random.default_rng(2)
  p_in = math.exp(eps) / (1 + math.exp(eps))
  scores_in = rng.random((experiments, trials)) < p_in
  scores_out = rng.random((experiments, trials)) < 1 - p_in
  bounds = np.array([audit_epsilon(a, b, 0.0) for a, b in zip(scores_in, scores_out)])
  assert np.mean(bounds > eps) <= 0.05
  assert np.median(bounds) > 0.8 * eps  # and it is not vacuous
  naive = np.log(scores_in.mean(1) / scores_out.mean(1))
  assert np.mean(naive > eps) > 0.3


def test_gaussian_scores_bound_below_and_near_the_exact_epsilon():
  # Two Gaussians at distance mu: the Gaussian mechanism with noise multiplier 1 / mu.
  mu = 2.0
  rng = np.random.default_rng(3)
  scores_out = rng.normal(0.0, 1.0, 50_000)
  scores_in = rng.normal(mu, 1.0, 50_000)
  exact = privacy_oracle.gaussian_epsilon(mu, DELTA)
  assert exact == pytest.approx(dp_epsilon(1 / mu, 1.0, 1, DELTA, accountant="pld"), rel=2e-3)
  bound = audit_epsilon(scores_in, scores_out, DELTA)
  assert 0.4 * exact < bound < exact


@jax.jit
def _canary_scores(noise_multiplier, keys):
  """One dp_aggregate step on 8 examples: a canary gradient of norm C among zeros, or none.

  ``keys`` has shape ``(2, trials)``: one trial with the canary per key of the first
  row, one without per key of the second. The score is the released mean's projection
  on the canary direction, in units of C / B: N(1, σ²) with the canary, N(0, σ²)
  without.
  """
  clip_norm, batch = 2.0, 8
  canary = jnp.zeros(4).at[0].set(clip_norm)

  def score(key, present):
    grads = jnp.zeros((batch, 4)).at[0].set(jnp.where(present, canary, 0.0))
    tx = dp_aggregate(clip_norm, noise_multiplier, key)
    update, _ = tx.update({"w": grads}, tx.init(None))
    return update["w"] @ canary * batch / clip_norm**2

  run = jax.vmap(score, in_axes=(0, None))
  return run(keys[0], True), run(keys[1], False)


def test_dp_aggregate_canary_audit_honest_and_under_noised():
  # σ = 1 claims ε = 4.73 (RDP; exactly 4.38). With 200 000 trials each way the audit of
  # the honest mechanism certifies about 2.4, and of one with half the noise (exact ε
  # 10.0) about 5.4, with a standard deviation of 0.2 over seeds: decisive both ways.
  sigma, trials = 1.0, 200_000
  claimed = dp_epsilon(sigma, 1.0, 1, DELTA)  # one full-batch step, RDP
  keys = jax.random.split(jax.random.key(0), (2, 2, trials))
  honest = audit_epsilon(*map(np.asarray, _canary_scores(sigma, keys[0])), DELTA)
  assert 0.4 * claimed < honest < claimed
  # Half the noise the accountant was told about: the audit proves the claim false.
  under_noised = audit_epsilon(*map(np.asarray, _canary_scores(sigma / 2, keys[1])), DELTA)
  assert under_noised > claimed


@pytest.mark.parametrize(
  "args, options, name",
  [
    (([0.0, np.nan, 1.0], [0.0, 1.0], DELTA), {}, "scores_in"),
    (([0.0, 1.0], [0.0, np.inf], DELTA), {}, "scores_out"),
    ((np.zeros((2, 2)), [0.0, 1.0], DELTA), {}, "scores_in"),
    (([1.0], [0.0, 1.0], DELTA), {}, "scores_in"),
    (([0.0, 1.0], [], DELTA), {}, "scores_out"),
    (([0.0, 1.0], [0.0, 1.0], 1.0), {}, "delta"),
    (([0.0, 1.0], [0.0, 1.0], -0.1), {}, "delta"),
    (([0.0, 1.0], [0.0, 1.0], DELTA), {"confidence": 1.0}, "confidence"),
    (([0.0, 1.0], [0.0, 1.0], DELTA), {"confidence": 0.0}, "confidence"),
  ],
)
def test_bad_input_is_refused_by_name(args, options, name):
  with pytest.raises(ValueError, match=name):
    audit_epsilon(*args, **options)
