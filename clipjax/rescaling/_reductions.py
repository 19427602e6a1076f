"""Row reductions for the solvers: sums and maxima over all but the leading batch axes.

``nb`` is the number of leading batch axes (0 or 1): the same code serves the unbatched
solve and the explicitly batched one that ``vmap`` runs. On one device a row is reduced
in two stages, a variadic ``lax.reduce`` of chunks fused with the elementwise work that
makes its terms, then one library reduction of the chunks (see ``reduce_rows``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def row_sum(v, nb):
  return jnp.sum(v, axis=tuple(range(nb, v.ndim)))


def row_max(v, nb):
  return jnp.max(v, axis=tuple(range(nb, v.ndim)), initial=0.0)


def per_row(t, ndim, nb):
  """Per-row scalars ``t`` (batch shape) against a leaf of rank ``ndim``."""
  return jnp.reshape(t, jnp.shape(t) + (1,) * (ndim - nb))


# Sums and maxima over a row are taken in two stages: a variadic reduction of
# every ``config.chunk`` consecutive elements, fused with the elementwise work
# that makes them, then one library reduction of the partial results. XLA:CPU
# hands a plain sum or max to YNNPACK, which reads its operand from memory: the
# elementwise terms would be written out first. The variadic first stage is
# fused instead, so a pass reads its inputs once and writes an eighth of their
# size. Below ``config.chunked_min_elements`` in all the extra operations cost
# more than the writes they save, which stay in cache (benchmarks/rescale_bench.py
# times both against a plain sum).


def reduce_rows(op, operands, nb, config):
  """Row reductions (``jnp.sum`` or ``jnp.max``) of several operands, in one pass.

  The values are non-negative, so the max of an empty row is 0. Sums keep
  float32 accurate: ``config.chunk`` terms at a time, then a blocked library sum (a single
  sequential loop would lose 2e-3 relative over 4M terms). On inputs that may be
  sharded each reduction stays a plain one, which the partitioner splits into a local
  reduction and an all-reduce.
  """
  shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in operands))
  operands = [jnp.broadcast_to(v, shape) for v in operands]
  if config.sharded or not config.chunked:
    return _plain_reduce(op, nb, *operands)
  chunk = config.chunk if math.prod(shape) >= config.chunked_min_elements else 0
  if chunk and math.prod(shape[nb:]) >= chunk:
    config.saw("chunked reduction")
  return _chunked_reduce(op, nb, chunk, *operands)


def _plain_reduce(op, nb, *operands):
  axes = tuple(range(nb, jnp.ndim(operands[0])))
  kw = {"initial": 0.0} if op is jnp.max else {}
  return tuple(op(v, axis=axes, **kw) for v in operands)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _chunked_reduce(op, nb, chunk, *operands):
  """``_plain_reduce`` in two stages of ``chunk`` elements (none if 0), on one device."""
  shape = jnp.shape(operands[0])
  rows = [jnp.reshape(v, shape[:nb] + (-1,)) for v in operands]
  q = rows[0].shape[-1] // chunk if chunk else 0
  if q:
    combine = lax.max if op is jnp.max else lax.add
    heads = [jnp.reshape(v[..., : q * chunk], shape[:nb] + (q, chunk)) for v in rows]
    # A lone operand is reduced twice: XLA:CPU would hand a single-operand
    # reduction to YNNPACK, unfused.
    heads = heads * (2 if len(heads) == 1 else 1)
    zeros = [jnp.zeros((), v.dtype) for v in heads]
    parts = lax.reduce(heads, zeros, lambda u, w: [combine(a, b) for a, b in zip(u, w)], (nb + 1,))
    rows = [jnp.concatenate([part, v[..., q * chunk :]], axis=-1) for part, v in zip(parts, rows)]
  if op is jnp.max:
    return tuple(jnp.max(v, axis=-1, initial=0.0) for v in rows)
  # Stacked, the sums are one library reduction.
  totals = jnp.sum(jnp.stack(rows, axis=nb), axis=-1)
  return tuple(totals[..., i] for i in range(len(rows)))


@_chunked_reduce.defjvp
def _chunked_reduce_jvp(op, nb, chunk, primals, tangents):
  # The variadic reduce has no derivative rule; the plain reductions give the same one.
  _, t = jax.jvp(functools.partial(_plain_reduce, op, nb), primals, tangents)
  return _chunked_reduce(op, nb, chunk, *primals), t
