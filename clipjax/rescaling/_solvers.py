"""The solvers of ``rescale``, registered once: ``SOLVERS`` maps each method to its solve.

Each solver takes the box, ``eps``, the first pass's :class:`~clipjax.rescaling._breakpoints.Scale`,
``p``, the number of batch axes and the :class:`~clipjax.rescaling._rescale_config.RescaleConfig`
(static), and returns ``eta`` (``inf`` where nothing is left
free: the caller takes the last breakpoint there). ``rescale``'s ``method`` names are
``"auto"`` and the keys of ``SOLVERS``.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax

from clipjax._powers import power
from clipjax.rescaling._breakpoints import (
  TINY,
  Box,
  first_pass,
  free_max,
  last_breakpoint,
  leaves,
  piece_root,
  stats,
)
from clipjax.rescaling._reductions import per_row, reduce_rows, row_max

SOLVERS = {}


def _register(name):
  def add(solve):
    SOLVERS[name] = solve
    return solve

  return add


def _sample(box: Box, nb, stride) -> Box:
  """Every ``stride``-th coordinate of each leaf."""
  parts = [[], [], [], []]
  for leaf in zip(*box):
    shape = jnp.shape(leaf[0])
    for part, v in zip(parts, leaf):
      if jnp.ndim(v):  # scalar bounds apply to the sample as they are
        v = jnp.reshape(jnp.broadcast_to(v, shape), shape[:nb] + (-1,))[..., ::stride]
      part.append(v)
  return Box(*parts)


def sample_probe(box: Box, eps, p, nb, config):
  """Where the first pass takes a tangent (``(eta_0, m_0)``), or None on short rows.

  ``eta_0`` solves the problem restricted to a strided sample, with ``eps``
  scaled by the sampled fraction to the power ``1/p``: it lies near the full
  solution. ``m_0`` is the sample's largest ``|delta_i|``, the scale for the free
  sum at ``eta_0`` (the full row's is not known until the pass ends).
  """
  stride = config.sample_stride
  sizes = [math.prod(jnp.shape(x)[nb:]) for x in box.xs]
  row, kept = sum(sizes), sum(-(-n // stride) for n in sizes)
  # Many leaves shorter than the stride would make the sample as long as the row;
  # on a sharded row the strided slice would move data.
  if row < config.sample_min_row or kept > row // 2 or config.sharded:
    return None
  config.saw("sampled start")
  sample = _sample(box, nb, stride)
  eta0, _ = eta_finite(sample, eps * (kept / row) ** (1 / p), p, "newton", nb, config)
  m0 = functools.reduce(jnp.maximum, [row_max(jnp.abs(d), nb) for d in sample.ds])
  return jnp.where(jnp.isfinite(eta0), eta0, 0), jnp.where(m0 > 0, m0, 1)


@_register("newton")
def newton(box, eps, sc, p, nb, config):
  """Active-set Newton from the left; exact when the saturated set stops growing.

  ``F(v)`` is concave and piecewise linear, so each step lands on the root of the
  current piece's extension, at or left of the solution; the iterates rise
  monotonically. A step that does not rise means the saturated set at ``eta``
  gives back ``eta`` itself: ``eta`` solves its own piece, exactly. The free
  sum is scaled by ``m`` (see ``first_pass``); it cannot overflow, as the free
  set only shrinks, and when the scale has become too coarse (heavy tails,
  large p: the sum underflows), an extra pass sets ``m = max_{not S} |delta_i|``
  and the step is retried.
  """

  def cond(carry):
    k, eta, prev, _ = carry
    return (k < config.max_newton_passes) & jnp.any(eta > prev)

  def body(carry):
    k, eta, _, m = carry
    # Tied to the iterate, the room and |delta| are recomputed in each pass: hoisted
    # out of the loop, XLA would write them out once and read them back on every
    # pass, which costs more than a whole pass over x and delta (benchmarks/).
    box_k, _ = lax.optimization_barrier((box, eta))
    sb, sa = stats(box_k, eta, eps, m, p, nb, config)
    coarse = sa < TINY
    m_free = lax.cond(jnp.any(coarse), lambda: free_max(box_k, eta, nb, config), lambda: m)
    rescaled = coarse & (m_free > 0)  # else nothing is free and sa == 0 is right
    step = jnp.maximum(piece_root(sb, sa, eps, m, p), eta)
    return (
      k + 1,
      jnp.where(rescaled, eta, step),
      jnp.where(rescaled, -1, eta),
      jnp.where(rescaled, m_free, m),
    )

  # Rows past the largest norm start converged: their answer is the last breakpoint.
  init = (0, sc.start, jnp.where(sc.beyond, sc.start, -1), sc.m)
  _, eta, prev, m = lax.while_loop(cond, body, init)
  stuck = eta > prev

  def fallback():
    config.saw_at_run_time("newton fallback")
    return jnp.where(stuck, bisect(box, eps, sc, p, nb, config, lo=eta), eta)

  return lax.cond(jnp.any(stuck), fallback, lambda: eta)


@_register("bisect")
def bisect(box, eps, sc, p, nb, config, lo=None):
  """Bisection over the bit patterns of eta, then one exact Newton step.

  Positive floats order like their bit patterns, so at most 31 (float32) or 63
  (float64) halvings leave ``lo`` and ``hi`` adjacent: no breakpoint lies between
  them, and the Newton step from ``lo`` solves the piece exactly. The comparison
  uses ``Σ (min(eta·|delta_i|, s_i)/eps)^p``, which needs no scale: terms that
  overflow are far past the target and terms that underflow do not matter.
  """
  dtype = eps.dtype
  itype = jnp.int32 if dtype == jnp.float32 else jnp.int64
  lo = jnp.zeros_like(eps) if lo is None else lo
  as_int = lambda v: lax.bitcast_convert_type(v, itype)
  as_float = lambda i: lax.bitcast_convert_type(i, dtype)

  def below(eta):
    total = 0.0
    for s, ad in leaves(lax.optimization_barrier((box, eta))[0]):  # see newton
      moved = jnp.minimum(per_row(eta, s.ndim, nb) * ad, s) * per_row(1 / eps, s.ndim, nb)
      total = total + reduce_rows(jnp.sum, (power(moved, p),), nb, config)[0]
    return total < 1

  def body(carry):
    lo_i, hi_i = carry
    mid = lo_i + (hi_i - lo_i) // 2
    go_right = below(as_float(mid))
    return jnp.where(go_right, mid, lo_i), jnp.where(go_right, hi_i, mid)

  hi = jnp.maximum(last_breakpoint(box, nb), lo)
  lo_i, _ = lax.while_loop(lambda c: jnp.any(c[1] - c[0] > 1), body, (as_int(lo), as_int(hi)))
  lo = as_float(lo_i)
  m_free = free_max(box, lo, nb, config)
  m_free = jnp.where(m_free > 0, m_free, 1)
  sb, sa = stats(box, lo, eps, m_free, p, nb, config)
  return piece_root(sb, sa, eps, m_free, p)


@_register("sort")
def sort(box, eps, sc, p, nb, config):
  """The paper's algorithm: sort the breakpoints, cumulative sums, one linear solve.

  The sort needs the whole vector, so a pytree's leaves are concatenated here (and
  only here). The free sums over each suffix are accumulated as (max, sum scaled
  by that max) pairs, an associative scan that neither overflows nor underflows.
  """
  rows = lambda v: jnp.reshape(v, jnp.shape(v)[:nb] + (-1,))
  rs, ads, bs = [], [], []
  for s, ad in leaves(box):
    moving = ad > 0
    rs.append(rows(jnp.where(moving, s / jnp.where(moving, ad, 1), jnp.inf)))
    ads.append(rows(ad))
    bs.append(rows(power(jnp.where(moving, s, 0) / per_row(eps, s.ndim, nb), p)))
  r, ad, b = (jnp.concatenate(v, axis=-1) for v in (rs, ads, bs))
  r, ad, b = lax.sort((r, ad, b), dimension=r.ndim - 1, num_keys=1)

  def merge(u, v):
    top = jnp.maximum(u[0], v[0])
    safe = jnp.where(top > 0, top, 1)
    return top, u[1] * power(u[0] / safe, p) + v[1] * power(v[0] / safe, p)

  top, total = lax.associative_scan(
    merge, (ad, (ad > 0).astype(ad.dtype)), reverse=True, axis=ad.ndim - 1
  )
  shift = lambda v: jnp.concatenate([v[..., 1:], jnp.zeros_like(v[..., :1])], axis=-1)
  top_after, total_after = shift(top), shift(total)  # over j > k
  saturated_b = jnp.cumsum(b, axis=-1)
  e = eps[..., None]
  free = jnp.where(total_after > 0, power(r * top_after / e, p) * total_after, 0)
  # The first breakpoint at or past the solution; the last one if rounding in the
  # cumulative sums leaves eps (at the maximum) just out of reach.
  reached = (saturated_b + free >= 1).at[..., -1].set(True)
  k = jnp.argmax(reached, axis=-1)
  take = lambda v, i: jnp.take_along_axis(v, i[..., None], axis=-1)[..., 0]
  before = jnp.where(k > 0, take(saturated_b, jnp.maximum(k - 1, 0)), 0)
  m = take(top, k)
  return piece_root(before, take(total, k), eps, jnp.where(m > 0, m, 1), p)


def resolve_method(method: str, box: Box, config) -> str:
  """``method``, or for ``"auto"`` the one ``config`` picks for this row length."""
  if method == "auto":
    row = sum(math.prod(jnp.shape(x)) for x in box.xs)
    # The sort's reshape of a sharded row to one array would need an explicit sharding.
    sort = not config.sharded and row <= config.sort_max_row
    method = "sort" if sort else "newton"
  return method


def eta_finite(box: Box, eps, p, method, nb, config):
  """Returns (eta, whether eps is at or past the largest reachable norm)."""
  safe_eps = jnp.where(eps > 0, eps, 1)
  probe = sample_probe(box, safe_eps, p, nb, config) if method == "newton" else None
  sc = first_pass(box, safe_eps, p, nb, config, probe)
  safe = sc._replace(m=jnp.where(sc.m > 0, sc.m, 1))
  config.saw(method)
  eta = jnp.maximum(SOLVERS[method](box, safe_eps, safe, p, nb, config), 0)
  # At or past the largest norm (the solvers answer inf where nothing is left free),
  # eta is the last breakpoint; that costs one more pass, so only when needed.
  last = sc.beyond | ~jnp.isfinite(eta)
  eta = jnp.where(
    last,
    lax.cond(jnp.any(last), lambda: last_breakpoint(box, nb), lambda: jnp.zeros_like(eta)),
    eta,
  )
  eta = jnp.where((eps > 0) & (sc.m > 0), eta, 0)
  valid = sc.valid & jnp.isfinite(eps) & (eps >= 0)
  return jnp.where(valid, eta, jnp.nan), sc.beyond
