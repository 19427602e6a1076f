"""The batching rule of ``rescale``: how ``jax.vmap`` runs a batch of solves."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
from jax import lax

from clipjax.rescaling._breakpoints import Box, eta_inf
from clipjax.rescaling._solvers import eta_finite


@functools.cache
def batched_solver(p: float, method: str, config):
  """The solve as a ``custom_vmap`` function, so that ``vmap`` picks its batching.

  The batched solve runs its rows in lockstep: every pass covers all of them and the
  loop runs until the slowest has converged. With ``config.row_by_row`` it runs on
  groups of rows, or single rows, in turn: a long row stays in cache through all
  of its passes and waits for no other row, while on short rows the loop's fixed
  cost per pass dominates, which a group shares (``config.row_elements``,
  ``config.group_elements``). Returns (eta, beyond).
  """

  def solve_rows(box, eps, nb):
    if p == math.inf:
      return eta_inf(box, eps, nb, config), jnp.zeros(jnp.shape(eps), bool)
    return eta_finite(box, eps, p, method, nb, config)

  @jax.custom_batching.custom_vmap
  def solve(box, eps):
    return solve_rows(box, eps, 0)

  @solve.def_vmap
  def rule(axis_size, in_batched, box, eps):
    box_b, eps_b = in_batched
    ndims = [x.ndim - b for x, b in zip(box.xs, box_b.xs)]

    def lift(leaves, batched, keep_unbatched):
      out = []
      for v, b, nd in zip(leaves, batched, ndims):
        if b:  # a batched bound of lower rank broadcasts after the batch axis
          v = jnp.reshape(v, v.shape[:1] + (1,) * (nd - v.ndim + 1) + v.shape[1:])
        elif not keep_unbatched:  # lazily: XLA fuses the broadcast into each pass
          v = jnp.broadcast_to(v, (axis_size,) + v.shape)
        out.append(v)
      return out

    box = Box(
      lift(box.xs, box_b.xs, False),
      lift(box.ds, box_b.ds, False),
      lift(box.los, box_b.los, True),
      lift(box.his, box_b.his, True),
    )
    eps = eps if eps_b else jnp.broadcast_to(eps, (axis_size,))
    flags = [True] * 2 * len(box.xs) + list(box_b.los) + list(box_b.his) + [True]
    row = sum(math.prod(v.shape) for v in box.xs) // max(axis_size, 1)
    rows = 1 if row >= config.row_elements else max(1, config.group_elements // max(row, 1))
    if row_by_row((box, eps), config) and rows < axis_size:
      config.saw("one row at a time" if rows == 1 else "row groups")
      out = _in_groups(solve_rows, (box, eps), flags, rows)
    else:
      config.saw("lockstep")
      out = solve_rows(box, eps, 1)
    # custom_vmap's contract: one (eta, beyond) per row, batched along the leading axis.
    chex.assert_shape(out, (axis_size,))
    return out, (True, True)

  return solve


def _in_groups(fn, args, flags, rows):
  """``fn(*args, nb)`` on ``rows`` rows at a time, in a loop (``lax.map``).

  ``flags`` has one entry per leaf of ``args``: whether it has the batch axis.
  Single rows are passed without it (``nb = 0``), which XLA:CPU reduces faster.
  """
  leaves, treedef = jax.tree.flatten(args)
  size = next(v.shape[0] for v, f in zip(leaves, flags) if f)

  def call(part, nb):
    part = iter(part)
    return fn(
      *jax.tree.unflatten(treedef, [next(part) if f else v for v, f in zip(leaves, flags)]), nb
    )

  full = size // rows * rows
  group = (rows,) if rows > 1 else ()
  grouped = [
    v[:full].reshape((size // rows, *group) + v.shape[1:]) for v, f in zip(leaves, flags) if f
  ]
  out = lax.map(lambda part: call(part, 1 if rows > 1 else 0), grouped)
  out = jax.tree.map(lambda o: o.reshape((full,) + o.shape[1 + len(group) :]), out)
  if full == size:
    return out
  rest = call([v[full:] for v, f in zip(leaves, flags) if f], 1)
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)


def row_by_row(tree, config) -> bool:
  """Whether a batched solve may run on groups of rows in turn (see ``batched_solver``).

  Where ``config`` allows it (the CPU default) and the inputs are not sharded: on a
  sharded batch a loop over its rows would gather them, while one lockstep solve
  keeps every reduction row-local, so the partitioner never gathers rows.
  """
  if not config.row_by_row or config.sharded:
    return False
  # Arrays typed with explicit-axis shardings (even on one device) cannot be scanned.
  specs = [
    getattr(getattr(jax.typeof(v), "sharding", None), "spec", ()) for v in jax.tree.leaves(tree)
  ]
  return not any(axis is not None for spec in specs for axis in spec)
