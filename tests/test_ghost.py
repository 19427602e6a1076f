"""Tests for clipjax.ghost: clipped_grad against the per-example path (vmap(grad), clip, sum)."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax import ghost

F32 = jnp.float32
F64 = jnp.float64


@jax.jit(static_argnums=(0,), static_argnames=("has_aux",))
def _reference(loss_fn, clip_norm, params, *batch, has_aux=False):
  """Per-example gradients, clipped in the global L2 norm, non-finite ones zeroed, summed."""
  grad = jax.grad(loss_fn, has_aux=has_aux)
  grads = jax.vmap(grad, in_axes=(None,) + (0,) * len(batch))(params, *batch)
  if has_aux:
    grads, aux = grads
  leaves = jax.tree.leaves(grads)
  norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves))
  ok = jnp.isfinite(norms)
  scale = jnp.where(ok, jnp.minimum(1.0, clip_norm / norms), 0.0)

  def total(g):
    g = jnp.where(ok.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0)
    return jnp.tensordot(scale.astype(g.dtype), g, axes=1)

  out = (jax.tree.map(total, grads), norms)
  return (out, aux) if has_aux else out


def _assert_close(actual, expected, rtol):
  """Leaf-wise agreement relative to each leaf's largest entry."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a), np.asarray(e)
    assert a.shape == e.shape and a.dtype == e.dtype
    scale = max(np.max(np.abs(e)), np.finfo(e.dtype).tiny)
    np.testing.assert_array_less(np.max(np.abs(a - e)) / scale, rtol)


def _check(loss_fn, clip_norm, params, *batch, rtol=1e-4):
  clipped, norms = clipjax.clipped_grad(loss_fn, clip_norm)(params, *batch)
  ref_clipped, ref_norms = _reference(loss_fn, clip_norm, params, *batch)
  _assert_close(norms, ref_norms, rtol)
  _assert_close(clipped, ref_clipped, rtol)
  return clipped, norms


def _closed(loss_fn, params, *batch):
  """The traced per-example loss and the numbers of parameter and data leaves."""
  leaves, treedef = jax.tree.flatten(params)
  batch_leaves, batch_treedef = jax.tree.flatten(batch)
  closed, _ = ghost._trace(loss_fn, leaves, treedef, batch_leaves, batch_treedef)
  return closed, len(leaves), len(batch_leaves)


def _split(loss_fn, params, *batch):
  """(leaf indices with a recognised fast path, fallback leaf indices)."""
  uses, fallback = ghost._find_uses(*_closed(loss_fn, params, *batch))
  return sorted({u.leaf for u in uses}), fallback


def _leaf_index(params, name):
  return [path[0].key for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]].index(name)


# ---------------------------------------------------------------------------- models


def _normal(seed, shape, dtype, scale=1.0):
  """Test data from NumPy, so building it compiles nothing."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def _ints(seed, shape, high):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


def _mlp_params(seed, sizes, dtype):
  return [
    (_normal(seed + 2 * i, (m, n), dtype, m**-0.5), _normal(seed + 2 * i + 1, (n,), dtype, 0.1))
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))
  ]


def _fill(shapes):
  """Random values for a pytree of shapes (initialising through JAX would compile)."""
  return jax.tree.map(lambda s: _normal(len(s.shape), s.shape, s.dtype, 0.5), shapes)


def _mlp_loss(params, x, y):
  h = x
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return -jax.nn.log_softmax(h @ w + b)[y]


_SIZES = (6, 16, 12, 4)


def _mlp(dtype, batch=16):
  params = _mlp_params(0, _SIZES, dtype)
  return params, _normal(100, (batch, _SIZES[0]), dtype), _ints(101, (batch,), _SIZES[-1])


def _seq_loss(params, x, y):
  """A token-wise dense layer over (T, d) by einsum, mean-pooled, then a linear head."""
  h = jnp.tanh(jnp.einsum("td,dh->th", x, params["w"]) + params["b"])
  return jnp.sum((jnp.mean(h, axis=0) @ params["head"] - y) ** 2)


def _seq(steps, d, h, dtype, batch=8):
  params = {
    "w": _normal(1, (d, h), dtype, d**-0.5),
    "b": _normal(2, (h,), dtype),
    "head": _normal(3, (h, 2), dtype),
  }
  return params, _normal(4, (batch, steps, d), dtype), _normal(5, (batch, 2), dtype)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("clip_norm", [1e-6, 0.3, 1.0, 1e6])
def test_mlp_float32_matches_per_example(clip_norm):
  params, x, y = _mlp(F32)
  assert _split(_mlp_loss, params, x, y) == (list(range(6)), [])
  clipped, norms = _check(_mlp_loss, clip_norm, params, x, y)
  assert norms.dtype == F32 and clipped[0][0].dtype == F32


def test_mlp_float64_tight():
  params, x, y = _mlp(F64)
  _check(_mlp_loss, 0.5, params, x, y, rtol=1e-12)


def test_reported_norms_are_unclipped():
  params, x, y = _mlp(F32)
  _, norms = clipjax.clipped_grad(_mlp_loss, 1e-3)(params, x, y)
  assert np.all(np.asarray(norms) > 1e-3)


@pytest.mark.parametrize(
  "steps, d, h, path",
  [(3, 16, 16, "gram"), (32, 3, 4, None)],
  ids=["gram", "explicit"],
)
def test_sequence_einsum(steps, d, h, path):
  params, x, y = _seq(steps, d, h, F64)
  uses, _ = ghost._find_uses(*_closed(_seq_loss, params, x, y))
  (use_w,) = [u for u in uses if u.leaf == _leaf_index(params, "w")]
  assert ghost._ghost_plan(use_w, x.shape[1:]) == path
  for c in (1e-6, 1.0, 1e6):
    _check(_seq_loss, c, params, x, y, rtol=1e-11)
  _check(_seq_loss, 1.0, *jax.tree.map(lambda a: a.astype(F32), (params, x, y)))


def test_per_head_einsum_and_pytree_batch():
  """Products with dot_general batch axes (one weight per head) get explicit gradients."""
  params = {"wq": _normal(20, (2, 4, 3), F64), "wo": _normal(21, (2, 3, 4), F64)}
  batch = {"x": _normal(22, (6, 5, 4), F64), "y": _normal(23, (6, 5, 4), F64)}

  def loss(p, ex):
    q = jnp.einsum("td,hdk->htk", ex["x"], p["wq"])
    attn = jax.nn.softmax(jnp.einsum("htk,hsk->hts", q, q), axis=-1)
    out = jnp.einsum("hts,hsk,hkd->td", attn, q, p["wo"])
    return jnp.sum((out - ex["y"]) ** 2)

  assert _split(loss, params, batch) == ([0, 1], [])
  for c in (1e-6, 1.0, 1e6):
    _check(loss, c, params, batch, rtol=1e-12)


def test_embedding_and_scale_fall_back_exactly():
  params = {
    "emb": _normal(6, (11, 5), F64),
    "scale": 1.0 + _normal(7, (5,), F64),
    "w": _normal(8, (5, 3), F64),
  }
  tokens = _ints(9, (12, 4), 11)
  y = _normal(10, (12, 3), F64)

  def loss(p, t, y):
    h = p["emb"][t] * p["scale"]
    return jnp.sum((jnp.sum(h, axis=0) @ p["w"] - y) ** 2)

  fast, fallback = _split(loss, params, tokens, y)
  assert fallback == [_leaf_index(params, "emb"), _leaf_index(params, "scale")]
  assert fast == [_leaf_index(params, "w")]
  for c in (1e-6, 1.0, 1e6):
    _check(loss, c, params, tokens, y, rtol=1e-12)


def test_flax_dense():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(8)(x))
      x = nn.DenseGeneral((2, 3))(x)
      return nn.Dense(1)(x.reshape(-1))[0]

  x = _normal(11, (10, 5), F32)
  y = _normal(12, (10,), F32)
  model = Net()
  params = _fill(jax.eval_shape(model.init, jax.random.key(6), x[0]))

  def loss(p, x, y):
    return (model.apply(p, x) - y) ** 2

  assert _split(loss, params, x, y)[1] == []
  _check(loss, 0.7, params, x, y)


def test_equinox_linear():
  model = eqx.filter_eval_shape(eqx.nn.MLP, 4, 3, 8, depth=2, key=jax.random.key(7))
  params, static = eqx.partition(model, lambda a: isinstance(a, jax.ShapeDtypeStruct))
  params = _fill(params)
  x = _normal(13, (9, 4), F32)
  y = _normal(14, (9, 3), F32)

  def loss(p, x, y):
    return jnp.sum((eqx.combine(p, static)(x) - y) ** 2)

  assert _split(loss, params, x, y)[1] == []
  _check(loss, 0.5, params, x, y)


def test_jit_wrapped_layers_are_inlined():
  params, x, y = _mlp(F64)
  dense = jax.jit(lambda h, w, b: jnp.dot(h, w) + b)

  def loss(p, x, y):
    h = x
    for w, b in p[:-1]:
      h = jax.nn.relu(dense(h, w, b))
    return -jax.nn.log_softmax(dense(h, *p[-1]))[y]

  assert _split(loss, params, x, y) == (list(range(6)), [])
  _check(loss, 0.5, params, x, y, rtol=1e-12)


def test_products_in_control_flow_fall_back():
  params, x, y = _mlp(F64)
  w_sq = _normal(15, (6, 6), F64, 1 / 3)

  def loss(p, x, y):
    q, rest = p
    h = jax.lax.fori_loop(0, 2, lambda _, h: jnp.tanh(h @ q), x)
    return _mlp_loss(rest, h, y)

  fast, fallback = _split(loss, (w_sq, params), x, y)
  assert fallback == [0] and fast == list(range(1, 7))
  _check(loss, 0.5, (w_sq, params), x, y, rtol=1e-12)


def test_weight_tying():
  params = {"w": _normal(16, (5, 3), F64), "v": _normal(17, (3,), F64)}
  x = _normal(18, (10, 4, 5), F64)

  def loss(p, x):
    code = jnp.tanh(x @ p["w"])  # encoder
    recon = (code * p["v"]) @ p["w"].T  # decoder tied to the encoder, plus a scale
    return jnp.sum((recon - x) ** 2)

  fast, fallback = _split(loss, params, x)
  assert fast == [_leaf_index(params, "w")] and fallback == [_leaf_index(params, "v")]
  for c in (1e-6, 1.0, 1e6):
    _check(loss, c, params, x, rtol=1e-12)


def test_parameter_used_in_product_and_elsewhere_falls_back():
  params, x, y = _mlp(F64)

  def loss(p, x, y):
    return _mlp_loss(p, x, y) + 0.1 * jnp.sum(p[0][0] ** 2)

  assert _split(loss, params, x, y) == ([1, 2, 3, 4, 5], [0])
  _check(loss, 0.5, params, x, y, rtol=1e-12)


def test_has_aux_stacks_per_example_aux():
  params, x, y = _mlp(F32)

  def loss(p, x, y):
    l = _mlp_loss(p, x, y)
    return l, {"loss": l, "twice": 2 * l}

  (clipped, norms), aux = clipjax.clipped_grad(loss, 0.5, has_aux=True)(params, x, y)
  (ref_clipped, ref_norms), ref_aux = _reference(loss, 0.5, params, x, y, has_aux=True)
  _assert_close((clipped, norms), (ref_clipped, ref_norms), 1e-4)
  assert aux["loss"].shape == (x.shape[0],)
  _assert_close(aux, ref_aux, 1e-6)


def test_non_finite_examples_are_zeroed():
  params, x, y = _mlp(F32)
  x = np.array(x)
  x[2] = np.nan
  x[5, 0] = np.inf
  k = np.abs(np.asarray(_normal(19, (x.shape[0], 5), F32)))
  k[7] = -1.0  # sqrt of a negative number: NaN loss and gradient
  x, k = jnp.asarray(x), jnp.asarray(k)
  params = (params, jnp.ones((5,), F32))

  def loss(p, x, y, k):
    return _mlp_loss(p[0], x, y) + jnp.sqrt(jnp.sum(k * p[1]))

  assert _split(loss, params, x, y, k)[1] == [6]
  clipped, norms = clipjax.clipped_grad(loss, 0.5)(params, x, y, k)
  bad = np.zeros(x.shape[0], bool)
  bad[[2, 5, 7]] = True
  norms = np.asarray(norms)
  assert np.all(~np.isfinite(norms[bad])) and np.all(np.isfinite(norms[~bad]))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(clipped))
  good = [np.asarray(a)[~bad] for a in (x, y, k)]
  ref_clipped, ref_norms = _reference(loss, 0.5, params, *good)
  _assert_close(clipped, ref_clipped, 1e-4)
  _assert_close(norms[~bad], ref_norms, 1e-4)


def test_under_jit_with_traced_clip_norm():
  params, x, y = _mlp(F32)

  @jax.jit
  def step(p, c, x, y):
    return clipjax.clipped_grad(_mlp_loss, c)(p, x, y)

  for c in (1e-6, 0.5, 1e6):
    clipped, norms = step(params, jnp.asarray(c, F32), x, y)
    ref_clipped, ref_norms = _reference(_mlp_loss, c, params, x, y)
    _assert_close((clipped, norms), (ref_clipped, ref_norms), 1e-4)


def test_non_scalar_loss_is_rejected():
  params, x, y = _mlp(F32)
  with pytest.raises(ValueError, match="scalar"):
    clipjax.clipped_grad(lambda p, x, y: jnp.stack([_mlp_loss(p, x, y)] * 2), 1.0)(params, x, y)
