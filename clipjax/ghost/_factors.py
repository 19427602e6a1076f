"""Per-example gradients in factored form: Gram norms, cross terms, explicit gradients.

A recognised use's per-example gradient, with the parameter's elements arranged as
``(H, L, R)`` (see ``_rules``), is ``G_i[h] = Σ_p A_i[h, p] ⊗ B_i[h, p]``. Everything
here works on that form, batched over examples:

* :func:`inner` forms the inner products ``A_p·A'_q`` (dense, or one-hot rows given by
  their indices, never built);
* :func:`cross` is ``⟨G_i, G'_i⟩ = Σ_h Σ_{p,q} (A_p·A'_q)(B_p·B'_q)`` for two uses of one
  leaf laid out alike (``⟨G_i, G_i⟩`` is the Gram-form squared norm), as a
  :class:`Scaled` value that cannot overflow where the norm does not;
* :func:`explicit` builds ``G_i`` itself, and :func:`against` is ``⟨G_i, S_i⟩`` with an
  explicit ``S_i``;
* :func:`summed` is ``Σ_i G_i``, one contraction over examples and positions (the
  clipped sum, once the weights are in the factors);
* :func:`of_use` computes the factors of a use from its recorded data and output
  cotangents, folding the iterations of enclosing scans: a leaf shared by the
  iterations sums over them (more positions), a scanned-over leaf has one slice per
  iteration (more blocks);
* :func:`layout` says which leaf element every ``(h, l, r)`` is (by strides, see
  ``_layout``), so that two uses can be matched.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax import _norms
from clipjax.ghost import _layout, _walk

_HIGHEST = lax.Precision.HIGHEST


class Factors(NamedTuple):
  """Example ``i``'s gradient ``Σ_p a[i, h, p] ⊗ b[i, h, p]`` in ``(H, L, R)`` layout.

  Attributes:
    a: ``(batch, H, P, L)``; or ``(batch, H, P)`` integer row indices if ``indexed``.
    b: ``(batch, H, P, R)``.
    indexed: whether ``a`` holds indices of one-hot ``L``-vectors.
    size_l: ``L``.
  """

  a: jax.Array
  b: jax.Array
  indexed: bool
  size_l: int

  @property
  def blocks(self) -> int:
    return self.b.shape[1]

  @property
  def positions(self) -> int:
    return self.b.shape[2]

  @property
  def size_r(self) -> int:
    return self.b.shape[3]

  @property
  def gram_cost(self) -> int:
    """Per-example multiply-adds of the Gram-form squared norm."""
    width = (1 if self.indexed else self.size_l) + self.size_r
    return self.blocks * self.positions**2 * width

  @property
  def explicit_cost(self) -> int:
    """Per-example multiply-adds and stores of the explicit gradient and its norm."""
    per_position = self.size_r * (1 if self.indexed else self.size_l)
    return self.blocks * (self.positions * per_position + self.size_l * self.size_r)


def _fold(x, scanned, tail):
  """``(batch, *iterations, H, P, *tail)`` to ``(batch, H', P', *tail)``: iterations over
  a scanned-over leaf become blocks (outermost first), shared ones positions."""
  n = len(scanned)
  sliced = [1 + i for i, s in enumerate(scanned) if s]
  shared = [1 + i for i, s in enumerate(scanned) if not s]
  rest = list(range(n + 3, n + 3 + tail))
  x = x.transpose([0, *sliced, n + 1, *shared, n + 2, *rest])
  return x.reshape(
    x.shape[0], -1, int(np.prod(x.shape[len(sliced) + 2 : n + 3])), *x.shape[n + 3 :]
  )


def of_use(use, records: list, g, size_l: int, dtype=None) -> Factors:
  """The factors of one use for every example, in ``dtype`` (the records' if None)."""

  def one(data, g):
    return use.rule.factors(use.eqn, use.position, data, g)

  for _ in use.lengths:
    one = jax.vmap(one)
  a, b = jax.vmap(one)(records, g)
  indexed = use.rule.indexed
  a = _fold(a, use.scanned, 0 if indexed else 1)
  b = _fold(b, use.scanned, 1)
  if dtype is not None:
    a = a if indexed else a.astype(dtype)
    b = b.astype(dtype)
  return Factors(a, b, indexed, size_l)


def layout(use, leaf_shape) -> _layout.Layout:
  """The use's ``(H, L, R)`` arrangement of the leaf (blocks include the slices of a
  scanned-over leaf), its element indices described by strides, not built."""
  spec = jax.ShapeDtypeStruct(tuple(leaf_shape), jnp.float32)
  shape = jax.eval_shape(lambda v: to_blocks(use, v), spec)
  try:
    whole = _layout.Strided.of(leaf_shape)
    sliced = sum(use.scanned)
    # The chain applies to one slice of the scanned-over axes; their sub-axes lead the blocks.
    part = _layout.Strided(whole.offset, whole.axes[sliced:])
    viewed = _walk.replay_layout(use.chain, part)
    arranged = use.rule.arrange(use.eqn, use.position, viewed)
    if not isinstance(arranged, _layout.Strided) or arranged.size != viewed.size:
      raise _layout.Unknown("arrange is no rearrangement")
    outer = tuple(s for axis in whole.axes[:sliced] for s in axis)
    blocks, *rest = arranged.axes
    indices = _layout.Strided(arranged.offset, (outer + blocks, *rest))
    if indices.shape != shape.shape:
      raise _layout.Unknown("shape mismatch")
  except (_layout.Unknown, ValueError, TypeError, AttributeError, IndexError):
    # Undescribed (a user rule's arrange may do anything): no pairing, not injective.
    indices = None
  return _layout.Layout(shape.shape, indices)


def to_blocks(use, leaf):
  """The leaf (or per-example leaf gradients, ``vmap`` it) arranged as the use's
  ``(H, L, R)``: the JAX counterpart of :func:`layout`, linear in ``leaf``."""

  def one(part):
    return use.rule.arrange(use.eqn, use.position, _walk.replay_layout(use.chain, part))

  for _ in range(sum(use.scanned)):
    one = jax.vmap(one)
  out = one(leaf)
  return out.reshape(-1, *out.shape[-2:])


def inner(x, x_indexed, y, y_indexed):
  """``(batch, H, P, Q)`` inner products of ``x``'s and ``y``'s vectors over ``L``."""
  if x_indexed and y_indexed:
    return (x[..., :, None] == y[..., None, :]).astype(jnp.float32)
  if x_indexed:
    # Row ``x[p]`` of a one-hot vector picks entry ``x[p]`` of every dense ``y[q]``.
    picked = jnp.take_along_axis(
      y, jnp.broadcast_to(x[:, :, None, :], y.shape[:3] + x.shape[-1:]), axis=3
    )
    return picked.swapaxes(2, 3)
  if y_indexed:
    return inner(y, True, x, False).swapaxes(2, 3)
  if x.shape[2] == 1 and y.shape[2] == 1:
    return jnp.sum(x * y, axis=-1)[..., None]
  return jnp.einsum("bhpl,bhql->bhpq", x, y, precision=_HIGHEST)


class Scaled(NamedTuple):
  """Per-example values ``value · 2^exponent`` (a squared norm can overflow where the
  norm itself does not)."""

  value: jax.Array
  exponent: jax.Array


def _top_exponent(x):
  """Per example, about the power of two of the largest magnitude (0 for all zeros).

  Any integer near it serves: dividing by an exact power of two is exact.
  """
  top = jnp.max(jnp.abs(x), axis=tuple(range(1, x.ndim)))
  log2 = jnp.floor(jnp.log2(jnp.where(top > 0, top, 1)))
  # Not finite only for non-finite entries, which make the example non-finite anyway.
  return jnp.where(jnp.isfinite(log2), log2, 0).astype(jnp.int32)


def _per_example(v, like):
  return v.reshape(v.shape + (1,) * (like.ndim - 1))


def cross(f: Factors, g: Factors, swapped: bool = False) -> Scaled:
  """``⟨G_i, G'_i⟩`` per example; ``swapped`` when ``g``'s ``L`` is ``f``'s ``R``.

  The two Gram products are divided by the powers of two of their largest entries
  before they are multiplied, so that a gradient whose squared norm passes the
  largest float is still measured (and clipped, not dropped).
  """
  if swapped:
    left = inner(f.a, f.indexed, g.b, False)
    right = inner(f.b, False, g.a, g.indexed)
  else:
    left = inner(f.a, f.indexed, g.a, g.indexed)
    right = inner(f.b, False, g.b, False)
  left = left.astype(right.dtype)
  e_left, e_right = _top_exponent(left), _top_exponent(right)
  left = _norms.times_pow2(left, -_per_example(e_left, left))
  right = _norms.times_pow2(right, -_per_example(e_right, right))
  return Scaled(jnp.sum(left * right, axis=(1, 2, 3)), e_left + e_right)


def explicit(f: Factors) -> jax.Array:
  """``(batch, H, L, R)``: every example's gradient itself."""
  if not f.indexed:
    return jnp.einsum("bhpl,bhpr->bhlr", f.a, f.b, precision=_HIGHEST)

  def rows(ids, b):
    return jnp.zeros((f.size_l, b.shape[-1]), b.dtype).at[ids].add(b)

  return jax.vmap(jax.vmap(rows))(f.a, f.b)


def summed(f: Factors) -> jax.Array:
  """``(H, L, R)``: ``Σ_i G_i`` over the batch: one contraction over examples and
  positions (the use's own weight gradient, computed as a matrix product: for a
  convolution, on its patches), or one scatter-add of rows.

  The larger factor is the right operand, whose contracted axes lead: XLA:CPU then
  copies (transposes) only the smaller one, not an output projection's cotangent.
  """
  acc = jnp.promote_types(f.b.dtype, jnp.float32)
  if f.indexed:
    blocks = jnp.arange(f.blocks)[None, :, None]
    return jnp.zeros((f.blocks, f.size_l, f.size_r), acc).at[blocks, f.a].add(f.b)
  kw = dict(precision=_HIGHEST, preferred_element_type=acc)
  if f.a.size <= f.b.size:
    return jnp.einsum("bhpl,bhpr->hlr", f.a, f.b, **kw)
  return jnp.einsum("bhpr,bhpl->hrl", f.b, f.a, **kw).swapaxes(1, 2)


def against(f: Factors, s) -> jax.Array:
  """``⟨G_i, S_i⟩`` per example for explicit ``s`` of shape ``(batch, H, L, R)``."""
  if f.indexed:
    picked = jnp.take_along_axis(s, f.a[..., None], axis=2)  # (batch, H, P, R)
    return jnp.sum(picked * f.b, axis=(1, 2, 3))
  sb = jnp.einsum("bhlr,bhpr->bhpl", s, f.b, precision=_HIGHEST)
  return jnp.sum(sb * f.a, axis=(1, 2, 3))
