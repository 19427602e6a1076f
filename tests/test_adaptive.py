"""Tests for clipjax.privacy.adaptive: the clip-norm rule, its privacy split, masks and groups.

Trajectories are checked against the rule computed by hand in float64; the noise scales
themselves are measured in tests/test_noise_scale.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipjax import (
  AdaptiveDPAggregateState,
  AdaptiveDPNoiseState,
  adaptive_dp_aggregate,
  adaptive_dp_noise,
  per_example_clip,
)
from clipjax.privacy.adaptive import _sum_multiplier


def _norm_tree(norms, dim=6, seed=0):
  """Per-example gradients with the given global L2 norms, split over two leaves."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(len(norms), dim))
  u *= (np.asarray(norms) / np.linalg.norm(u, axis=1))[:, None]
  return {
    "a": jnp.asarray(u[:, :2], jnp.float32),
    "b": jnp.asarray(u[:, 2:].reshape(-1, 2, 2), jnp.float32),
  }


def _flat(tree):
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1)


def _clipped_mean(flat, clip_norm, divisor, mask=None):
  norms = np.linalg.norm(flat, axis=1)
  weights = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-300))
  if mask is not None:
    weights = weights * mask
  return (flat * weights[:, None]).sum(0) / divisor


def _next(clip_norm, norms, gamma, eta, divisor, mask=None):
  """The rule by hand, without count noise."""
  real = np.ones(len(norms), bool) if mask is None else mask
  fraction = np.clip(np.sum((norms <= clip_norm) - 0.5, where=real) / divisor + 0.5, 0, 1)
  return clip_norm * math.exp(-eta * (fraction - gamma))


def test_deterministic_trajectory():
  norms = np.array([0.2, 0.5, 1.0, 1.5, 3.0, 4.0, 8.0])
  grads = _norm_tree(norms)
  flat = _flat(grads)
  gamma, eta, c = 0.3, 0.4, 0.1
  tx = adaptive_dp_aggregate(
    c, 0.0, key=0, target_quantile=gamma, clip_learning_rate=eta, count_noise_stddev=0.0
  )
  state = tx.init(None)
  assert isinstance(state, AdaptiveDPAggregateState)
  update = jax.jit(tx.update)
  for _ in range(25):
    updates, state = update(grads, state)
    # The update uses the clip norm from before this step's adaptation.
    np.testing.assert_allclose(
      _flat(jax.tree.map(lambda x: x[None], updates))[0],
      _clipped_mean(flat, c, len(norms)),
      rtol=1e-5,
      atol=1e-7,
    )
    c = _next(c, norms, gamma, eta, len(norms))
    np.testing.assert_allclose(float(state.clip_norm), c, rtol=1e-5)
  # It settled between the norms around the 0.3 quantile.
  assert 0.5 <= c <= 1.5 * math.exp(eta)


def test_group_wise_masked_trajectory_and_one_implementation():
  """Each group adapts to its own norms; only real examples count; both transforms agree."""
  rng = np.random.default_rng(1)
  batch, divisor = 12, 10.0
  grads = {
    "a": jnp.asarray(rng.normal(size=(batch, 3)) * rng.uniform(0.1, 2, (batch, 1))),
    "b": jnp.asarray(rng.normal(size=(batch, 2, 2)) * rng.uniform(1, 9, (batch, 1, 1))),
  }
  mask = np.arange(batch) % 4 != 0
  flat = {k: _flat(v) for k, v in grads.items()}
  norms = {k: np.linalg.norm(v, axis=1) for k, v in flat.items()}
  c = {"a": 0.3, "b": 8.0}
  hyper = dict(target_quantile=0.6, clip_learning_rate=0.3, count_noise_stddev=0.0)
  aggregate = adaptive_dp_aggregate(c, 0.0, key=0, expected_batch_size=divisor, **hyper)
  noise = adaptive_dp_noise(c, 0.0, divisor, key=1, **hyper)

  @jax.jit
  def step(states):
    a_state, n_state = states
    a_out, a_state = aggregate.update(grads, a_state, mask=jnp.asarray(mask))
    clipped, n_norms = per_example_clip(grads, n_state.clip_norm, mask=jnp.asarray(mask))
    summed = jax.tree.map(lambda g: g.sum(0), clipped)
    n_out, n_state = noise.update(summed, n_state, norms=n_norms, mask=jnp.asarray(mask))
    return (a_state, n_state), a_out, n_out

  states = (aggregate.init(None), noise.init(None))
  assert isinstance(states[1], AdaptiveDPNoiseState)
  for _ in range(8):
    states, a_out, n_out = step(states)
    for k in c:
      want = _clipped_mean(flat[k], c[k], divisor, mask)
      np.testing.assert_allclose(_flat(a_out[k][None])[0], want, rtol=1e-12, atol=1e-15)
      np.testing.assert_allclose(_flat(n_out[k][None])[0], want, rtol=1e-12, atol=1e-15)
    c = {k: _next(c[k], norms[k], 0.6, 0.3, divisor, mask) for k in c}
    for state in states:
      for k in c:
        np.testing.assert_allclose(float(state.clip_norm[k]), c[k], rtol=1e-12)
  assert c["a"] < 2 < c["b"]  # the groups went their own ways


def test_default_count_noise_is_zero_without_privacy():
  grads = _norm_tree([0.5, 2.0, 3.0, 4.0])
  tx = adaptive_dp_aggregate(1.0, 0.0, key=0)
  _, state = jax.jit(tx.update)(grads, tx.init(None))
  np.testing.assert_allclose(float(state.clip_norm), math.exp(-0.2 * (0.25 - 0.5)))


def _converge(tx, groups, batch=256, steps=300, seed=0):
  """Runs ``tx`` on fresh norms every step: group g's uniform on (0, 2·(g + 1))."""

  def norms_of(key):
    draws = jax.random.uniform(key, (len(groups), batch), minval=0.0, maxval=2.0)
    return {k: draws[g] * (g + 1) for g, k in enumerate(groups)}

  def step(state, key):
    norms = norms_of(key)
    if isinstance(state, AdaptiveDPNoiseState):
      _, state = tx.update(jnp.zeros(3), state, norms=norms if len(groups) > 1 else norms["w"])
    else:
      direction = jax.random.normal(jax.random.fold_in(key, 1), (batch, 8))
      direction /= jnp.linalg.norm(direction, axis=1, keepdims=True)
      _, state = tx.update({"w": direction * norms["w"][:, None]}, state)
    return state, state.clip_norm

  keys = jax.random.split(jax.random.key(seed), steps)
  _, trajectory = jax.jit(lambda s: jax.lax.scan(step, s, keys))(tx.init(None))
  return trajectory


@pytest.mark.parametrize("initial", [0.05, 20.0])
def test_converges_to_the_median(initial):
  # Norms uniform on (0, 2): median 1. The default count noise B/20 at z = 1.
  for tx in (adaptive_dp_noise(initial, 1.0, 256, key=3), adaptive_dp_aggregate(initial, 1.0, 3)):
    tail = np.asarray(_converge(tx, ["w"]))[150:]
    assert abs(tail.mean() - 1.0) < 0.05, (type(tx), tail.mean())
    assert np.all(np.abs(tail - 1.0) < 0.2)


def test_group_wise_norms_converge_to_their_own_quantiles():
  groups = ["first", "second", "third"]  # medians 1, 2 and 3
  tx = adaptive_dp_noise(dict.fromkeys(groups, 1.0), 1.0, 256, key=4)
  trajectory = _converge(tx, groups)
  for g, k in enumerate(groups):
    tail = np.asarray(trajectory[k])[150:]
    assert abs(tail.mean() / (g + 1) - 1.0) < 0.05, (k, tail.mean())


def test_split_multipliers_documented():
  # adaptive_dp_noise's docstring: z = 1, B = 256, default σ_b = B/20, K groups.
  for groups, documented in [(1, 1.0008), (4, 1.0031), (10, 1.0077)]:
    assert str(documented) in adaptive_dp_noise.__doc__
    exact = (1.0 - groups / (2 * 256 / 20) ** 2) ** -0.5
    assert round(exact, 4) == documented
    np.testing.assert_allclose(float(_sum_multiplier(1.0, 256 / 20, groups)), exact, rtol=1e-12)
  assert float(_sum_multiplier(0.0, 0.0, 3)) == 0.0  # no privacy, no noise
  assert np.isnan(_sum_multiplier(1.0, 0.0, 1)) and np.isnan(_sum_multiplier(2.0, 1.0, 1))


def test_noise_split_refused():
  with pytest.raises(ValueError, match="count_noise_stddev"):
    adaptive_dp_aggregate(1.0, 1.0, key=0, count_noise_stddev=0.5)
  with pytest.raises(ValueError, match="count_noise_stddev"):
    adaptive_dp_aggregate(1.0, 0.5, key=0, count_noise_stddev=0.0)
  with pytest.raises(ValueError, match="count_noise_stddev"):
    adaptive_dp_aggregate(1.0, 2.0, key=0, expected_batch_size=20)
  tx = adaptive_dp_aggregate(1.0, 2.0, key=0)  # default σ_b = B/20
  with pytest.raises(ValueError, match="count_noise_stddev"):
    jax.eval_shape(tx.update, jnp.ones((20, 3)), tx.init(None))  # σ_b = 1: needs z < 2
  jax.eval_shape(tx.update, jnp.ones((40, 3)), tx.init(None))  # σ_b = 2
  # K groups need z < 2σ_b/√K: with σ_b = 2 and four groups, z < 2.
  four = dict.fromkeys("abcd", 1.0)
  adaptive_dp_noise(four, 1.99, 40, key=0)
  adaptive_dp_noise(1.0, 3.99, 40, key=0)
  with pytest.raises(ValueError, match=r"sqrt\(4\)"):
    adaptive_dp_noise(four, 2.0, 40, key=0)
  with pytest.raises(ValueError, match="count_noise_stddev"):
    adaptive_dp_aggregate(four, 1.0, key=0, count_noise_stddev=1.0)


@pytest.mark.parametrize("factory", [adaptive_dp_aggregate, adaptive_dp_noise])
def test_traced_bad_split_gives_nan(factory):
  # Traced values cannot be checked: an invalid split gives NaN, never a finite wrong
  # answer. σ_b = 0 is the sharpest case: (-inf)^(-1/2) would be 0, no noise at all.
  args = () if factory is adaptive_dp_aggregate else (20,)
  tx = optax.inject_hyperparams(factory)(1.0, 1.0, *args, key=0, count_noise_stddev=2.0)
  params = jnp.zeros(3)
  extra = {"norms": jnp.ones(20)} if factory is adaptive_dp_noise else {}
  grads = jnp.ones((20, 3)) if factory is adaptive_dp_aggregate else jnp.ones(3)
  update = jax.jit(tx.update)
  for z, count_stddev in [(5.0, 2.0), (1.0, 0.0), (4.0, 2.0)]:
    state = tx.init(params)
    state.hyperparams["noise_multiplier"] = jnp.asarray(z)
    state.hyperparams["count_noise_stddev"] = jnp.asarray(count_stddev)
    updates, _ = update(grads, state, params, **extra)
    assert np.all(np.isnan(updates)), (z, count_stddev)
  state.hyperparams["noise_multiplier"] = jnp.asarray(3.9)
  assert np.all(np.isfinite(update(grads, state, params, **extra)[0]))


def test_adaptive_validates():
  for factory, args in [(adaptive_dp_aggregate, ()), (adaptive_dp_noise, (8,))]:
    with pytest.raises(ValueError, match="initial_clip_norm must be > 0"):
      factory(0.0, 1.0, *args, key=0)
    with pytest.raises(ValueError, match="initial_clip_norm must be > 0"):
      factory({"a": 1.0, "b": 0.0}, 1.0, *args, key=0)
    with pytest.raises(ValueError, match="target_quantile"):
      factory(1.0, 1.0, *args, key=0, target_quantile=1.5)
    with pytest.raises(ValueError, match="clip_learning_rate"):
      factory(1.0, 1.0, *args, key=0, clip_learning_rate=-1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
      factory(1.0, -1.0, *args, key=0)
  with pytest.raises(ValueError, match="batch_size"):
    adaptive_dp_noise(1.0, 1.0, 0, key=0)
  with pytest.raises(ValueError, match="expected_batch_size"):
    adaptive_dp_aggregate(1.0, 1.0, key=0, expected_batch_size=-2.0)

  tx = adaptive_dp_noise({"a": 1.0, "b": 2.0}, 1.0, 80, key=0)
  state = tx.init(None)
  good = {"a": jnp.ones(4), "b": jnp.ones(4)}
  for norms, message in [
    (jnp.ones(4), "norms must be a"),
    ({"a": jnp.ones(4)}, "norms must be a"),
    ({"a": jnp.ones(4), "b": jnp.ones(5)}, "one batch size"),
    ({"a": jnp.ones((4, 1)), "b": jnp.ones((4, 1))}, r"\(batch,\) arrays"),
  ]:
    with pytest.raises(ValueError, match=message):
      tx.update(jnp.zeros(2), state, norms=norms)
  with pytest.raises(ValueError, match="mask must have shape"):
    tx.update(jnp.zeros(2), state, norms=good, mask=jnp.ones(3, bool))
  with pytest.raises(TypeError, match="norms"):
    tx.update(jnp.zeros(2), state)


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

  tx = optax.inject_hyperparams(adaptive_dp_noise)(1.0, 0.0, 7, key=0, count_noise_stddev=0.0)
  state = tx.init(params)
  state.hyperparams["batch_size"] = jnp.asarray(14.0)
  out, state = jax.jit(tx.update)(params, state, params, norms=jnp.asarray(norms))
  expected = math.exp(-0.2 * ((np.sum(norms <= 1.0) - 3.5) / 14 + 0.5 - 0.5))
  np.testing.assert_allclose(float(state.inner_state.clip_norm), expected, rtol=1e-6)
  np.testing.assert_allclose(out["a"], params["a"] / 14, rtol=1e-6)
