"""Tests for clipjax._norms: norms over the whole float range, weights, weighted sums.

The oracle is exact: every float is a rational, so the largest magnitude of a row is
found exactly with ``fractions.Fraction`` and the remaining sum is taken in float64 on
ratios <= 1, which neither overflows nor loses the dominant terms; the norm is
compared in log2, where every dtype's range fits.
"""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import privacy_oracle
import pytest

from clipjax import _norms

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]
PS = [1.0, 1.5, 2.0, 3.0, 8.0, 32.0, math.inf]


def _log2_norm(row, p):
  """log2 of the p-norm of exactly representable floats (-inf for zero)."""
  mags = [abs(Fraction(float(v))) for v in row]
  top = max(mags)
  if top == 0:
    return -math.inf
  log_top = math.log2(top.numerator) - math.log2(top.denominator)
  if p == math.inf:
    return log_top
  return log_top + math.log2(sum(float(m / top) ** p for m in mags)) / p


def _rows(dtype, seed=0):
  """Rows of six entries from the smallest subnormal to the largest finite value."""
  info = jnp.finfo(dtype)
  values = [
    float(info.smallest_subnormal),
    3 * float(info.smallest_subnormal),
    float(info.tiny) / 3,
    float(info.tiny),
    1e-3,
    1.0,
    7.5,
    float(info.max) / 8,
    float(info.max),
  ]
  rng = np.random.default_rng(seed)
  rows = [np.full(6, v) for v in values] + [np.zeros(6)]
  rows += [rng.choice(values, 6) * rng.choice([-1.0, 1.0], 6) for _ in range(24)]
  rows = np.asarray(jnp.asarray(np.stack(rows), dtype))  # exactly representable
  return rows, np.asarray(rows).astype(np.float64)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_per_example_norms_over_the_whole_float_range(dtype, p):
  rows, exact = _rows(dtype)
  tree = {"a": jnp.asarray(rows[:, :4]), "b": jnp.asarray(rows[:, 4:]).reshape(-1, 1, 2)}
  n = jax.jit(lambda t: _norms.norms(t, p))(tree)
  acc = jnp.finfo(_norms.accumulation_dtype(tree))
  assert bool(jnp.all(n.finite))
  units, exponents = np.asarray(n.unit, np.float64), np.asarray(n.exponent)
  value = np.asarray(n.value, np.float64)
  for i, row in enumerate(exact):
    want = _log2_norm(row, p)
    if want == -math.inf:
      assert value[i] == 0 and units[i] == 0
      continue
    # unit · 2^exponent is the norm to float rounding, wherever it lies (the float64
    # logarithms themselves are exact to about |want|·2^-52).
    tolerance = 8 * float(acc.eps) + abs(want) * 2.0**-50
    got_log = math.log2(units[i]) + exponents[i]
    assert abs(got_log - want) * math.log(2) < tolerance, (i, got_log, want)
    if want >= math.log2(float(acc.max)):
      assert value[i] == np.inf or value[i] >= 2.0 ** (want - 1e-6)
    elif want < math.log2(float(acc.tiny)):  # a subnormal result: within one ulp of it
      assert abs(value[i] - 2.0**want) <= float(acc.smallest_subnormal) + 2.0**want * tolerance
    else:
      assert abs(math.log2(value[i]) - want) * math.log(2) < tolerance


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_global_norm_is_the_flattened_rows_norm(p):
  rows, exact = _rows(jnp.float32, seed=1)
  got = float(jax.jit(lambda t: _norms.global_norm(t, p))({"x": jnp.asarray(rows[:12])}))
  want = _log2_norm(exact[:12].ravel(), p)
  assert got == np.inf or abs(math.log2(got) - want) < 1e-6


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, 8.0, math.inf])
def test_gradients_match_finite_differences(p):
  rng = np.random.default_rng(2)
  f = jax.jit(lambda t: _norms.global_norm({"a": t, "b": 2 * t[:2]}, p))
  grad = jax.jit(jax.grad(f))
  per_example = lambda t: _norms.norms(t, p).value
  fwd, rev = jax.jit(jax.jacfwd(per_example)), jax.jit(jax.jacrev(per_example))
  # Plain sums, and sums that overflow or underflow float64 (the scaled path).
  for scale in [1.0, 1e250, 1e-250]:
    v = jnp.asarray(rng.normal(size=5) * scale)
    h = 1e-6 * scale
    fd = [(f(v + h * e) - f(v - h * e)) / (2 * h) for e in np.eye(5)]
    np.testing.assert_allclose(grad(v), fd, rtol=1e-6, atol=1e-8)
    # Forward and reverse mode agree on per-example norms; a zero row has gradient 0.
    x = jnp.asarray(rng.normal(size=(3, 4)) * scale).at[1].set(0.0)
    np.testing.assert_allclose(fwd(x), rev(x), rtol=1e-12, atol=1e-300)
    assert np.all(np.asarray(fwd(x))[1] == 0)


@pytest.mark.parametrize("scaling", _norms.SCALINGS)
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_weights_and_weighted_sums_match_oracle(scaling, p):
  rng = np.random.default_rng(3)
  g = rng.normal(size=(16, 7)) * 10.0 ** rng.uniform(-2, 2, size=(16, 1))
  g[4] = 0.0
  mask = np.ones(16, bool)
  mask[[2, 9]] = False
  tree = {"w": jnp.asarray(g[:, :5]), "b": jnp.asarray(g[:, 5:])}

  @jax.jit
  def run(tree, c):
    n = _norms.norms(tree, p, mask=jnp.asarray(mask))
    w = _norms.clip_weights(n, c, scaling=scaling, mask=jnp.asarray(mask))
    scaled = jax.tree.map(lambda leaf: _norms.scale_examples(leaf, w), tree)
    return _norms.reported(n, jnp.asarray(mask)), scaled, _norms.weighted_sum(tree, w)

  norms = np.linalg.norm(g, ord=p, axis=1)
  for c in [0.05, 1.0, 30.0]:
    got_norms, scaled, summed = run(tree, c)
    weights = np.where(mask, privacy_oracle.clip_weights(norms, c, scaling), 0.0)
    np.testing.assert_allclose(got_norms, np.where(mask, norms, 0), rtol=1e-12)
    flat = np.concatenate([scaled["w"], scaled["b"]], axis=1)
    np.testing.assert_allclose(flat, g * weights[:, None], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(
      np.concatenate([summed["w"], summed["b"]]), weights @ g, rtol=1e-12, atol=1e-14
    )
    # Every rule bounds every example's contribution by C.
    assert np.all(np.linalg.norm(flat, ord=p, axis=1) <= c * (1 + 1e-12))


@pytest.mark.parametrize("scaling", _norms.SCALINGS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_finite_examples_beyond_the_range_are_clipped_not_zeroed(scaling, dtype):
  big = float(jnp.finfo(dtype).max)
  g = jnp.asarray(
    [[big, big, -big], [3.0, 4.0, 0.0], [1e5, 1.0, 0.0], [np.nan, 1.0, 1.0], [-big, 0.0, 0.0]],
    dtype,
  )
  n = jax.jit(lambda g: _norms.norms({"w": g}, 8.0))(g)
  w = _norms.clip_weights(n, 1.0, scaling=scaling)
  clipped = np.asarray(_norms.scale_examples(g, w), np.float64)
  assert list(np.asarray(n.finite)) == [True, True, True, False, True]
  assert np.all(clipped[3] == 0)
  # The first example's norm overflows, the last one's is the largest float: C/‖g‖
  # is subnormal for both. Clipped, they point the same way with norm ~C.
  np.testing.assert_allclose(clipped[0], np.array([1, 1, -1]) / 3 ** (1 / 8), rtol=1e-2)
  np.testing.assert_allclose(clipped[4], [-1, 0, 0], rtol=1e-2)
  summed = np.asarray(_norms.weighted_sum({"w": g}, w)["w"], np.float64)
  np.testing.assert_allclose(summed, np.delete(clipped, 3, 0).sum(0), rtol=2e-2, atol=1e-6)
  assert np.all(np.isfinite(summed))


def test_subnormal_examples_are_kept_or_normalized_exactly():
  tiny = float(jnp.finfo(jnp.float32).smallest_subnormal)
  g = jnp.asarray([[tiny, 2 * tiny, 0.0], [0.0, 0.0, 0.0]], jnp.float32)
  n = _norms.norms(g, 2.0)
  clip = _norms.scale_examples(g, _norms.clip_weights(n, 1.0))
  assert np.array_equal(np.asarray(clip), np.asarray(g))  # within C: untouched, bit for bit
  unit = np.asarray(_norms.scale_examples(g, _norms.clip_weights(n, 1.0, scaling="normalize")))
  np.testing.assert_allclose(unit[0], np.array([1, 2, 0]) / math.sqrt(5), rtol=1e-6)
  assert np.all(unit[1] == 0)


def test_groups_split_by_prefix_and_refuse_other_structures():
  tree = {"dense": {"w": jnp.ones((2, 3)), "b": jnp.ones((2,))}, "out": jnp.ones((2, 4))}
  prefix, norms, subtrees = _norms.groups({"dense": 1.0, "out": 2.0}, tree)
  assert norms == [1.0, 2.0] and subtrees[1].shape == (2, 4)
  assert prefix.unflatten(subtrees) == tree
  _, norms, subtrees = _norms.groups(0.5, tree)
  assert norms == [0.5] and subtrees == [tree]
  with pytest.raises(ValueError, match="prefix"):
    _norms.groups({"dense": 1.0}, tree)
  with pytest.raises(ValueError, match="scalar"):
    _norms.groups({"dense": jnp.ones(2), "out": 1.0}, tree)
