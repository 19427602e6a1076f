"""flax NNX and equinox models as clipped_grad's params, dropout included; and the errors
that name a non-differentiable leaf and the fix."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from privacy_oracle import clip_weights

import clipjax

CLIP = 0.5


class _NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x, key):
    # A per-example key: the module's own RNG stream cannot advance inside a traced loss.
    return self.out(self.dropout(jax.nn.relu(self.hidden(x)), rngs=key))


def _batch():
  x = jax.random.normal(jax.random.key(0), (6, 5))
  y = jnp.array([0, 1, 2, 0, 1, 2])
  keys = jax.random.split(jax.random.key(1), 6)
  return x, y, keys


def _oracle_sum(loss, params, x, y, keys):
  """Per-example gradients from vmap(grad), clipped and summed in float64 NumPy."""
  per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0))(params, x, y, keys)
  leaves = [np.asarray(g, np.float64).reshape(len(x), -1) for g in jax.tree.leaves(per_example)]
  norms = np.sqrt(sum((g**2).sum(1) for g in leaves))
  w = clip_weights(norms, CLIP, "clip")
  return [(w[:, None] * g).sum(0) for g in leaves], norms


def _check_against_oracle(loss, params, x, y, keys):
  total, norms = clipjax.clipped_grad(loss, CLIP)(params, x, y, keys)
  want_sums, want_norms = _oracle_sum(loss, params, x, y, keys)
  np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(total), want_sums):
    np.testing.assert_allclose(np.ravel(got), want, rtol=1e-4, atol=1e-6)
  assert jax.tree.structure(total) == jax.tree.structure(params)


def test_nnx_params_with_dropout():
  graphdef, params, rest = nnx.split(_NNXNet(nnx.Rngs(0)), nnx.Param, ...)

  def loss(params, x, y, key):
    model = nnx.merge(graphdef, params, rest)
    return optax.softmax_cross_entropy_with_integer_labels(model(x, key), y)

  x, y, keys = _batch()
  _check_against_oracle(loss, params, x, y, keys)
  # Dropout acts: other keys give other norms.
  _, other = clipjax.clipped_grad(loss, CLIP)(params, x, y, jax.random.split(jax.random.key(9), 6))
  _, norms = clipjax.clipped_grad(loss, CLIP)(params, x, y, keys)
  assert not np.allclose(norms, other)


def test_nnx_whole_state_names_the_rng_leaf_and_the_fix():
  graphdef, state = nnx.split(_NNXNet(nnx.Rngs(0)))
  loss = lambda s, x, y, key: optax.softmax_cross_entropy_with_integer_labels(
    nnx.merge(graphdef, s)(x, key), y
  )
  with pytest.raises(ValueError, match=r"params\['dropout'\]\['rngs'\].*nnx\.split\(model, nnx"):
    clipjax.clipped_grad(loss, CLIP)(state, *_batch())


class _EqxNet(eqx.Module):
  mlp: eqx.nn.MLP
  dropout: eqx.nn.Dropout

  def __init__(self, key):
    self.mlp = eqx.nn.MLP(5, 3, 8, 1, key=key)
    self.dropout = eqx.nn.Dropout(0.5)

  def __call__(self, x, key):
    return self.mlp(self.dropout(x, key=key))


def test_equinox_partition_with_dropout():
  params, static = eqx.partition(_EqxNet(jax.random.key(0)), eqx.is_inexact_array)

  def loss(params, x, y, key):
    model = eqx.combine(params, static)
    return optax.softmax_cross_entropy_with_integer_labels(model(x, key), y)

  _check_against_oracle(loss, params, *_batch())


def test_equinox_whole_module_names_the_function_leaf_and_the_fix():
  model = _EqxNet(jax.random.key(0))
  loss = lambda m, x, y, key: optax.softmax_cross_entropy_with_integer_labels(m(x, key), y)
  with pytest.raises(ValueError, match=r"params\.mlp\.activation .*eqx\.partition\(model"):
    clipjax.clipped_grad(loss, CLIP)(model, *_batch())


@pytest.mark.parametrize(
  ("leaf", "kind"),
  [
    (jnp.zeros(4, jnp.int32), "int32"),
    (jax.random.split(jax.random.key(0), 4), "PRNG key"),
    (3, "int"),
  ],
)
def test_per_example_clip_names_the_leaf(leaf, kind):
  grads = {"w": jnp.ones((4, 2)), "step": leaf}
  with pytest.raises(ValueError, match=rf"grads\['step'\] is .*{kind}"):
    clipjax.per_example_clip(grads, 1.0)


def test_box_error_says_the_range_and_the_bounds():
  image = jnp.arange(256.0).reshape(16, 16)
  with pytest.raises(ValueError, match=r"span \[0, 255\], the box is \[0, 1\].*upper=255"):
    clipjax.rescale(image, jnp.ones_like(image), 3.0)
  assert clipjax.rescale(image, jnp.ones_like(image), 3.0, lower=0, upper=255) > 0
