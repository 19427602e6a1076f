"""clipped_grad on whole models against the per-example path: parameters inside control
flow (scan over stacked layers or shared, remat, custom derivatives, cond, while), flax
linen (CNN with GroupNorm, a transformer with a tied embedding, nn.scan, nn.remat),
flax NNX, equinox, and bfloat16 parameters and activations.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _ghost_oracle import check, plan
from flax import nnx
from jax import lax

import clipjax

F32, F64, BF16 = jnp.float32, jnp.float64, jnp.bfloat16


def _normal(seed, shape, dtype=F64, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def _ints(seed, shape, high):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


def _fill(shapes, dtype):
  """Random values for a pytree of shapes (initialising through JAX would compile)."""
  leaves, treedef = jax.tree.flatten(shapes)
  return jax.tree.unflatten(
    treedef,
    [_normal(i, s.shape, dtype, 0.4) + (len(s.shape) == 1) for i, s in enumerate(leaves)],
  )


# ---------------------------------------------------------------------------- control flow


@jax.custom_vjp
def _doubled_grad(w, h):
  """``h @ w`` whose custom VJP doubles the parameter's gradient: inlining its body
  instead of honouring the rule would be wrong."""
  return h @ w


_doubled_grad.defvjp(
  lambda w, h: (h @ w, (w, h)), lambda res, g: (2 * jnp.outer(res[1], g), g @ res[0].T)
)


@jax.custom_jvp
def _scaled(w, h):
  return jnp.tanh(h * w)


_scaled.defjvp(lambda p, t: (_scaled(*p), (1 - _scaled(*p) ** 2) * (p[1] * t[0] + p[0] * t[1])))


def test_parameters_inside_control_flow():
  """``scan`` over stacked layers (one slice per iteration), a layer shared by a scan's
  iterations, nested scans, ``checkpoint``: recognised inside. ``custom_vjp``,
  ``custom_jvp`` and ``cond``: their leaves are taken in the batched pass."""
  params = {
    "stacked": _normal(1, (3, 5, 5), scale=0.4),
    "shared": _normal(2, (5, 5), scale=0.4),
    "nested": _normal(3, (2, 5, 5), scale=0.4),
    "remat": _normal(4, (5, 5), scale=0.4),
    "custom_vjp": _normal(5, (5, 5), scale=0.4),
    "custom_jvp": _normal(6, (5,)),
    "cond": _normal(7, (5, 5), scale=0.4),
  }
  x = _normal(9, (6, 2, 5))
  steps = _ints(10, (6,), 3)

  def loss(p, x, steps):
    h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stacked"])
    h, _ = lax.scan(lambda h, _: (jnp.tanh(h @ p["shared"]), None), h, None, length=2)

    def outer(h, w):
      return lax.scan(lambda h, _: (jnp.tanh(h @ w), None), h, None, length=2)[0], None

    h, _ = lax.scan(outer, h, p["nested"])
    h = jax.checkpoint(lambda h: jnp.tanh(h @ p["remat"]))(h)
    h = jnp.tanh(jax.vmap(_doubled_grad, (None, 0))(p["custom_vjp"], h))
    h = _scaled(p["custom_jvp"], h)
    h = lax.cond(steps > 0, lambda h: jnp.tanh(h @ p["cond"]), lambda h: h, h)
    return jnp.sum(h**2)

  modes = plan(loss, params, x, steps)
  assert {k for k, m in modes.items() if m == "pass"} == {
    "['cond']",
    "['custom_jvp']",
    "['custom_vjp']",
  }
  assert modes["['shared']"] != "pass" and modes["['remat']"] != "pass"
  check(loss, params, x, steps)


# ---------------------------------------------------------------------------- flax linen


class _CNN(nn.Module):
  """The benchmark CNN in small: Conv -> GroupNorm -> relu, strides 1, 2, 2, pool, Dense."""

  @nn.compact
  def __call__(self, x):
    for c, s in ((4, 1), (8, 2), (16, 2)):
      x = nn.relu(nn.GroupNorm(2)(nn.Conv(c, (3, 3), strides=s)(x)))
    return nn.Dense(3)(jnp.mean(x, axis=(0, 1)))


def _cnn_loss(model):
  return lambda p, x, y: -jax.nn.log_softmax(model.apply(p, x))[y]


def test_flax_cnn_with_masks():
  """The benchmark CNN in small (its convolutions run ghost and explicit), some
  examples masked out."""
  model = _CNN()
  x, y = _normal(1, (8, 8, 8, 3), F32), _ints(2, (8,), 3)
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), x[0]), F32)
  loss = _cnn_loss(model)
  modes = plan(loss, params, x, y)
  assert modes["['params']['Conv_0']['kernel']"] == ("explicit",)
  assert modes["['params']['Conv_2']['kernel']"] == ("ghost",)
  assert modes["['params']['GroupNorm_0']['scale']"] == "pass"
  check(loss, params, x, y, clip_norms=(0.05, 1e6), mask=jnp.arange(8) % 3 != 1)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[0]))
    x = x + nn.MultiHeadDotProductAttention(2)(nn.LayerNorm()(x), mask=mask)
    return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(32)(nn.RMSNorm()(x))))


class _LM(nn.Module):
  """A causal language model whose output projection is its embedding (``attend``)."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(64, 16)
    x = embed(tokens) + self.param("pos", nn.initializers.normal(0.02), (5, 16))
    return embed.attend(nn.LayerNorm()(_Block()(x)))


def test_flax_transformer_with_tied_embedding():
  model = _LM()
  tokens = _ints(3, (6, 6), 8)  # few distinct ids: repeats within every sequence
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), tokens[0, :-1]), F32)

  def loss(p, tokens):
    logits = model.apply(p, tokens[:-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], 1))

  modes = plan(loss, params, tokens)
  assert modes["['params']['Embed_0']['embedding']"] == ("ghost", "ghost")
  assert all(m != "pass" for p, m in modes.items() if p.endswith("['kernel']"))
  # The key bias shifts every attention logit of a query alike: its gradient is zero.
  check(loss, params, tokens, clip_norms=(0.1, 1e6), floor=1e-4)


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(h.shape[-1])(nn.LayerNorm()(h))), None


class _Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(_Scanned, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = layers()(x, None)
    return jnp.sum(nn.remat(nn.Dense)(2)(h) ** 2)


def test_flax_scan_and_remat():
  model = _Stack()
  x = _normal(4, (6, 4, 8), F32)
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), x[0]), F32)
  modes = plan(model.apply, params, x)
  assert modes["['params']['Scan_Scanned_0']['Dense_0']['kernel']"] != "pass"
  assert modes["['params']['CheckpointDense_0']['kernel']"] != "pass"
  check(model.apply, params, x, clip_norms=(0.1, 1e6))


# ---------------------------------------------------------------------------- other APIs


def test_flax_nnx_split_and_merge():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), strides=2, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)
      self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.mean(jax.nn.relu(self.norm(self.conv(x))), axis=(0, 1)))

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
  state = _fill(state, F32)
  x, y = _normal(5, (6, 6, 6, 3), F32), _ints(6, (6,), 3)

  def loss(state, x, y):
    return -jax.nn.log_softmax(nnx.merge(graphdef, state)(x))[y]

  assert all(m != "pass" for p, m in plan(loss, state, x, y).items() if "kernel" in p)
  check(loss, state, x, y, clip_norms=(0.1, 1e6))


def test_equinox():
  def build(key):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential(
      [
        eqx.nn.Conv2d(3, 4, 3, stride=2, key=k1),
        eqx.nn.Lambda(lambda h: jnp.mean(jax.nn.relu(h), axis=(1, 2))),
        eqx.nn.LayerNorm(4),
        eqx.nn.Linear(4, 3, key=k2),
      ]
    )

  model = eqx.filter_eval_shape(build, jax.random.key(0))
  params, static = eqx.partition(model, lambda a: isinstance(a, jax.ShapeDtypeStruct))
  params = _fill(params, F32)
  x, y = _normal(7, (6, 3, 6, 6), F32), _ints(8, (6,), 3)

  def loss(params, x, y):
    return -jax.nn.log_softmax(eqx.combine(params, static)(x))[y]

  modes = plan(loss, params, x, y)
  assert modes[".layers[0].weight"] != "pass" and modes[".layers[3].weight"] != "pass"
  check(loss, params, x, y, clip_norms=(0.1, 1e6))


def test_bfloat16_parameters_and_activations():
  """Norms accumulate in float32; the clipped sum is in the parameters' dtype. The
  reference's own per-example gradients are rounded to bfloat16."""
  model = _CNN()
  x, y = _normal(1, (8, 8, 8, 3), BF16), _ints(2, (8,), 3)
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), x[0]), BF16)
  loss = _cnn_loss(model)
  total, norms = clipjax.clipped_grad(loss, 0.5)(params, x, y)
  assert norms.dtype == F32
  assert all(leaf.dtype == F32 for leaf in jax.tree.leaves(total))  # summed in float32
  check(loss, params, x, y, clip_norms=(0.5,), rtol=3e-2)
