"""One rule per way a parameter meets per-example data, registered by primitive.

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

Elementwise uses (biases, normalization scales: ``x * s``, ``x + b``) need no rule: an
equation no rule takes puts its parameter in the batched backward pass, which forms
their small per-example gradients ``Σ_broadcast axes x·g`` as ``vmap(grad)`` would.

Adding a layer type is registering one rule with :func:`register_rule`, keyed by the
primitive object (the built-in rules below are registered the same way): ``match`` (is
this equation a use, and which operand is the parameter), ``arrange`` (the operand's
elements as ``(H, L, R)``; it must only ``reshape`` and ``transpose``, as it also runs
on a stride description of the operand's element indices) and ``factors`` (``A`` and
``B`` from one example's data and output cotangent).
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core


class Rule:
  """A way a parameter meets per-example data; subclass it and :func:`register_rule` it.

  Example ``i``'s gradient with respect to the parameter operand, its elements arranged
  as ``(H, L, R)`` by :meth:`arrange`, must be ``G_i[h] = Σ_p A_i[h, p] ⊗ B_i[h, p]``
  with ``(A, B)`` given by :meth:`factors` for that example.

  Attributes:
    indexed: whether ``A`` holds integer row indices into ``L`` standing for one-hot
      vectors (an embedding lookup) instead of dense ``L``-vectors.
  """

  indexed = False

  def match(self, eqn, kinds: list[str]) -> int | None:
    """The operand index of the parameter view, or None if this is not a use.

    Args:
      eqn: the jaxpr equation (``eqn.params``, ``eqn.invars[j].aval.shape``).
      kinds: per operand, ``"view"`` (a leaf, possibly reshaped, transposed, sliced or
        cast), ``"data"`` (depends on the example), ``"params"`` (on parameters only,
        but not as a view) or ``"const"``.
    """
    raise NotImplementedError

  def arrange(self, eqn, position: int, operand):
    """The parameter operand arranged as ``(H, L, R)``, by ``reshape`` and
    ``transpose`` only (it may be a JAX array or a description of element indices)."""
    raise NotImplementedError

  def factors(self, eqn, position: int, data: list, g):
    """``(A, B)`` for one example from the equation's other operands ``data`` and the
    output cotangent ``g``: ``A`` of shape ``(H, P, L)`` (``(H, P)`` integer indices if
    ``indexed``), ``B`` of shape ``(H, P, R)``. A dense ``A`` must be linear in the data
    and ``B`` in ``g``: a clip weight may go on either."""
    raise NotImplementedError


_RULES: dict = {}


def register_rule(primitive, rule) -> None:
  """Makes :func:`clipjax.clipped_grad` take uses of parameters by ``primitive`` with ``rule``.

  Rules are keyed by the primitive object (``jax.lax.dot_general_p``, or your own
  ``jax.extend.core.Primitive``); registering again replaces the rule. The built-in
  rules (``dot_general``, ``conv_general_dilated``, ``gather``) are registered this way.

  Args:
    primitive: a ``jax.extend.core.Primitive``.
    rule: an instance of a :class:`Rule` subclass, or None to remove the rule.

  Raises:
    TypeError: ``primitive`` is no primitive, or ``rule`` no :class:`Rule`.

  Example:
    >>> from jax import lax
    >>> from clipjax import ghost
    >>> ghost.register_rule(lax.dot_general_p, ghost.rule_for(lax.dot_general_p))
  """
  if not isinstance(primitive, jex_core.Primitive):
    raise TypeError(f"primitive must be a jax.extend.core.Primitive, got {primitive!r}.")
  if rule is None:
    _RULES.pop(primitive, None)
    return
  if not isinstance(rule, Rule):
    raise TypeError(f"rule must be an instance of clipjax.privacy.ghost.Rule, got {rule!r}.")
  _RULES[primitive] = rule


def rule_for(primitive):
  """The rule registered for ``primitive``, or None."""
  return _RULES.get(primitive)


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
  undilated = all(d == 1 for d in (*lhs_dilation, *rhs_dilation))
  if undilated and tuple(strides) == tuple(window) and all(lo >= 0 for lo, _ in padding):
    # Windows that tile the input (a ViT's patch embedding): the patches are the padded
    # input cut into blocks, one reshape, not one slice per tap (hundreds of them).
    config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)]
    padded = lax.pad(x, zero, config)
    limit = [n * k for n, k in zip(out_spatial, window)]
    padded = lax.slice(padded, [0] * x.ndim, [x.shape[0], *limit, x.shape[-1]])
    split = [x.shape[0]] + [d for n, k in zip(out_spatial, window) for d in (n, k)] + [x.shape[-1]]
    rank = len(window)
    order = [0, *range(1, 2 * rank, 2), *range(2, 2 * rank + 1, 2), 2 * rank + 1]
    blocks = padded.reshape(split).transpose(order)
    return blocks.reshape(x.shape[0], *out_spatial, math.prod(window), x.shape[-1])
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


def _transposed(params) -> bool:
  """A transposed convolution (input dilated, unit window strides): its kernel gradient
  is taken from patches of the output cotangent, at the input's positions."""
  return any(d > 1 for d in params["lhs_dilation"]) and all(
    s == 1 for s in params["window_strides"]
  )


def cotangent_patches(g, window, padding, lhs_dilation, rhs_dilation, in_spatial):
  """``(N, *in_spatial, prod(window), O)``: for every input position ``i``, the output
  cotangents that the kernel taps carry it to, in a transposed convolution.

  With the input dilated by ``s`` and padded by ``lo``, input ``i`` meets tap ``k`` at
  output ``lo + s·i − k·d`` (``d`` the kernel dilation), so tap ``k`` reads a slice of
  stride ``s`` of the cotangent padded by ``(K − 1)·d − lo`` (negative: cropped). The
  zero-filled dilated input, ``s^rank`` times larger, is never built.
  """
  config = [(0, 0, 0)]
  for k, (lo, hi), d in zip(window, padding, rhs_dilation):
    config.append(((k - 1) * d - lo, (k - 1) * d - hi, 0))
  padded = lax.pad(g, jnp.zeros((), g.dtype), config + [(0, 0, 0)])
  taps = []
  for offsets in itertools.product(*(range(k) for k in window)):
    start = [(k - 1 - o) * d for k, o, d in zip(window, offsets, rhs_dilation)]
    limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, in_spatial, lhs_dilation)]
    taps.append(
      lax.slice(padded, [0, *start, 0], [g.shape[0], *limit, g.shape[-1]], [1, *lhs_dilation, 1])
    )
  return jnp.stack(taps, axis=-2)


class Conv(Rule):
  """``conv_general_dilated(x, kernel)``: any rank, strides, padding, dilations, groups.

  ``G[g, (k, i), o] = Σ_p patch[p, k, g, i] · g_out[p, g, o]`` over output positions
  ``p`` (and the example's own batch axis): blocks are feature groups (a depthwise
  convolution has one per channel), ``L`` the kernel taps times a group's input
  channels, ``R`` a group's output channels.

  A transposed convolution (``lhs_dilation > 1``, unit strides: ``ConvTranspose``)
  instead takes positions at the input: ``G[g, i, (k, o)] = Σ_p x[p, g, i] ·
  g_patch[p, k, g, o]``, with ``L`` a group's input channels and ``R`` the taps times a
  group's output channels, so neither factor holds the dilated input's zeros.
  """

  def match(self, eqn, kinds):
    if kinds == ["data", "view"] and eqn.params["batch_group_count"] == 1:
      return 1
    return None

  def arrange(self, eqn, position, operand):
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    groups = eqn.params["feature_group_count"]
    kernel = operand.transpose((*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # (*window, I, O)
    *window, inp, out = kernel.shape
    kernel = kernel.reshape(_prod(window), inp, groups, out // groups)
    if _transposed(eqn.params):
      kernel = kernel.transpose((2, 1, 0, 3))  # (G, I, K, O/G)
      return kernel.reshape(groups, inp, _prod(window) * (out // groups))
    kernel = kernel.transpose((2, 0, 1, 3))  # (G, K, I, O/G)
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
    if _transposed(params):
      cols = cotangent_patches(
        out,
        window,
        params["padding"],
        params["lhs_dilation"],
        params["rhs_dilation"],
        x.shape[1:-1],
      )
      p = _prod(x.shape[:-1])
      a = x.reshape(p, groups, -1).transpose((1, 0, 2))
      b = cols.reshape(p, _prod(window), groups, -1).transpose((2, 0, 1, 3))
      return a, b.reshape(groups, p, -1)
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


register_rule(lax.dot_general_p, DotGeneral())
register_rule(lax.conv_general_dilated_p, Conv())
register_rule(lax.gather_p, Embedding())
