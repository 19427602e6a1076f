"""The breakpoint formulation that every solver of ``rescale`` shares.

Coordinate ``i`` has room ``s_i`` in the direction of ``delta_i`` and moves by
``min(eta·|delta_i|, s_i)``. It saturates at the breakpoint ``r_i = s_i / |delta_i|``.
With ``S = {i : r_i <= eta}`` the saturated set, the p-th power of the norm is
``Σ_S s_i^p + eta^p Σ_{not S} |delta_i|^p``: piecewise linear, non-decreasing and
concave in ``v = eta^p``. All solvers share one scaled formulation of it: with
``a_i = (|delta_i|/m)^p`` (``m = 1`` where the unscaled free sum is in range,
else at least the largest free ``|delta_i|``) and ``b_i = (s_i/eps)^p``, solve
``Σ_S b_i + (eta·m/eps)^p Σ_{not S} a_i = 1``. The summed ``b_i`` are at most
one where it matters (``b_i <= 1`` on ``S`` below the solution), and ``m`` is
refreshed whenever the free sum underflows, so float32 neither overflows nor loses
the dominant terms for large ``p`` or heavy tails; saturation itself is tested
without powers, as ``s_i <= eta·|delta_i|``.

Given the final piece, ``eta = ((eps^p − Σ_S s_i^p) / Σ_{not S} |delta_i|^p)^(1/p)``
in closed form (:func:`closed_form`): the solvers run without gradients and this is
what is differentiated. For ``p = inf``, ``eta`` is itself a closed form (:func:`eta_inf`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from clipjax._powers import power, root
from clipjax.rescaling._reductions import per_row, reduce_rows, row_max, row_sum


class Box(NamedTuple):
  """Leaves of ``x``, ``delta`` and the bounds, in the compute dtype."""

  xs: list[jax.Array]
  ds: list[jax.Array]
  los: list[jax.Array]
  his: list[jax.Array]


def room(x, d, lo, hi):
  return jnp.where(d >= 0, hi - x, x - lo)


def outside(x, d, lo, hi):
  """1 where ``x`` or ``delta`` is not finite or ``x`` lies outside the box, else 0."""
  ok = jnp.isfinite(x) & jnp.isfinite(d) & (lo <= x) & (x <= hi)
  return jnp.where(ok, 0, 1).astype(x.dtype)


def leaves(box: Box):
  for x, d, lo, hi in zip(*box):
    yield room(x, d, lo, hi), jnp.abs(d)


# The free sum is trusted when it is at least this: its largest term is then at
# least TINY / n, so the terms lost to underflow (each < 2^-126) cost a relative
# 2^-42 at most, for n up to 2^24, in float32 too.
TINY = 2.0**-60


class Scale(NamedTuple):
  """Per-row facts from the first pass over the data."""

  m: jax.Array  # a scale for the free sums: 1, or max |delta| where those need one
  beyond: jax.Array  # eps >= the largest reachable norm
  valid: jax.Array  # x and delta are finite and x lies inside the box
  start: jax.Array  # a first Newton iterate at or left of the solution (0 if none is trusted)


def first_pass(box: Box, eps, p, nb, config, probe=None) -> Scale:
  """One pass: validity, whether eps is reachable, a scale ``m`` and a first step.

  At ``eta = 0`` only coordinates without room are saturated (they contribute
  nothing), so the first Newton step is ``eps / (Σ_{s_i > 0} |delta_i|^p)^{1/p}``.
  Its sum is taken unscaled. Where it is finite and at least ``TINY`` the terms
  lost to underflow do not matter, and neither can any later free sum overflow,
  so the scale is ``m = 1``; elsewhere (nothing free, or sums out of range) a
  second pass takes ``m = max_{s_i > 0} |delta_i|`` and the step is 0.
  With a ``probe`` ``(eta_0, m_0)`` (see ``sample_probe``) the same pass also
  takes the sums at ``eta_0``, with the free terms scaled by ``m_0``; the root of
  the tangent of ``F(v)`` there lies at or left of the solution, because ``F`` is
  concave, and the first step is the larger of the two.
  """
  total = free = bad = sb = sa = 0.0
  for (x, d, lo, hi), (s, ad) in zip(zip(*box), leaves(box)):
    parts = [
      outside(x, d, lo, hi),
      jnp.where(ad > 0, power(s * per_row(1 / eps, s.ndim, nb), p), 0),
      jnp.where(s > 0, power(ad, p), 0),
    ]
    if probe is not None:
      parts += terms(s, ad, probe[0], eps, probe[1], p, nb)[:2]
    out, b, a, *at_probe = reduce_rows(jnp.sum, parts, nb, config)
    bad, total, free = bad + out, total + b, free + a
    if probe is not None:
      sb, sa = sb + at_probe[0], sa + at_probe[1]
  trusted = (free >= TINY) & jnp.isfinite(free)
  start = jnp.where(trusted, eps / root(jnp.where(trusted, free, 1), p), 0)
  m = lax.cond(
    jnp.all(trusted),
    lambda: jnp.ones_like(free),
    lambda: free_max(box, jnp.zeros_like(free), nb, config),
  )
  m = jnp.where(trusted, 1, m)
  if probe is not None:
    tangent = piece_root(sb, sa, eps, probe[1], p)
    # An m_0 far below the row's largest |delta_i| can overflow the free sum.
    trusted = (sa >= TINY) & jnp.isfinite(sa) & jnp.isfinite(tangent)
    start = jnp.where(trusted, jnp.maximum(tangent, start), start)
  return Scale(m, total <= 1, bad == 0, start)


def terms(s, ad, eta, eps, m, p, nb):
  """Per-coordinate ``b_i`` (saturated), ``a_i`` (free) and free ``|delta_i|`` at ``eta``."""
  sat = s <= per_row(eta, s.ndim, nb) * ad
  # Zero the masked-out operand before the power, so its gradient is finite too.
  free = jnp.where(sat, 0, ad)
  b = power(jnp.where(sat, s, 0) * per_row(1 / eps, s.ndim, nb), p)
  a = power(free * per_row(1 / m, s.ndim, nb), p)
  return b, a, free


def stats(box: Box, eta, eps, m, p, nb, config):
  """One pass: ``Σ_S b_i`` and ``Σ_{not S} a_i``.

  ``S = {i : s_i <= eta·|delta_i|}`` and ``a_i = (|delta_i| / m)^p``. Only sums:
  a new scale is needed only when the free sum underflows (see ``free_max``).
  """
  sb = sa = 0.0
  for s, ad in leaves(box):
    b, a = reduce_rows(jnp.sum, terms(s, ad, eta, eps, m, p, nb)[:2], nb, config)
    sb, sa = sb + b, sa + a
  return sb, sa


def free_max(box: Box, eta, nb, config):
  """``max_{not S} |delta_i|``: a scale for the free sum that cannot underflow."""
  top = 0.0
  for s, ad in leaves(box):
    free = jnp.where(s <= per_row(eta, s.ndim, nb) * ad, 0, ad)
    top = jnp.maximum(top, reduce_rows(jnp.max, (free,), nb, config)[0])
  return top


def piece_root(sb, sa, eps, m, p):
  """Root of the current piece's linear extension, ``(eta·m/eps)^p·sa = 1 − sb``.

  With nothing free (``sa == 0``) every moving coordinate is saturated: ``inf``,
  which the caller clips to the last breakpoint.
  """
  safe = jnp.where(sa > 0, sa, 1)
  return jnp.where(sa > 0, eps / m * root(jnp.maximum(1 - sb, 0) / safe, p), jnp.inf)


def last_breakpoint(box: Box, nb):
  r = 0.0
  for s, ad in leaves(box):
    moving = ad > 0
    r = jnp.maximum(r, row_max(jnp.where(moving, s / jnp.where(moving, ad, 1), 0), nb))
  return r


def closed_form(box: Box, eps, p, nb, eta_star, beyond, config):
  """eta as a differentiable function of the data, with the final piece held fixed."""
  safe_eps = jnp.where(eps > 0, eps, 1)
  # eta does not depend on the scale m; holding it fixed keeps its max out of the tangent.
  m = lax.stop_gradient(free_max(box, eta_star, nb, config))
  m = jnp.where(m > 0, m, 1)
  sb = sa = 0.0
  for s, ad in leaves(box):
    b, a, _ = terms(s, ad, eta_star, safe_eps, m, p, nb)
    sb, sa = sb + row_sum(b, nb), sa + row_sum(a, nb)
  # Past the solution every moving coordinate is saturated: eta is the last breakpoint.
  eta = jnp.where(beyond | (sa <= 0), last_breakpoint(box, nb), piece_root(sb, sa, safe_eps, m, p))
  return jnp.where((eps > 0) & (lax.stop_gradient(eta_star) > 0), eta, 0)


def eta_inf(box: Box, eps, nb, config):
  """p = inf: ``eta = e / max{|delta_i| : s_i >= e}`` with ``e = min(eps, max reachable)``."""
  reach = bad = 0.0
  for (x, d, lo, hi), (s, ad) in zip(zip(*box), leaves(box)):
    r, b = reduce_rows(jnp.max, (jnp.where(ad > 0, s, 0), outside(x, d, lo, hi)), nb, config)
    reach, bad = jnp.maximum(reach, r), jnp.maximum(bad, b)
  e = jnp.minimum(eps, reach)
  speed = 0.0
  for s, ad in leaves(box):
    speed = jnp.maximum(speed, row_max(jnp.where(s >= per_row(e, s.ndim, nb), ad, 0), nb))
  eta = jnp.where(speed > 0, e / jnp.where(speed > 0, speed, 1), 0)
  return jnp.where(jnp.isfinite(eps) & (eps >= 0) & (bad == 0), eta, jnp.nan)
