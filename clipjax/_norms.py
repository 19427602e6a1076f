"""p-norms of pytrees over the whole float range, per-example clip weights, weighted sums.

Every norm in clipjax is taken here: the global norm of a pytree (one vector) and the
norm of every example's slice of a pytree whose leaves carry a leading batch axis.
Both are sums over leaves, never concatenations, so they run leaf by leaf and shard
by shard.

**Range.** A norm is held as ``unit · 2^exponent`` (:class:`Norms`). The common case
takes one pass: the plain sum of ``|v_j|^p``, accumulated in at least float32, is
trusted where it is finite and large enough that the terms flushed to zero cannot
matter (``exponent = 0``). Elsewhere (entries near the largest float or among the
subnormals, large ``p``, or a row of zeros, which the sum alone cannot tell from an
underflow) one pass finds each row's largest magnitude from its bit pattern and a
second divides by that power of two exactly; these passes run only when some row
needs them. CPUs (and XLA's GPU backends) flush subnormal operands to zero, so
subnormal entries are rescaled from their bits rather than by arithmetic.

A norm can still exceed the dtype's range (a float32 gradient whose norm is above
3.4e38): its value is then reported as ``inf``, but the clip factor is applied in
scaled form, ``(v · 2^-exponent) · (C / unit)``, so such an example is clipped
correctly and never mistaken for a non-finite one. Only NaN or inf entries make an
example non-finite.

**Weights.** A per-example rule (``"clip"``, ``"automatic"`` or ``"normalize"``) turns
norms into :class:`Weights`; :func:`scale_examples` applies them to per-example
arrays and :func:`weighted_sum` forms ``Σ_i w_i v_i`` over the batch as one
matrix-vector product per leaf. Examples that are not finite or are masked out
contribute exact zeros (never ``0 · NaN``).

**Groups.** A clip norm may be a pytree prefix of the gradients (group-wise clipping):
:func:`groups` splits a tree into one subtree per clip norm.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax import _checks
from clipjax._powers import power, root

SCALINGS = _checks.SCALINGS


class Norms(NamedTuple):
  """p-norms held as ``unit · 2^exponent`` (per example, or one scalar).

  Attributes:
    exponent: int32; 0 where the plain sum of ``|v_j|^p`` was in range.
    unit: the norm divided by ``2^exponent``; NaN or inf for a row with NaN or inf
      entries.
  """

  exponent: jax.Array
  unit: jax.Array

  @property
  def finite(self) -> jax.Array:
    """Whether every entry of the row is finite (the norm itself may still overflow)."""
    return jnp.isfinite(self.unit)

  @property
  def value(self) -> jax.Array:
    """The norm: ``inf`` where it exceeds the dtype's range or an entry is not finite."""
    return _ldexp(self.unit, self.exponent)


class Weights(NamedTuple):
  """Example ``i`` contributes ``factor_i · v_i · 2^-shift_i`` where ``keep_i``, else zero.

  ``shift`` is 0 except where ``factor`` alone would leave the float range (norms
  beyond it, or subnormal ones under ``"normalize"``).
  """

  factor: jax.Array
  shift: jax.Array
  keep: jax.Array


def accumulation_dtype(tree: Any) -> Any:
  """At least float32: the dtype norms and weights are computed in."""
  dtypes = [jnp.result_type(v) for v in jax.tree.leaves(tree)]
  out = jnp.result_type(*dtypes) if dtypes else jnp.result_type(float)
  if not jnp.issubdtype(out, jnp.floating):
    out = jnp.result_type(float)
  return jnp.promote_types(out, jnp.float32)


# ---------------------------------------------------------------------------
# Exact powers of two, from bit patterns (arithmetic flushes subnormals to zero)
# ---------------------------------------------------------------------------


def _layout(dtype):
  info = jnp.finfo(dtype)
  return info, {16: jnp.int16, 32: jnp.int32, 64: jnp.int64}[info.bits]


def _pow2(k, dtype):
  """``2^k`` for integer ``k`` within the normal exponent range, built from its bits."""
  info, itype = _layout(dtype)
  bias = 1 - info.minexp
  k = jnp.clip(k, info.minexp, info.maxexp - 1).astype(itype)
  return lax.bitcast_convert_type((k + bias) << info.nmant, dtype)


def times_pow2(v, k):
  """``v · 2^k`` for normal ``v``, in two exact steps so that neither factor leaves range."""
  half = k // 2
  return v * _pow2(half, v.dtype) * _pow2(k - half, v.dtype)


def _subnormal_parts(v):
  """``(is_subnormal, q, negative)`` with ``|v| = q · 2^(minexp − nmant)`` where subnormal."""
  info, itype = _layout(v.dtype)
  signed = lax.bitcast_convert_type(lax.stop_gradient(v), itype)
  bits = signed & jnp.asarray(np.iinfo(itype).max, itype)
  return ((bits >> info.nmant) == 0) & (bits != 0), bits, signed < 0


def scale_exact(v, k):
  """``v · 2^k`` for any finite ``v``, subnormal inputs included (``k`` broadcasts).

  Differentiable in ``v`` wherever ``v`` is normal (subnormal inputs, which arithmetic
  reads as zero, are rebuilt from their bits).
  """
  info, _ = _layout(v.dtype)
  subnormal, q, negative = _subnormal_parts(v)
  from_bits = times_pow2(q.astype(v.dtype), k + info.minexp - info.nmant)
  return jnp.where(subnormal, jnp.where(negative, -from_bits, from_bits), times_pow2(v, k))


def _ldexp(unit, exponent):
  """``unit · 2^exponent`` for ``unit >= 0``: ``inf`` past the range, subnormal below it."""
  info, itype = _layout(unit.dtype)
  big = times_pow2(unit, exponent)
  # Below the normal range, round unit · 2^(exponent − minexp + nmant) to the integer
  # that is the subnormal's bit pattern.
  q = jnp.round(times_pow2(unit, exponent - info.minexp + info.nmant))
  small = lax.bitcast_convert_type(jnp.clip(q, 0, 2**info.nmant).astype(itype), unit.dtype)
  return jnp.where(big < info.tiny, small, big)


def _exponent_of(bits, dtype):
  """The frexp exponent of the non-negative float with bit pattern ``bits`` (0 for zero)."""
  info, _ = _layout(dtype)
  value = lax.bitcast_convert_type(bits, dtype)
  subnormal, q, _ = _subnormal_parts(value)
  normal_e = (bits >> info.nmant).astype(jnp.int32) + info.minexp
  sub_e = jnp.frexp(q.astype(dtype))[1] + info.minexp - info.nmant
  return jnp.where(subnormal, sub_e, jnp.where(bits == 0, 0, normal_e)).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------


def _rows(values, nb, op, shape, dtype):
  """Row sums (``op=jnp.sum``) or maxima (``jnp.max``) over several leaves."""
  out = jnp.zeros(shape, dtype)
  for v in values:
    axes = tuple(range(nb, v.ndim))
    if op is jnp.sum:
      out = out + jnp.sum(v, axis=axes)
    else:
      out = jnp.maximum(out, jnp.max(v, axis=axes, initial=0))
  return out


def _bcast(row, like, nb):
  return jnp.reshape(row, row.shape + (1,) * (like.ndim - nb))


def norms(tree: Any, p: float, nb: int = 1, mask: Any = None) -> Norms:
  """The p-norm of every row of ``tree`` (``nb`` leading batch axes; 0 for one norm).

  Args:
    tree: a pytree of arrays sharing their first ``nb`` axes.
    p: ``>= 1`` or ``math.inf``, already canonical (``_checks.canonical_p``).
    nb: leading batch axes: 1 for per-example norms, 0 for a global norm.
    mask: optional boolean row mask; masked-out rows never trigger the slow path.

  Returns:
    :class:`Norms` in the accumulation dtype (at least float32), of the batch
    shape. Its derivative is the norm's own, ``sign(v)·(|v|/‖v‖)^(p−1)`` (0 at a row
    of zeros), so gradients are finite wherever the entries are.
  """
  leaves = tuple(jnp.asarray(v) for v in jax.tree.leaves(tree))
  exponent, unit = _rows_norm(p, nb, mask, *leaves)
  return Norms(exponent, unit)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _rows_norm(p, nb, mask, *leaves):
  acc = accumulation_dtype(leaves)
  shape = leaves[0].shape[:nb] if leaves else ()
  info, itype = _layout(acc)

  # Built where they are used: values a `lax.cond` branch closes over become its
  # operands, and XLA materialises them (two full copies of the gradients) even when
  # the branch is not taken.
  def magnitudes():
    return [jnp.abs(v.astype(acc)) for v in leaves]

  def bit_patterns(mags):
    return [lax.bitcast_convert_type(m, itype) for m in mags]

  if p == math.inf:
    # A maximum never overflows. Bit patterns order like the magnitudes and keep the
    # subnormal entries that a float max (and any arithmetic on them) would flush.
    top_bits = _rows(bit_patterns(magnitudes()), nb, jnp.max, shape, itype)
    top = lax.bitcast_convert_type(top_bits, acc)
    subnormal = _subnormal_parts(top)[0]
    exponent = jnp.where(subnormal, _exponent_of(top_bits, acc), 0)
    return _moderate(exponent, jnp.where(subnormal, scale_exact(top, -exponent), top))
  total = _rows([power(m, p) for m in magnitudes()], nb, jnp.sum, shape, acc)
  n = sum(math.prod(v.shape[nb:]) for v in leaves)
  # Terms below the smallest normal are flushed to zero; past this total, all of
  # them together (fewer than n) change it by less than half an ulp.
  threshold = float(info.tiny) * max(n, 1) * 2.0 ** (info.nmant + 1)
  # NaN entries make a NaN total: non-finite either way.
  trusted = jnp.isnan(total) | ((total >= threshold) & (total < jnp.inf))
  if mask is not None:
    trusted = trusted | ~mask
  # zeros_like: under an explicit mesh the exponent must be sharded like the total.
  plain = (jnp.zeros_like(total, jnp.int32), root(total, p))

  def scaled():
    mags = magnitudes()
    top_bits = _rows(bit_patterns(mags), nb, jnp.max, shape, itype)
    finite = top_bits < lax.bitcast_convert_type(jnp.asarray(jnp.inf, acc), itype)
    exponent = jnp.where(finite, _exponent_of(jnp.clip(top_bits, 0, None), acc), 0)
    # Each |v_j| · 2^-exponent lies in [0, 1), the largest one in [0.5, 1).
    ys = [scale_exact(m, -_bcast(exponent, m, nb)) for m in mags]
    top = _rows(ys, nb, jnp.max, shape, acc)
    safe = jnp.where(top > 0, top, 1)
    inner = _rows([power(y / _bcast(safe, y, nb), p) for y in ys], nb, jnp.sum, shape, acc)
    unit = jnp.where(finite, top * root(inner, p), jnp.where(jnp.isnan(total), jnp.nan, jnp.inf))
    return jnp.where(trusted, 0, exponent), jnp.where(trusted, plain[1], unit)

  return _moderate(*lax.cond(jnp.all(trusted), lambda: plain, scaled))


# Units are kept within [2^-64, 2^64]: there C/unit and v/unit stay normal for any
# reasonable C, even where XLA turns a division into a multiplication by the
# reciprocal (1/3e38 is subnormal, and flushed to zero).
_MODERATE = 2.0**64


def _moderate(exponent, unit):
  """Moves an extreme unit's binary exponent into ``exponent`` (exactly)."""
  mantissa, shift = jnp.frexp(unit)
  extreme = jnp.isfinite(unit) & ((unit > _MODERATE) | ((unit > 0) & (unit < 1 / _MODERATE)))
  return jnp.where(extreme, exponent + shift, exponent), jnp.where(extreme, mantissa, unit)


@_rows_norm.defjvp
def _rows_norm_jvp(p, nb, primals, tangents):
  # d‖v‖ = Σ_j sign(v_j)·(|v_j|/‖v‖)^(p−1)·dv_j, with |v_j|/‖v‖ = (|v_j|·2^-e)/unit <= 1.
  mask, *leaves = primals
  _, *dleaves = tangents
  exponent, unit = _rows_norm(p, nb, mask, *leaves)
  acc = unit.dtype
  safe = jnp.where(unit > 0, unit, 1)
  dunit = jnp.zeros(unit.shape, acc)
  if p == math.inf:
    count = jnp.zeros(unit.shape, acc)
    for v in leaves:
      y = scale_exact(jnp.abs(v.astype(acc)), -_bcast(exponent, v, nb))
      count = count + _rows([(y == _bcast(unit, y, nb)).astype(acc)], nb, jnp.sum, unit.shape, acc)
  for v, dv in zip(leaves, dleaves):
    if isinstance(dv, jax.custom_derivatives.SymbolicZero) or dv.dtype == jax.dtypes.float0:
      continue
    v = v.astype(acc)
    e = -_bcast(exponent, v, nb)
    y = scale_exact(jnp.abs(v), e)
    if p == math.inf:
      weight = (y == _bcast(unit, y, nb)).astype(acc) / _bcast(jnp.maximum(count, 1), y, nb)
    else:
      weight = power(y / _bcast(safe, y, nb), p - 1) if p != 1 else jnp.ones_like(y)
    terms = jnp.sign(v) * weight * times_pow2(dv.astype(acc), e)
    dunit = dunit + _rows([terms], nb, jnp.sum, unit.shape, acc)
  dunit = jnp.where(unit > 0, dunit, 0)
  return (exponent, unit), (np.zeros(exponent.shape, jax.dtypes.float0), dunit)


def global_norm(tree: Any, p: float) -> jax.Array:
  """The p-norm of a whole pytree as one vector, with finite gradients everywhere.

  ``inf`` only for non-finite entries or a norm beyond the dtype's range.
  """
  return norms(tree, p, nb=0).value


def combine(parts: list[Norms], p: float) -> Norms:
  """The norms of rows that concatenate rows whose norms are ``parts``."""
  if len(parts) == 1:
    return parts[0]
  exponent = parts[0].exponent
  for part in parts[1:]:
    exponent = jnp.maximum(exponent, part.exponent)
  units = [_ldexp(part.unit, part.exponent - exponent) for part in parts]
  if p == math.inf:
    unit = units[0]
    for u in units[1:]:
      unit = jnp.maximum(unit, u)
    return Norms(exponent, unit)
  top = units[0]
  for u in units[1:]:
    top = jnp.maximum(top, u)
  safe = jnp.where(top > 0, top, 1)
  inner = sum(power(u / safe, p) for u in units)
  unit = jnp.where(inner > 0, top * root(jnp.where(inner > 0, inner, 1), p), 0)
  return Norms(exponent, jnp.where(jnp.isnan(top), jnp.nan, unit))


# ---------------------------------------------------------------------------
# Clip weights and weighted sums
# ---------------------------------------------------------------------------


def clip_weights(
  n: Norms, clip_norm: Any, *, scaling: str = "clip", stability: Any = 0.01, mask: Any = None
) -> Weights:
  """Per-example factors: ``min(1, C/‖v‖)``, ``C/(‖v‖ + stability)`` or ``C/‖v‖``.

  ``"clip"`` (Abadi et al. 2016) leaves examples within ``C`` unchanged;
  ``"automatic"`` (Bu et al. 2023) scales every example by ``C/(‖v‖ + γ)``;
  ``"normalize"`` scales every example to norm ``C`` (zero examples stay zero). Each
  bounds every example's contribution by ``C``. Examples with NaN or inf entries, and
  those where ``mask`` is False, get weight zero and ``keep = False``.
  """
  dtype = n.unit.dtype
  c = jnp.asarray(clip_norm, dtype)
  norm = n.value
  finite = n.finite
  # Where the norm leaves the normal range, factor and example are scaled by 2^-exponent.
  # Rows with a nonzero exponent (norms beyond 2^±64) are scaled by 2^-exponent and
  # get the factor in scaled form, so that neither the factor nor the example leaves
  # the float range.
  extreme = finite & (n.exponent != 0)
  if scaling == "clip":
    over = norm > c
    scaled = extreme & over
    denominator = jnp.where(scaled, n.unit, norm)
    factor = jnp.where(over, c / jnp.where(over, denominator, 1), 1)
  elif scaling == "automatic":
    gamma = jnp.asarray(stability, dtype)
    # A tiny norm is dominated by γ: only large norms need the scaled form,
    # C / (unit + γ·2^-exponent), applied to v·2^-exponent.
    scaled = extreme & (n.exponent > 0)
    gamma_scaled = scale_exact(jnp.full_like(n.unit, gamma), -n.exponent)
    factor = c / jnp.where(scaled, n.unit + gamma_scaled, norm + gamma)
  else:  # normalize
    positive = n.unit > 0
    scaled = extreme & positive
    denominator = jnp.where(scaled, n.unit, jnp.where(positive, norm, 1))
    factor = jnp.where(positive, c / denominator, 0)
  keep = finite if mask is None else finite & mask
  return Weights(
    factor=jnp.where(keep, factor, 0).astype(dtype),
    shift=jnp.where(keep & scaled, n.exponent, 0).astype(jnp.int32),
    keep=keep,
  )


def reported(n: Norms, mask: Any = None) -> jax.Array:
  """The norms to hand back: ``inf`` for non-finite examples, 0 for masked-out ones."""
  out = jnp.where(n.finite, n.value, jnp.inf)
  return out if mask is None else jnp.where(mask, out, 0)


def _per_example(v, like):
  return jnp.reshape(v, v.shape + (1,) * (like.ndim - v.ndim))


def _shifted(leaf, w: Weights):
  """Every example of ``leaf`` times ``2^-shift``, zero where not kept (in ``leaf``'s dtype
  promoted to the weights' dtype)."""
  v = leaf.astype(jnp.promote_types(leaf.dtype, w.factor.dtype))
  v = scale_exact(v, -_per_example(w.shift, v))
  return jnp.where(_per_example(w.keep, v), v, jnp.zeros((), v.dtype))


def scale_examples(leaf: jax.Array, w: Weights) -> jax.Array:
  """``factor_i · v_i · 2^-shift_i`` for every example of one leaf, zero where not kept.

  Examples with factor 1 are returned bit for bit (arithmetic would flush their
  subnormal entries to zero).
  """
  scaled = (_shifted(leaf, w) * _per_example(w.factor, leaf)).astype(leaf.dtype)
  unchanged = _per_example(w.keep & (w.factor == 1) & (w.shift == 0), leaf)
  return jnp.where(unchanged, leaf, scaled)


def _sum_sharding(leaf):
  """The sharding of a sum over ``leaf``'s batch axis, for explicit meshes.

  Contracting an explicitly sharded batch axis is ambiguous to JAX's sharding rules,
  so the output keeps the remaining axes' specs; elsewhere XLA decides.
  """
  sharding = jax.typeof(leaf).sharding
  if jax.sharding.AxisType.Explicit not in sharding.mesh.axis_types:
    return None
  # A NamedSharding, not a bare spec: it also works without ``jax.set_mesh``.
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))


def _round_down(factor, dtype):
  """``factor`` in ``dtype``, rounded toward zero so that no example's weight grows."""
  low = factor.astype(dtype)
  return jnp.where(low.astype(factor.dtype) > factor, jnp.nextafter(low, jnp.zeros_like(low)), low)


def weighted_sum(tree: Any, w: Weights) -> Any:
  """``Σ_i factor_i · v_i · 2^-shift_i`` over the leading batch axis of every leaf.

  Each leaf is one matrix-vector product (XLA:CPU's reduction over a leading axis is
  an order of magnitude slower), with the factors rounded toward zero to the leaf's
  dtype and the sum accumulated and returned in the weights' (at least float32): a
  sum rounded to bfloat16 before the noise could move by more than one example's
  clip norm when one example changes. A zero weight does not silence a NaN
  (0 · NaN = NaN), so examples that are not kept are masked out first; that costs a
  pass over the gradients and runs (inside ``lax.cond``) only when some example needs
  it.
  """

  def dot(tree):
    return jax.tree.map(
      lambda g: jnp.tensordot(
        _round_down(w.factor, g.dtype),
        g,
        axes=1,
        preferred_element_type=jnp.promote_types(g.dtype, w.factor.dtype),
        out_sharding=_sum_sharding(g),
      ),
      tree,
    )

  def masked_dot(tree):
    return dot(jax.tree.map(lambda g: _shifted(g, w).astype(g.dtype), tree))

  plain = jnp.all(w.keep) & jnp.all(w.shift == 0)
  return lax.cond(plain, dot, masked_dot, tree)


def groups(clip_norm: Any, tree: Any, name: str = "clip_norm") -> tuple[Any, list, list]:
  """Splits ``tree`` into one subtree per leaf of ``clip_norm`` (a scalar or a pytree prefix).

  Returns ``(prefix treedef, clip norms, subtrees)``; ``prefix.unflatten(per_group)``
  reassembles per-group results (subtrees included) into the full structure.
  """
  prefix = jax.tree.structure(clip_norm)
  if prefix.num_leaves == 0:
    raise ValueError(f"{name} must be a scalar or a pytree prefix of the gradients.")
  try:
    subtrees = prefix.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{name} must be a scalar or a pytree prefix of the gradients' structure "
      f"{jax.tree.structure(tree)}; got structure {prefix}."
    ) from e
  for c in jax.tree.leaves(clip_norm):
    if np.ndim(c):
      raise ValueError(f"every {name} must be a scalar, got shape {np.shape(c)}.")
  return prefix, jax.tree.leaves(clip_norm), subtrees
