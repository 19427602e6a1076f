"""Parameters transformed before use, against the float64 per-example oracle.

A rule takes the transformed operand (a fused kernel, ``w * g``, ``v / ‖v‖``, a
flipped kernel) as a leaf of its own; its per-example gradient is pulled back to the
parameter leaves through the transformation's VJP. A concatenation of distinct leaves
used nowhere else keeps the Gram form (the pull-back only rearranges); anything else is
pulled back from the explicit per-example gradient. ``plan`` asserts which form ran.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _ghost_oracle import check, plan
from jax import lax

from clipjax.privacy import ghost

F32, F64, BF16 = jnp.float32, jnp.float64, jnp.bfloat16


def _normal(seed, shape, dtype=F64, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def _fill(shapes, dtype):
  """Random values for a pytree of shapes (initialising through JAX would compile)."""
  leaves, treedef = jax.tree.flatten(shapes)
  return jax.tree.unflatten(
    treedef,
    [_normal(i, s.shape, dtype, 0.4) + (len(s.shape) == 1) for i, s in enumerate(leaves)],
  )


class _LSTM(nn.Module):
  """A recurrent classifier over a sequence: the cell, then a dense head."""

  cell: type
  hidden: int = 16
  dtype: object = F64

  @nn.compact
  def __call__(self, x):
    cell = self.cell(self.hidden, param_dtype=F64 if self.dtype == F64 else F32, dtype=self.dtype)
    h = nn.RNN(cell)(x[None])[0]
    return jnp.sum(jnp.tanh(nn.Dense(3, param_dtype=F64)(h[-1])) ** 2)


def _lstm(cell, dtype=F64):
  model = _LSTM(cell, dtype=dtype)
  x = _normal(1, (5, 6, 4))
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), x[0])["params"], F64)
  return (lambda p, x: model.apply({"params": p}, x)), params, x


def test_fused_lstm_kernels_keep_the_gram_form():
  """flax ``OptimizedLSTMCell`` concatenates its four gate kernels before one matrix
  product per step: the hidden kernels (shared by the steps: positions) take the Gram
  form of the fused kernel; the input kernels (4 features) take whichever form the
  backend's cost weights favour, each fused kernel one use."""
  loss, params, x = _lstm(nn.OptimizedLSTMCell)
  report = ghost.plan(loss, params, x)
  cell = "['OptimizedLSTMCell_0']"
  for gate in "ifgo":
    hidden = report[f"{cell}['h{gate}']['kernel']"]
    assert hidden.form == "ghost" and hidden.uses[0].through == ("concatenate",)
    inputs = report[f"{cell}['i{gate}']['kernel']"]
    assert inputs.form in ("ghost", "explicit") and inputs.uses[0].through == ("concatenate",)
  check(loss, params, x)


def test_fused_kernels_in_groups_and_with_other_uses():
  """A fused kernel whose pieces lie in different clip groups, or one of whose pieces is
  also used directly, or that holds a constant piece, is pulled back explicitly; a
  fused kernel of two leaves of one group and nothing else keeps the Gram form."""
  params = {
    "a": {"q": _normal(1, (6, 5)), "k": _normal(2, (6, 3))},  # one group: ghost
    "b": {"u": _normal(3, (6, 4)), "v": _normal(4, (6, 4))},  # v also used alone
    "c": _normal(5, (6, 2)),  # next to a constant piece
  }
  x = _normal(6, (4, 3, 6))

  def loss(p, x):
    h = x @ jnp.concatenate([p["a"]["q"], p["a"]["k"]], axis=1)
    u = x @ jnp.concatenate([p["b"]["u"], p["b"]["v"]], axis=1) + 0.5 * jnp.tile(x @ p["b"]["v"], 2)
    c = x @ jnp.concatenate([p["c"], jnp.ones((6, 1))], axis=1)
    return jnp.sum(jnp.tanh(h) ** 2) + jnp.sum(jnp.sin(u)) + jnp.sum(jnp.cos(c))

  assert plan(loss, params, x) == {
    "['a']['k']": ("ghost",),
    "['a']['q']": ("ghost",),
    "['b']['u']": ("explicit",),
    "['b']['v']": ("ghost", "explicit"),
    "['c']": ("explicit",),
  }
  check(loss, params, x)
  group_wise = {"a": 1.0, "b": 0.5, "c": 2.0}
  check(loss, params, x, clip_norms=(group_wise,))
  across = {"a": {"q": 1.0, "k": 0.3}, "b": 0.5, "c": 2.0}
  assert ghost.plan(loss, params, x)["['a']['q']"].form == "ghost"
  check(loss, params, x, clip_norms=(across,))


def test_weight_normalisation_and_products_with_parameters():
  """flax ``WeightNorm`` (``g · v / ‖v‖``, the norm's own gradient included), a weight
  scaled by another parameter (``w * g``), weight standardisation, a flipped transposed
  convolution kernel: exact, each leaf's gradient pulled back through the transform."""
  norm = nn.WeightNorm(nn.Dense(4, param_dtype=F64))
  x = _normal(1, (5, 3, 6))
  params = {
    "norm": _fill(jax.eval_shape(norm.init, jax.random.key(0), x[0])["params"], F64),
    "w": _normal(2, (4, 4)),
    "g": _normal(3, (4,)),
    "std": _normal(4, (4, 4)),
    "flip": _normal(5, (3, 2, 4)),
  }

  def loss(p, x):
    h = jnp.tanh(norm.apply({"params": p["norm"]}, x))
    h = jnp.tanh(h @ (p["w"] * p["g"]))
    s = p["std"]
    h = jnp.tanh(h @ ((s - s.mean(0)) / jnp.sqrt(s.var(0) + 1e-3)))
    y = lax.conv_transpose(
      h[None],
      p["flip"],
      (2,),
      "SAME",
      dimension_numbers=("NWC", "WIO", "NWC"),
      transpose_kernel=True,
    )
    return jnp.sum(jnp.sin(y))

  report = ghost.plan(loss, params, x)
  forms = {
    path: (leaf.form, leaf.uses[0].through[:2] if leaf.uses else ())
    for path, leaf in report.items()
  }
  assert forms == {
    "['flip']": ("ghost", ("rev", "transpose")),  # a flip only rearranges
    "['g']": ("explicit", ("mul",)),
    "['norm']['layer_instance']['bias']": ("pass", ()),
    "['norm']['layer_instance']['kernel']": ("explicit", ("reduce_sum", "broadcast_in_dim")),
    "['norm']['layer_instance/kernel/scale']": ("explicit", ("reduce_sum", "broadcast_in_dim")),
    "['std']": ("explicit", ("square", "select_n")),
    "['w']": ("explicit", ("mul",)),
  }
  check(loss, params, x)


def test_transforms_inside_scans_and_jit():
  """Weight-normalised layers stacked on a leading axis and run by ``scan`` (each slice
  transformed in its iteration), a fused kernel shared by a scan's iterations, and a
  transform inside a ``jit``-compiled function."""
  params = {
    "v": _normal(1, (3, 8, 8)),
    "g": _normal(2, (3, 8)),
    "gates": [_normal(3 + i, (8, 8), scale=0.5) for i in range(2)],
    "inner": _normal(6, (8, 8)),
  }
  x = _normal(7, (4, 1, 8))

  @jax.jit
  def normalised(w):
    return w / jnp.linalg.norm(w, axis=0)

  def loss(p, x):
    def layer(h, vg):
      v, g = vg
      return jnp.tanh(h @ (g * v / jnp.linalg.norm(v, axis=0))), None

    h, _ = lax.scan(layer, x, (p["v"], p["g"]))
    fused = jnp.concatenate(p["gates"], axis=1)

    def step(h, _):
      a, b = jnp.split(jnp.tanh(h @ fused), 2, axis=-1)
      return a * b, None

    h, _ = lax.scan(step, h, length=3)
    return jnp.sum(jnp.sin(h @ normalised(p["inner"])))

  report = ghost.plan(loss, params, x)
  assert report["['gates'][0]"].form == "ghost"
  assert {report[k].form for k in ("['v']", "['g']", "['inner']")} == {"explicit"}
  check(loss, params, x)


def test_mixed_precision_modules():
  """``param_dtype=float32, dtype=bfloat16``: the cast is a view (Gram form of the cast
  kernel); an LSTM whose fused kernel is cast is pulled back explicitly."""
  dense = nn.Dense(16, param_dtype=F32, dtype=BF16)
  x = _normal(1, (6, 3, 16), F32)
  params = _fill(jax.eval_shape(dense.init, jax.random.key(0), x[0])["params"], F32)
  loss = lambda p, x: jnp.sum(jnp.tanh(dense.apply({"params": p}, x)).astype(F32) ** 2)
  assert plan(loss, params, x)["['kernel']"] == ("ghost",)
  check(loss, params, x, clip_norms=(0.5,), rtol=3e-2)

  loss, params, x = _lstm(nn.OptimizedLSTMCell, dtype=BF16)
  params = jax.tree.map(lambda p: p.astype(F32), params)
  x = x.astype(F32)
  report = ghost.plan(loss, params, x)
  assert report["['OptimizedLSTMCell_0']['hi']['kernel']"].form == "explicit"
  check(loss, params, x, clip_norms=(0.5,), rtol=3e-2)
