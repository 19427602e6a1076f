"""Tests for clipjax.rescaling.transforms against a float64 NumPy oracle."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest

import clipjax

P_VALUES = [1, 1.5, 2, 3, math.inf]


# ---------------------------------------------------------------------------
# float64 NumPy oracle
# ---------------------------------------------------------------------------


def _flat(tree):
  return np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(tree)])


def _norm(v, p):
  v = np.abs(np.asarray(v, np.float64))
  if p == math.inf:
    return v.max(initial=0.0)
  return np.sum(v**p) ** (1 / p)


def _tree_norm(tree, p):
  return _norm(_flat(tree), p)


def _reachable(x, delta, lower, upper, p):
  """Largest ||clip(x + eta * delta) - x||_p over eta: every moving coordinate at its bound."""
  room = np.where(delta > 0, upper - x, np.where(delta < 0, x - lower, 0.0))
  return _norm(room, p)


def _bounds_like(bound, params):
  if jax.tree.structure(bound) == jax.tree.structure(params):
    leaves = jax.tree.leaves(bound)
  else:
    leaves = [bound] * len(jax.tree.leaves(params))
  return np.concatenate(
    [
      np.broadcast_to(np.asarray(b, np.float64), np.shape(x)).ravel()
      for b, x in zip(leaves, jax.tree.leaves(params))
    ]
  )


def _expected_norm(params, updates, norm, lower, upper, p):
  reach = _reachable(
    _flat(params),
    _flat(updates),
    _bounds_like(lower, params),
    _bounds_like(upper, params),
    p,
  )
  return min(norm, reach)


def _assert_in_box(params, lower, upper):
  x = _flat(params)
  dtype = jax.tree.leaves(params)[0].dtype
  # Bounds as the params' dtype sees them (float32(7.3) > 7.3).
  lo = _bounds_like(lower, params).astype(dtype).astype(np.float64)
  hi = _bounds_like(upper, params).astype(dtype).astype(np.float64)
  assert np.all(x >= lo) and np.all(x <= hi)


def _params(rng, lower, upper, dtype=np.float64):
  return {
    "w": jnp.asarray(rng.uniform(lower, upper, (6, 5)), dtype),
    "b": jnp.asarray(rng.uniform(lower, upper, (7,)), dtype),
  }


def _direction(rng, params, drift=0.0):
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(drift, 1.0, x.shape), x.dtype), params)


# ---------------------------------------------------------------------------
# clipping_aware_normalize
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="p")
def _descent_step(grads, params, norm, lower, upper, *, p):
  # norm is an argument, so one compilation serves every norm for each p.
  tx = optax.chain(
    optax.scale(-1.0),
    clipjax.clipping_aware_normalize(norm, p=p, lower=lower, upper=upper),
  )
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("per_coordinate", [0.2, 10.0])
def test_exact_norm_over_many_steps(p, per_coordinate):
  # 0.2 per coordinate is mostly reachable; 10 is beyond the box (width 3),
  # so every step must reach the maximum instead.
  rng = np.random.default_rng(0)
  lower, upper = -1.0, 2.0
  params = _params(rng, lower, upper)
  norm = per_coordinate * len(_flat(params)) ** (1 / p)
  reached = 0
  for step in range(30):
    # A drift whose sign flips every 5 steps pins coordinates on both bounds.
    grads = _direction(rng, params, drift=(-1) ** (step // 5))
    updates = _descent_step(grads, params, norm, lower, upper, p=p)
    expected = _expected_norm(params, jax.tree.map(jnp.negative, grads), norm, lower, upper, p)
    reached += expected == norm
    new_params = optax.apply_updates(params, updates)
    moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new_params, params)
    np.testing.assert_allclose(_tree_norm(updates, p), expected, rtol=1e-9)
    np.testing.assert_allclose(_tree_norm(moved, p), expected, rtol=1e-9)
    _assert_in_box(new_params, lower, upper)
    params = new_params
  assert reached == 0 if per_coordinate > 3 else reached > 20


@pytest.mark.parametrize("norm", [3.0, 1e4])
def test_float32_rounding_never_leaves_the_box(norm):
  # With bounds such as 7.3, x + (clip(...) - x) rounds outside the box for a
  # few percent of the coordinates that jump to a bound unless the update is
  # settled; rescale would then see infeasible params (ValueError eagerly, NaN
  # under jit). A norm of 1e4 sends every coordinate to a bound.
  rng = np.random.default_rng(1)
  lower, upper = -3.0, 7.3
  tx = clipjax.clipping_aware_normalize(norm, lower=lower, upper=upper)
  update = jax.jit(tx.update)
  for drift in [3.0, -3.0] * 3:
    params = _params(rng, lower, upper, np.float32)
    direction = _direction(rng, params, drift)
    updates, _ = update(direction, optax.EmptyState(), params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
    expected = _expected_norm(params, direction, norm, lower, upper, 2)
    assert _tree_norm(updates, 2) == pytest.approx(expected, rel=1e-5)
    _assert_in_box(optax.apply_updates(params, updates), lower, upper)


def test_pytree_and_array_bounds():
  rng = np.random.default_rng(2)
  lower = {"w": -0.5, "b": jnp.asarray(np.linspace(0.0, 1.0, 7))}
  upper = {"w": jnp.full((1, 5), 0.5), "b": jnp.asarray(np.linspace(1.0, 3.0, 7))}
  params = {
    "w": jnp.asarray(rng.uniform(-0.5, 0.5, (6, 5))),
    "b": lower["b"] + rng.uniform(0.0, 1.0, 7) * (upper["b"] - lower["b"]),
  }
  tx = clipjax.clipping_aware_normalize(0.9, p=2, lower=lower, upper=upper)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(10):
    direction = _direction(rng, params, drift=0.5)
    updates, state = update(direction, state, params)
    expected = _expected_norm(params, direction, 0.9, lower, upper, 2)
    np.testing.assert_allclose(_tree_norm(updates, 2), expected, rtol=1e-9)
    params = optax.apply_updates(params, updates)
    _assert_in_box(params, lower, upper)


def test_inject_hyperparams_follows_a_schedule():
  rng = np.random.default_rng(3)
  schedule = optax.linear_schedule(1.0, 0.1, transition_steps=8)
  lower, upper = jnp.zeros(7), jnp.full(7, 2.0)  # Array bounds become hyperparams.
  tx = optax.inject_hyperparams(clipjax.clipping_aware_normalize, static_args=("p",))(
    norm=schedule, p=3, lower=lower, upper=upper
  )
  params = jnp.asarray(rng.uniform(0.0, 2.0, 7))
  state = tx.init(params)
  assert set(state.hyperparams) == {"norm", "lower", "upper"}
  update = jax.jit(tx.update)
  for step in range(10):
    direction = jnp.asarray(rng.normal(size=7))
    updates, state = update(direction, state, params)
    # The schedule runs in float32; the state holds the value this step used.
    np.testing.assert_allclose(state.hyperparams["norm"], schedule(step), rtol=1e-6)
    norm = float(state.hyperparams["norm"])
    expected = _expected_norm(params, direction, norm, 0.0, 2.0, 3)
    np.testing.assert_allclose(_norm(updates, 3), expected, rtol=1e-9)
    params = optax.apply_updates(params, updates)


def test_traced_p_asks_for_static_args():
  tx = optax.inject_hyperparams(clipjax.clipping_aware_normalize)(norm=0.1, p=2.0)
  params = jnp.full(3, 0.5)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(tx.update)(jnp.ones(3), tx.init(params), params)


def test_missing_params_raises():
  tx = clipjax.clipping_aware_normalize(0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones(3), tx.init(jnp.zeros(3)))


@pytest.mark.parametrize("factory", [clipjax.clipping_aware_normalize, clipjax.clip_by_norm])
@pytest.mark.parametrize("p", [0.5, 0, -1, "two", float("nan")])
def test_invalid_p_raises(factory, p):
  with pytest.raises(ValueError, match="p"):
    factory(1.0, p=p)


@pytest.mark.parametrize("factory", [clipjax.clipping_aware_normalize, clipjax.clip_by_norm])
def test_negative_norm_raises(factory):
  with pytest.raises(ValueError, match="norm"):
    factory(-1.0)


@pytest.mark.parametrize("p", ["inf", "Infinity", jnp.inf, float("inf")])
def test_inf_spellings_agree(p):
  grads = jnp.asarray([0.2, -0.9, 0.5])
  updates, _ = clipjax.clip_by_norm(0.3, p=p).update(grads, optax.EmptyState())
  np.testing.assert_allclose(updates, grads / 3, rtol=1e-12)


def test_norm_is_differentiable_under_jit():
  rng = np.random.default_rng(4)
  params = _params(rng, 0.0, 1.0)
  direction = _direction(rng, params)

  @jax.jit
  @jax.value_and_grad
  def step_norm(norm):
    tx = clipjax.clipping_aware_normalize(norm)
    updates, _ = tx.update(direction, tx.init(params), params)
    return optax.tree.norm(updates)

  # The realized norm is the requested one, so its derivative is 1.
  value, grad = step_norm(0.4)
  assert value == pytest.approx(0.4, rel=1e-12)
  assert grad == pytest.approx(1.0, rel=1e-9)


def test_zero_norm_and_zero_updates_give_zeros_without_nan():
  params = jnp.asarray([0.0, 0.5, 1.0])

  @jax.jit
  @functools.partial(jax.value_and_grad, argnums=(0, 1))
  def total(norm, direction):
    tx = clipjax.clipping_aware_normalize(norm)
    updates, _ = tx.update(direction, tx.init(params), params)
    return jnp.sum(updates)

  for norm, direction in [(0.0, jnp.ones(3)), (0.3, jnp.zeros(3)), (0.0, jnp.zeros(3))]:
    value, grads = total(norm, direction)
    assert value == 0.0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------
# clip_by_norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_clip_by_norm_p2_matches_oracle_and_optax(dtype, scale):
  """p = 2 in each dtype, against the float64 oracle; optax's clip agrees as closely."""
  rng = np.random.default_rng(5)
  grads = {
    "a": jnp.asarray(rng.normal(0, scale, (4, 3)), dtype),
    "b": [jnp.asarray(rng.normal(0, scale, 5), dtype)],
  }
  # A few roundings of the dtype: the norm's sum of 17 squares, its root, one division.
  rtol = 8 * float(np.finfo(dtype).eps)
  norm = _tree_norm(grads, 2)
  for max_norm in [0.1, 1.0, jnp.asarray(2.5, dtype)]:
    want = jax.tree.map(lambda g: np.asarray(g, np.float64) * min(1.0, max_norm / norm), grads)
    ours, _ = clipjax.clip_by_norm(max_norm).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, grads)
    chex.assert_trees_all_close(
      jax.tree.map(lambda v: np.asarray(v, np.float64), ours), want, rtol=rtol, atol=0
    )
    chex.assert_trees_all_close(ours, theirs, rtol=rtol, atol=0)


@pytest.mark.parametrize("p", P_VALUES)
def test_clip_by_norm_matches_oracle(p):
  rng = np.random.default_rng(6)
  update = jax.jit(clipjax.clip_by_norm(1.0, p=p).update)
  for scale in [0.01, 1.0, 100.0]:
    grads = {
      "a": jnp.asarray(rng.normal(0, scale, (5, 4))),
      "b": jnp.asarray(rng.normal(0, scale, 3)),
    }
    norm = _tree_norm(grads, p)
    updates, _ = update(grads, optax.EmptyState())
    factor = min(1.0, 1.0 / norm)
    np.testing.assert_allclose(_flat(updates), factor * _flat(grads), rtol=1e-12)
    assert _tree_norm(updates, p) == pytest.approx(min(norm, 1.0), rel=1e-12)


@pytest.mark.parametrize("p", [1.5, 3, 7])
@pytest.mark.parametrize("size", [1e30, 1e-30])
def test_clip_by_norm_general_p_does_not_overflow_float32(p, size):
  # |g|**p overflows (or underflows) float32 for these sizes without scaling.
  grads = jnp.asarray([3.0, -10.0, 2.0], jnp.float32) * jnp.float32(size)
  max_norm = jnp.float32(size)
  updates, _ = clipjax.clip_by_norm(max_norm, p=p).update(grads, optax.EmptyState())
  assert updates.dtype == jnp.float32
  assert _norm(updates, p) == pytest.approx(size, rel=1e-5)


@pytest.mark.parametrize("p", P_VALUES)
def test_clip_by_norm_zero_norm_and_zero_max_norm_without_nan(p):
  @jax.jit
  @functools.partial(jax.value_and_grad, argnums=(0, 1))
  def total(max_norm, updates):
    clipped, _ = clipjax.clip_by_norm(max_norm, p=p).update(updates, optax.EmptyState())
    return jnp.sum(clipped**2) + jnp.sum(clipped)

  zeros = jnp.zeros(4, jnp.float32)
  ones = jnp.ones(4, jnp.float32)
  for max_norm, updates in [(0.0, zeros), (1.0, zeros), (0.0, ones)]:
    value, grads = total(jnp.float32(max_norm), updates)
    assert value == 0.0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_clip_by_norm_under_inject_hyperparams_and_jit():
  tx = optax.inject_hyperparams(clipjax.clip_by_norm, static_args=("p",))(
    max_norm=optax.linear_schedule(4.0, 1.0, transition_steps=3), p=1
  )
  grads = jnp.asarray([3.0, -4.0, 1.0])  # L1 norm 8.
  state = tx.init(grads)
  update = jax.jit(tx.update)
  for step in range(5):
    updates, state = update(grads, state)
    # The schedule is evaluated in float32.
    assert _norm(updates, 1) == pytest.approx(max(4.0 - step, 1.0), rel=1e-6)


def test_clip_by_norm_gradient_matches_finite_differences():
  # Above the threshold the output is max_norm * g / ||g||_p, a smooth map.
  grads = jnp.asarray([0.3, -1.2, 2.0, 0.7])

  @jax.jit
  def f(g):
    clipped, _ = clipjax.clip_by_norm(1.0, p=3).update(g, optax.EmptyState())
    return jnp.sum(clipped * jnp.arange(1.0, 5.0))

  analytic = jax.jit(jax.grad(f))(grads)
  step = 1e-6
  numeric = [(f(grads.at[i].add(step)) - f(grads.at[i].add(-step))) / (2 * step) for i in range(4)]
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("p", [1.0, 2.0, 8.0, math.inf])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64])
def test_clip_by_norm_over_the_whole_float_range(dtype, p):
  """Finite updates, from subnormal to the largest float, are clipped and never lost.

  The global norm may exceed the dtype's range (a float32 vector of entries near
  3e38): the update is still scaled to norm max_norm along the same direction.
  """
  info = jnp.finfo(dtype)
  update = jax.jit(clipjax.clip_by_norm(1.0, p=p).update)
  for top in [
    float(info.max),
    float(info.max) / 3,
    1.0,
    float(info.tiny),
    4 * float(info.smallest_subnormal),
  ]:
    g = np.asarray(jnp.asarray([top, -top / 2, top / 4, 0.0], dtype))
    exact = np.asarray(g).astype(np.float64)
    out, _ = update({"g": jnp.asarray(g)}, optax.EmptyState())
    out = np.asarray(out["g"]).astype(np.float64)
    assert np.all(np.isfinite(out))
    top = float(exact[0])  # as rounded to the dtype
    relative = [1.0, 0.5, 0.25]  # |g_i| / max |g|, exact powers of two
    unit = max(relative) if p == math.inf else sum(r**p for r in relative) ** (1 / p)
    if math.log2(top) + math.log2(unit) <= 0:  # ‖g‖ <= 1 = max_norm: unchanged, bit for bit
      np.testing.assert_array_equal(out, exact)
    else:  # scaled to norm 1 along g
      want = np.array([1.0, -0.5, 0.25, 0.0]) / unit
      tol = 8 * float(info.eps)
      np.testing.assert_allclose(out, want, rtol=tol, atol=4 * float(info.smallest_subnormal))


# ---------------------------------------------------------------------------
# With and without jit (chex variants)
# ---------------------------------------------------------------------------


class VariantsTest(chex.TestCase):
  """Both transformations, with and without ``jit``, against the float64 oracle."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_oracle(self):
    rng = np.random.default_rng(32)
    params = _params(rng, 0.0, 1.0)
    grads = _direction(rng, params)
    x, g = _flat(params), _flat(grads)
    for p in (1.0, 2.0, math.inf):
      clip = clipjax.clip_by_norm(0.5, p=p)
      clipped, _ = self.variant(clip.update)(grads, clip.init(params))
      factor = min(1.0, 0.5 / _norm(g, p))
      chex.assert_trees_all_equal_shapes_and_dtypes(clipped, grads)
      chex.assert_trees_all_close(clipped, jax.tree.map(lambda v: factor * v, grads), rtol=1e-12)
      tx = clipjax.clipping_aware_normalize(0.3, p=p, lower=0.0, upper=1.0)
      updates, _ = self.variant(tx.update)(grads, tx.init(params), params)
      eta = oracle.rescale(x, g, 0.3, p)
      want = jax.tree.map(lambda a, b: np.clip(a + eta * b, 0, 1) - a, params, grads)
      chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
      chex.assert_trees_all_close(updates, want, rtol=1e-10, atol=1e-14)
