"""The privacy noise sampler (``clipjax.privacy._gaussian``) against the exact Gaussian.

Oracles are float64 ``math`` functions (``log``, ``log1p``, ``cos``, ``sin``, ``erfc``),
not the sampler's code: its radius and angle are checked word by word on crafted bit
patterns (the far tail and the edge are reached deterministically), and its draws
against the standard normal CDF (a KS test on 10^7 draws) and in the tail (the number
of distinct values beyond 4.5σ, which ``jax.random.normal`` collapses onto a few dozen
levels). The 2.7e8-draw tail count runs with ``CLIPJAX_SLOW=1`` (it takes minutes).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax.privacy import _gaussian

KS_DRAWS = 10**7


def _words(k, upper):
  """The two radius words of a 63-bit integer ``k`` (``upper`` picks U = 1 − W)."""
  k = np.asarray(k, np.uint64)
  word0 = (k >> np.uint64(32)).astype(np.uint32) | (np.uint32(1 << 31) * np.uint32(upper))
  return word0, (k & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _radius_oracle(k, upper):
  """``sqrt(-2 log U)`` in float64 for ``W = (k + 1/2) 2^-64``, ``U = W`` or ``1 − W``."""
  out = []
  for ki in k:
    w = (int(ki) + 0.5) * 2.0**-64
    log_u = math.log1p(-w) if upper else math.log(int(ki) + 0.5) - 64 * math.log(2)
    out.append(math.sqrt(-2 * log_u))
  return np.array(out)


def _crafted_k():
  rng = np.random.default_rng(0)
  logs = rng.uniform(0, 63, 3000)
  k = np.floor(2.0**logs).astype(np.uint64)
  extremes = [0, 1, 2, 3, (1 << 24) - 1, 1 << 40, (1 << 63) - 1, (1 << 63) - 2]
  return np.concatenate([k, np.array(extremes, np.uint64)])


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 4e-7), (jnp.float64, 1e-14)])
@pytest.mark.parametrize("upper", [False, True])
def test_radius_against_float64_log(dtype, rtol, upper):
  k = _crafted_k()
  word0, word1 = _words(k, upper)
  got = jax.jit(lambda a, b: _gaussian._radius(a, b, jnp.dtype(dtype)))(word0, word1)
  got = np.asarray(got, np.float64)
  np.testing.assert_allclose(got, _radius_oracle(k, upper), rtol=rtol, atol=0)
  assert np.all(got > 0)  # no draw is rounded to U = 1: no atom at 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_edge(dtype):
  # The largest radius is the smallest cell's, k = 0 with U = W; EDGE is at or below it.
  word0, word1 = _words(np.array([0], np.uint64), False)
  top = float(_gaussian._radius(jnp.asarray(word0), jnp.asarray(word1), jnp.dtype(dtype))[0])
  exact = math.sqrt(130 * math.log(2))
  assert _gaussian.EDGE <= exact < _gaussian.EDGE + 1e-4
  assert abs(top - exact) <= 2e-6 * exact
  assert top >= 9  # the floor


def _unit_oracle(words, dtype):
  """``(cos θ, sin θ)`` in float64 from the words' symmetry bits and octant angle."""
  top = words[0].astype(np.uint64)
  square = top >> np.uint64(29)
  rest = top & np.uint64((1 << 29) - 1)
  if dtype == jnp.float64:
    cells = rest.astype(np.float64) * 2.0**32 + words[1].astype(np.float64) + 0.5
    phi = cells * (math.pi / 4) * 2.0**-61
  else:
    phi = (rest.astype(np.float64) + 0.5) * (math.pi / 4) * 2.0**-29
  c, s = np.cos(phi), np.sin(phi)
  swap = (square & np.uint64(1)) == 1
  a, b = np.where(swap, s, c), np.where(swap, c, s)
  a = np.where((square & np.uint64(2)) == 2, -a, a)
  b = np.where((square & np.uint64(4)) == 4, -b, b)
  return a, b


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1.5e-7), (jnp.float64, 3e-16)])
def test_angle_against_float64_trigonometry(dtype, atol):
  rng = np.random.default_rng(1)
  words = rng.integers(0, 2**32, (2, 20000), dtype=np.uint64).astype(np.uint32)
  # every symmetry with the octant's first and last cells
  crafted = np.array([(s << 29) | r for s in range(8) for r in (0, (1 << 29) - 1)], np.uint32)
  words[0, : crafted.size] = crafted
  words[1, : crafted.size] = np.uint32(0xFFFFFFFF)
  n = 2 if dtype == jnp.float64 else 1
  a, b = jax.jit(lambda w: _gaussian._unit_pair(w, jnp.dtype(dtype)))(jnp.asarray(words[:n]))
  want_a, want_b = _unit_oracle(words, dtype)
  np.testing.assert_allclose(np.asarray(a, np.float64), want_a, rtol=0, atol=atol)
  np.testing.assert_allclose(np.asarray(b, np.float64), want_b, rtol=0, atol=atol)
  # The 8 symmetries map the first octant onto the 8 octants of the circle.
  octant = np.floor(np.arctan2(want_b[:16:2], want_a[:16:2]) / (math.pi / 4)) % 8
  assert sorted(octant.astype(int)) == list(range(8))


def _normal_cdf(x):
  """Φ at float64 points, from ``math.erfc`` on a 1e-4 grid (interpolation error < 1e-9)."""
  grid = np.linspace(-12, 12, 240_001)
  table = np.array([0.5 * math.erfc(-g / math.sqrt(2)) for g in grid])
  return np.interp(x, grid, table)


def _ks_statistic(x):
  x = np.sort(np.asarray(x, np.float64).ravel())
  n = x.size
  cdf = _normal_cdf(x)
  return max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))


def test_ks_float32():
  x = jax.jit(lambda k: _gaussian.normal(k, (KS_DRAWS,), jnp.float32))(jax.random.key(3))
  d = _ks_statistic(x)
  # The 0.1% critical value is 1.95/sqrt(n) = 6.2e-4; a sampler off by 1% in scale
  # gives D near 2.4e-3.
  assert d < 1.95 / math.sqrt(KS_DRAWS), d


def test_ks_float64_and_shapes():
  x = jax.jit(lambda k: _gaussian.normal(k, (999, 1001), jnp.float64))(jax.random.key(4))
  assert x.dtype == jnp.float64 and x.shape == (999, 1001)
  assert _ks_statistic(x) < 1.95 / math.sqrt(x.size)
  odd = _gaussian.normal(jax.random.key(5), (3,), jnp.float32)  # an odd count of draws
  assert odd.shape == (3,) and np.all(np.isfinite(odd)) and len(set(np.asarray(odd))) == 3


def _tail(chunks, chunk=1 << 24):
  """Draws beyond 4.5σ, and the count beyond 5.45σ, of ``chunks`` chunks of draws."""
  draw = jax.jit(lambda k: _gaussian.normal(k, (chunk,), jnp.float32))
  far, beyond = [], 0
  for i in range(chunks):
    x = np.abs(np.asarray(draw(jax.random.fold_in(jax.random.key(6), i))))
    far.append(x[x > 4.5])
    beyond += int(np.sum(x > 5.45))
  return np.concatenate(far), beyond


def _poisson_bounds(mean, sds=5):
  return mean - sds * math.sqrt(mean), mean + sds * math.sqrt(mean)


def test_tail_values_are_distinct():
  # 2^23 draws: about 57 beyond 4.5σ, where jax.random.normal's float32 draws take a
  # few dozen distinct values (57 in 1863 of 2.7e8 draws); the sampler's are all distinct.
  far, _ = _tail(1, chunk=1 << 23)
  expected = (1 << 23) * math.erfc(4.5 / math.sqrt(2))
  low, high = _poisson_bounds(expected)
  assert low < far.size < high
  assert np.unique(far).size >= far.size - 2


@pytest.mark.skipif(not os.environ.get("CLIPJAX_SLOW"), reason="2.7e8 draws: CLIPJAX_SLOW=1")
def test_tail_of_270_million_draws():
  # jax.random.normal: nothing beyond 5.42σ, and a handful of levels beyond 4.5σ.
  chunks = 16  # 2.68e8 draws
  far, beyond = _tail(chunks)
  n = chunks * (1 << 24)
  low, high = _poisson_bounds(n * math.erfc(5.45 / math.sqrt(2)))
  assert max(low, 1) <= beyond < high, beyond
  low, high = _poisson_bounds(n * math.erfc(4.5 / math.sqrt(2)))
  assert low < far.size < high
  assert np.unique(far).size >= far.size - 5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64])
def test_noisy_adds_in_full_precision_and_casts_once(dtype):
  value = jnp.linspace(-3, 3, 4097).astype(dtype)
  key = jax.random.key(7)
  got = _gaussian.noisy(value, 0.7, key, divisor=3)
  wide = jnp.float64 if dtype == jnp.float64 else jnp.float32
  noise = _gaussian.normal(key, value.shape, wide)
  want = ((value.astype(wide) + jnp.asarray(0.7, wide) * noise) / 3).astype(dtype)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # A Python zero draws nothing and still divides in full precision.
  exact = (value.astype(wide) / 3).astype(dtype)
  np.testing.assert_array_equal(np.asarray(_gaussian.noisy(value, 0, None, 3)), exact)


def test_edge_delta():
  for z in (0.5, 0.7, 1.0, 3.0):
    want = 0.5 * math.erfc((_gaussian.EDGE - 1 / z) / math.sqrt(2))
    assert _gaussian.edge_delta(z) == pytest.approx(want, rel=1e-12)
  assert 5e-18 < _gaussian.edge_delta(1.0) < 2e-17
  assert _gaussian.edge_delta(0.0) == 1.0
