"""Tests for clipjax.rescale and clipjax.max_norm against the float64 NumPy oracle."""

import dataclasses
import functools
import importlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clipjax

_breakpoints = importlib.import_module("clipjax.rescaling._breakpoints")
_eta = importlib.import_module("clipjax.rescaling._eta")
_rescale_config = importlib.import_module("clipjax.rescaling._rescale_config")
_solvers = importlib.import_module("clipjax.rescaling._solvers")

P_VALUES = [1.0, 1.5, 2.0, 3.0, 7.0, math.inf]
METHODS = ["newton", "sort", "bisect", "auto"]
SOLVER_CASES = [
  (2.0, "newton"),
  (2.0, "sort"),
  (2.0, "bisect"),
  (1.0, "newton"),
  (7.0, "sort"),
  (math.inf, "newton"),
]


@functools.cache
def jitted(p, method):
  return jax.jit(functools.partial(clipjax.rescale, p=p, method=method))


def configured(**changes):
  """The CPU default with ``changes``, reporting its paths, and the set they go to."""
  seen = set()

  def report(path):
    seen.add(path)

  return dataclasses.replace(_rescale_config.default("cpu"), report=report, **changes), seen


def rescale_with(config, *, p=2.0, method="auto"):
  """``rescale``'s solve under ``config`` (unjitted; bounds as the last two arguments)."""
  return lambda x, d, e, lo=0.0, hi=1.0: _eta.solve_eta(
    x, d, e, p=p, lower=lo, upper=hi, method=method, config=config
  )[0]


def box_of(x, d, lo=0.0, hi=1.0):
  return _eta.prepare_box(x, d, lower=lo, upper=hi)[0]


def random_case(rng, n, *, heavy=False, array_bounds=False, dtype=np.float64):
  """A point in a box with zeros in delta and coordinates on the bounds."""
  if array_bounds:
    lower = rng.uniform(-1, 0.5, n)
    upper = lower + rng.uniform(0, 2, n)
  else:
    lower, upper = 0.0, 1.0
  x = lower + rng.uniform(0, 1, n) * (np.asarray(upper) - lower)
  on_lower, on_upper = rng.uniform(size=n) < 0.15, rng.uniform(size=n) < 0.15
  x = np.where(on_lower, lower, np.where(on_upper, upper, x))
  d = rng.standard_normal(n)
  if heavy:
    d = d * np.abs(rng.standard_cauchy(n)) ** 2
  d[rng.uniform(size=n) < 0.1] = 0.0
  cast = lambda v: np.asarray(v, dtype) if np.ndim(v) else v
  return cast(x), cast(d), cast(lower), cast(upper)


# ---------------------------------------------------------------------------
# Exactness against the oracle
# ---------------------------------------------------------------------------


@settings(max_examples=20)
@given(
  seed=st.integers(0, 2**31 - 1),
  p=st.sampled_from(P_VALUES),
  fraction=st.sampled_from([0.0, 1e-3, 0.1, 0.5, 0.9, 0.999, 1.0, 1.3]),
  heavy=st.booleans(),
  array_bounds=st.booleans(),
)
def test_matches_oracle_float64(seed, p, fraction, heavy, array_bounds):
  rng = np.random.default_rng(seed)
  n = int(rng.choice([1, 5, 64]))
  x, d, lower, upper = random_case(rng, n, heavy=heavy, array_bounds=array_bounds)
  # Scalar bounds go in as arrays too, so that one compilation serves every case.
  lower, upper = (np.broadcast_to(b, x.shape) + 0.0 for b in (lower, upper))
  eps = fraction * oracle.max_norm(x, d, p, lower, upper)
  want = oracle.rescale(x, d, eps, p, lower, upper)
  top = oracle.max_norm(x, d, p, lower, upper)
  for method in METHODS:
    eta = jitted(p, method)(pad(x), pad(d), eps, lower=pad(lower), upper=pad(upper, 1.0))
    assert eta.dtype == jnp.float64
    np.testing.assert_allclose(float(eta), want, rtol=1e-9, atol=1e-300, err_msg=method)
    reached = oracle.norm_after_clip(x, d, float(eta), p, lower, upper)
    np.testing.assert_allclose(reached, min(eps, top), rtol=1e-9, err_msg=method)


def pad(v, fill=0.0, size=64):
  """Pads to one shape with coordinates that cannot move (delta = 0, x on the bound)."""
  return np.concatenate([v, np.full(size - len(v), fill)])


@settings(max_examples=20)
@given(
  seed=st.integers(0, 2**31 - 1),
  p=st.sampled_from(P_VALUES),
  fraction=st.sampled_from([0.01, 0.3, 0.7, 0.95, 1.2]),
  heavy=st.booleans(),
)
def test_matches_oracle_float32(seed, p, fraction, heavy):
  rng = np.random.default_rng(seed)
  x, d, lower, upper = random_case(rng, 300, heavy=heavy, dtype=np.float32)
  eps = np.float32(fraction * oracle.max_norm(x, d, p))
  # The oracle solves the problem exactly as it was rounded to float32. Summing a few
  # hundred float32 terms costs ~1e-6 of the norm (backward error); eta inherits it
  # amplified by the problem's condition number, so the bound scales with it.
  want = oracle.rescale(x, d, float(eps), p)
  cond = 1.0 if p == math.inf else max(1.0, oracle.condition(x, d, want, p))
  for method in METHODS:
    eta = jitted(p, method)(x, d, eps)
    assert eta.dtype == jnp.float32
    reached = oracle.norm_after_clip(x, d, float(eta), p)
    np.testing.assert_allclose(
      reached, min(float(eps), oracle.max_norm(x, d, p)), rtol=1e-5, err_msg=method
    )
    np.testing.assert_allclose(
      float(eta), want, rtol=(1e-6 if p == math.inf else 1e-5 * cond), err_msg=method
    )


def test_sorted_oracle_matches_oracle():
  rng = np.random.default_rng(11)
  for p in [1.0, 2.0, 3.0]:
    x, d, lo, hi = random_case(rng, 300, heavy=True, array_bounds=True)
    eps = 0.5 * oracle.max_norm(x, d, p, lo, hi)
    assert oracle.rescale_sorted(x, d, eps, p, lo, hi) == pytest.approx(
      oracle.rescale(x, d, eps, p, lo, hi), rel=1e-12
    )


@pytest.mark.parametrize("method", ["newton", "bisect"])
def test_float32_long_rows_keep_precision(method):
  """Sums over 150528 float32 terms (an ImageNet image) stay accurate to ~1e-7.

  A sequential float32 accumulation loses about 1e-5 here. Not the sort: "auto" picks it
  only for rows of up to 16,384 elements, and its sums are checked on such rows above.
  """
  rng = np.random.default_rng(12)
  n = 3 * 224 * 224
  x = rng.uniform(0, 1, n).astype(np.float32)
  for heavy in [False, True]:
    d = rng.standard_normal(n).astype(np.float32)
    if heavy:
      d = d / rng.standard_normal(n).astype(np.float32)
    for p in [1.0, 2.0]:
      eps = 0.5 * oracle.max_norm(x, d, p)
      eta = float(jitted(p, method)(x, d, eps))
      assert eta == pytest.approx(oracle.rescale_sorted(x, d, eps, p), rel=1e-6), (heavy, p)


def test_float32_rows_long_enough_to_sample():
  """Rows of the default ``sample_min_row`` (Newton started from a sample), batched, float32."""
  config, seen = configured()
  n = config.sample_min_row
  rng = np.random.default_rng(13)
  x = rng.uniform(0, 1, (3, n)).astype(np.float32)
  x[2, rng.uniform(size=n) < 0.8] = 0.0  # mostly on the lower bound, like a dark image
  d = rng.standard_normal((3, n)).astype(np.float32)
  d[1] /= rng.standard_normal(n).astype(np.float32)  # Cauchy directions
  for p in [1.0, 2.0]:
    eps = np.array(
      [f * oracle.max_norm(a, b, p) for f, a, b in zip((0.5, 0.3, 0.9), x, d)], np.float32
    )
    eta = jax.jit(jax.vmap(rescale_with(config, p=p)))(x, d, eps)
    want = [oracle.rescale_sorted(a, b, e, p) for a, b, e in zip(x, d, eps)]
    np.testing.assert_allclose(eta, want, rtol=1e-6, err_msg=str(p))
  assert {"sampled start", "one row at a time"} <= seen, seen


@pytest.mark.parametrize("method", ["newton", "sort", "bisect"])
def test_large_p_heavy_tails_float32_no_overflow(method):
  """p = 7 with heavy-tailed directions: naive powers overflow float32 (1e38)."""
  rng = np.random.default_rng(7)
  x = rng.uniform(0, 1, 2000).astype(np.float32)
  c = rng.standard_cauchy(2000)
  d = (np.sign(c) * np.abs(c) ** 2.5).astype(np.float32)
  assert np.all(np.isfinite(d)) and np.max(np.abs(d).astype(np.float64)) ** 7 > 1e38
  for fraction in [1e-4, 0.2, 0.9]:
    eps = np.float32(fraction * oracle.max_norm(x, d, 7))
    eta = float(jitted(7.0, method)(x, d, eps))
    assert np.isfinite(eta)
    np.testing.assert_allclose(eta, oracle.rescale(x, d, float(eps), 7), rtol=1e-4)
  # Tiny eps: every power of the step underflows unless scaled.
  eps = np.float32(1e-6)
  np.testing.assert_allclose(
    float(jitted(7.0, method)(x, d, eps)), oracle.rescale(x, d, 1e-6, 7), rtol=1e-4
  )


def test_methods_agree_on_image_batch():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (784,))
  x[rng.uniform(size=784) < 0.6] = 0.0  # mostly-zero image, like MNIST
  d = rng.standard_normal(784)
  results = [float(jitted(2.0, m)(x, d, 3.6)) for m in ["newton", "sort", "bisect"]]
  np.testing.assert_allclose(results, oracle.rescale(x, d, 3.6, 2), rtol=1e-12)


# ---------------------------------------------------------------------------
# Edge cases of the contract
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("p", "method"),
  # At p = inf every method is the one closed form (rescale maps it to newton).
  [(p, m) for p in P_VALUES for m in ["newton", "sort", "bisect"] if p < math.inf or m == "newton"],
)
def test_edge_cases(p, method):
  f = jitted(p, method)
  x = np.array([0.0, 0.3, 1.0, 0.5, 0.9])
  d = np.array([-1.0, 2.0, 1.0, 0.0, -0.5])
  assert float(f(x, d, 0.0)) == 0.0  # eps = 0
  assert float(f(x, np.zeros(5), 0.7)) == 0.0  # all-zero delta
  # eps beyond the maximum: the smallest eta that reaches the maximum, finite.
  top = oracle.max_norm(x, d, p)
  eta = float(f(x, d, 10 * top))
  np.testing.assert_allclose(eta, oracle.rescale(x, d, top, p), rtol=1e-12)
  np.testing.assert_allclose(oracle.norm_after_clip(x, d, eta, p), top, rtol=1e-12)
  assert eta == pytest.approx(float(f(x, d, top)), rel=1e-12)
  # Coordinates with delta_i == 0 never move, even at large eta.
  moved = np.asarray(clipjax.perturb(x, d, 10 * top, p=p, method=method)) - x
  assert moved[3] == 0.0
  # x on the bounds, moving outwards: nothing can move.
  assert float(f(np.array([0.0, 1.0]), np.array([-1.0, 3.0]), 0.5)) == 0.0


def test_p_inf_is_smallest_eta():
  x = np.array([0.5, 0.5, 0.95])
  d = np.array([1.0, 0.5, 4.0])
  # Coordinate 2 saturates at 0.05 < eps, so the norm reaches 0.2 through coordinate 0.
  eta = float(clipjax.rescale(x, d, 0.2, p="inf"))
  assert eta == pytest.approx(0.2)
  for smaller in [eta * (1 - 1e-9), 0.9 * eta]:
    assert oracle.norm_after_clip(x, d, smaller, np.inf) < 0.2
  assert float(clipjax.rescale(x, d, 0.2, p=jnp.inf)) == eta
  assert float(clipjax.rescale(x, d, 0.2, p=float("inf"))) == eta


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computed_in_float32(dtype):
  rng = np.random.default_rng(1)
  x, d, _, _ = random_case(rng, 200)
  xh, dh = jnp.asarray(x, dtype), jnp.asarray(d, dtype)
  eta = clipjax.rescale(xh, dh, 2.0)
  assert eta.dtype == dtype
  # The solve is in float32: the result is the float32 answer, rounded once.
  f32 = clipjax.rescale(xh.astype(jnp.float32), dh.astype(jnp.float32), 2.0)
  assert eta == f32.astype(dtype), (eta, f32)
  # So it lies within half a unit in the last place of the exact answer (plus float32's
  # own error): half of the format's epsilon, relative.
  want = oracle.rescale(np.asarray(xh, np.float64), np.asarray(dh, np.float64), 2.0, 2)
  np.testing.assert_allclose(float(eta), want, rtol=float(jnp.finfo(dtype).eps) / 2 + 1e-6)
  y = clipjax.perturb(xh, dh, 2.0)
  chex.assert_trees_all_equal_shapes_and_dtypes(y, xh)


def test_auto_picks_the_measured_method():
  """auto: the sort on one GPU for rows up to ``sort_max_row`` (by default), else newton."""
  limit = _rescale_config.default("gpu").sort_max_row
  assert limit == 1 << 14 and _rescale_config.default("cpu").sort_max_row == 0
  gpu = _rescale_config.default("gpu")
  box = lambda *shapes: box_of([np.zeros(s) for s in shapes], [np.zeros(s) for s in shapes])
  resolve = _solvers.resolve_method
  assert resolve("auto", box((limit,)), _rescale_config.default("cpu")) == "newton"
  assert resolve("auto", box((limit // 2,), (limit // 2,)), gpu) == "sort"  # the whole pytree
  assert resolve("auto", box((limit // 2,), (limit // 2 + 1,)), gpu) == "newton"
  assert resolve("bisect", box((8,)), gpu) == "bisect"
  sharded = dataclasses.replace(gpu, sharded=True)
  assert resolve("auto", box((8,)), sharded) == "newton"
  # The choice is the path that runs.
  x, d = np.full(10, 0.5), np.linspace(-1, 1, 10)
  for sort_max_row, method in [(10, "sort"), (9, "newton")]:
    config, seen = configured(sort_max_row=sort_max_row)
    eta = float(rescale_with(config)(x, d, 0.3))
    np.testing.assert_allclose(eta, oracle.rescale(x, d, 0.3, 2), rtol=1e-12)
    assert method in seen and len(seen & set(_solvers.SOLVERS)) == 1, seen


def test_newton_fallback_is_exact():
  """The bounded fallback (bisection over bit patterns), forced after one or two passes."""
  rng = np.random.default_rng(3)
  # Geometric breakpoints: every Newton step saturates only a few more coordinates.
  n = 200
  x = np.full(n, 0.5)
  d = 0.5 / np.geomspace(1e-3, 1.0, n) * rng.choice([-1, 1], n)
  eps = 0.5 * oracle.max_norm(x, d, 2)
  want = oracle.rescale(x, d, eps, 2)
  for passes in [1, 2, 40]:
    config, seen = configured(max_newton_passes=passes)
    got = float(jax.jit(rescale_with(config, method="newton"))(x, d, eps))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # Newton alone converges here in fewer than 40 passes.
    assert ("newton fallback" in seen) == (passes < 40), passes


# ---------------------------------------------------------------------------
# Pytrees, bounds, jit and vmap
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p, method", SOLVER_CASES)
def test_pytree_equals_flat_vector(p, method):
  rng = np.random.default_rng(4)
  x = {"a": rng.uniform(0, 1, (3, 4)), "b": [rng.uniform(-1, 1, 5), rng.uniform(0, 2, ())]}
  d = jax.tree.map(lambda v: rng.standard_normal(np.shape(v)), x)
  lower = {"a": 0.0, "b": [np.full(5, -1.0), 0.0]}
  upper = {"a": np.ones((1, 4)), "b": [1.0, 2.0]}
  eps = 1.5
  eta = float(clipjax.rescale(x, d, eps, p=p, lower=lower, upper=upper, method=method))
  leaves = lambda t: jax.tree.leaves(t)
  bcast = lambda b: [np.broadcast_to(lb, np.shape(lx)) for lb, lx in zip(leaves(b), leaves(x))]
  flat_x, flat_d = oracle.flat(leaves(x)), oracle.flat(leaves(d))
  flat_lo, flat_hi = oracle.flat(bcast(lower)), oracle.flat(bcast(upper))
  np.testing.assert_allclose(
    eta, oracle.rescale(flat_x, flat_d, eps, p, flat_lo, flat_hi), rtol=1e-10
  )
  flat_eta = float(
    clipjax.rescale(flat_x, flat_d, eps, p=p, lower=flat_lo, upper=flat_hi, method=method)
  )
  np.testing.assert_allclose(eta, flat_eta, rtol=1e-12)
  y = clipjax.perturb(x, d, eps, p=p, lower=lower, upper=upper, method=method)
  assert jax.tree.structure(y) == jax.tree.structure(x)
  np.testing.assert_allclose(
    oracle.norm_after_clip(flat_x, flat_d, eta, p, flat_lo, flat_hi), eps, rtol=1e-10
  )


@pytest.mark.parametrize("p, method", SOLVER_CASES)
def test_vmap_matches_loop(p, method):
  rng = np.random.default_rng(5)
  cases = [random_case(rng, 50, heavy=bool(i % 2), array_bounds=True) for i in range(6)]
  x, d, lo, hi = (np.stack(v) for v in zip(*cases))
  eps = np.array([0.0, 0.1, 0.5, 1.0, 2.0, 50.0])
  f = lambda x, d, e, lo, hi: clipjax.rescale(x, d, e, p=p, lower=lo, upper=hi, method=method)
  batched = jax.jit(jax.vmap(f))(x, d, eps, lo, hi)
  want = [oracle.rescale(*args, p, l, h) for args, l, h in zip(zip(x, d, eps), lo, hi)]
  np.testing.assert_allclose(np.asarray(batched), want, rtol=1e-10)
  loop = [float(f(*args)) for args in zip(x, d, eps, lo, hi)]
  np.testing.assert_allclose(np.asarray(batched), loop, rtol=1e-12)


def test_vmap_mixed_batching_and_nesting():
  rng = np.random.default_rng(6)
  x = rng.uniform(0, 1, (4, 3, 10))
  d = rng.standard_normal((4, 3, 10))
  eps = rng.uniform(0.1, 1.0, (4, 3))
  upper = rng.uniform(0.5, 1.0, (3, 10))  # per-row bound, shared across the outer batch
  x = np.minimum(x, upper)
  f = lambda x, d, e, hi: clipjax.rescale(x, d, e, upper=hi)
  nested = jax.jit(jax.vmap(jax.vmap(f), in_axes=(0, 0, 0, None)))(x, d, eps, upper)
  for i in range(4):
    for j in range(3):
      want = oracle.rescale(x[i, j], d[i, j], eps[i, j], 2, 0.0, upper[j])
      np.testing.assert_allclose(float(nested[i, j]), want, rtol=1e-10)
  # One x, many directions; one direction, many eps; a batched bound of lower rank.
  shared_x = jax.vmap(lambda d: clipjax.rescale(x[0, 0], d, 0.5))(d[:, 0])
  np.testing.assert_allclose(
    shared_x, [oracle.rescale(x[0, 0], dd, 0.5, 2) for dd in d[:, 0]], rtol=1e-10
  )
  many_eps = jax.vmap(lambda e: clipjax.rescale(x[0, 0], d[0, 0], e))(eps[0])
  np.testing.assert_allclose(
    many_eps, [oracle.rescale(x[0, 0], d[0, 0], e, 2) for e in eps[0]], rtol=1e-10
  )
  row_upper = np.ones((4, 1))  # (1,) per example, broadcast against (10,)
  low_rank = jax.vmap(lambda x, d, hi: clipjax.rescale(x, d, 0.5, upper=hi))(
    x[:, 0], d[:, 0], row_upper
  )
  np.testing.assert_allclose(
    low_rank, [oracle.rescale(a, b, 0.5, 2) for a, b in zip(x[:, 0], d[:, 0])], rtol=1e-10
  )


@pytest.mark.parametrize(
  "strategy, changes",
  [
    ("one row at a time", {"row_elements": 1}),
    ("row groups", {"row_elements": 10**9, "group_elements": 160}),  # of two, and a rest
    ("lockstep", {"row_by_row": False}),
  ],
)
def test_batching_strategies_match_oracle(strategy, changes):
  """Every batching strategy of the custom_vmap rule gives the unbatched numbers."""
  rng = np.random.default_rng(8)
  cases = [random_case(rng, 80, heavy=bool(i % 2), array_bounds=True) for i in range(5)]
  x, d, lo, hi = (np.stack(v) for v in zip(*cases))
  unit_x = np.clip(x, 0, 1)
  eps = np.linspace(0.1, 3.0, 5)
  config, seen = configured(**changes)
  for p in [1.0, 3.0, math.inf]:
    f = rescale_with(config, p=p)
    batched = jax.jit(jax.vmap(f))(x, d, eps, lo, hi)
    shared_bounds = jax.jit(jax.vmap(f, in_axes=(0, 0, 0, None, None)))(unit_x, d, eps, 0.0, 1.0)
    loop = [float(f(*args)) for args in zip(x, d, eps, lo, hi)]  # no vmap: no batching rule
    np.testing.assert_allclose(batched, loop, rtol=1e-12, err_msg=strategy)
    np.testing.assert_allclose(
      batched, [oracle.rescale(*a, p, l, h) for *a, l, h in zip(x, d, eps, lo, hi)], rtol=1e-10
    )
    np.testing.assert_allclose(
      shared_bounds, [oracle.rescale(a, b, e, p) for a, b, e in zip(unit_x, d, eps)], rtol=1e-10
    )
  batchings = {"one row at a time", "row groups", "lockstep"}
  assert seen & batchings == {strategy}, seen


@pytest.mark.parametrize("method", ["newton", "sort", "bisect"])
def test_chunked_reductions_match_oracle(method):
  """Row reductions in chunks of eight (forced onto short rows) stay exact.

  Leaves shorter than a chunk, of exactly one, with a remainder, and 2-D;
  unbatched and under vmap, with gradients for p = inf (whose solve is the
  differentiated closed form).
  """
  config, seen = configured(chunked_min_elements=0)
  rng = np.random.default_rng(21)
  shapes = [(3,), (8,), (83,), (5, 13)]
  flat = lambda v: np.concatenate([np.ravel(a) for a in v])
  for p in [1.0, 2.5, math.inf]:
    f = jax.jit(rescale_with(config, p=p, method=method))
    jaxpr = str(jax.make_jaxpr(f)(*[[np.ones(s) for s in shapes]] * 2, 1.0, 0.0, 2.0))
    assert " reduce[" in jaxpr and "chunked reduction" in seen  # the variadic first stage
    rows = []
    for i, fraction in enumerate([0.05, 0.5, 0.95, 1.2]):
      leaves = [
        random_case(rng, math.prod(s), heavy=bool(i % 2), array_bounds=True) for s in shapes
      ]
      x, d, lo, hi = ([np.reshape(v, s) for v, s in zip(vs, shapes)] for vs in zip(*leaves))
      eps = fraction * oracle.max_norm(flat(x), flat(d), p, flat(lo), flat(hi))
      want = oracle.rescale(flat(x), flat(d), eps, p, flat(lo), flat(hi))
      np.testing.assert_allclose(float(f(x, d, eps, lo, hi)), want, rtol=1e-10)
      rows.append(((x, d, eps, lo, hi), want))
    stacked = jax.tree.map(lambda *v: np.stack(v), *[r[0] for r in rows])
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(*stacked), [r[1] for r in rows], rtol=1e-10)
    if p == math.inf and method == "newton":
      x, d, eps, lo, hi = rows[1][0]
      g = jax.grad(lambda e: f(x, d, e, lo, hi))(eps)
      h = 1e-6 * eps
      numeric = (oracle.rescale(flat(x), flat(d), eps + h, p, flat(lo), flat(hi)) - rows[1][1]) / h
      np.testing.assert_allclose(g, numeric, rtol=1e-5)


def test_sampled_warm_start_matches_oracle():
  """Long rows start Newton from a strided sample's solution; the answers stay exact.

  Forced onto short rows (every 7th coordinate) of a pytree with leaves shorter
  than, equal to and longer than the stride, array bounds, heavy tails, eps = 0
  and eps past the maximum, unbatched and under vmap (with per-row bounds).
  """
  config, seen = configured(sample_min_row=100, sample_stride=7)  # the row, not its sample
  rng = np.random.default_rng(12)
  sizes, fractions = (3, 7, 230), (0.0, 0.02, 0.4, 0.9, 0.999, 1.3)
  flat = lambda v: np.concatenate([np.ravel(a) for a in v])
  moved = 0
  for p in [1.0, 2.5]:
    f = jax.jit(rescale_with(config, p=p))

    @jax.jit
    def starts(box, eps):
      probe = _solvers.sample_probe(box, eps, p, 0, config)
      return tuple(
        _breakpoints.first_pass(box, eps, p, 0, config, probe).start for probe in (None, probe)
      )

    cases = []
    for i, fraction in enumerate(fractions):
      leaves = [random_case(rng, n, heavy=bool(i % 2), array_bounds=True) for n in sizes]
      x, d, lo, hi = (list(v) for v in zip(*leaves))
      eps = fraction * oracle.max_norm(flat(x), flat(d), p, flat(lo), flat(hi))
      want = oracle.rescale(flat(x), flat(d), eps, p, flat(lo), flat(hi))
      np.testing.assert_allclose(float(f(x, d, eps, lo, hi)), want, rtol=1e-10, atol=1e-300)
      cases.append((x, d, eps, lo, hi, want))
      # The start is at or left of the solution, and mostly past the plain first step.
      box = box_of(x, d, lo, hi)
      if 0 < fraction < 1:
        plain, start = (float(v) for v in starts(box, eps))
        assert plain <= start <= want * (1 + 1e-12)
        moved += start > plain
    stacked = jax.tree.map(lambda *v: np.stack(v), *[c[:5] for c in cases])
    batched = jax.jit(jax.vmap(f))(*stacked)
    np.testing.assert_allclose(batched, [c[5] for c in cases], rtol=1e-10, atol=1e-300)
  assert moved >= 4, moved  # of 8 rows inside (0, max): the sample does move the start
  assert "sampled start" in seen


def test_traced_eps_under_jit():
  x, d = np.full(6, 0.5), np.linspace(-1, 1, 6)
  f = jax.jit(lambda e: clipjax.rescale(x, d, e))
  for e in [0.0, 0.2, 0.7, 5.0]:
    np.testing.assert_allclose(float(f(e)), oracle.rescale(x, d, e, 2), rtol=1e-12)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


def gradient_case(seed, n=12):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.05, 0.95, n)  # strictly inside, so small moves keep it in the box
  d = rng.standard_normal(n)
  return x, d


@pytest.mark.parametrize(
  "p, method", [(p, "newton") for p in P_VALUES] + [(2.0, "sort"), (3.0, "bisect")]
)
@pytest.mark.parametrize("fraction", [0.5, 1.5])
def test_gradients_match_finite_differences(p, method, fraction):
  x, d = gradient_case(10 * P_VALUES.index(p) + int(fraction * 10))
  eps = fraction * oracle.max_norm(x, d, p)
  lo = np.full_like(x, -0.1)
  f = lambda x, d, e, lo: clipjax.rescale(x, d, e, p=p, lower=lo, method=method)
  grads = jax.grad(f, argnums=(0, 1, 2, 3))(x, d, eps, lo)
  numeric = [
    oracle.finite_difference(lambda v: oracle.rescale(v, d, eps, p, lo, 1.0), x),
    oracle.finite_difference(lambda v: oracle.rescale(x, v, eps, p, lo, 1.0), d),
    oracle.finite_difference(lambda v: oracle.rescale(x, d, float(v), p, lo, 1.0), eps),
    oracle.finite_difference(lambda v: oracle.rescale(x, d, eps, p, v, 1.0), lo),
  ]
  for g, want in zip(grads, numeric):
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p", [1.5, math.inf])
def test_jacfwd_equals_jacrev_and_vmap_of_grad(p):
  rng = np.random.default_rng(11)
  x = rng.uniform(0.05, 0.95, (3, 10))
  d = rng.standard_normal((3, 10))
  eps = np.array([0.3, 0.6, 0.9])
  f = lambda x, d, e: clipjax.rescale(x, d, e, p=p)
  per_example = jax.vmap(jax.grad(f, argnums=(0, 1, 2)))(x, d, eps)
  for i in range(3):
    fwd = jax.jacfwd(f, argnums=(0, 1, 2))(x[i], d[i], eps[i])
    rev = jax.jacrev(f, argnums=(0, 1, 2))(x[i], d[i], eps[i])
    for a, b, c in zip(fwd, rev, per_example):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
      np.testing.assert_allclose(a, c[i], rtol=1e-10, atol=1e-14)
    fd = oracle.finite_difference(lambda v: oracle.rescale(x[i], v, eps[i], p), d[i])
    np.testing.assert_allclose(rev[1], fd, rtol=1e-5, atol=1e-7)


def test_reverse_mode_has_no_loop():
  """Reverse mode differentiates the closed form, never the while_loop."""
  f = lambda d: clipjax.rescale(jnp.full(5, 0.5), d, 0.4)
  _, vjp = jax.vjp(f, jnp.linspace(-1.0, 1.0, 5))
  backward = str(jax.make_jaxpr(vjp)(1.0))
  assert "while" not in backward


def test_pytree_gradients():
  rng = np.random.default_rng(12)
  x = {"w": rng.uniform(0.1, 0.9, (2, 3)), "b": rng.uniform(0.1, 0.9, 4)}
  d = jax.tree.map(lambda v: rng.standard_normal(v.shape), x)
  g = jax.grad(lambda d: clipjax.rescale(x, d, 0.8))(d)
  flat_x, flat_d = oracle.flat(jax.tree.leaves(x)), oracle.flat(jax.tree.leaves(d))
  fd = oracle.finite_difference(lambda v: oracle.rescale(flat_x, v, 0.8, 2), flat_d)
  np.testing.assert_allclose(oracle.flat(jax.tree.leaves(g)), fd, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------
# max_norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", P_VALUES)
def test_max_norm(p):
  rng = np.random.default_rng(13)
  x, d, lower, upper = random_case(rng, 100, array_bounds=True)
  got = float(clipjax.max_norm(x, d, p=p, lower=lower, upper=upper))
  np.testing.assert_allclose(got, oracle.max_norm(x, d, p, lower, upper), rtol=1e-12)
  # float32 with large p and wide bounds: the powers would overflow unscaled.
  x32 = np.full(50, 1e6, np.float32)
  d32 = np.ones(50, np.float32)
  got32 = float(clipjax.max_norm(x32, d32, p=p, lower=0.0, upper=1e7))
  np.testing.assert_allclose(got32, oracle.max_norm(x32, d32, p, 0.0, 1e7), rtol=1e-5)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


GOOD = dict(x=np.array([0.2, 0.5]), delta=np.array([1.0, -1.0]), eps=0.3)


@pytest.mark.parametrize(
  "change, name",
  [
    (dict(x=np.array([1.2, 0.5])), "x"),
    (dict(x=np.array([-0.1, 0.5])), "x"),
    (dict(eps=-0.1), "eps"),
    (dict(eps=np.nan), "eps"),
    (dict(eps=np.inf), "eps"),
    (dict(x=np.array([np.nan, 0.5])), "x"),
    (dict(delta=np.array([np.inf, 0.0])), "delta"),
    (dict(delta=np.array([1.0, 2.0, 3.0])), "delta"),
    (dict(delta={"a": np.array([1.0, 2.0])}), "delta"),
    (dict(lower=1.0, upper=0.0), "lower"),
    (dict(lower=np.array([0.0, 0.0, 0.0])), "lower"),
    (dict(upper=np.nan), "upper"),
    (dict(p=0.5), "p"),
    (dict(p="two"), "p"),
    (dict(method="magic"), "method"),
    (dict(eps=np.array([0.1, 0.2])), "eps"),
  ],
)
def test_bad_input_raises_naming_argument(change, name):
  kwargs = {**GOOD, **change}
  x, delta, eps = kwargs.pop("x"), kwargs.pop("delta"), kwargs.pop("eps")
  with pytest.raises(ValueError, match=name):
    clipjax.rescale(x, delta, eps, **kwargs)


@functools.cache
def jitted_with_lower(p):
  """``rescale`` and ``max_norm`` under ``jit``, with the lower bound as an argument."""
  return (
    jax.jit(lambda x, d, e, lo: clipjax.rescale(x, d, e, p=p, lower=lo)),
    jax.jit(lambda x, d, lo: clipjax.max_norm(x, d, p=p, lower=lo)),
  )


@pytest.mark.parametrize(
  "x, delta, eps, lower",
  [
    ([1.2, 0.5], [1.0, -1.0], 0.3, 0.0),
    ([0.2, 0.5], [1.0, -1.0], -0.3, 0.0),
    ([np.nan, 0.5], [1.0, -1.0], 0.3, 0.0),
    ([0.2, 0.5], [np.inf, -1.0], 0.3, 0.0),
    ([0.2, 0.5], [1.0, -1.0], np.nan, 0.0),
    ([0.2, 0.5], [1.0, -1.0], 0.3, 0.9),
  ],
)
@pytest.mark.parametrize("p", [2.0, math.inf])
def test_bad_input_under_jit_is_nan(x, delta, eps, lower, p):
  f, g = jitted_with_lower(p)  # the inputs are arguments: one compilation serves every case
  assert np.isnan(float(f(np.array(x), np.array(delta), eps, lower)))
  if not np.isnan(eps) and eps >= 0:
    assert np.isnan(float(g(np.array(x), np.array(delta), lower)))


class VariantsTest(chex.TestCase):
  """``rescale``, ``perturb`` and ``max_norm`` on a pytree, with and without ``jit``."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_oracle(self):
    rng = np.random.default_rng(31)
    x = {"a": rng.uniform(0, 1, (3, 4)), "b": [rng.uniform(0, 1, 5)]}
    d = jax.tree.map(lambda v: rng.standard_normal(v.shape), x)
    flat_x, flat_d = oracle.flat(jax.tree.leaves(x)), oracle.flat(jax.tree.leaves(d))
    for p in (1.0, 2.0, math.inf):
      eps = 0.6 * oracle.max_norm(flat_x, flat_d, p)
      want = oracle.rescale(flat_x, flat_d, eps, p)
      eta = self.variant(functools.partial(clipjax.rescale, p=p))(x, d, eps)
      chex.assert_trees_all_close(eta, want, rtol=1e-10)
      y = self.variant(functools.partial(clipjax.perturb, p=p))(x, d, eps)
      chex.assert_trees_all_equal_shapes_and_dtypes(y, x)
      moved = jax.tree.map(lambda a, b: np.clip(a + want * b, 0, 1), x, d)
      chex.assert_trees_all_close(y, moved, rtol=1e-10)
      reach = self.variant(functools.partial(clipjax.max_norm, p=p))(x, d)
      chex.assert_trees_all_close(reach, oracle.max_norm(flat_x, flat_d, p), rtol=1e-12)


def test_configuration_follows_the_inputs():
  """Single-device inputs keep the backend's default; a sharded one would mark it."""
  config = _rescale_config.default()
  assert hash(config) == hash(_rescale_config.default())  # a static argument
  leaves = [np.ones(3), jnp.ones(3)]
  assert _rescale_config.for_inputs(leaves) == config
  # Traced without mesh axes, sharding is decided later: the process's devices decide.
  seen = []
  jax.jit(lambda v: seen.append(_rescale_config.may_be_sharded([v])) or v)(jnp.ones(2))
  assert seen == [jax.device_count() > 1]
  marked = _rescale_config.for_inputs(leaves, dataclasses.replace(config, sharded=True))
  assert marked.sharded and _solvers.resolve_method("auto", box_of(*leaves[:2]), marked) == "newton"
