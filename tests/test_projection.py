"""Tests for clipjax.project_ball_box against an independent float64 NumPy oracle.

The oracle is Dykstra's alternating projections between the p-ball and the box,
run to convergence; it uses none of the closed forms of the library.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st

import clipjax

_PS = (1, 2, math.inf)
_SHAPE = (3, 4)
_project = jax.jit(clipjax.project_ball_box, static_argnames="p")


# ---------------------------------------------------------------------------
# The oracle and the test problems
# ---------------------------------------------------------------------------


def _project_l1_ball(w, eps):
  """Projection of ``w`` onto the centred L1 ball (Duchi et al., ICML 2008)."""
  a = np.abs(w)
  if a.sum() <= eps:
    return w
  s = np.sort(a)[::-1]
  cs = np.cumsum(s)
  k = np.arange(1, s.size + 1)
  rho = np.nonzero(s - (cs - eps) / k > 0)[0][-1]
  theta = (cs[rho] - eps) / (rho + 1)
  return np.sign(w) * np.maximum(a - theta, 0)


def _project_ball(v, c, eps, p):
  w = v - c
  if p == 2:
    norm = np.linalg.norm(w)
    return v if norm <= eps else c + w * (eps / norm)
  if p == 1:
    return c + _project_l1_ball(w, eps)
  return c + np.clip(w, -eps, eps)


def _dykstra(y, c, eps, p, lo, hi, max_iter=50_000):
  """Dykstra's alternating projections: converge to the projection onto ball ∩ box."""
  shape = np.shape(y)
  y, c, lo, hi = (np.broadcast_to(np.asarray(v, np.float64), shape).ravel() for v in (y, c, lo, hi))
  tol = 1e-14 * (1 + np.max(np.abs(y)))  # the increments carry rounding of size |y|
  x, inc_ball, inc_box = y.copy(), np.zeros_like(y), np.zeros_like(y)
  for _ in range(max_iter):
    b = _project_ball(x + inc_ball, c, eps, p)
    inc_ball = x + inc_ball - b
    x_new = np.clip(b + inc_box, lo, hi)
    inc_box = b + inc_box - x_new
    if np.max(np.abs(x_new - x)) <= tol and np.max(np.abs(x_new - b)) <= tol:
      return x_new.reshape(shape)
    x = x_new
  raise AssertionError("Dykstra did not converge: the test case is too hard for the oracle.")


def _norm(v, p):
  return np.linalg.norm(np.ravel(v), ord=p)


def _case(seed, p, eps, far, unit_box=False, shape=_SHAPE):
  """A random problem: array bounds, centres partly on them, ``y`` about ``far`` radii away.

  Every problem has the same shapes and dtypes, so the jitted function compiles
  once per ``p`` and dtype. Half of them (all with ``unit_box``) use the box [0, 1].
  """
  rng = np.random.default_rng(seed)
  if rng.random() < 0.5 and not unit_box:
    lo = rng.uniform(-1, 0, shape)
    hi = lo + rng.uniform(0, 2, shape)
  else:
    lo, hi = np.zeros(shape), np.ones(shape)
  c = rng.uniform(lo, hi)
  c = np.where(rng.random(shape) < 0.3, np.where(rng.random(shape) < 0.5, lo, hi), c)
  # Dykstra needs many passes when y is far from a small ball, so the distance of
  # y follows eps; the largest eps exceeds what the box allows.
  g = rng.normal(size=shape)
  y = c + g * (far * eps / _norm(g, p))
  return y, c, eps, lo, hi


def _cases(p):
  return st.builds(
    _case,
    seed=st.integers(0, 2**32 - 1),
    p=st.just(p),
    eps=st.sampled_from([1e-4, 1e-2, 0.1, 0.5, 1.5, 10.0]),
    far=st.sampled_from([0.5, 1.5, 4.0, 20.0]),
  )


def _as(dtype, *values):
  return [jnp.asarray(v, dtype) for v in values]


# ---------------------------------------------------------------------------
# Agreement with the oracle, feasibility, optimality
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-10), (jnp.float32, 2e-6)])
@pytest.mark.parametrize("p", _PS)
@given(data=st.data())
def test_matches_dykstra(p, dtype, tol, data):
  y, c, eps, lo, hi = data.draw(_cases(p))
  y, c, lo, hi = _as(dtype, y, c, lo, hi)
  eps = float(jnp.asarray(eps, dtype))
  z = _project(y, c, eps, p=p, lower=lo, upper=hi)
  assert z.dtype == dtype and z.shape == _SHAPE
  # The oracle solves, in float64, the problem as rounded to ``dtype``.
  y, c, lo, hi, z = (np.asarray(v, np.float64) for v in (y, c, lo, hi, z))
  np.testing.assert_allclose(z, _dykstra(y, c, eps, p, lo, hi), rtol=0, atol=tol)
  assert np.all((lo <= z) & (z <= hi))
  assert _norm(z - c, p) <= eps + tol


def _shrink_into_ball(w, c, eps, p):
  """Feasible points from points ``w`` of the box: move them toward ``c`` (convexity)."""
  norms = np.linalg.norm(w - c, ord=p, axis=-1, keepdims=True)
  return c + (w - c) * np.minimum(1, eps / np.maximum(norms, 1e-300))


def _closest_found(y, c, z, eps, p, lo, hi, rng):
  """The distance to ``y`` of the nearest feasible point a random search finds.

  Feasible points: random points of the box and random perturbations of ``z``,
  both moved toward ``c`` into the ball, and points on the segments from ``z``
  to them (feasible by convexity), which catch any descent direction at ``z``.
  """
  y, c, z, lo, hi = (np.ravel(v) for v in (y, c, z, lo, hi))
  n = y.size
  anywhere = rng.uniform(lo, hi, (1000, n))
  near = np.clip(z + eps * np.logspace(-4, 0, 2000)[:, None] * rng.normal(size=(2000, n)), lo, hi)
  feasible = _shrink_into_ball(np.concatenate([anywhere, near]), c, eps, p)
  t = np.logspace(-6, 0, feasible.shape[0])[:, None]
  candidates = np.concatenate([feasible, z + t * (feasible - z)])
  return np.min(np.linalg.norm(candidates - y, axis=-1))


@pytest.mark.parametrize("p", _PS)
@pytest.mark.parametrize("seed", range(4))
def test_no_closer_feasible_point(p, seed):
  y, c, eps, lo, hi = _case(seed, p, 0.3, 4.0)
  z = np.asarray(_project(y, c, eps, p=p, lower=lo, upper=hi))
  rng = np.random.default_rng(seed)
  assert _closest_found(y, c, z, eps, p, lo, hi, rng) >= np.linalg.norm(z - y) - 1e-12


@pytest.mark.parametrize("p", [1, 2])
def test_search_catches_project_then_clip(p):
  """The search above has power: it beats the point attack libraries use."""
  y, c, eps, lo, hi = _case(1, p, 0.3, 4.0)
  naive = np.clip(_project_ball(y.ravel(), c.ravel(), eps, p).reshape(y.shape), lo, hi)
  rng = np.random.default_rng(0)
  assert _closest_found(y, c, naive, eps, p, lo, hi, rng) < np.linalg.norm(naive - y) - 1e-6


@pytest.mark.parametrize("p", _PS)
def test_closer_than_project_then_clip_on_images(p):
  rng = np.random.default_rng(0)
  shape = (8, 3, 16, 16)
  # Image-like: many pixels saturated at 0 or 1, the rest uniform.
  x = np.clip(rng.uniform(-0.5, 1.5, shape), 0, 1).astype(np.float32)
  step = np.sign(rng.normal(size=shape)).astype(np.float32)  # an FGSM-like step
  eps = {1: 10.0, 2: 2.0, math.inf: 8 / 255}[p]
  y = x + step * np.float32(eps)
  exact = jax.vmap(lambda y, x: _project(y, x, eps, p=p))(y, x)
  for yi, xi, zi in zip(y, x, np.asarray(exact, np.float64)):
    yi, xi = yi.astype(np.float64), xi.astype(np.float64)
    naive = np.clip(_project_ball(yi.ravel(), xi.ravel(), eps, p).reshape(shape[1:]), 0, 1)
    assert np.linalg.norm(zi - yi) <= np.linalg.norm(naive - yi) + 1e-5


@pytest.mark.parametrize("p", _PS)
def test_zero_radius_gives_center(p):
  y, c, _, lo, hi = _case(3, p, 0.1, 4.0)
  np.testing.assert_array_equal(_project(y, c, 0.0, p=p, lower=lo, upper=hi), c)


# The tests below call the eager API with scalar bounds; their arrays share _SHAPE.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("p", _PS)
def test_clip_inside_ball_is_returned_unchanged(p, dtype):
  rng = np.random.default_rng(1)
  c = rng.uniform(0, 1, 12)
  y = c + rng.normal(size=12) * 0.01
  y[:5] = [1.001, 1.2, -0.003, -4.0, 1.0]
  c[:5] = [1.0, 1.0, 0.0, 0.0, 1.0]
  y, c = _as(dtype, y.reshape(_SHAPE), c.reshape(_SHAPE))
  clipped = jnp.clip(y, 0, 1)
  for eps in (float(_norm(clipped - c, p)) * 1.01, 100.0):
    np.testing.assert_array_equal(clipjax.project_ball_box(y, c, eps, p=p), clipped)
  np.testing.assert_array_equal(clipjax.project_ball_box(clipped, c, 100.0, p=p), clipped)


def test_p_spellings():
  y, c, eps, _, _ = _case(0, math.inf, 0.1, 4.0, unit_box=True)
  results = [
    clipjax.project_ball_box(y, c, eps, p=p) for p in (jnp.inf, float("inf"), "inf", "INF")
  ]
  for z in results[1:]:
    np.testing.assert_array_equal(z, results[0])


def test_p1_with_ties_matches_dykstra():
  # Equal breakpoints everywhere: equal |y − c| and equal room in most coordinates.
  c = np.full(12, 0.5)
  y = c + np.where(np.arange(12) % 2 == 0, 0.7, -0.7)
  y[:4] = 0.7
  y, c = y.reshape(_SHAPE), c.reshape(_SHAPE)
  for eps in (0.05, 2.0, 4.0, 4.7, 4.8, 4.9, 25.0):
    z = np.asarray(clipjax.project_ball_box(y, c, eps, p=1))
    np.testing.assert_allclose(z, _dykstra(y, c, eps, 1, 0.0, 1.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("p", _PS)
def test_half_precision(p, dtype):
  y, c, eps, _, _ = _case(2, p, 0.5, 4.0, unit_box=True)
  y, c = _as(dtype, y, c)
  z = clipjax.project_ball_box(y, c, eps, p=p)
  assert z.dtype == dtype
  ref = clipjax.project_ball_box(*_as(jnp.float32, y, c), eps, p=p).astype(dtype)
  np.testing.assert_array_equal(z, ref)


# ---------------------------------------------------------------------------
# Pytrees, jit, vmap, grad
# ---------------------------------------------------------------------------


def _split(v):
  """12 numbers as a pytree with a matrix, a vector and a scalar leaf."""
  v = np.ravel(v)
  return {"w": v[:8].reshape(2, 4), "b": v[8:11], "s": v[11]}


@pytest.mark.parametrize("p", _PS)
def test_pytree_equals_flat_vector(p):
  y, c, eps, lo, _ = _case(5, p, 0.4, 4.0)
  lo = np.minimum(lo, c) - 0.5
  # ``lower`` as a pytree like y, ``upper`` as one scalar for every leaf.
  tree = _project(_split(y), _split(c), eps, p=p, lower=_split(lo), upper=1.0)
  flat = _project(y, c, eps, p=p, lower=lo, upper=np.ones(_SHAPE))
  assert jax.tree.structure(tree) == jax.tree.structure(_split(y))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-14), tree, _split(flat)
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("p", _PS)
def test_vmap_with_per_example_eps_agrees_with_jit(p, dtype):
  cases = [_case(s, p, e, 4.0) for s, e in enumerate([1e-3, 0.1, 0.5, 1.0, 10.0])]
  ys, cs, epss, los, his = _as(dtype, *(np.stack([case[i] for case in cases]) for i in range(5)))
  batched = jax.vmap(lambda y, c, e, lo, hi: _project(y, c, e, p=p, lower=lo, upper=hi))(
    ys, cs, epss, los, his
  )
  for i in range(len(cases)):
    one = _project(ys[i], cs[i], float(epss[i]), p=p, lower=los[i], upper=his[i])
    np.testing.assert_allclose(
      batched[i], one, rtol=0, atol=1e-6 if dtype == jnp.float32 else 1e-14
    )


@pytest.mark.parametrize("p", _PS)
def test_grad_matches_finite_differences(p):
  loss = lambda w, y, c, eps, lo, hi: jnp.vdot(w, _project(y, c, eps, p=p, lower=lo, upper=hi))
  grad = jax.jit(jax.grad(loss, argnums=range(1, 6)))
  for seed in range(3):
    # Centres strictly inside the box and y well outside the ball: away from kinks.
    rng = np.random.default_rng(100 + seed)
    lo = rng.uniform(-1, -0.2, _SHAPE)
    hi = rng.uniform(0.2, 1, _SHAPE)
    c = rng.uniform(lo / 2, hi / 2)
    y = c + rng.normal(size=_SHAPE)
    w = rng.normal(size=_SHAPE)
    args = [y, c, {1: 0.8, 2: 0.5, math.inf: 0.3}[p], lo, hi]
    grads = grad(w, *args)
    for i in range(5):
      f = lambda v, i=i, w=w, args=args: float(loss(w, *args[:i], v, *args[i + 1 :]))
      np.testing.assert_allclose(
        grads[i], oracle.finite_difference(f, args[i]), rtol=1e-6, atol=1e-7
      )
  # Where clip(y) is inside the ball the projection is the clip, and so is its Jacobian.
  y = c + np.clip(rng.normal(size=_SHAPE), -0.01, 0.01)
  y[0, :2] = [hi[0, 0] + 0.001, lo[0, 1] - 0.001]
  expected = np.where((lo < y) & (y < hi), w, 0)
  np.testing.assert_array_equal(grad(w, y, c, 10.0, lo, hi)[0], expected)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

_Y = np.array([0.2, 0.9, 1.4])
_C = np.array([0.1, 0.5, 1.0])


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(p=3), "p"),
    (dict(p=0.5), "p"),
    (dict(p="two"), "p"),
    (dict(eps=-0.1), "eps"),
    (dict(eps=np.nan), "eps"),
    (dict(eps=np.ones(3)), "eps"),
    (dict(center=np.array([0.1, 0.5, 1.1])), "center"),
    (dict(center=np.array([0.1, 0.5])), "center"),
    (dict(center={"a": _C}), "center"),
    (dict(y=np.array([0.2, np.nan, 1.4])), "y"),
    (dict(y=np.array([0.2, np.inf, 1.4])), "y"),
    (dict(lower=np.array([0.0, 0.6, 0.0])), "lower"),
    (dict(lower=np.zeros(2)), "lower"),
    (dict(upper=np.array([1.0, np.nan, 1.0])), "upper"),
    (dict(upper={"a": 1.0}), "upper"),
  ],
)
def test_bad_input_raises(kwargs, name):
  args = dict(y=_Y, center=_C, eps=0.2, p=2, lower=0.0, upper=1.0) | kwargs
  with pytest.raises(ValueError, match=rf"\b{name}\b"):
    clipjax.project_ball_box(**args)


@pytest.mark.parametrize("p", _PS)
@pytest.mark.parametrize(
  "name, value",
  [
    ("eps", -0.1),
    ("eps", np.nan),
    ("center", [0.1, 0.5, 1.1]),
    ("y", [0.2, np.nan, 1.4]),
    ("lower", [0.0, 0.6, 0.0]),
    ("upper", [1.0, np.inf, 1.0]),
  ],
)
def test_invalid_input_under_jit_is_nan(p, name, value):
  tile = lambda v: np.resize(np.asarray(v, np.float64), _SHAPE)
  args = dict(y=tile(_Y), center=tile(_C), eps=0.2, lower=np.zeros(_SHAPE), upper=np.ones(_SHAPE))
  args[name] = value if name == "eps" else tile(value)
  y, center, eps, lower, upper = args.values()
  assert np.all(np.isnan(_project(y, center, eps, p=p, lower=lower, upper=upper)))
