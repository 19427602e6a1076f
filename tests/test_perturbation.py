"""Tests for clipjax.perturb, clipjax.random_perturbation and the demonstration."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import clipjax
from clipjax import __main__ as demo


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_perturb_lands_in_box_at_exact_distance(p, dtype):
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (16, 16))
  x[rng.uniform(size=x.shape) < 0.5] = 0.0
  x, d = jnp.asarray(x, dtype), jnp.asarray(rng.standard_normal((16, 16)), dtype)
  for eps in [0.0, 0.3, 2.0]:
    y = clipjax.perturb(x, d, eps, p=p)
    assert y.dtype == dtype and y.shape == x.shape
    assert bool(jnp.all((y >= 0) & (y <= 1)))
    reached = oracle.norm_after_clip(np.asarray(x), np.asarray(y) - np.asarray(x), 1.0, p)
    want = min(eps, oracle.max_norm(np.asarray(x), np.asarray(d), p))
    np.testing.assert_allclose(
      reached, want, rtol=1e-5 if dtype == jnp.float32 else 1e-12, atol=1e-7
    )


def test_perturb_beyond_reach_stops_at_the_maximum():
  x, d = jnp.array([0.5, 0.9, 0.0]), jnp.array([1.0, 1.0, -1.0])
  y = clipjax.perturb(x, d, 10.0)
  np.testing.assert_allclose(y, [1.0, 1.0, 0.0])
  np.testing.assert_allclose(
    float(jnp.linalg.norm(y - x)), float(clipjax.max_norm(x, d)), rtol=1e-6
  )


def test_perturb_pytree_keeps_structure_and_dtypes():
  x = {"img": jnp.full((4, 4), 0.5, jnp.bfloat16), "aux": jnp.full(3, 0.25, jnp.float32)}
  d = {"img": jnp.ones((4, 4), jnp.bfloat16), "aux": -jnp.ones(3, jnp.float32)}
  y = clipjax.perturb(x, d, 0.9)
  assert jax.tree.structure(y) == jax.tree.structure(x)
  assert y["img"].dtype == jnp.bfloat16 and y["aux"].dtype == jnp.float32
  flat = np.concatenate(
    [np.ravel(np.asarray(y[k], np.float64) - np.asarray(x[k], np.float64)) for k in ("aux", "img")]
  )
  np.testing.assert_allclose(np.linalg.norm(flat), 0.9, rtol=1e-2)  # bfloat16 rounding


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_random_perturbation_exact_size(distribution, p):
  x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (28, 28)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 8)
  eps = {1.0: 20.0, 2.0: 3.6, math.inf: 0.2}[p]
  ys = jax.vmap(lambda k: clipjax.random_perturbation(k, x, eps, p=p, distribution=distribution))(
    keys
  )
  for y in ys:
    assert bool(jnp.all((y >= 0) & (y <= 1)))
    np.testing.assert_allclose(
      oracle.norm_after_clip(np.asarray(x), np.asarray(y - x), 1.0, p), eps, rtol=1e-5
    )
  assert not np.allclose(ys[0], ys[1])  # fresh directions per key


def test_random_perturbation_int_seed_and_bad_distribution():
  x = jnp.full(10, 0.5)
  np.testing.assert_array_equal(
    clipjax.random_perturbation(3, x, 0.4), clipjax.random_perturbation(jax.random.key(3), x, 0.4)
  )
  with pytest.raises(ValueError, match="distribution"):
    clipjax.random_perturbation(0, x, 0.4, distribution="laplace")


def test_demo_naive_undershoots_and_clipjax_is_exact(capsys):
  kx, kd = jax.random.split(jax.random.key(0))
  x, d = jax.random.uniform(kx, (8, 28, 28)), jax.random.normal(kd, (8, 28, 28))
  for _, eps, naive, exact in demo.compare_norms(x, d):
    np.testing.assert_allclose(np.asarray(exact), eps, rtol=1e-5)
    assert float(naive.max()) <= eps * (1 + 1e-6) and float(naive.min()) < eps
  demo.main(["--quick", "--batch", "8"])  # the shapes above: their compilations serve
  out = capsys.readouterr().out
  assert "naive rescale" in out and "newton" in out
