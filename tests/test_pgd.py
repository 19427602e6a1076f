"""Tests for clipjax.pgd against a float64 NumPy re-implementation of the same iteration.

The oracle shares no code with the library: the gradient is written by hand, the
clipping-aware scale comes from ``tests/oracle.py`` (breakpoints evaluated one by
one), and the projections are bisections on the KKT multiplier (p = 1, 2) or a
clip to the intersection of two boxes (p = inf).

Compiling ``pgd`` takes seconds on CPU, so the tests share a few jitted runs: one
per ``p``, random start or not, and dtype; the loss's coefficients and the bounds
are arguments, and a callback in the loss records every iterate.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import clipjax

_PS = (1.0, 2.0, math.inf)
_EPS = {1.0: 0.6, 2.0: 0.4, math.inf: 0.1}
_N = 6  # coordinates
_STEPS = 16


# ---------------------------------------------------------------------------
# The oracle, the test problem and the shared runs
# ---------------------------------------------------------------------------


def _loss(w, k, z):
  """A smooth, nonlinear loss; linear with ``k = 0``."""
  return jnp.dot(w, z) + jnp.sum(jnp.sin(k * z)) / 4


def _problem(seed, lo=0.0, hi=1.0):
  """A point with coordinates on and near the bounds, the loss's coefficients, its gradient."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(lo, hi, _N)
  x[:3] = [lo, hi, hi - 0.01]
  w, k = rng.standard_normal(_N), rng.uniform(1, 4, _N)
  grad = lambda z: w + k * np.cos(k * z) / 4
  return x, w, k, grad


def _bisect(f, lo, hi, target, iters=200):
  """The root of a monotone non-decreasing ``f`` on ``[lo, hi]``."""
  for _ in range(iters):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
  return (lo + hi) / 2


def _project(y, c, eps, p, lo=0.0, hi=1.0):
  """The nearest point of ball ∩ box, from the KKT conditions of each norm."""
  if p == math.inf:
    return np.clip(y, np.maximum(c - eps, lo), np.minimum(c + eps, hi))
  if np.linalg.norm(np.clip(y, lo, hi) - c, ord=p) <= eps:
    return np.clip(y, lo, hi)
  u = y - c
  room = np.where(u >= 0, hi - c, c - lo)
  if p == 2:  # z = clip(c + t·u), t = 1/(1 + mu) where the norm reaches eps
    z = lambda t: np.clip(c + t * u, lo, hi)
    return z(_bisect(lambda t: np.linalg.norm(z(t) - c), 0.0, 1.0, eps))
  # p = 1: soft threshold by lam, then clip; the moved L1 distance falls with lam.
  z = lambda lam: c + np.sign(u) * np.minimum(np.maximum(np.abs(u) - lam, 0), room)
  lam = -_bisect(lambda m: np.sum(np.abs(z(-m) - c)), -np.max(np.abs(u)), 0.0, eps)
  return z(lam)


def _pgd_oracle(grad, start, x, eps, p, alpha, lo=0.0, hi=1.0):
  """Iterates ``z_0..z_T`` of ``z ← Π(z + eta·d)``, ``‖clip(z + eta·d) − z‖_p = alpha``."""
  zs = [np.asarray(start, np.float64)]
  for _ in range(_STEPS):
    z = zs[-1]
    d = np.sign(grad(z)) if p == math.inf else grad(z)
    eta = oracle.rescale(z, d, alpha, p, lo, hi)
    zs.append(_project(z + eta * d, x, eps, p, lo, hi))
  return zs


_SEEN = []


@functools.partial(jax.jit, static_argnames=("p", "random_start"))
def _run(x, w, k, eps, step_size, key, lower, upper, *, p, random_start):
  def loss(z):
    jax.debug.callback(lambda v: _SEEN.append(np.asarray(v)), z, ordered=True)
    return _loss(w, k, z)

  return clipjax.pgd(
    loss, x, eps, p=p, steps=_STEPS, step_size=step_size, lower=lower, upper=upper, key=key,
    random_start=random_start, return_losses=True,
  )  # fmt: skip


def _iterates(x, w, k, eps, *, p, step_size, seed=0, random_start=True, lo=0.0, hi=1.0):
  """``(zs, losses)``: every iterate ``z_0..z_T`` (``z_T = x_adv``) and the losses."""
  dtype = np.asarray(x).dtype
  args = [np.asarray(v, dtype) for v in (x, w, k, eps, step_size)]
  bounds = [np.full(_N, b, dtype) for b in (lo, hi)]
  _SEEN.clear()
  x_adv, losses = _run(*args, jax.random.key(seed), *bounds, p=p, random_start=random_start)
  jax.effects_barrier()
  return [*_SEEN, np.asarray(x_adv)], np.asarray(losses)


def _norm(v, p):
  return np.linalg.norm(np.ravel(v), ord=p)


# ---------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", _PS)
def test_iterates_match_the_oracle(p):
  # From a random start on the sphere, with steps of 2.5·eps/steps (the default, which
  # the vmap test checks).
  x, w, k, grad = _problem(0)
  eps = _EPS[p]
  alpha = 2.5 * eps / _STEPS
  zs, losses = _iterates(x, w, k, eps, p=p, step_size=alpha, seed=3)
  assert len(zs) == _STEPS + 1
  np.testing.assert_allclose(_norm(zs[0] - x, p), eps, rtol=1e-12)  # the exact start
  want = _pgd_oracle(grad, zs[0], x, eps, p, alpha)
  np.testing.assert_allclose(np.array(zs), np.array(want), rtol=0, atol=1e-12)
  # losses[t] is the loss at z_t, before step t.
  np.testing.assert_allclose(losses, [_loss(w, k, z) for z in zs[:-1]], rtol=1e-13)
  assert losses[-1] > losses[0]


@pytest.mark.parametrize("p", _PS)
def test_every_iterate_is_feasible(p):
  lo, hi = -0.5, 2.0
  for seed in range(3):
    x, w, k, _ = _problem(10 + seed, lo, hi)
    eps = 3 * _EPS[p]
    zs, _ = _iterates(x, w, k, eps, p=p, step_size=eps / 4, seed=seed, lo=lo, hi=hi)
    for z in zs:
      assert np.all((lo <= z) & (z <= hi))
      assert _norm(z - x, p) <= eps * (1 + 1e-12)
    # The random start and the last iterate use the whole budget here.
    np.testing.assert_allclose(_norm(zs[0] - x, p), eps, rtol=1e-12)
    np.testing.assert_allclose(_norm(zs[-1] - x, p), eps, rtol=1e-12)


@pytest.mark.parametrize(
  "p, dtype, rtol",
  [(p, np.float64, 1e-12) for p in _PS] + [(2.0, np.float32, 2e-6), (math.inf, np.float32, 2e-6)],
)
def test_every_step_has_exact_size_after_clipping(p, dtype, rtol):
  # A ball that never binds: each step is the clipped step, of size alpha unless the
  # box has less room along the step's direction.
  x, w, k, grad = _problem(1)
  alpha = {1.0: 0.3, 2.0: 0.2, math.inf: 0.06}[p]
  zs, _ = _iterates(x.astype(dtype), w, k, 100.0, p=p, step_size=alpha, random_start=False)
  np.testing.assert_array_equal(zs[0], x.astype(dtype))
  naive_fell_short = False
  for z, z_next in zip(zs, zs[1:]):
    assert z_next.dtype == dtype
    z = z.astype(np.float64)
    d = np.sign(grad(z)) if p == math.inf else grad(z)
    want = min(alpha, oracle.max_norm(z, d, p))
    np.testing.assert_allclose(_norm(z_next - z, p), want, rtol=rtol)
    naive = np.clip(z + alpha * d / _norm(d, p), 0, 1)
    naive_fell_short |= _norm(naive - z, p) < want * (1 - 1e-3)
  # The test would pass for the naive step if the box never clipped it.
  assert naive_fell_short or p == math.inf


def test_linf_is_the_usual_signed_step_and_clip():
  x, w, k, grad = _problem(2)
  eps, alpha = 0.1, 0.03
  zs, _ = _iterates(x, w, k, eps, p=math.inf, step_size=alpha, random_start=False)
  z = x
  for got in zs[1:]:
    z = np.clip(z + alpha * np.sign(grad(z)), np.maximum(x - eps, 0), np.minimum(x + eps, 1))
    np.testing.assert_array_equal(got, z)


@pytest.mark.parametrize("p", _PS)
def test_converges_to_the_maximiser_of_a_linear_loss(p):
  # Over the ball ∩ box the maximiser of w·z is clip(x + s·w) at the radius for p = 2,
  # clip(x + eps·sign(w)) to the box for p = inf, and for p = 1 the budget goes to the
  # largest |w_i| first, each coordinate until its bound.
  x = np.array([0.1, 0.5, 0.95, 0.3, 0.0, 0.7])
  w = np.array([1.0, -2.0, 3.0, 0.5, -1.0, 0.0])
  eps = {1.0: 0.6, 2.0: 0.5, math.inf: 0.2}[p]
  if p == 2:
    step = lambda s: np.clip(x + s * w, 0, 1)
    best = step(_bisect(lambda s: np.linalg.norm(step(s) - x), 0.0, 10.0, eps))
  elif p == math.inf:
    best = np.clip(x + eps * np.sign(w), 0, 1)
  else:
    best, budget = x.copy(), eps
    for i in np.argsort(-np.abs(w)):
      move = min(budget, (1 - x[i]) if w[i] > 0 else x[i])
      best[i] += np.sign(w[i]) * move
      budget -= move
  zs, losses = _iterates(x, w, np.zeros(_N), eps, p=p, step_size=eps / 5, random_start=False)
  np.testing.assert_allclose(zs[-1], best, atol=1e-12)
  # Clipping before projecting would stall short of the maximiser, coordinate 2 below 1.
  assert zs[-1][2] == 1.0
  assert np.all(np.diff(losses) >= -1e-12)


def test_random_start_keys_and_steps_zero():
  x, w, k, _ = _problem(4)
  loss = lambda z: _loss(w, k, z)
  start = clipjax.pgd(loss, x, 0.1, p="inf", steps=0, key=7)
  np.testing.assert_allclose(_norm(np.asarray(start) - x, np.inf), 0.1, rtol=1e-12)
  # An int seed is the typed key it names; without a random start, steps=0 gives x.
  typed = clipjax.pgd(loss, x, 0.1, p="inf", steps=0, key=jax.random.key(7))
  np.testing.assert_array_equal(typed, start)
  no_start = clipjax.pgd(loss, x, 0.1, p="inf", steps=0, random_start=False)
  np.testing.assert_array_equal(no_start, x)


# ---------------------------------------------------------------------------
# Transformations: vmap, pytrees, gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_vmap_with_per_example_eps_matches_a_loop(p):
  rng = np.random.default_rng(5)
  xs, ws = rng.uniform(0, 1, (5, _N)), rng.standard_normal((5, _N))
  k = np.full(_N, 2.0)
  # eps = 0 pins the point; a negative eps, which jit cannot refuse, gives NaN.
  eps = np.array([0.0, 0.5, 1.0, 2.0, -0.1]) * _EPS[p]
  keys = jax.random.split(jax.random.key(0), 5)

  def attack(x, w, e, key):  # the default step size, 2.5·eps/steps
    return clipjax.pgd(lambda z: _loss(w, k, z), x, e, p=p, steps=_STEPS, key=key)

  batched = np.asarray(jax.jit(jax.vmap(attack))(xs, ws, eps, keys))
  for i in range(5):
    bounds = (np.zeros(_N), np.ones(_N))
    args = (xs[i], ws[i], k, eps[i], 2.5 * eps[i] / _STEPS, keys[i], *bounds)
    one, _ = _run(*args, p=p, random_start=True)
    np.testing.assert_allclose(batched[i], one, rtol=0, atol=1e-13)
  np.testing.assert_array_equal(batched[0], xs[0])
  assert np.all(np.isnan(batched[-1]))
  assert not np.any(np.isnan(batched[:-1]))


def test_pytree_with_pytree_bounds_is_one_vector():
  # The norms, the scale and the projection are global over the leaves.
  rng = np.random.default_rng(6)
  a, b = rng.uniform(-1, 1, (2, 3)), rng.uniform(0, 2, 4)
  w, k = rng.standard_normal(10), rng.uniform(1, 4, 10)
  flatten = lambda t: jnp.concatenate([t["a"].ravel(), t["b"]])
  lo, hi = np.r_[-np.ones(6), np.zeros(4)], np.r_[np.ones(6), 2 * np.ones(4)]
  got = clipjax.pgd(
    lambda t: _loss(w, k, flatten(t)), {"a": a, "b": b}, 0.5, steps=_STEPS, step_size=0.2,
    lower={"a": -1.0, "b": np.zeros(4)}, upper={"a": 1.0, "b": 2.0}, random_start=False,
  )  # fmt: skip
  assert jax.tree.structure(got) == jax.tree.structure({"a": a, "b": b})
  x = np.r_[a.ravel(), b]
  grad = lambda z: w + k * np.cos(k * z) / 4
  want = _pgd_oracle(grad, x, x, 0.5, 2.0, 0.2, lo, hi)[-1]
  np.testing.assert_allclose(flatten(got), want, rtol=0, atol=1e-12)
  assert not np.allclose(want, x)


def test_mixed_precision_pytree_keeps_dtypes():
  x = {"a": jnp.array([0.1, 0.5, 0.9], jnp.bfloat16), "b": jnp.array([0.0, 1.0], jnp.float32)}
  loss = lambda t: jnp.sum(jnp.sin(3 * t["a"].astype(jnp.float32))) + jnp.sum(t["b"] * 2)
  got = clipjax.pgd(loss, x, 0.3, p="inf", steps=3, key=0)
  assert got["a"].dtype == jnp.bfloat16 and got["b"].dtype == jnp.float32
  for name in x:
    z = np.asarray(got[name], np.float64)
    assert np.all(np.abs(z - np.asarray(x[name], np.float64)) <= 0.3 * (1 + 2**-7))
    assert np.all((z >= 0) & (z <= 1))


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_gradient_through_pgd_matches_finite_differences(p):
  # Centres inside the box and a ball that binds from the second step: away from the
  # kinks. (Without the random start, whose compiled gradient would double the time.)
  rng = np.random.default_rng(7)
  x = rng.uniform(0.3, 0.7, _N)
  w, k = rng.standard_normal(_N), rng.uniform(1, 4, _N)
  eps = {2.0: 0.2, math.inf: 0.05}[p]

  def outcome(x, eps, w, k):
    loss = lambda z: _loss(w, k, z)
    x_adv = clipjax.pgd(loss, x, eps, p=p, steps=3, random_start=False)
    return jnp.sum(jnp.sin(3 * x_adv))

  # One compiled function serves the gradient and, through its value, the differences.
  value_and_grad = jax.jit(jax.value_and_grad(outcome, argnums=(0, 1)))
  value = lambda x, eps, w=w, k=k: float(value_and_grad(x, eps, w, k)[0])
  _, (gx, ge) = value_and_grad(x, eps, w, k)
  np.testing.assert_allclose(gx, oracle.finite_difference(lambda v: value(v, eps), x), rtol=1e-6)
  np.testing.assert_allclose(ge, oracle.finite_difference(lambda e: value(x, e), eps), rtol=1e-6)
  assert np.any(np.abs(gx) > 1e-3) and abs(ge) > 1e-3
  # A zero loss gradient: zero steps, and no NaN in the derivative either.
  zero = np.zeros(_N)
  assert all(np.all(np.isfinite(g)) for g in value_and_grad(x, eps, zero, zero)[1])
  zs, _ = _iterates(x, zero, zero, eps, p=p, step_size=0.1, random_start=False)
  np.testing.assert_array_equal(zs[-1], x)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

_X = np.array([0.1, 0.5, 0.9])
_LOSS = lambda z: jnp.sum(z**2)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(p=3), "p"),
    (dict(p="two"), "p"),
    (dict(eps=-0.1), "eps"),
    (dict(eps=np.nan), "eps"),
    (dict(eps=np.ones(3)), "eps"),
    (dict(step_size=-0.1), "step_size"),
    (dict(step_size=np.inf), "step_size"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.0), "steps"),
    (dict(key=None), "key"),
    (dict(key="seed"), "key"),
    (dict(x=np.array([0.1, 0.5, 1.1])), "x"),
    (dict(x=np.array([0.1, np.nan, 0.9])), "x"),
    (dict(x=np.array([0, 1, 1])), "x"),
    (dict(x={}), "x"),
    (dict(lower=np.zeros(2)), "lower"),
    (dict(lower=np.array([0.0, 0.6, 0.0])), "lower"),
    (dict(upper={"a": 1.0}), "upper"),
    (dict(loss_fn=lambda z: z), "loss_fn"),
    (dict(loss_fn="loss"), "loss_fn"),
  ],
)
def test_bad_input_raises(kwargs, name):
  args = dict(loss_fn=_LOSS, x=_X, eps=0.2, p="inf", steps=2, key=0) | kwargs
  with pytest.raises(ValueError, match=rf"\b{name}\b"):
    clipjax.pgd(**args)
