"""clipped_grad's contract on a small MLP, against a float64 NumPy oracle of the clipped
sum of ``jax.vmap(jax.grad(loss_fn))``: clip norms from tiny to huge, the three scaling
rules, group-wise clip norms, masks (padded examples holding NaN), non-finite examples,
``has_aux``, tracing under ``jit``, and bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _ghost_oracle import check, group_index, oracle, per_example_grads, plan

import clipjax

F32, F64 = jnp.float32, jnp.float64


def _normal(seed, shape, dtype, scale=1.0):
  """Test data from NumPy, so building it compiles nothing."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


_SIZES = (6, 16, 12, 4)


def _mlp(dtype, batch=16):
  params = [
    {"w": _normal(2 * i, (m, n), dtype, m**-0.5), "b": _normal(2 * i + 1, (n,), dtype, 0.1)}
    for i, (m, n) in enumerate(zip(_SIZES[:-1], _SIZES[1:]))
  ]
  x = _normal(100, (batch, 3, _SIZES[0]), dtype)  # three positions per example
  y = jnp.asarray(np.random.default_rng(101).integers(0, _SIZES[-1], batch), jnp.int32)
  return params, x, y


def _loss(params, x, y):
  """Cross-entropy of the mean over positions of an MLP applied at each position."""
  h = x
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  logits = jnp.mean(h @ params[-1]["w"] + params[-1]["b"], axis=0)
  return -jax.nn.log_softmax(logits)[y]


def test_matches_per_example_float32():
  params, x, y = _mlp(F32)
  assert plan(_loss, params, x, y) == {
    f"[{i}]['{name}']": ("ghost",) if name == "w" else "pass"
    for i in range(3)
    for name in ("b", "w")
  }
  check(_loss, params, x, y, clip_norms=(1e-6, 0.3, 1.0, 1e6))


def test_matches_per_example_float64():
  check(_loss, *_mlp(F64), clip_norms=(1e-6, 0.3, 1e6))


@pytest.mark.parametrize("scaling", ["clip", "automatic", "normalize"])
def test_scaling_rules_group_wise_with_masks(scaling):
  """Every rule with one clip norm per layer, and padded examples whose data is NaN
  (they report 0 and change nothing). Each example's contribution (the sum when the
  mask selects it alone) is within its group's clip norm, and equal to it under
  ``"normalize"``."""
  params, x, y = _mlp(F64)
  mask = np.ones(len(x), bool)
  mask[[3, 7, 12]] = False
  x = x.at[3].set(jnp.nan).at[12, 1].set(jnp.inf)
  stability = 0.05 if scaling == "automatic" else 0.01
  clip_norms = [[c, c, c] for c in (1e-3, 0.4, 1e6)]
  check(
    _loss,
    params,
    x,
    y,
    clip_norms=clip_norms,
    mask=jnp.asarray(mask),
    scaling=scaling,
    stability=stability,
  )

  clip_norm = [0.3, 0.05, 0.2]
  grad_fn = clipjax.clipped_grad(_loss, clip_norm, scaling=scaling, stability=stability)
  for i in np.flatnonzero(mask):
    total, norms = grad_fn(params, x, y, mask=jnp.asarray(np.arange(len(x)) == i))
    for layer, bound, n in zip(total, clip_norm, norms):
      size = np.sqrt(sum(np.sum(np.asarray(v) ** 2) for v in jax.tree.leaves(layer)))
      assert size <= bound * (1 + 1e-12)
      if scaling == "normalize":
        np.testing.assert_allclose(size, bound, rtol=1e-12)
      assert np.count_nonzero(np.asarray(n)) == 1


def test_non_finite_examples_are_zeroed():
  """An example whose loss or gradient is NaN or inf contributes nothing (never 0·NaN)
  and reports an infinite norm; the others are untouched."""
  params, x, y = _mlp(F32)
  k = np.abs(np.asarray(_normal(19, (len(x), 4), F32)))
  k[7] = -1.0  # sqrt of a negative number: NaN loss and gradient
  x = x.at[2].set(jnp.nan).at[5, 0, 0].set(jnp.inf)
  params = (params, jnp.ones((4,), F32))

  def loss(p, x, y, k):
    return _loss(p[0], x, y) + jnp.sqrt(jnp.sum(k * p[1]))

  total, norms = clipjax.clipped_grad(loss, 0.5)(params, x, y, jnp.asarray(k))
  bad = np.isin(np.arange(len(x)), [2, 5, 7])
  assert np.all(np.isinf(np.asarray(norms)[bad])) and np.all(np.isfinite(norms[~bad]))
  good = [np.asarray(a)[~bad] for a in (x, y, k)]
  sums, want_norms = oracle(per_example_grads(loss, params, *good), 0.5, [0] * 7)
  np.testing.assert_allclose(np.asarray(norms)[~bad], want_norms[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(total), sums):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_has_aux_stacks_every_example_aux():
  params, x, y = _mlp(F32)

  def loss(p, x, y):
    value = _loss(p, x, y)
    return value, {"loss": value, "twice": 2 * value}

  (total, norms), aux = clipjax.clipped_grad(loss, 0.5, has_aux=True)(params, x, y)
  want, want_norms = clipjax.clipped_grad(_loss, 0.5)(params, x, y)
  losses = jax.vmap(_loss, (None, 0, 0))(params, x, y)
  np.testing.assert_allclose(aux["loss"], losses, rtol=1e-6)
  np.testing.assert_allclose(aux["twice"], 2 * losses, rtol=1e-6)
  np.testing.assert_allclose(norms, want_norms, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_under_jit_with_traced_clip_norms():
  params, x, y = _mlp(F32)
  grads = per_example_grads(_loss, params, x, y)

  @jax.jit
  def step(p, c, x, y):
    return clipjax.clipped_grad(_loss, [c, 2 * c, c])(p, x, y)

  for c in (1e-6, 0.3, 1e6):
    total, norms = step(params, jnp.asarray(c, F32), x, y)
    groups = [c, 2 * c, c]
    sums, want_norms = oracle(grads, groups, group_index(groups, params))
    np.testing.assert_allclose(np.stack(norms), want_norms, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(total), sums):
      np.testing.assert_array_less(np.max(np.abs(a - b)), 1e-4 * np.max(np.abs(b)) + 1e-30)


def test_bad_input_is_refused_naming_the_argument():
  params, x, y = _mlp(F32)
  grad_fn = clipjax.clipped_grad(_loss, 1.0)
  with pytest.raises(ValueError, match="clip_norm"):
    clipjax.clipped_grad(_loss, -1.0)
  with pytest.raises(ValueError, match="clip_norm"):
    clipjax.clipped_grad(_loss, [1.0, float("nan"), 1.0])
  with pytest.raises(ValueError, match="scaling"):
    clipjax.clipped_grad(_loss, 1.0, scaling="median")
  with pytest.raises(ValueError, match="stability"):
    clipjax.clipped_grad(_loss, 1.0, scaling="automatic", stability=0.0)
  with pytest.raises(ValueError, match="clip_norm"):
    clipjax.clipped_grad(_loss, [1.0, 1.0])(params, x, y)  # not a prefix of 3 layers
  with pytest.raises(ValueError, match="clip_norm"):
    clipjax.clipped_grad(_loss, jnp.ones(3))(params, x, y)
  with pytest.raises(ValueError, match="mask"):
    grad_fn(params, x, y, mask=jnp.ones(len(x) + 1, bool))
  with pytest.raises(ValueError, match="mask"):
    grad_fn(params, x, y, mask=jnp.ones(len(x)))
  with pytest.raises(ValueError, match="batch"):
    grad_fn(params, x, y[:3])
  with pytest.raises(ValueError, match="batch"):
    grad_fn(params)
  with pytest.raises(ValueError, match="scalar"):
    clipjax.clipped_grad(lambda p, x, y: jnp.stack([_loss(p, x, y)] * 2), 1.0)(params, x, y)


def test_gradients_whose_squared_norm_overflows_are_clipped_not_dropped():
  """Float32 gradients of norm ~1e22 (their squares pass the largest float): every form
  (Gram, ‖x‖²‖g‖², explicit, in the pass) still measures and clips them."""
  params = {
    "gram": _normal(1, (8, 6), F32),  # 2 positions: Gram form
    "flat": _normal(2, (8, 6), F32),  # one position
    "long": _normal(3, (2, 3), F32),  # 30 positions of 2 features: explicit
    "bias": _normal(4, (6,), F32),  # in the pass
  }
  x = _normal(5, (6, 2, 8), F32, 1e11)
  long = _normal(6, (6, 30, 2), F32, 1e11)

  def loss(p, x, long):
    h = jnp.sum(x @ p["gram"]) + jnp.sum(x[0] @ p["flat"] + p["bias"])
    return 1e10 * (h + jnp.sum(long @ p["long"]))

  assert plan(loss, params, x, long) == {
    "['bias']": "pass",
    "['flat']": ("ghost",),
    "['gram']": ("ghost",),
    "['long']": ("explicit",),
  }
  total, norms = clipjax.clipped_grad(loss, 1.0)(params, x, long)
  assert np.all(np.isfinite(norms)) and np.all(np.asarray(norms) > 1e21)
  check(loss, params, x, long, clip_norms=(1.0, 1e30))
