"""Every rule of clipped_grad against the per-example path, on models that exercise its
variants: dot_general, conv_general_dilated, embedding gathers, elementwise scales, and
several uses of one leaf (weight tying, a layer applied twice, slices of a stacked leaf).

Float64 (exact to 1e-10 of each leaf's largest entry) unless a test says otherwise.
``plan`` asserts the form each use took (ghost or explicit), so that both forms of every
rule run; several variants share one model so that one compilation covers them.
"""

import jax
import jax.numpy as jnp
import numpy as np
from _ghost_oracle import check, plan
from jax import lax

F32, F64 = jnp.float32, jnp.float64


def _normal(seed, shape, dtype=F64, scale=1.0):
  """Test data from NumPy, so building it compiles nothing."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def _ints(seed, shape, low, high):
  return jnp.asarray(np.random.default_rng(seed).integers(low, high, shape), jnp.int32)


def _fill(shapes, dtype):
  """Random values for a pytree of shapes (initialising through JAX would compile)."""
  leaves, treedef = jax.tree.flatten(shapes)
  return jax.tree.unflatten(
    treedef,
    [_normal(i, s.shape, dtype, 0.5) + (len(s.shape) == 1) for i, s in enumerate(leaves)],
  )


# ---------------------------------------------------------------------------- dot_general


def test_dot_general_in_every_layout():
  """Ghost (Gram, or ‖x‖²‖g‖² without positions) or explicit, as the shapes favour;
  the parameter on either side; several contracted axes; dot batch axes (heads)."""
  params = {
    "short": _normal(1, (6, 5)),  # 3 positions x 6 features: Gram
    "long": _normal(2, (2, 3)),  # 40 positions x 2 features: explicit
    "flat": _normal(3, (6, 4)),  # no positions
    "two_axes": _normal(4, (3, 2, 4)),  # contracts two axes of the data
    "lhs": _normal(5, (4, 6)),  # the parameter as the left operand
    "heads": _normal(6, (2, 3, 6)),  # one matrix per head: dot batch axis
  }
  batch = (_normal(7, (5, 3, 6)), _normal(8, (5, 40, 2)), _normal(9, (5, 6)))

  def loss(p, short, long, flat):
    h = jnp.tanh(short @ p["short"])  # (3, 5)
    h2 = jnp.tanh(jnp.einsum("td,dk->tk", long, p["long"]))  # (40, 3)
    h3 = jnp.einsum("tab,abk->tk", h[:, :3].reshape(3, 3, 1) * h2[:3, None, :2], p["two_axes"])
    h4 = jnp.einsum("kd,td->tk", p["lhs"], short)  # (3, 4)
    heads = jnp.einsum("htd,hdk->htk", h4[None, :2, :3] * jnp.ones((2, 1, 1)), p["heads"])
    return jnp.sum(jnp.sin(flat @ p["flat"])) + jnp.sum(h3**2) + jnp.sum(jnp.cos(heads))

  assert plan(loss, params, *batch) == {
    "['flat']": ("ghost",),
    "['heads']": ("ghost",),
    "['lhs']": ("ghost",),
    "['long']": ("explicit",),
    "['short']": ("ghost",),
    "['two_axes']": ("ghost",),
  }
  check(loss, params, *batch)


# ---------------------------------------------------------------------------- convolutions


def _conv(x, k, dims, **kw):
  return lax.conv_general_dilated(x[None], k, dimension_numbers=dims, **kw)[0]


_CONV_SPECS = {
  # name: (example input shape, kernel shape, dimension numbers, keywords)
  "1d_strided": (
    (9, 3),
    (3, 3, 4),
    ("NWC", "WIO", "NWC"),
    dict(window_strides=(2,), padding="SAME"),
  ),
  "2d_dilated_nchw": (
    (3, 6, 5),
    (4, 3, 3, 2),
    ("NCHW", "OIHW", "NCHW"),
    dict(
      window_strides=(2, 1),
      padding=((1, 2), (0, 1)),
      lhs_dilation=(1, 2),
      rhs_dilation=(2, 1),
    ),
  ),
  "3d": (
    (4, 4, 4, 2),
    (2, 2, 2, 2, 3),
    ("NDHWC", "DHWIO", "NDHWC"),
    dict(window_strides=(1, 1, 1), padding="VALID"),
  ),
  "grouped": (
    (6, 6, 4),
    (3, 3, 2, 6),
    ("NHWC", "HWIO", "NHWC"),
    dict(window_strides=(1, 1), padding="SAME", feature_group_count=2),
  ),
  "depthwise": (
    (6, 6, 3),
    (3, 3, 1, 6),
    ("NHWC", "HWIO", "NHWC"),
    dict(window_strides=(2, 2), padding="SAME", feature_group_count=3),
  ),
  "few_positions": (  # windows that tile the input (patches), a row left over
    (7, 6, 8),
    (3, 3, 8, 8),
    ("NHWC", "HWIO", "NHWC"),
    dict(window_strides=(3, 3), padding="VALID"),
  ),
}


def test_convolutions_of_every_kind():
  """1-D, 2-D, 3-D; strides, explicit and SAME padding, lhs and rhs dilation; NCHW;
  grouped and depthwise (channel multiplier 2); explicit or Gram as the shapes favour."""
  params = {n: _normal(i, s[1], scale=0.5) for i, (n, s) in enumerate(_CONV_SPECS.items())}
  batch = {n: _normal(10 + i, (6, *s[0])) for i, (n, s) in enumerate(_CONV_SPECS.items())}

  def loss(p, x):
    return sum(
      jnp.sum(jnp.sin(_conv(x[n], p[n], dims, **kw)) ** 2)
      for n, (_, _, dims, kw) in _CONV_SPECS.items()
    )

  modes = plan(loss, params, batch)
  assert modes["['few_positions']"] == ("ghost",) and ("explicit",) in modes.values()
  check(loss, params, batch)


_TRANSPOSED_SPECS = {
  # name: (example input shape, kernel shape, dimension numbers, conv_transpose keywords)
  "1d_s2_same": ((5, 3), (3, 3, 4), ("NWC", "WIO", "NWC"), dict(strides=(2,), padding="SAME")),
  "1d_s3_valid": ((4, 2), (4, 2, 3), ("NWC", "WIO", "NWC"), dict(strides=(3,), padding="VALID")),
  "2d_s2_explicit": (
    (4, 3, 2),
    (3, 3, 2, 3),
    ("NHWC", "HWIO", "NHWC"),
    dict(strides=(2, 2), padding=((1, 0), (2, 1))),
  ),
  "2d_nchw_rhs_dilated": (
    (2, 4, 3),
    (3, 2, 2, 3),
    ("NCHW", "OIHW", "NCHW"),
    dict(strides=(2, 3), padding="SAME", rhs_dilation=(2, 1)),
  ),
  "3d": (
    (2, 3, 2, 2),
    (2, 2, 2, 2, 2),
    ("NDHWC", "DHWIO", "NDHWC"),
    dict(strides=(2, 1, 2), padding="VALID"),
  ),
  "wide": ((4, 16), (3, 16, 16), ("NWC", "WIO", "NWC"), dict(strides=(2,), padding="SAME")),
}


def test_transposed_convolutions():
  """``lax.conv_transpose`` with every stride and padding kind (SAME, VALID, explicit),
  1-D to 3-D, NCHW, kernel dilation; and the primitive itself with an input dilation,
  padding that crops (negative) and feature groups: factors at the input's positions,
  explicit or Gram as the shapes favour."""
  specs = _TRANSPOSED_SPECS
  params = {n: _normal(20 + i, s[1], scale=0.5) for i, (n, s) in enumerate(specs.items())}
  batch = {n: _normal(30 + i, (5, *s[0])) for i, (n, s) in enumerate(specs.items())}
  params["cropped_grouped"] = _normal(40, (3, 2, 6))
  batch["cropped_grouped"] = _normal(41, (5, 6, 4))

  def loss(p, x):
    out = sum(
      jnp.sum(jnp.sin(lax.conv_transpose(x[n][None], p[n], dimension_numbers=dims, **kw)) ** 2)
      for n, (_, _, dims, kw) in specs.items()
    )
    y = lax.conv_general_dilated(
      x["cropped_grouped"][None],
      p["cropped_grouped"],
      (1,),
      ((-1, 2),),
      lhs_dilation=(3,),
      rhs_dilation=(2,),
      dimension_numbers=("NWC", "WIO", "NWC"),
      feature_group_count=2,
    )
    return out + jnp.sum(jnp.sin(y) ** 2)

  modes = plan(loss, params, batch)
  assert modes["['wide']"] == ("ghost",) and ("explicit",) in modes.values()
  check(loss, params, batch)


# ---------------------------------------------------------------------------- embeddings


def test_embedding_lookups():
  """``table[ids]`` with repeated and negative ids, 2-D id arrays, ``jnp.take`` dropping
  or clipping out-of-range ids; a tiny vocabulary read at many positions is explicit."""
  params = {
    "table": _normal(1, (60, 4)),
    "take_fill": _normal(2, (40, 3)),
    "take_clip": _normal(3, (40, 3)),
    "tiny": _normal(4, (3, 2)),
  }
  ids = _ints(5, (8, 6), -4, 4)  # 6 draws from 8 ids: repeats within most examples
  grid = _ints(6, (8, 2, 2), 0, 4)
  wild = _ints(7, (8, 5), -45, 45)  # often beyond either end of a 40-row table
  many = _ints(8, (8, 50), 0, 3)

  def loss(p, ids, grid, wild, many):
    a = jnp.tanh(p["table"][ids]) ** 3  # (6, 4)
    b = jnp.sin(p["table"][grid])  # (2, 2, 4)
    c = jnp.take(p["take_fill"], wild, axis=0, mode="fill", fill_value=0.0)
    d = jnp.take(p["take_clip"], wild, axis=0, mode="clip")
    e = jnp.cos(p["tiny"][many])
    return jnp.sum(a) + jnp.sum(b * a[:2]) + jnp.sum(jnp.tanh(c + d)) + jnp.sum(e**2)

  assert plan(loss, params, ids, grid, wild, many) == {
    "['take_clip']": ("ghost",),
    "['take_fill']": ("ghost",),
    "['table']": ("ghost", "ghost"),
    "['tiny']": ("explicit",),
  }
  check(loss, params, ids, grid, wild, many)


# ---------------------------------------------------------------------------- elementwise


def test_elementwise_scales_and_shifts():
  """A layer norm's scale and shift, a per-channel gain and a bias: their per-example
  gradients (``Σ x·g`` over the broadcast axes) are formed in the batched pass. (The flax
  LayerNorm, GroupNorm and RMSNorm run in test_ghost_models.)"""
  params = {"scale": _normal(1, (4,)), "shift": _normal(2, (4,)), "gain": _normal(3, (3, 1))}
  x = _normal(4, (6, 3, 5, 4))

  def loss(p, x):
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    h = centred / jnp.sqrt(jnp.mean(centred**2, axis=-1, keepdims=True) + 1e-5)
    return jnp.sum(jnp.tanh((h * p["scale"] + p["shift"]) * p["gain"][:, None]))

  assert set(plan(loss, params, x).values()) == {"pass"}
  check(loss, params, x)


# ---------------------------------------------------------------------------- several uses


def test_tied_and_repeated_uses_include_the_cross_terms():
  """The norm of the sum over a leaf's uses: an embedding tied to the output projection,
  a layer applied twice, an encoder tied to its transposed decoder, two lookups."""
  params = {
    "emb": _normal(1, (50, 16)),
    "twice": _normal(2, (16, 16), scale=0.3),
    "tied": _normal(3, (16, 12), scale=0.3),
  }
  ids = _ints(4, (6, 3), 0, 4)  # repeats within most examples

  def loss(p, ids):
    h = jnp.tanh(p["emb"][ids])  # (3, 16)
    h = jnp.tanh(jnp.tanh(h @ p["twice"]) @ p["twice"])
    code = jnp.tanh(h @ p["tied"])
    h = h + code @ p["tied"].T + p["emb"][ids[::-1]]
    return jnp.sum(jax.nn.log_softmax(h @ p["emb"].T)[:, 0])

  assert plan(loss, params, ids) == {
    "['emb']": ("ghost", "ghost", "ghost"),
    "['tied']": ("ghost", "ghost"),
    "['twice']": ("ghost", "ghost"),
  }
  check(loss, params, ids)


def test_slices_of_a_stacked_leaf():
  """Disjoint slices pair with no cross term; overlapping ones cannot pair, so one goes
  explicit; a ghost use pairs with an explicit one of the same leaf through its sum."""
  params = {"stack": _normal(1, (3, 4, 4), scale=0.5), "mixed": _normal(2, (2, 3))}
  batch = (_normal(3, (6, 4)), _normal(4, (6, 2)), _normal(5, (6, 40, 2)))

  def loss(p, x, flat, long):
    h = jnp.tanh(jnp.tanh(x @ p["stack"][0]) @ p["stack"][2])
    h = h + x @ p["stack"][:2].reshape(8, 4)[2:6]  # overlaps stack[0]
    return (
      jnp.sum(h**2) + jnp.sum(jnp.sin(flat @ p["mixed"])) + jnp.sum(jnp.tanh(long @ p["mixed"]))
    )

  assert plan(loss, params, *batch) == {
    "['mixed']": ("ghost", "explicit"),
    "['stack']": ("explicit", "ghost", "ghost"),
  }
  check(loss, params, *batch)


def test_unrecognised_uses_are_exact():
  """A penalty on the parameters alone and an elementwise power are taken in the
  batched pass; a parameter transformed before use (``sin(w)``) is pulled back from its
  use's explicit gradient: all exactly."""
  params = {"w": _normal(1, (4, 3)), "v": _normal(2, (3,)), "dense": _normal(3, (4, 3))}
  x = _normal(4, (6, 4))

  def loss(p, x):
    h = x @ jnp.sin(p["w"]) + jnp.abs(x[:3]) ** p["v"]
    return jnp.sum(jnp.tanh(h + x @ p["dense"])) + 0.1 * jnp.sum(p["dense"] ** 2)

  assert plan(loss, params, x) == {"['dense']": "pass", "['v']": "pass", "['w']": ("explicit",)}
  check(loss, params, x)


def test_split_of_a_fused_kernel():
  """``jnp.split`` of a fused QKV kernel: every part is a view (a slice), the parts are
  disjoint, so all pair without cross terms and stay ghost; a part used twice pairs
  with itself ("same")."""
  params = {"qkv": _normal(1, (6, 9), scale=0.5)}
  x = _normal(2, (5, 2, 6))  # 2 positions: the Gram form is cheaper

  def loss(p, x):
    q, k, v = jnp.split(p["qkv"], 3, axis=1)
    scores = jax.nn.softmax((x @ q) @ (x @ k).T, axis=-1)
    return jnp.sum(jnp.tanh(scores @ (x @ v))) + jnp.sum(jnp.sin(jnp.tanh(x) @ q))

  assert plan(loss, params, x) == {"['qkv']": ("ghost",) * 4}
  check(loss, params, x)
