"""Tests for clipjax.privacy against float64 NumPy oracles."""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipjax.privacy import (
  AdaptiveDPAggregateState,
  ClippingStats,
  DPAggregateState,
  DPNoiseState,
  adaptive_dp_aggregate,
  clipping_stats,
  dp_aggregate,
  dp_noise,
  per_example_clip,
)

BATCH = 16

# Tests call the library through `jit`: one compilation per test instead of
# one per primitive keeps the suite fast.
_clip = jax.jit(per_example_clip, static_argnames="p")
_stats = jax.jit(clipping_stats)


def _tree(seed=0, batch=BATCH, dtype=np.float32):
  """Per-example pytree with ranks 1 to 3 and norms spread over two decades."""
  rng = np.random.default_rng(seed)
  scales = 10.0 ** rng.uniform(-1, 1, size=batch)
  tree = {
    "dense": {
      "w": rng.normal(size=(batch, 5, 3)),
      "b": rng.normal(size=(batch, 3)),
    },
    "conv": rng.normal(size=(batch, 2, 2, 2)),
    "scalar": rng.normal(size=(batch,)),
  }
  return jax.tree.map(
    lambda x: jnp.asarray(x * scales.reshape((-1,) + (1,) * (x.ndim - 1)), dtype),
    tree,
  )


def _flat(tree):
  """(batch, n) float64 NumPy matrix: the oracle's view of a per-example tree."""
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1)


def _oracle_clip(flat, clip_norm, p):
  norms = np.linalg.norm(flat, ord=p, axis=1)
  scale = np.where(norms > clip_norm, clip_norm / np.maximum(norms, 1e-300), 1.0)
  return flat * scale[:, None], norms


def _std_error_of_std(n):
  # Standard error of a sample standard deviation, relative to it, for
  # Gaussian samples.
  return 1.0 / math.sqrt(2 * (n - 1))


# ---------------------------------------------------------------- per_example_clip


@pytest.mark.parametrize("p", [1, 1.5, 2, np.inf, "inf"])
def test_every_example_within_bound(p):
  tree = _tree()
  p_num = np.inf if p == "inf" else p
  # The median norm: half the examples are clipped, half are not.
  clip_norm = float(np.median(np.linalg.norm(_flat(tree), ord=p_num, axis=1)))
  clipped, norms = _clip(tree, clip_norm, p=p)
  expected, expected_norms = _oracle_clip(_flat(tree), clip_norm, p_num)
  got = _flat(clipped)
  np.testing.assert_allclose(norms, expected_norms, rtol=2e-6)
  np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
  got_norms = np.linalg.norm(got, ord=p_num, axis=1)
  assert np.all(got_norms <= clip_norm * (1 + 1e-6))
  assert np.sum(expected_norms > clip_norm) == BATCH // 2
  assert jax.tree.map(lambda x: x.dtype, clipped) == jax.tree.map(lambda x: x.dtype, tree)


@pytest.mark.parametrize("p", [1, 1.5, 2, np.inf])
def test_bad_examples_zeroed_others_intact(p):
  tree = _tree()
  tree["dense"]["w"] = tree["dense"]["w"].at[3, 0, 0].set(jnp.nan)
  tree["conv"] = tree["conv"].at[7, 1, 0, 1].set(jnp.inf)
  tree["scalar"] = tree["scalar"].at[11].set(-jnp.inf)
  bad = np.zeros(BATCH, bool)
  bad[[3, 7, 11]] = True
  clipped, norms = _clip(tree, 1.0, p=p)
  got = _flat(clipped)
  assert np.all(np.isfinite(got))
  assert np.all(got[bad] == 0)
  assert np.all(np.isinf(np.asarray(norms)[bad]))
  expected, expected_norms = _oracle_clip(_flat(tree)[~bad], 1.0, p)
  np.testing.assert_allclose(got[~bad], expected, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(norms)[~bad], expected_norms, rtol=2e-6)


def test_bad_examples_skipped_by_dp_aggregate():
  tree = _tree()
  tree["conv"] = tree["conv"].at[5].set(jnp.nan)
  tx = dp_aggregate(1.0, 0.0, key=0)
  updates, _ = jax.jit(tx.update)(tree, tx.init(None))
  good = np.arange(BATCH) != 5
  expected = _oracle_clip(_flat(tree)[good], 1.0, 2)[0].sum(0) / BATCH
  np.testing.assert_allclose(
    _flat(jax.tree.map(lambda x: x[None], updates))[0], expected, rtol=2e-6, atol=1e-7
  )


def test_zero_clip_norm_and_zero_gradients_no_nan():
  tree = _tree()
  zeros = jax.tree.map(jnp.zeros_like, tree)
  for grads in (tree, zeros):
    for clip_norm in (0.0, jnp.float32(0.0)):
      clipped, norms = _clip(grads, clip_norm)
      assert np.all(_flat(clipped) == 0)
      assert np.all(np.isfinite(norms))
  clipped, norms = _clip(zeros, 1.0)
  assert np.all(_flat(clipped) == 0) and np.all(np.asarray(norms) == 0)


def test_infinite_clip_norm_is_identity():
  tree = _tree()
  clipped, _ = _clip(tree, jnp.inf)
  np.testing.assert_array_equal(_flat(clipped), _flat(tree))


def test_per_example_clip_validates():
  tree = _tree()
  with pytest.raises(ValueError, match="p must be"):
    per_example_clip(tree, 1.0, p=0.5)
  with pytest.raises(ValueError, match="clip_norm"):
    per_example_clip(tree, -1.0)
  with pytest.raises(ValueError, match="batch axis"):
    per_example_clip({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}, 1.0)
  with pytest.raises(ValueError, match="batch axis"):
    per_example_clip({"a": jnp.ones(())}, 1.0)


# ---------------------------------------------------------------- dp_aggregate


def test_zero_noise_equals_optax_per_example_global_norm_clip_mean():
  tree = {"dense": _tree()["dense"]}  # optax draws (zero-scaled) noise per leaf
  leaves, treedef = jax.tree.flatten(tree)
  summed, _ = optax.per_example_global_norm_clip(leaves, 1.5)
  expected = jax.tree.unflatten(treedef, [s / BATCH for s in summed])
  tx = dp_aggregate(1.5, 0.0, key=jax.random.key(3))
  updates, state = jax.jit(tx.update)(tree, tx.init(None))
  assert isinstance(state, DPAggregateState)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    updates,
    expected,
  )
  # The optax reference transformation agrees too.
  reference = optax.contrib.differentially_private_aggregate(1.5, 0.0, key=0)
  ref_updates, _ = jax.jit(reference.update)(tree, reference.init(None))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    updates,
    ref_updates,
  )


def test_noise_standard_deviation_and_fresh_noise():
  clip_norm, sigma, batch, n = 0.7, 1.3, 4, 200_000
  grads = {
    "w": jnp.zeros((batch, n // 2), jnp.float32),
    "b": jnp.zeros((batch, 2, n // 4), jnp.float32),
  }
  tx = dp_aggregate(clip_norm, sigma, key=jax.random.key(42))
  update = jax.jit(tx.update)
  first, state = update(grads, tx.init(None))
  second, _ = update(grads, state)
  x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(first)]).astype(np.float64)
  expected_std = sigma * clip_norm / batch
  assert x.dtype == np.float64 and x.size == n
  assert abs(x.std() / expected_std - 1) < 6 * _std_error_of_std(n)
  assert abs(x.mean()) < 6 * expected_std / math.sqrt(n)
  # Fresh noise every step: consecutive draws are uncorrelated.
  y = np.concatenate([np.ravel(v) for v in jax.tree.leaves(second)])
  assert abs(np.corrcoef(x, y)[0, 1]) < 6 / math.sqrt(n)


def _clamp_mean_closed_form(g):
  """E[clamp(g + ζ, −1, 1)] for ζ ~ N(0, 1): clipping a scalar at C = 1."""
  cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))
  pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
  lo, hi = -1 - g, 1 - g
  inside = g * (cdf(hi) - cdf(lo)) + pdf(lo) - pdf(hi)
  return -cdf(lo) + (1 - cdf(hi)) + inside


def test_chen_wu_hong_one_dimensional_example():
  # Losses ½(x − a_i)² with a = (−3, 3): at x = 1 the per-example gradients
  # are 4 and −2. Clipped at C = 1 they cancel; with k = 1 the mean points
  # back toward the optimum x = 0.
  grads = jnp.array([[4.0], [-2.0]], jnp.float32)
  tx = dp_aggregate(1.0, 0.0, key=0)
  assert float(jax.jit(tx.update)(grads, tx.init(None))[0][0]) == 0.0

  expected = (_clamp_mean_closed_form(4.0) + _clamp_mean_closed_form(-2.0)) / 2
  assert abs(expected - 0.0413) < 5e-5
  draws = 1_000_000
  batch = jnp.tile(grads, (draws, 1))  # every copy gets its own ζ_i
  tx = dp_aggregate(1.0, 0.0, key=jax.random.key(7), pre_clip_noise=1.0)
  clipped, _ = _clip(
    batch + jax.random.normal(jax.random.key(8), batch.shape, jnp.float32),
    1.0,
  )
  # The estimate averages i.i.d. pairs; their spread gives its standard error.
  pairs = clipped[:, 0].reshape(draws, 2).mean(axis=1)
  std_error = float(jnp.std(pairs)) / math.sqrt(draws)
  estimate = float(jax.jit(tx.update)(batch, tx.init(None))[0][0])
  assert abs(estimate - expected) < 6 * std_error
  assert std_error < 0.001  # the test can tell 0.0413 from 0


def test_keys_seed_typed_and_raw_agree():
  grads = jnp.zeros((3, 5), jnp.float32)
  outs = []
  for key in (5, jax.random.key(5), jax.random.PRNGKey(5)):
    tx = dp_aggregate(1.0, 1.0, key=key)
    outs.append(np.asarray(jax.jit(tx.update)(grads, tx.init(None))[0]))
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], outs[2])
  assert np.any(outs[0] != 0)


def test_dp_aggregate_validates():
  with pytest.raises(ValueError, match="noise_multiplier"):
    dp_aggregate(1.0, -1.0, key=0)
  with pytest.raises(ValueError, match="pre_clip_noise"):
    dp_aggregate(1.0, 1.0, key=0, pre_clip_noise=-0.1)
  with pytest.raises(ValueError, match="p must be"):
    dp_aggregate(1.0, 1.0, key=0, p="two")


def test_p_norm_aggregation():
  tree = _tree()
  tx = dp_aggregate(1.0, 0.0, key=0, p=1)
  updates, _ = jax.jit(tx.update)(tree, tx.init(None))
  expected = _oracle_clip(_flat(tree), 1.0, 1)[0].mean(0)
  got = _flat(jax.tree.map(lambda x: x[None], updates))[0]
  np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)


def test_inject_hyperparams_dp_aggregate():
  # Two leaves: compiling the noise draws dominates this test's time.
  tree = {"w": _tree()["dense"]["w"], "b": _tree()["scalar"]}
  params = jax.tree.map(lambda x: x[0], tree)
  tx = optax.inject_hyperparams(dp_aggregate, static_args=("p",))(
    clip_norm=1.0, noise_multiplier=0.0, key=0, pre_clip_noise=0.0
  )
  state = tx.init(params)
  state.hyperparams["clip_norm"] = jnp.asarray(0.25)
  updates, state = jax.jit(tx.update)(tree, state, params)
  expected = _oracle_clip(_flat(tree), 0.25, 2)[0].mean(0)
  got = _flat(jax.tree.map(lambda x: x[None], updates))[0]
  np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
  # Traced noise hyperparameters draw noise.
  state.hyperparams["noise_multiplier"] = jnp.asarray(1.0)
  state.hyperparams["pre_clip_noise"] = jnp.asarray(0.5)
  noisy, _ = jax.jit(tx.update)(tree, state, params)
  assert not np.allclose(_flat(jax.tree.map(lambda x: x[None], noisy))[0], got)
  # A traced p gets a helpful message.
  bad = optax.inject_hyperparams(dp_aggregate)(1.0, 0.0, key=0)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(bad.update)(tree, bad.init(params), params)


def test_dp_aggregate_in_a_chain_under_jit():
  tree = {"w": _tree()["dense"]["w"]}
  params = jax.tree.map(lambda x: jnp.zeros_like(x[0]), tree)
  tx = optax.chain(dp_aggregate(1.0, 0.5, key=1), optax.sgd(0.1))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = jax.jit(tx.update)(tree, state, params)
    return optax.apply_updates(params, updates), state

  params, state = step(params, state)
  params, state = step(params, state)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------- adaptive


def _norm_tree(norms, dim=6, seed=0):
  """Per-example gradients with the given global L2 norms, split over two leaves."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(len(norms), dim))
  u *= (np.asarray(norms) / np.linalg.norm(u, axis=1))[:, None]
  return {
    "a": jnp.asarray(u[:, :2], jnp.float32),
    "b": jnp.asarray(u[:, 2:].reshape(-1, 2, 2), jnp.float32),
  }


def test_adaptive_deterministic_trajectory():
  norms = np.array([0.2, 0.5, 1.0, 1.5, 3.0, 4.0, 8.0])
  grads = _norm_tree(norms)
  flat = _flat(grads)
  gamma, eta, c = 0.3, 0.4, 0.1
  tx = adaptive_dp_aggregate(
    c,
    0.0,
    key=0,
    target_quantile=gamma,
    clip_learning_rate=eta,
    count_noise_stddev=0.0,
  )
  state = tx.init(None)
  assert isinstance(state, AdaptiveDPAggregateState)
  update = jax.jit(tx.update)
  for _ in range(25):
    updates, state = update(grads, state)
    # The update uses the clip norm from before this step's adaptation.
    expected = _oracle_clip(flat, c, 2)[0].mean(0)
    np.testing.assert_allclose(
      _flat(jax.tree.map(lambda x: x[None], updates))[0],
      expected,
      rtol=1e-5,
      atol=1e-7,
    )
    fraction = np.mean(norms <= c)
    c = c * math.exp(-eta * (fraction - gamma))
    np.testing.assert_allclose(float(state.clip_norm), c, rtol=1e-5)
  # It settled between the norms around the 0.3 quantile.
  assert 0.5 <= c <= 1.5 * math.exp(eta)


def test_adaptive_default_count_noise_is_zero_without_privacy():
  grads = _norm_tree([0.5, 2.0, 3.0, 4.0])
  tx = adaptive_dp_aggregate(1.0, 0.0, key=0)
  _, state = jax.jit(tx.update)(grads, tx.init(None))
  np.testing.assert_allclose(float(state.clip_norm), math.exp(-0.2 * (0.25 - 0.5)))


@pytest.mark.parametrize("initial", [0.05, 20.0])
def test_adaptive_tracks_median_with_count_noise(initial):
  batch, steps = 256, 300
  noise_multiplier = 1.0  # default σ_b = B/20 = 12.8 on the count

  tx = adaptive_dp_aggregate(initial, noise_multiplier, key=jax.random.key(0))

  def step(carry, key):
    (state,) = carry
    # Fresh per-example gradients each step: random directions in R^8 with
    # log-normal norms whose median is exactly 1.
    direction = jax.random.normal(key, (batch, 8), jnp.float32)
    direction /= jnp.linalg.norm(direction, axis=1, keepdims=True)
    scale = jnp.exp(jax.random.normal(jax.random.fold_in(key, 1), (batch, 1)))
    _, state = tx.update({"w": direction * scale}, state)
    return (state,), state.clip_norm

  _, trajectory = jax.jit(lambda s, k: jax.lax.scan(step, (s,), k))(
    tx.init(None), jax.random.split(jax.random.key(1), steps)
  )
  tail = np.log(np.asarray(trajectory[steps // 2 :]))
  # The 0.45 and 0.55 quantiles of the log-normal norm are exp(∓0.126).
  assert abs(tail.mean()) < 0.126
  assert np.all(np.abs(tail) < 0.4)


def test_noise_split_formula():
  batch, n, z, clip_norm = 20, 200_000, 1.0, 0.5
  grads = {"w": jnp.zeros((batch, n), jnp.float32)}
  for sigma_b in (None, 0.6):
    tx = adaptive_dp_aggregate(clip_norm, z, key=jax.random.key(3), count_noise_stddev=sigma_b)
    updates, state = jax.jit(tx.update)(grads, tx.init(None))
    sigma_b = batch / 20 if sigma_b is None else sigma_b
    z_sum = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert z_sum > 1.15  # distinguishable from z at this sample size
    expected_std = z_sum * clip_norm / batch
    x = np.asarray(updates["w"], np.float64)
    assert abs(x.std() / expected_std - 1) < 6 * _std_error_of_std(n)
    # All examples fit (norm 0 <= C), so the noised fraction is near 1 and
    # the clip norm shrinks.
    assert float(state.clip_norm) < clip_norm


def test_noise_split_refused():
  with pytest.raises(ValueError, match="count_noise_stddev"):
    adaptive_dp_aggregate(1.0, 1.0, key=0, count_noise_stddev=0.5)
  with pytest.raises(ValueError, match="count_noise_stddev"):
    adaptive_dp_aggregate(1.0, 0.5, key=0, count_noise_stddev=0.0)
  tx = adaptive_dp_aggregate(1.0, 2.0, key=0)  # default σ_b = B/20
  with pytest.raises(ValueError, match="count_noise_stddev"):
    jax.jit(tx.update)(jnp.ones((20, 3)), tx.init(None))  # σ_b = 1: needs z < 2
  updates, _ = jax.jit(tx.update)(jnp.ones((40, 3)), tx.init(None))  # σ_b = 2
  assert np.all(np.isfinite(updates))
  # Traced values cannot be checked: the invalid split gives NaN, not a
  # finite wrong answer.
  tx = optax.inject_hyperparams(adaptive_dp_aggregate)(1.0, 1.0, key=0, count_noise_stddev=2.0)
  params = jnp.zeros(3)
  state = tx.init(params)
  state.hyperparams["noise_multiplier"] = jnp.asarray(5.0)
  updates, _ = jax.jit(tx.update)(jnp.ones((20, 3)), state, params)
  assert np.all(np.isnan(updates))


def test_adaptive_validates():
  with pytest.raises(ValueError, match="initial_clip_norm"):
    adaptive_dp_aggregate(0.0, 1.0, key=0)
  with pytest.raises(ValueError, match="target_quantile"):
    adaptive_dp_aggregate(1.0, 1.0, key=0, target_quantile=1.5)
  with pytest.raises(ValueError, match="clip_learning_rate"):
    adaptive_dp_aggregate(1.0, 1.0, key=0, clip_learning_rate=-1.0)


def test_inject_hyperparams_adaptive():
  norms = np.array([0.2, 0.5, 1.0, 1.5, 3.0, 4.0, 8.0])
  grads = _norm_tree(norms)
  params = jax.tree.map(lambda x: x[0], grads)
  tx = optax.inject_hyperparams(adaptive_dp_aggregate)(1.0, 0.0, key=0, count_noise_stddev=0.0)
  state = tx.init(params)
  state.hyperparams["clip_learning_rate"] = jnp.asarray(0.5)
  state.hyperparams["target_quantile"] = jnp.asarray(0.9)
  _, state = jax.jit(tx.update)(grads, state, params)
  expected = math.exp(-0.5 * (np.mean(norms <= 1.0) - 0.9))
  np.testing.assert_allclose(float(state.inner_state.clip_norm), expected, rtol=1e-6)


# ---------------------------------------------------------------- clipping_stats


def test_clipping_stats_against_oracle():
  tree = _tree()
  stats = jax.jit(clipping_stats)(tree, 2.0)
  assert isinstance(stats, ClippingStats)
  flat = _flat(tree)
  clipped, norms = _oracle_clip(flat, 2.0, 2)
  a, b = clipped.mean(0), flat.mean(0)
  np.testing.assert_allclose(stats.fraction_clipped, np.mean(norms > 2.0))
  np.testing.assert_allclose(stats.mean_norm, norms.mean(), rtol=1e-6)
  np.testing.assert_allclose(stats.bias_norm, np.linalg.norm(a - b), rtol=1e-5)
  np.testing.assert_allclose(stats.cosine, a @ b / np.linalg.norm(a) / np.linalg.norm(b), rtol=1e-5)


def test_clipping_stats_safe_when_zero():
  zeros = jax.tree.map(jnp.zeros_like, _tree())
  for clip_norm in (0.0, 1.0):
    stats = _stats(zeros, clip_norm)
    assert tuple(map(float, stats)) == (0.0, 0.0, 0.0, 1.0)
  # Everything clipped to zero while the mean is not: cosine 0, not NaN.
  stats = _stats(_tree(), 0.0)
  assert float(stats.cosine) == 0.0 and float(stats.fraction_clipped) == 1.0


def test_clipping_stats_with_bad_example():
  tree = _tree()
  tree["scalar"] = tree["scalar"].at[0].set(jnp.nan)
  stats = _stats(tree, 2.0)
  assert np.isinf(stats.mean_norm)
  assert np.isfinite(stats.bias_norm) and np.isfinite(stats.cosine)


# ---------------------------------------------------------------- dp_noise


def test_dp_noise_statistics_and_chain():
  n, batch, clip_norm, sigma = 200_000, 8, 2.0, 0.8
  summed = jnp.full((n,), 4.0, jnp.float32)
  tx = dp_noise(clip_norm, sigma, batch, key=jax.random.key(0))
  state = tx.init(summed)
  assert isinstance(state, DPNoiseState)
  out, state = jax.jit(tx.update)(summed, state)
  x = np.asarray(out, np.float64)
  expected_std = sigma * clip_norm / batch
  assert abs(x.mean() - 0.5) < 6 * expected_std / math.sqrt(n)
  assert abs(x.std() / expected_std - 1) < 6 * _std_error_of_std(n)
  out2, _ = jax.jit(tx.update)(summed, state)
  assert not np.array_equal(out, out2)

  chained = optax.chain(dp_noise(1.0, 0.0, 4, key=0), optax.sgd(1.0))
  updates, _ = chained.update(jnp.array([2.0, -4.0]), chained.init(jnp.zeros(2)))
  np.testing.assert_allclose(updates, [-0.5, 1.0])


def test_inject_hyperparams_dp_noise():
  tx = optax.inject_hyperparams(dp_noise)(1.0, 0.0, 4, key=0)
  params = jnp.zeros(3, jnp.float32)
  state = tx.init(params)
  state.hyperparams["batch_size"] = jnp.asarray(2.0)
  updates, _ = jax.jit(tx.update)(jnp.ones(3, jnp.float32), state, params)
  np.testing.assert_allclose(updates, 0.5)


def test_dp_noise_validates():
  with pytest.raises(ValueError, match="batch_size"):
    dp_noise(1.0, 1.0, 0, key=0)


# ---------------------------------------------------------------- sharding


_SHARDED_SCRIPT = textwrap.dedent(
  """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import clipjax
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(0)
    grads = {"w": rng.normal(size=(32, 6, 3)).astype(np.float32),
             "b": rng.normal(size=(32, 3)).astype(np.float32)}
    grads["w"][5, 0, 0] = np.nan
    expected_clip, expected_norms = clipjax.per_example_clip(grads, 1.0)
    tx = clipjax.dp_aggregate(1.0, 0.0, key=0)
    expected_agg, _ = tx.update(grads, tx.init(None))
    with jax.set_mesh(mesh):
        sharded = jax.tree.map(
            lambda x: jax.device_put(x, NamedSharding(mesh, P("batch"))), grads)
        clip, norms = jax.jit(lambda g: clipjax.per_example_clip(g, 1.0))(sharded)
        assert clip["w"].sharding.spec[0] == "batch", clip["w"].sharding
        agg, _ = jax.jit(tx.update)(sharded, tx.init(None))
        stats = jax.jit(clipjax.clipping_stats)(sharded, 1.0)
        ada = clipjax.adaptive_dp_aggregate(1.0, 1.0, key=0, pre_clip_noise=0.5)
        noisy_out, ada_state = jax.jit(ada.update)(sharded, ada.init(None))
    for a, b in zip(jax.tree.leaves((clip, norms, agg)),
                    jax.tree.leaves((expected_clip, expected_norms, expected_agg))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert np.isinf(stats.mean_norm) and np.isfinite(stats.cosine)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(noisy_out))
    assert np.isfinite(ada_state.clip_norm)
    print("OK")
    """
)


def test_batch_axis_sharded_over_explicit_mesh():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout


def test_half_precision_norms_do_not_overflow():
  # 300² overflows float16; the norms are reduced in float32.
  grads = {"w": jnp.full((2, 4), 300.0, jnp.float16)}
  clipped, norms = _clip(grads, 1.0)
  np.testing.assert_allclose(norms, 600.0, rtol=1e-3)
  assert clipped["w"].dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(clipped["w"], np.float32), 0.5, rtol=1e-3)
