"""One rule per way a parameter meets per-example data, registered in :data:`RULES`.

A rule recognises an equation ``eqn(..., view(leaf), ..., data)`` of the per-example
program and writes example ``i``'s gradient with respect to the parameter operand in
a *factored* form: with the operand's elements arranged as ``(H, L, R)``,

    G_i[h] = Σ_p A_i[h, p] ⊗ B_i[h, p],

a sum over positions ``p`` of outer products of an ``L``-vector computed from the
recorded data and an ``R``-vector computed from the output cotangent. ``H`` indexes
independent blocks (dot batch dimensions, convolution feature groups). An ``indexed``
rule's ``A`` holds row indices, standing for one-hot ``L``-vectors that are never built.

From this form ``_factors`` computes the per-example squared norm either by the Gram
form ``Σ_h Σ_{p,q} (A_p·A_q)(B_p·B_q)`` or from the explicit ``G_i``, whichever is
cheaper for the shapes, and the cross terms between several uses of one leaf. The
clipped sum needs no rule either: it contracts the factors of the clip-weighted
records and cotangents over examples and positions (a matrix product as large as a
plain step's weight gradient, or a scatter-add of rows).

A rule with ``in_pass = True`` recognises a use whose per-example gradient is small
(an elementwise scale or shift by a broadcast parameter: ``Σ_broadcast axes x·g``); it
is formed where the batched backward pass meets the use, as ``vmap(grad)`` forms it.

Adding a layer type is adding one rule here: ``match`` (is this equation a use, and
which operand is the parameter), ``arrange`` (the operand's elements as ``(H, L, R)``;
it must work on NumPy and JAX arrays alike, so only ``reshape`` and ``transpose``) and
``factors`` (``A`` and ``B`` from one example's data and output cotangent).
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
from jax import lax


class Rule:
  """A way a parameter meets data. Subclasses set ``primitives`` and implement the rest."""

  primitives: tuple = ()
  in_pass = False  # the per-example gradient is formed in the batched backward pass
  indexed = False  # ``A`` holds row indices into ``L`` (one-hot vectors)

  def match(self, eqn, kinds: list[str]) -> int | None:
    """The operand index of the parameter view, or None if this is not a use.

    ``kinds[j]`` is ``"view"``, ``"data"``, ``"params"`` or ``"const"`` for operand ``j``.
    """
    raise NotImplementedError

  def arrange(self, eqn, position: int, operand):
    """The parameter operand (or its element indices) arranged as ``(H, L, R)``."""
    raise NotImplementedError

  def factors(self, eqn, position: int, data: list, g):
    """``(A, B)`` for one example: ``A`` of shape ``(H, P, L)`` (``(H, P)`` indices if
    ``indexed``), ``B`` of shape ``(H, P, R)``. A dense ``A`` must be linear in the data
    and ``B`` in ``g``: a clip weight may go on either."""
    raise NotImplementedError


def _view_and_data(kinds):
  """The position of the one view among two operands whose other one is data."""
  if len(kinds) == 2 and sorted(kinds) == ["data", "view"]:
    return kinds.index("view")
  return None


def _prod(shape) -> int:
  return math.prod(shape)


# ---------------------------------------------------------------------------
# dot_general: dense layers, einsum, attention projections
# ---------------------------------------------------------------------------


class DotGeneral(Rule):
  """``dot_general(x, W)`` in any layout, with or without dot batch dimensions.

  ``G[b, c, f] = Σ_p x[b, p, c] g[b, p, f]``: blocks are the batch dimensions,
  ``L`` the contracted ones, ``R`` the parameter's free ones and positions the data's
  free ones (a sequence axis, heads, ...).
  """

  primitives = ("dot_general",)

  def match(self, eqn, kinds):
    return _view_and_data(kinds)

  @staticmethod
  def _axes(eqn, position):
    (contract_lhs, contract_rhs), (batch_lhs, batch_rhs) = eqn.params["dimension_numbers"]
    contract, batch = (contract_lhs, contract_rhs), (batch_lhs, batch_rhs)
    ranks = [len(v.aval.shape) for v in eqn.invars]
    axes = []
    for side in (position, 1 - position):
      c, b = tuple(contract[side]), tuple(batch[side])
      free = tuple(a for a in range(ranks[side]) if a not in c and a not in b)
      axes.append((b, c, free))
    return axes

  def arrange(self, eqn, position, operand):
    (b, c, free), _ = self._axes(eqn, position)
    shape = operand.shape
    sizes = (_prod([shape[a] for a in axes]) for axes in (b, c, free))
    return operand.transpose(b + c + free).reshape(tuple(sizes))

  def factors(self, eqn, position, data, g):
    (pb, _, pfree), (db, dc, dfree) = self._axes(eqn, position)
    (x,) = data
    nb, npf, ndf = len(pb), len(pfree), len(dfree)
    h = _prod([x.shape[a] for a in db])
    p = _prod([x.shape[a] for a in dfree])
    a = x.transpose(db + dfree + dc).reshape(h, p, -1)
    # Output axes: batch, then the lhs's free axes, then the rhs's.
    if position == 0:
      param_out, data_out = range(nb, nb + npf), range(nb + npf, nb + npf + ndf)
    else:
      data_out, param_out = range(nb, nb + ndf), range(nb + ndf, nb + ndf + npf)
    b = g.transpose((*range(nb), *data_out, *param_out)).reshape(h, p, -1)
    return a, b


# ---------------------------------------------------------------------------
# conv_general_dilated: 1-D, 2-D, 3-D, grouped and depthwise convolutions
# ---------------------------------------------------------------------------


def patches(x, window, strides, padding, lhs_dilation, rhs_dilation, out_spatial):
  """``(N, *out_spatial, prod(window), C)``: the input under every kernel tap.

  ``x`` is channels-last, ``(N, *spatial, C)``. Strided slices of the padded (and
  lhs-dilated) input, one per kernel offset, are what the convolution multiplies by
  that tap; stacked next to the channels they need no transpose.
  """
  zero = jnp.zeros((), x.dtype)
  config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)]
  padded = lax.pad(x, zero, config + [(0, 0, 0)])
  taps = []
  for offsets in itertools.product(*(range(k) for k in window)):
    start = [o * r for o, r in zip(offsets, rhs_dilation)]
    limit = [s + (n - 1) * st + 1 for s, n, st in zip(start, out_spatial, strides)]
    taps.append(
      lax.slice(padded, [0, *start, 0], [x.shape[0], *limit, x.shape[-1]], [1, *strides, 1])
    )
  return jnp.stack(taps, axis=-2)


class Conv(Rule):
  """``conv_general_dilated(x, kernel)``: any rank, strides, padding, dilations, groups.

  ``G[g, (k, i), o] = Σ_p patch[p, k, g, i] · g_out[p, g, o]`` over output positions
  ``p`` (and the example's own batch axis): blocks are feature groups (a depthwise
  convolution has one per channel), ``L`` the kernel taps times a group's input
  channels, ``R`` a group's output channels.
  """

  primitives = ("conv_general_dilated",)

  def match(self, eqn, kinds):
    if kinds == ["data", "view"] and eqn.params["batch_group_count"] == 1:
      return 1
    return None

  def arrange(self, eqn, position, operand):
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    groups = eqn.params["feature_group_count"]
    kernel = operand.transpose((*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # (*window, I, O)
    *window, inp, out = kernel.shape
    kernel = kernel.reshape(_prod(window), inp, groups, out // groups).transpose((2, 0, 1, 3))
    return kernel.reshape(groups, _prod(window) * inp, out // groups)

  def factors(self, eqn, position, data, g):
    params = eqn.params
    dn = params["dimension_numbers"]
    groups = params["feature_group_count"]
    (lhs,) = data
    # Channels last: the layout flax and most models use, so usually no copy.
    x = lhs.transpose((dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
    out = g.transpose((dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))
    kernel_shape = eqn.invars[1].aval.shape
    window = [kernel_shape[a] for a in dn.rhs_spec[2:]]
    cols = patches(
      x,
      window,
      params["window_strides"],
      params["padding"],
      params["lhs_dilation"],
      params["rhs_dilation"],
      out.shape[1:-1],
    )
    p = _prod(out.shape[:-1])
    a = cols.reshape(p, _prod(window), groups, -1).transpose((2, 0, 1, 3))
    b = out.reshape(p, groups, -1).transpose((1, 0, 2))
    return a.reshape(groups, p, -1), b


# ---------------------------------------------------------------------------
# gather: embedding lookups
# ---------------------------------------------------------------------------


class Embedding(Rule):
  """Rows gathered from a table: ``table[ids]``, ``jnp.take``, flax ``nn.Embed``.

  ``G = Σ_t e_{id_t} ⊗ g_t``: ``A`` holds the row ids, ``B`` the output cotangent of
  each looked-up row, so the Gram form is ``Σ_{t,s} [id_t = id_s] g_t·g_s`` and no
  per-example table is ever built.
  """

  primitives = ("gather",)
  indexed = True

  def match(self, eqn, kinds):
    if kinds != ["view", "data"]:
      return None
    dn = eqn.params["dimension_numbers"]
    table = eqn.invars[0].aval.shape
    ids = eqn.invars[1].aval.shape
    out_rank = len(eqn.outvars[0].aval.shape)
    rows = (
      len(table) >= 1
      and ids[-1:] == (1,)
      and tuple(dn.collapsed_slice_dims) == (0,)
      and tuple(dn.start_index_map) == (0,)
      and not dn.operand_batching_dims
      and tuple(eqn.params["slice_sizes"]) == (1, *table[1:])
      and tuple(dn.offset_dims) == tuple(range(out_rank - len(table) + 1, out_rank))
    )
    return 0 if rows else None

  def arrange(self, eqn, position, operand):
    return operand.reshape(1, operand.shape[0], -1)

  def factors(self, eqn, position, data, g):
    (indices,) = data
    rows = eqn.invars[0].aval.shape[0]
    ids = indices.reshape(-1)
    b = g.reshape(ids.shape[0], -1)
    if eqn.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
      # Out-of-range rows read the fill value and pass no gradient to the table.
      valid = (ids >= 0) & (ids < rows)
      b = jnp.where(valid[:, None], b, jnp.zeros((), b.dtype))
      ids = jnp.where(valid, ids, 0)
    else:
      ids = jnp.clip(ids, 0, rows - 1)
    return ids[None], b[None]


# ---------------------------------------------------------------------------
# Elementwise scales and shifts: normalization layers, biases
# ---------------------------------------------------------------------------


class Elementwise(Rule):
  """``x * s``, ``x + b``, ``x - b``, ``x / s`` with a (broadcast) parameter ``s`` or ``b``.

  LayerNorm, GroupNorm and RMSNorm scales and shifts, biases, per-channel scales: the
  per-example gradient ``Σ_broadcast axes x·g`` has the parameter's size, so it is
  formed exactly where the batched backward pass meets the use.
  """

  primitives = ("mul", "add", "add_any", "sub", "div")
  in_pass = True

  def match(self, eqn, kinds):
    return _view_and_data(kinds)


RULES: dict[str, Rule] = {
  name: rule
  for rule in (DotGeneral(), Conv(), Embedding(), Elementwise())
  for name in rule.primitives
}
