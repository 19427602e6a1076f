"""Tests for clipjax.privacy.sampling: exact inclusion rates, uniform truncation, static shapes."""

import itertools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax import (
  PoissonSampler,
  WithoutReplacementSampler,
  poisson_overflow_probability,
  poisson_sample,
)
from clipjax.privacy import sampling


def _draws(fn, count, seed=0):
  """``fn(key)`` for ``count`` keys at once, as NumPy arrays."""
  keys = jax.random.split(jax.random.key(seed), count)
  return jax.tree.map(np.asarray, jax.jit(jax.vmap(fn))(keys))


def _rate(q):
  """The inclusion probability the sampler implements: floor(q · 2^32) / 2^32."""
  return math.floor(q * 2.0**32) / 2.0**32


def _binomial_pmf(n, p, k):
  return math.comb(n, k) * p**k * (1 - p) ** (n - k)


def _within(observed, expected, trials, sigmas=5.0):
  """Frequencies within ``sigmas`` binomial standard deviations of the probabilities."""
  sd = np.sqrt(np.asarray(expected) * (1 - np.asarray(expected)) / trials)
  return np.all(np.abs(np.asarray(observed) - expected) <= sigmas * sd + 1e-12)


def _chosen_sets(indices, mask):
  """Boolean ``(draws, n)`` membership from ``(indices, mask)``; checks there are no repeats."""
  n = int(indices.max()) + 1
  member = np.zeros((indices.shape[0], max(n, 1)), np.int64)
  rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
  np.add.at(member, (rows, indices.ravel()), mask.ravel())
  assert member.max() <= 1, "an example appears twice in one batch"
  return member.astype(bool)


def test_poisson_batches_are_padded_and_masked():
  n, q, size = 1000, 0.01, 32
  sampler = PoissonSampler(num_examples=n, sample_rate=q, max_batch_size=size)
  indices, mask = _draws(sampler, 500)  # jitted with a traced key
  assert indices.shape == mask.shape == (500, size)
  assert indices.dtype == np.int32 and mask.dtype == bool
  count = mask.sum(1)
  assert np.all(mask == (np.arange(size) < count[:, None])), "the mask is not a prefix"
  assert np.all(indices[~mask] == 0), "padding slots must hold index 0"
  for row, m in zip(indices, mask):
    real = row[m]
    assert np.all(np.diff(real) > 0) and np.all((real >= 0) & (real < n))


def test_inclusion_thresholds_round_down():
  # floor(q · 2^32) / 2^32 <= q: a rate below 2^-32 includes nobody, never more than q.
  assert not sampling._bernoulli(jax.random.key(0), 1e-12, 1000).any()
  assert sampling._bernoulli(jax.random.key(0), 1.0, 1000).all()
  assert _rate(0.1) <= 0.1 and 0.1 - _rate(0.1) < 2.0**-32


def test_poisson_inclusion_rate_and_batch_size_are_exact():
  n, q, trials = 40, 0.1, 100_000
  indices, mask = _draws(lambda k: poisson_sample(k, n, q, n), trials)
  member = _chosen_sets(indices, mask)
  p = _rate(q)
  assert _within(member.mean(0), np.full(n, p), trials), "per-example inclusion rate is off"
  sizes = np.bincount(mask.sum(1), minlength=n + 1) / trials
  expected = np.array([_binomial_pmf(n, p, k) for k in range(n + 1)])
  # Sizes expected at least 20 times each, and the rest pooled (normal approximations).
  common = expected * trials >= 20
  assert _within(sizes[common], expected[common], trials), "batch sizes are not Binomial(n, q)"
  assert _within(sizes[~common].sum(), expected[~common].sum(), trials)
  # Independence across examples: a pair is in together with probability p².
  assert _within((member[:, 0] & member[:, 1]).mean(), p * p, trials)


def test_truncation_keeps_a_uniformly_random_subset():
  # n = 8, q = 0.8, 3 slots: most draws overflow. Example i is kept with probability
  # q · E[min(1, B / K)], K = 1 + Binomial(n − 1, q); a pair with q² · E[min(1, B(B−1) /
  # (K(K−1)))], K = 2 + Binomial(n − 2, q); the same for every example and every pair
  # only if the kept subset is uniform.
  n, q, size, trials = 8, 0.8, 3, 100_000
  indices, mask = _draws(lambda k: poisson_sample(k, n, q, size), trials, seed=1)
  member = _chosen_sets(indices, mask)
  p = _rate(q)
  single = p * sum(_binomial_pmf(n - 1, p, j) * min(1.0, size / (1 + j)) for j in range(n))
  pair = (
    p
    * p
    * sum(
      _binomial_pmf(n - 2, p, j) * min(1.0, size * (size - 1) / ((2 + j) * (1 + j)))
      for j in range(n - 1)
    )
  )
  assert _within(member.mean(0), np.full(n, single), trials)
  together = np.array(
    [(member[:, i] & member[:, j]).mean() for i, j in itertools.combinations(range(n), 2)]
  )
  assert _within(together, np.full(together.shape, pair), trials)
  assert _within(
    mask.all(1).mean(), sum(_binomial_pmf(n, p, k) for k in range(size, n + 1)), trials
  )


def test_choose_is_uniform_among_candidates_even_with_ties():
  # With 1 random bit per candidate almost every draw has ties at the cut, which must be
  # re-drawn among the tied candidates only: each 3-subset of the 5 candidates has
  # probability 1/10, and the 2 others are never chosen.
  candidates = np.array([True, False, True, True, True, False, True])
  trials = 50_000
  chosen = _draws(lambda k: sampling._choose(k, jnp.asarray(candidates), 3, key_bits=1), trials)
  assert np.all(chosen.sum(1) == 3) and not chosen[:, ~candidates].any()
  codes = chosen @ (1 << np.arange(candidates.size))
  subsets = [sum(1 << i for i in c) for c in itertools.combinations(np.flatnonzero(candidates), 3)]
  frequencies = np.array([(codes == s).mean() for s in subsets])
  assert _within(frequencies, np.full(len(subsets), 1 / len(subsets)), trials)


def test_without_replacement_sampler_draws_uniform_subsets():
  n, b, trials = 6, 2, 60_000
  sampler = WithoutReplacementSampler(num_examples=n, batch_size=b)
  indices, mask = _draws(sampler, trials)
  assert indices.shape == (trials, b) and mask.all()
  member = _chosen_sets(indices, mask)
  assert np.all(member.sum(1) == b)
  codes = member @ (1 << np.arange(n))
  subsets = [sum(1 << i for i in c) for c in itertools.combinations(range(n), b)]
  frequencies = np.array([(codes == s).mean() for s in subsets])
  assert _within(frequencies, np.full(len(subsets), 1 / len(subsets)), trials)


def _exact_tail(n, q, size):
  q = Fraction(q)
  return float(sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(size + 1, n + 1)))


@pytest.mark.parametrize(
  "n, q, size",
  [
    (1, 0.5, 1),
    (10, 0.5, 3),
    (50, 0.1, 5),
    (200, 0.05, 30),  # far tail, ~1e-10
    (300, 0.01, 40),  # ~1e-30
    (300, 0.3, 10),  # ~1, summed as one minus the small side
    (120, 0.999, 119),
    (64, 1.0, 63),
  ],
)
def test_overflow_probability_matches_the_exact_sum(n, q, size):
  assert poisson_overflow_probability(n, q, size) == pytest.approx(
    _exact_tail(n, q, size), rel=1e-11, abs=1e-300
  )


def test_overflow_probability_for_large_datasets_and_edges():
  stats = pytest.importorskip("scipy.stats")
  for n, q, size in [(60_000, 256 / 60_000, 256 + 96), (10**6, 1e-3, 1150), (10**6, 0.5, 499_000)]:
    assert poisson_overflow_probability(n, q, size) == pytest.approx(
      stats.binom.sf(size, n, q), rel=1e-8
    )
  assert poisson_overflow_probability(10, 0.5, 10) == 0.0
  assert poisson_overflow_probability(10, 0.5, 50) == 0.0


@pytest.mark.parametrize(
  "call, name",
  [
    (lambda: poisson_sample(0, 10, 0.0, 4), "sample_rate"),
    (lambda: poisson_sample(0, 10, 1.5, 4), "sample_rate"),
    (lambda: poisson_sample(0, 10, float("nan"), 4), "sample_rate"),
    (lambda: poisson_sample(0, 10, 0.5, 0), "max_batch_size"),
    (lambda: poisson_sample(0, 10, 0.5, 2.0), "max_batch_size"),
    (lambda: poisson_sample(0, 0, 0.5, 4), "num_examples"),
    (lambda: poisson_sample("key", 10, 0.5, 4), "key"),
    (lambda: jax.jit(lambda q: poisson_sample(0, 10, q, 4))(0.5), "sample_rate"),
    (lambda: poisson_overflow_probability(10, -0.1, 4), "sample_rate"),
    (lambda: poisson_overflow_probability(10, 0.5, 0), "max_batch_size"),
    (lambda: PoissonSampler(10, 2.0, 4), "sample_rate"),
    (lambda: PoissonSampler(10, 0.5, 0), "max_batch_size"),
    (lambda: WithoutReplacementSampler(10, 11), "batch_size"),
    (lambda: WithoutReplacementSampler(10, 0), "batch_size"),
    (lambda: WithoutReplacementSampler(0, 1), "num_examples"),
  ],
)
def test_bad_input_is_refused_by_name(call, name):
  with pytest.raises(ValueError, match=name):
    call()


def test_samplers_describe_what_they_drew_to_the_accountant():
  poisson = PoissonSampler(num_examples=10_000, sample_rate=0.01, max_batch_size=170)
  assert poisson.accounting == {
    "sample_rate": 0.01,
    "sampling": "poisson",
    "num_examples": 10_000,
    "max_batch_size": 170,
  }
  assert poisson.overflow_probability == poisson_overflow_probability(10_000, 0.01, 170)
  fixed = WithoutReplacementSampler(num_examples=10_000, batch_size=100)
  eps = clipjax.dp_epsilon(2.0, steps=100, delta=1e-5, **fixed.accounting)
  explicit = clipjax.dp_epsilon(
    2.0, 0.01, 100, 1e-5, sampling="without_replacement", num_examples=10_000
  )
  assert eps == explicit
  assert eps > clipjax.dp_epsilon(2.0, 0.01, 100, 1e-5, sampling="poisson")
