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

**Certified norms.** Differential privacy needs every norm that a clip weight is
computed from to be an *upper bound* of the norm of what enters the sum, for every
input: a norm that comes out low lets an example through unclipped. Two things make
the Gram form come out low in floating point, and both are closed here:

* *Range.* The Gram form takes every example's ``a`` and ``b`` divided by the powers
  of two of their largest magnitudes (:func:`shifts`: exact, and applied inside the
  inner products, slice by slice for long vectors, which are never copied), which
  keeps every product of four factors representable; the powers are carried as an
  exponent. On data in range this changes no rounding, so one computation serves
  every input (no second, scaled pass to compile).
* *Cancellation.* ``Σ_{p,q} λ_pq ρ_pq`` cancels (near-identical positions with nearly
  opposite cotangents), and its rounding error scales with ``Σ|λ_pq ρ_pq|``, not with
  the result. :func:`cross` and :func:`against` return, next to each value, a bound
  of its rounding error from Higham's ``γ_n = n·u/(1 − n·u)`` (``u`` the unit
  roundoff of the accumulation dtype; a sum of ``n`` rounded terms, in any order, is
  within ``γ_n Σ|terms|`` of the exact sum), derived in their docstrings; and
  :func:`contraction_slack` bounds how far a use's contribution to the clipped sum,
  formed by its own contraction, can stray from ``w_i G_i``. ``_leaves.root`` adds the
  bounds before the square root and the slack after it, so rounding can over-clip an
  ill-conditioned example but never under-clip one. On benign data the bounds are of
  the order of ``(l + r)·u`` relative (``l``, ``r`` the inner products' lengths).

Sums of non-negative terms (the explicit gradients' norms, as ``per_example_clip``
computes them) are trusted to their relative rounding, as any norm is: nothing cancels
in them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax import _norms
from clipjax.privacy.ghost import _cost, _layout, _walk

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
  def gram_cost(self) -> float:
    """Per-example relative cost of the Gram-form squared norm (``_cost``)."""
    width_l = 1 if self.indexed else self.size_l
    return _cost.gram(self.blocks, self.positions, width_l, self.size_r, _cost.weights())

  @property
  def explicit_held(self) -> bool:
    """Whether the explicit form's gradients fit the memory budget (``_cost.held``)."""
    width_l = 1 if self.indexed else self.size_l
    factors = self.b.shape[0] * self.blocks * self.positions * (width_l + self.size_r)
    return _cost.held(self.b.shape[0] * self.blocks * self.size_l * self.size_r, factors)

  @property
  def explicit_cost(self) -> float:
    """Per-example relative cost of the explicit gradient and its norm (``_cost``);
    an indexed use scatters its rows, one multiply-add per row entry."""
    w = _cost.weights()
    if self.indexed:
      rows = self.blocks * self.positions * self.size_r
      return w.explicit * rows + w.explicit_out * self.blocks * self.size_l * self.size_r
    return _cost.explicit(self.blocks, self.positions, self.size_l, self.size_r, w)


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


# Inner products longer than this are summed in blocks of about √L, so that their
# rounding bound is γ of about 2√L instead of γ_L (a 32000-token vocabulary: 90x
# tighter, which is what keeps benign norms within 1e-3 of exact on a language model).
_BLOCKED = 1024


def rounds(length: int) -> int:
  """How many roundings an entry of :func:`inner` over ``length`` passes through, at
  most (the index of its ``γ``): ``length``, or block length plus block count (and
  one for a remainder)."""
  if length <= _BLOCKED:
    return length
  block = math.isqrt(length - 1) + 1
  return block + length // block + 1


def depth(n: int) -> int:
  """The additions a term passes through in :func:`pairwise` over ``n`` terms."""
  return max(1, (n - 1).bit_length())


def pairwise(x, axes):
  """``jnp.sum(x, axes)`` by halving, so that every term passes through ``depth(n)``
  additions (Higham's bound ``γ_depth`` instead of ``γ_n`` for a sum in any order)."""
  rest = [a for a in range(x.ndim) if a not in axes]
  x = x.transpose(rest + list(axes)).reshape(*[x.shape[a] for a in rest], -1)
  while x.shape[-1] > 1:
    half = (x.shape[-1] + 1) // 2
    high = x[..., half:]
    if high.shape[-1] < half:
      high = jnp.pad(high, [(0, 0)] * (x.ndim - 1) + [(0, 1)])
    x = x[..., :half] + high
  return x[..., 0]


def _shifted(x, shift):
  """``x`` divided per example by ``2^shift`` (exact; ``shift`` None leaves it)."""
  return x if shift is None else _norms.times_pow2(x, -_per_example(shift, x))


def _products(u, v, half):
  """The inner products of ``u``'s and ``v``'s vectors: all of them, or for a Gram
  matrix (``half`` > 0: ``u`` is ``v``) its two diagonal quarters and the upper one."""
  einsum = lambda p, q: jnp.einsum("bhpl,bhql->bhpq", p, q, precision=_HIGHEST)
  if not half:
    return (einsum(u, v),)
  top, bottom = u[:, :, :half], u[:, :, half:]
  return einsum(top, top), einsum(top, bottom), einsum(bottom, bottom)


def _assembled(parts):
  if len(parts) == 1:
    return parts[0]
  upper, corner, lower = parts
  rows = (jnp.concatenate([upper, corner], 3), jnp.concatenate([corner.swapaxes(2, 3), lower], 3))
  return jnp.concatenate(rows, 2)


def _blocked(x, y, sx, sy, half):
  """:func:`inner` of long dense vectors: blocks of about √L, accumulated in order.

  Each block is sliced (and shifted) inside the loop, so no copy of the factors is
  made (an output projection's cotangent is the step's largest array)."""
  length = x.shape[-1]
  block = math.isqrt(length - 1) + 1
  count = length // block

  def product(u, v):
    return _products(_shifted(u, sx), _shifted(v, sy), half)

  def step(i, totals):
    u, v = (lax.dynamic_slice_in_dim(w, i * block, block, axis=3) for w in (x, y))
    return tuple(t + p for t, p in zip(totals, product(u, v)))

  zeros = jax.eval_shape(product, x[..., :1], y[..., :1])
  zeros = tuple(jnp.zeros(z.shape, z.dtype) for z in zeros)
  totals = lax.fori_loop(0, count, step, zeros)
  if count * block < length:
    tail = product(x[..., count * block :], y[..., count * block :])
    totals = tuple(t + p for t, p in zip(totals, tail))
  return _assembled(totals)


def inner(x, x_indexed, y, y_indexed, sx=None, sy=None):
  """``(batch, H, P, Q)`` inner products of ``x``'s and ``y``'s vectors over ``L``, the
  dense ones divided per example by ``2^sx`` and ``2^sy`` first (None: as they are)."""
  if x_indexed and y_indexed:
    return (x[..., :, None] == y[..., None, :]).astype(jnp.float32)
  if x_indexed:
    # Row ``x[p]`` of a one-hot vector picks entry ``x[p]`` of every dense ``y[q]``.
    picked = jnp.take_along_axis(
      y, jnp.broadcast_to(x[:, :, None, :], y.shape[:3] + x.shape[-1:]), axis=3
    )
    return _shifted(picked, sy).swapaxes(2, 3)
  if y_indexed:
    return inner(y, True, x, False, sy, sx).swapaxes(2, 3)
  # A Gram matrix is symmetric: by quarters, three of four products are formed, and
  # every entry is still one inner product summed the same way. Worth its extra
  # kernels where the products are many: long vectors (a vocabulary) or many positions.
  gram = x is y and sx is sy
  if x.shape[-1] > _BLOCKED:
    return _blocked(x, y, sx, sy, x.shape[2] // 2 if gram and x.shape[2] >= 32 else 0)
  x, y = _shifted(x, sx), _shifted(y, sy)
  if x.shape[2] == 1 and y.shape[2] == 1:
    return jnp.sum(x * y, axis=-1)[..., None]
  return _assembled(_products(x, y, x.shape[2] // 2 if gram and x.shape[2] >= 128 else 0))


class Scaled(NamedTuple):
  """Per-example values ``value · 2^exponent`` (a squared norm can overflow where the
  norm itself does not), each within ``bound · 2^exponent`` of the exact value."""

  value: jax.Array
  exponent: jax.Array
  bound: jax.Array


class Normalized(NamedTuple):
  """A use's factors as the Gram form takes them, with the norms of its positions.

  Attributes:
    factors: ``a`` and ``b`` as they are.
    shift_a: ``(batch,)`` int32: the Gram form takes ``a`` divided by ``2^shift_a``
      per example (:func:`shifts`; zeros for indices), inside the inner products.
    shift_b: the same for ``b``. Example ``i``'s gradient is ``2^exponent_i · Σ_p
      a'_ip ⊗ b'_ip`` for the divided factors ``a'``, ``b'``.
    norm_a: ``(batch, H, P)`` upper bounds of the norms ``‖a'_hp‖`` (ones for one-hot
      rows), read off the Gram diagonal.
    norm_b: ``(batch, H, P)`` upper bounds of the norms ``‖b'_hp‖``.
  """

  factors: Factors
  shift_a: jax.Array
  shift_b: jax.Array
  norm_a: jax.Array
  norm_b: jax.Array

  @property
  def exponent(self) -> jax.Array:
    return self.shift_a + self.shift_b

  @property
  def spread(self) -> jax.Array:
    """``(batch, H)``: ``S_h = Σ_p ‖a_hp‖‖b_hp‖``, the triangle-inequality bound of the
    block's gradient norm that scales the rounding errors below."""
    return jnp.sum(self.norm_a * self.norm_b, axis=2)


def unit_roundoff(dtype) -> float:
  return float(jnp.finfo(dtype).eps) / 2


def gamma(n: int, dtype) -> float:
  """Higham's ``γ_n = n·u / (1 − n·u)``: a sum of ``n`` rounded operations, in any
  order, is within ``γ_n · Σ|terms|`` of the exact one."""
  nu = n * unit_roundoff(dtype)
  return nu / (1 - nu) if nu < 0.5 else math.inf


def _top_exponent(x):
  """Per example, the ``frexp`` exponent of the largest magnitude (0 for all zeros):
  dividing by its power of two puts the row's magnitudes in ``[0, 1)``, exactly."""
  top = jnp.max(jnp.abs(x), axis=tuple(range(1, x.ndim)))
  exponent = jnp.frexp(top)[1]
  # Not finite only for non-finite entries, which make the example non-finite anyway.
  return jnp.where(jnp.isfinite(top), exponent, 0).astype(jnp.int32)


def _per_example(v, like):
  return v.reshape(v.shape + (1,) * (like.ndim - 1))


def shifts(f: Factors) -> tuple[jax.Array, jax.Array]:
  """Per example, the powers of two of ``a``'s and ``b``'s largest magnitudes: divided
  by them (exact), no inner product of four factors leaves the float range, and on
  data in range every rounding is what it would be undivided."""
  eb = _top_exponent(f.b)
  ea = jnp.zeros_like(eb) if f.indexed else _top_exponent(f.a)
  return ea, eb


def _diagonal_norms(gram, length: int):
  """Upper bounds of the norms ``‖x_p‖`` from a Gram matrix's computed diagonal."""
  d = jnp.diagonal(gram, axis1=-2, axis2=-1)
  dtype = gram.dtype
  widened = (d + length * float(jnp.finfo(dtype).tiny)) / (1 - gamma(rounds(length), dtype))
  return jnp.sqrt(jnp.maximum(widened, 0)) * (1 + 2 * unit_roundoff(dtype))


def own(f: Factors) -> tuple[Normalized, Scaled]:
  """A use's own squared norm ``⟨G_i, G_i⟩``, certified (see :func:`cross`), taken on
  its factors divided by :func:`shifts`, with the norms of its positions read off
  its Gram diagonals."""
  sa, sb = shifts(f)
  left = inner(f.a, f.indexed, f.a, f.indexed, sa, sa).astype(f.b.dtype)
  right = inner(f.b, False, f.b, False, sb, sb)
  if f.indexed:
    norm_a = jnp.ones(right.shape[:3], right.dtype)
  else:
    norm_a = _diagonal_norms(left, f.size_l)
  n = Normalized(f, sa, sb, norm_a, _diagonal_norms(right, f.size_r))
  return n, _term(n, n, left, right, _self_pairs(f))


def _self_pairs(f):
  return ((f.a, f.indexed, f.a, f.indexed), (f.b, False, f.b, False))


def plain(f: Factors, weighted_dtype) -> tuple[Scaled, Scaled]:
  """The squared norm and contraction slack of a use without positions, on its own.

  ``‖G_h‖ = ‖a_h‖‖b_h‖``: a product of two norms, nothing cancels, so it needs no
  bound, and the range-safe norms of ``_norms`` (one pass in the common case) replace
  the Gram form. The contraction of one outer product per example
  rounds each entry once or twice: its slack is ``(γ_2 + 3u_w)`` times the norm.
  """
  n_b = _norms.norms([f.b[:, :, 0]], 2.0, 2)
  mantissa, exponent = jnp.frexp(n_b.unit)
  exponent = exponent + n_b.exponent
  if not f.indexed:
    n_a = _norms.norms([f.a[:, :, 0]], 2.0, 2)
    m_a, e_a = jnp.frexp(n_a.unit)
    mantissa, exponent = mantissa * m_a, exponent + e_a + n_a.exponent
  top = jnp.max(exponent, axis=1)
  units = _norms.times_pow2(mantissa, exponent - top[:, None])  # (batch, H), each <= 1
  value = jnp.sum(units * units, axis=1)
  dtype = value.dtype
  relative = gamma(2, dtype) + 3 * unit_roundoff(weighted_dtype)
  slack = relative * jnp.sum(units, axis=1) * (1 + gamma(f.blocks + 4, dtype))
  slack = slack + 4 * float(jnp.finfo(dtype).tiny)
  zero = jnp.zeros_like(value)
  return Scaled(value, 2 * top, zero), Scaled(slack, top, zero)


def _inexact_length(x, x_indexed, y, y_indexed) -> int:
  """The summation length of :func:`inner`'s products (0 where they are exact picks)."""
  return 0 if x_indexed or y_indexed else x.shape[-1]


def _outer(x, y):
  return x[..., :, None] * y[..., None, :]


def cross(f: Normalized, g: Normalized, swapped: bool = False) -> Scaled:
  """``⟨G_i, G'_i⟩`` per example with a certified bound of its rounding error;
  ``swapped`` when ``g``'s ``L`` is ``f``'s ``R``.

  The bound. Per block, write ``λ_pq = a_p·a'_q`` and ``ρ_pq = b_p·b'_q`` (``a'``,
  ``b'`` exchanged when swapped), ``n`` for the additions each product ``λ_pq ρ_pq``
  passes through (they are summed pairwise: ``⌈log2⌉`` of their number) and ``l``,
  ``r`` for the roundings of the two inner products (their lengths, or block length
  plus block count for long ones, summed in blocks; 0 for a one-hot side, whose
  products are exact picks). Higham's bounds give ``|λ̂ − λ| <= γ_l
  ‖a_p‖‖a'_q‖`` and ``|ρ̂ − ρ| <= γ_r ‖b_p‖‖b'_q‖``, and summing the rounded products
  adds at most ``γ_n Σ|λ̂ ρ̂|``. With ``|λ| <= |λ̂| + γ_l ‖a_p‖‖a'_q‖``,

      |computed − exact| <= γ_n Σ|λ̂ρ̂| + γ_l Σ ‖a_p‖‖a'_q‖ |ρ̂_pq|
                            + γ_r Σ |λ̂_pq| ‖b_p‖‖b'_q‖ + γ_l γ_r Σ_h S_h S'_h,

  every sum formed from the ``P x Q`` products already in memory (the last by
  Cauchy–Schwarz from the spreads). The bound is then widened by the rounding of its
  own evaluation (``γ`` of its length) and by an absolute floor for results flushed to
  zero (each flushed operation errs by at most ``tiny``, carried through the other
  factor: ``tiny·(l Σ|ρ̂| + r Σ|λ̂| + n)``, the position norms being read off the Gram
  diagonals, widened by their own rounding and flushes). A
  single outer product of one use with itself (no positions) is a product of two sums
  of squares: nothing cancels, its relative rounding is that of any norm, and it
  carries no bound.
  """
  fa, ga = f.factors, g.factors
  if swapped:
    pairs = ((fa.a, fa.indexed, ga.b, False), (fa.b, False, ga.a, ga.indexed))
    shifts = ((f.shift_a, g.shift_b), (f.shift_b, g.shift_a))
  else:
    pairs = ((fa.a, fa.indexed, ga.a, ga.indexed), (fa.b, False, ga.b, False))
    shifts = ((f.shift_a, g.shift_a), (f.shift_b, g.shift_b))
  left, right = (inner(*pair, *shift) for pair, shift in zip(pairs, shifts))
  return _term(f, g, left.astype(right.dtype), right, pairs, swapped)


def _term(f: Normalized, g: Normalized, left, right, pairs, swapped=False) -> Scaled:
  """:func:`cross` from its two Gram products (see there)."""
  products = left * right
  value = pairwise(products, (1, 2, 3))
  dtype = right.dtype
  exponent = f.exponent + g.exponent
  if f is g and f.factors.positions == 1:
    return Scaled(value, exponent, jnp.zeros_like(value))
  if swapped:
    norms = ((f.norm_a, g.norm_b), (f.norm_b, g.norm_a))
  else:
    norms = ((f.norm_a, g.norm_a), (f.norm_b, g.norm_b))
  n_left, n_right = (_inexact_length(*pair) for pair in pairs)
  n = math.prod(products.shape[1:])
  g_n, g_l, g_r = (gamma(k, dtype) for k in (depth(n), rounds(n_left), rounds(n_right)))
  abs_left, abs_right = jnp.abs(left), jnp.abs(right)
  error = g_n * jnp.abs(products) + g_r * abs_left * _outer(*norms[1])
  if n_left:
    error = error + g_l * _outer(*norms[0]) * abs_right
  tiny = float(jnp.finfo(dtype).tiny)
  error = error + tiny * (n_left * abs_right + n_right * abs_left + 1)
  bound = jnp.sum(error, axis=(1, 2, 3)) + g_l * g_r * jnp.sum(f.spread * g.spread, axis=1)
  widen = gamma(n_left + n_right + n + f.factors.positions + g.factors.positions + 16, dtype)
  return Scaled(value, exponent, bound * (1 + widen) / (1 - g_n) + 16 * tiny)


def contraction_slack(f: Normalized, weighted_dtype) -> Scaled:
  """How far the clipped sum's contraction of this use can stray from ``w_i G_i``, per
  unit weight, in norm units.

  The contraction ``Σ_p a_p ⊗ w b_p`` rounds each entry's ``P`` products and their sum
  (``γ_(P+1)`` relative to ``Σ_p |a_pl||w b_pr|``), and the weighted operand is
  rounded once or twice to its own dtype (``weighted_dtype``: ``3u`` covers the cast
  weight and the product); both are at most those factors times ``w S``.
  """
  dtype = f.spread.dtype
  p = f.factors.positions
  total = jnp.sum(f.spread, axis=1)
  own = gamma(p + f.factors.blocks + f.factors.size_r + f.factors.size_l + 8, dtype)
  floor = 4 * (p + 8) * float(jnp.finfo(dtype).tiny)
  relative = gamma(p + 1, dtype) + 3 * unit_roundoff(weighted_dtype)
  value = relative * total * (1 + own) + floor
  return Scaled(value, f.exponent, jnp.zeros_like(value))


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


def against(f: Normalized, s, s_exponent, s_norm) -> Scaled:
  """``⟨G_i, S_i⟩`` per example for explicit ``s`` of shape ``(batch, H, L, R)``, given
  already divided by ``2^s_exponent`` per example, with its Frobenius norm ``s_norm``.

  Each term ``a_pl s_lr b_pr`` passes through at most ``R + ⌈log2 HPL⌉ + 1`` roundings
  (one inner product over ``R``, then a pairwise sum), and ``Σ_{p,l,r}
  |a_pl||s_lr||b_pr| <= ‖s‖ Σ_p ‖a_p‖‖b_p‖`` (Cauchy–Schwarz), so the error is at most
  ``γ_(R + ⌈log2 HPL⌉ + 1) ‖s‖ S`` (plus a floor for flushed products).
  """
  fa = f.factors
  dtype = fa.b.dtype
  b = _shifted(fa.b, f.shift_b)
  if fa.indexed:
    picked = jnp.take_along_axis(s, fa.a[..., None], axis=2)  # (batch, H, P, R)
    value = jnp.sum(picked * b, axis=(1, 2, 3))
    n = math.prod(fa.b.shape[1:])
  else:
    sb = jnp.einsum("bhlr,bhpr->bhpl", s, b, precision=_HIGHEST)
    value = pairwise(sb * _shifted(fa.a, f.shift_a), (1, 2, 3))
    n = fa.size_r + depth(fa.blocks * fa.positions * fa.size_l) + 1
  widen = gamma(n + fa.positions + fa.size_l + fa.size_r + 16, dtype)
  spread = jnp.sum(f.spread, axis=1)
  # Flushed operations err by at most tiny each, carried through |a| <= sqrt(L)‖a_p‖.
  reach = jnp.sum(f.norm_a, axis=(1, 2)) * math.sqrt(fa.size_l) * fa.size_r
  floor = 4 * float(jnp.finfo(dtype).tiny) * (reach + n + 16)
  bound = gamma(n, dtype) * s_norm * spread * (1 + widen) + floor
  return Scaled(value, f.exponent + s_exponent, bound)
