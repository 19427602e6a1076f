r"""Exact Euclidean projection onto the intersection of a p-norm ball and a box.

Projected-gradient attacks need the point of
``C = {z : ‖z − c‖_p <= eps} ∩ [lower, upper]`` nearest to ``y``. Attack libraries
project onto the ball and then clip to the box: the result is feasible (clipping
only moves coordinates toward ``c``, which lies in the box) but not nearest,
because the ball projection shrinks every coordinate to make room for coordinates
that the clip then cuts back anyway; the budget they give up is wasted. The exact
projection spends it on the coordinates that can still move.

The problem ``min ½‖z − y‖²`` over ``C`` separates by coordinate once the ball
constraint carries a multiplier ``mu >= 0``; with ``u = y − c``:

* p = 2: ``z = clip(c + u / (1 + mu))``. The scale ``1 / (1 + mu)`` is the one
  that makes ``‖clip(c + t·u) − c‖_2 == eps``: exactly the clipping-aware scale
  :func:`clipjax.rescale` solves for.
* p = 1: ``z_i = c_i + sign(u_i)·min(max(|u_i| − lam, 0), room_i)`` (soft
  threshold, then clip), where ``room_i`` is the distance from ``c_i`` to the
  bound in the direction of ``u_i`` and ``lam`` solves
  ``G(lam) = Σ_i min(max(|u_i| − lam, 0), room_i) = eps``.
* p = inf: the ball is the box ``[c − eps, c + eps]``, so ``C`` is a box and the
  projection is a clip.

In every case, if ``clip(y)`` already lies in the ball it is the answer (``mu = 0``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from clipjax import _checks, _norms
from clipjax._typing import PyTree
from clipjax.rescaling._eta import prepare_box
from clipjax.rescaling.rescale import rescale

# Bracket-safeguarded Newton passes for the p = 1 threshold before the solver falls
# back to bisection; image-like data needs 2 to 12 (more for larger inputs).
_NEWTON_PASSES = 20


class _Problem(NamedTuple):
  """Leaves of ``y``, ``center`` and the bounds, in the compute dtype."""

  ys: list[jax.Array]
  cs: list[jax.Array]
  los: list[jax.Array]
  his: list[jax.Array]


def _prepare(y, center, lower, upper) -> tuple[_Problem, Any, Any]:
  """Flattens and checks structures. Returns (problem, treedef, result dtype)."""
  box, treedef, out = prepare_box(y, center, lower=lower, upper=upper, names=("y", "center"))
  return _Problem(*box), treedef, out


def _valid(problem: _Problem, eps: jax.Array) -> jax.Array:
  """The conditions ``_check_values`` raises for, as a traced flag for ``jit``."""
  ok = jnp.isfinite(eps) & (eps >= 0)
  for y, c, lo, hi in zip(*problem):
    leaf_ok = (
      jnp.isfinite(y)
      & jnp.isfinite(c)
      & jnp.isfinite(lo)
      & jnp.isfinite(hi)
      & (lo <= c)
      & (c <= hi)
    )
    ok = ok & jnp.all(leaf_ok)
  return ok


# ---------------------------------------------------------------------------
# The three projections. Each takes the problem and returns the projected leaves,
# assuming clip(y) lies outside the ball (the caller handles the inside case).
# ---------------------------------------------------------------------------


def _project_inf(problem: _Problem, eps) -> list[jax.Array]:
  # The intersection of two boxes is a box, and projecting onto a box is a clip.
  return [
    jnp.clip(y, jnp.maximum(c - eps, lo), jnp.minimum(c + eps, hi))
    for y, c, lo, hi in zip(*problem)
  ]


def _project_2(problem: _Problem, treedef, eps) -> list[jax.Array]:
  # KKT: z = clip(c + t·u) with t = 1/(1 + mu) in (0, 1] the clipping-aware scale.
  us = [y - c for y, c in zip(problem.ys, problem.cs)]
  tree = lambda leaves: jax.tree.unflatten(treedef, leaves)
  eta = rescale(
    tree(problem.cs), tree(us), eps, p=2, lower=tree(problem.los), upper=tree(problem.his)
  )
  t = jnp.minimum(eta, 1)
  return [
    jnp.clip(c + t * u, lo, hi) for c, u, lo, hi in zip(problem.cs, us, problem.los, problem.his)
  ]


class _Piece(NamedTuple):
  """``G`` near a threshold ``q``: its value, slope ``−n``, and the enclosing breakpoints."""

  g: jax.Array
  n: jax.Array  # an integer count, exact at any size
  left: jax.Array  # the largest breakpoint <= q (or -inf)
  right: jax.Array  # the smallest breakpoint > q (or +inf)


def _piece(a_leaves, r_leaves, q) -> _Piece:
  """One pass over the data. ``G`` is linear with slope ``−n`` on ``[left, right]``."""
  g, n = 0.0, 0
  left, right = -jnp.inf, jnp.inf
  for a, r in zip(a_leaves, r_leaves):
    moving = a > 0
    knee = a - r  # below this threshold the coordinate sits on its bound
    g = g + jnp.sum(jnp.clip(a - q, 0, r))
    n = n + jnp.sum(moving & (knee <= q) & (q < a), dtype=jnp.int32)
    # Coordinate i has the breakpoints knee_i <= a_i.
    below = jnp.where(a <= q, a, jnp.where(knee <= q, knee, -jnp.inf))
    above = jnp.where(knee > q, knee, jnp.where(a > q, a, jnp.inf))
    left = jnp.maximum(left, jnp.max(jnp.where(moving, below, -jnp.inf), initial=-jnp.inf))
    right = jnp.minimum(right, jnp.min(jnp.where(moving, above, jnp.inf), initial=jnp.inf))
  return _Piece(g, n, left, right)


def _l1_threshold(a_leaves, r_leaves, eps, inside) -> jax.Array:
  """The root ``lam`` of ``G(lam) = Σ_i clip(a_i − lam, 0, r_i) = eps`` (any value if ``inside``).

  ``G`` is continuous, non-increasing and piecewise linear, but neither convex nor
  concave (each term is flat, falls with slope −1, then is flat again), so plain
  Newton may cycle. Each pass evaluates the piece of ``G`` at a trial ``q`` and
  stops, exactly, if the root of that piece's line lies on the piece. Otherwise
  the bracket ``[lo, hi]`` (``G(lo) >= eps >= G(hi)``) jumps past the whole piece,
  and the next trial is the Newton root if it falls inside the bracket (for the
  first ``_NEWTON_PASSES`` passes), else the midpoint of the bracket's float bit
  patterns. Positive floats order like their bit patterns, so at most 31
  (float32) or 63 (float64) halvings leave no breakpoint inside the bracket: the
  loop has a fixed bound and no sort, and works leaf by leaf on pytrees.
  """
  dtype = eps.dtype
  itype = jnp.int32 if dtype == jnp.float32 else jnp.int64
  as_int = lambda v: lax.bitcast_convert_type(v, itype)
  as_float = lambda i: lax.bitcast_convert_type(i, dtype)
  max_passes = _NEWTON_PASSES + jnp.finfo(dtype).bits + 1

  def cond(carry):
    k, lo, hi, _, _, found = carry
    # lo == hi pins the root even when rounding hides it from the piece test.
    return (k < max_passes) & ~found & (lo < hi)

  def body(carry):
    k, lo, hi, q, _, _ = carry
    pc = _piece(a_leaves, r_leaves, q)
    root = jnp.where(pc.n > 0, q + (pc.g - eps) / jnp.maximum(pc.n, 1).astype(dtype), q)
    found = jnp.where(pc.n > 0, (pc.left <= root) & (root <= pc.right), pc.g == eps)
    # Not found: the root lies beyond this piece, on the side where G crosses eps.
    above = pc.g > eps
    lo = jnp.where(~found & above, jnp.minimum(pc.right, hi), lo)
    hi = jnp.where(~found & ~above, jnp.maximum(pc.left, lo), hi)
    mid = as_float(as_int(lo) + (as_int(hi) - as_int(lo)) // 2)
    newton = (k < _NEWTON_PASSES) & (pc.n > 0) & (lo < root) & (root < hi)
    return k + 1, lo, hi, jnp.where(newton, root, mid), root, found

  zero = jnp.zeros((), dtype)
  top = jnp.max(jnp.stack([jnp.max(a, initial=0.0) for a in a_leaves]))  # G(top) = 0
  init = (0, zero, top, zero, zero, inside)
  _, lo, hi, _, root, _ = lax.while_loop(cond, body, init)
  return jnp.clip(root, lo, hi)


def _project_1(problem: _Problem, eps, inside) -> list[jax.Array]:
  us = [y - c for y, c in zip(problem.ys, problem.cs)]
  a_leaves = [jnp.abs(u) for u in us]
  r_leaves = [jnp.where(u >= 0, hi - c, c - lo) for u, c, lo, hi in zip(us, *problem[1:])]
  # The solve runs without gradients; the piece it lands on is then solved again in
  # closed form, lam = (Σ_A |u_i| + Σ_S room_i − eps) / |A|, which carries them.
  lam0 = _l1_threshold(*jax.tree.map(lax.stop_gradient, (a_leaves, r_leaves, eps)), inside)
  saturated = [a - r >= lam0 for a, r in zip(a_leaves, r_leaves)]
  active = [~s & (a > lam0) for s, a in zip(saturated, a_leaves)]
  count = sum(jnp.sum(m, dtype=jnp.int32) for m in active)
  excess = (
    sum(
      jnp.sum(jnp.where(m, a, 0)) + jnp.sum(jnp.where(s, r, 0))
      for m, s, a, r in zip(active, saturated, a_leaves, r_leaves)
    )
    - eps
  )
  # With no active coordinate G is flat at eps and any lam on the flat gives z.
  lam = jnp.where(count > 0, excess / jnp.maximum(count, 1).astype(eps.dtype), lam0)
  out = []
  for u, a, m, s, c, lo, hi in zip(us, a_leaves, active, saturated, *problem[1:]):
    step = jnp.where(m, a - lam, 0)
    z = jnp.where(s, jnp.where(u >= 0, hi, lo), c + jnp.where(u >= 0, step, -step))
    out.append(jnp.clip(z, lo, hi))  # c + step may round one ulp past the bound
  return out


@functools.partial(jax.jit, static_argnames=("p", "treedef"))
def _project(problem: _Problem, eps, p: float, treedef) -> list[jax.Array]:
  clipped = [jnp.clip(y, lo, hi) for y, _, lo, hi in zip(*problem)]
  inside = _norms.global_norm([z - c for z, c in zip(clipped, problem.cs)], p) <= eps
  if p == math.inf:
    projected = _project_inf(problem, eps)
  elif p == 2:
    projected = _project_2(problem, treedef, eps)
  else:
    projected = _project_1(problem, eps, inside)
  valid = _valid(problem, eps)
  # Inside the ball clip(y) is returned as it is, not recomputed as c + (y − c).
  return [jnp.where(valid, jnp.where(inside, z0, z), jnp.nan) for z0, z in zip(clipped, projected)]


def project_ball_box(
  y: PyTree,
  center: PyTree,
  eps: jax.typing.ArrayLike,
  *,
  p: float | str = 2,
  lower: PyTree = 0.0,
  upper: PyTree = 1.0,
) -> PyTree:
  r"""The point of ``{z : ‖z − center‖_p <= eps} ∩ [lower, upper]`` nearest to ``y``.

  The exact Euclidean projection for projected-gradient methods (PGD attacks,
  constrained optimisation). With ``u = y − center``:

  * ``p = 2``: ``clip(center + t·u)`` with ``t = min(1, eta)`` and
    ``eta = rescale(center, u, eps)``. The KKT conditions give
    ``z = clip(center + u / (1 + mu))``, and ``1 / (1 + mu)`` is the scale at
    which the clipped step has norm exactly ``eps``: the clipping-aware scale.
  * ``p = 1``: ``z_i = center_i + sign(u_i)·min(max(|u_i| − lam, 0), room_i)``, a
    soft threshold followed by a clip, where ``room_i`` is the distance from
    ``center_i`` to the bound in the direction of ``u_i`` and ``lam >= 0`` solves
    ``Σ_i min(max(|u_i| − lam, 0), room_i) = eps``. It is solved exactly by a
    bounded, bracket-safeguarded Newton iteration over the pieces of that
    piecewise-linear function, leaf by leaf (pytrees are never concatenated).
  * ``p = inf``: the ball is a box, so ``C`` is the box
    ``[max(center − eps, lower), min(center + eps, upper)]`` and ``z`` is a clip.

  If ``clip(y, lower, upper)`` already lies in the ball it is returned unchanged.

  Args:
    y: The point to project: an array or a pytree of arrays.
    center: The centre of the ball, inside ``[lower, upper]``, with the structure
      and shapes of ``y``.
    eps: The radius, a scalar ``>= 0`` (traced values are fine; use ``jax.vmap``
      for per-example radii).
    p: ``1``, ``2`` or ``inf`` (``jnp.inf``, ``float("inf")`` or ``"inf"``). Static.
    lower: Lower bound: a scalar, an array broadcastable to ``y``, or a pytree
      like ``y``.
    upper: Upper bound, like ``lower``.

  Returns:
    The projection, with the structure, shapes and dtypes of ``y`` (half
    precision is computed in float32 and rounded once at the end). ``NaN`` under
    ``jit`` when the inputs are invalid; eager calls raise ``ValueError``.

  Raises:
    ValueError: naming the argument, for ``p`` not in {1, 2, inf}, mismatched
      structures or shapes, NaN or inf values, ``lower > upper``, ``center``
      outside the box or ``eps < 0``.

  Gradients with respect to ``y``, ``center``, ``eps`` and the bounds are exact
  almost everywhere (away from the kinks where a coordinate reaches a bound or
  zero).

  Why not project onto the ball and then clip, as attack libraries do? That point
  is feasible but not nearest: the ball projection shrinks every coordinate of
  ``u`` by the same factor (p = 2) or threshold (p = 1) to fit the budget, and the
  clip then cuts back the coordinates that leave the box, so part of the budget
  is wasted. Here the budget goes to the coordinates that can still move.

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> center = jnp.array([0.9, 0.5, 0.1])
    >>> y = jnp.array([1.5, 0.9, 0.1])
    >>> z = clipjax.project_ball_box(y, center, 0.3)
    >>> print(z)
    [1.     0.7828 0.1   ]
    >>> round(float(jnp.linalg.norm(z - center)), 4)
    0.3

    Project-then-clip is feasible too, but farther from ``y``:

    >>> naive = jnp.clip(center + (y - center) * 0.3 / jnp.linalg.norm(y - center), 0, 1)
    >>> print(naive)
    [1.     0.6664 0.1   ]
    >>> round(float(jnp.linalg.norm(z - y)), 4), round(float(jnp.linalg.norm(naive - y)), 4)
    (0.5135, 0.5519)
  """
  p = _checks.canonical_p(p, allowed=(1.0, 2.0, math.inf))
  problem, treedef, out_dtype = _prepare(y, center, lower, upper)
  _checks.check_scalar_eps(eps)
  # center, not y, must lie inside the box.
  _checks.check_box(problem.cs, problem.ys, problem.los, problem.his, names=("center", "y"))
  eps = jnp.asarray(eps, problem.ys[0].dtype)
  if eps.ndim:
    raise ValueError(f"eps must be a scalar, got shape {eps.shape}; use jax.vmap for a batch.")
  out = _project(problem, eps, p=p, treedef=treedef)
  dtypes = [jnp.result_type(v) for v in jax.tree.leaves(y)]
  return jax.tree.unflatten(
    treedef,
    [z.astype(dt if jnp.issubdtype(dt, jnp.floating) else out_dtype) for z, dt in zip(out, dtypes)],
  )
