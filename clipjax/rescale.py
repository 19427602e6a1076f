"""Exact clipping-aware rescaling for any p-norm: ``rescale`` and ``max_norm``.

Given a point ``x`` in a box ``[lower, upper]`` and a direction ``delta``, find the
scale ``eta >= 0`` such that ``‖clip(x + eta·delta, lower, upper) − x‖_p == eps``
(Rauber & Bethge, "Fast Differentiable Clipping-Aware Normalization and Rescaling",
arXiv:2007.07677, 2020).

The pieces, one module per idea: ``_breakpoints`` (the piecewise-linear formulation
every solver shares, and the closed forms that are differentiated), ``_solvers``
(newton, bisect and sort, registered once), ``_reductions`` (fused row reductions),
``_batching`` (the ``vmap`` rule). This module checks the arguments, solves without
gradients and differentiates the closed form of the final piece.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from clipjax import _checks, _norms
from clipjax._batching import batched_solver
from clipjax._breakpoints import Box, closed_form, eta_inf, leaves, outside
from clipjax._solvers import SOLVERS, resolve_method
from clipjax._typing import PyTree

METHODS = ("auto", *SOLVERS)


def _prepare(x, delta, lower, upper, names=("x", "delta")) -> tuple[Box, Any, Any]:
  """Flattens and checks the inputs. Returns (box, treedef, result dtype).

  The box holds the leaves in the compute dtype: at least float32, so half-precision
  inputs are computed in float32 and rounded once at the end.
  """
  x_leaves, treedef = jax.tree.flatten(x)
  d_leaves, d_treedef = jax.tree.flatten(delta)
  if d_treedef != treedef:
    raise ValueError(
      f"{names[1]} must have the pytree structure of {names[0]}: {d_treedef} != {treedef}."
    )
  if not x_leaves:
    raise ValueError(f"{names[0]} must contain at least one array.")
  shapes = [jnp.shape(v) for v in x_leaves]
  for shape, leaf in zip(shapes, d_leaves):
    if jnp.shape(leaf) != shape:
      raise ValueError(
        f"{names[1]}'s leaf shape {jnp.shape(leaf)} differs from {names[0]}'s {shape}."
      )
  lo_leaves = _checks.bound_leaves(lower, treedef, shapes, "lower", names[0])
  hi_leaves = _checks.bound_leaves(upper, treedef, shapes, "upper", names[0])
  out = jnp.result_type(*x_leaves, *d_leaves)
  if not jnp.issubdtype(out, jnp.floating):
    out = jnp.result_type(float)
  compute = _norms.accumulation_dtype(x_leaves + d_leaves)
  cast = lambda vs: [jnp.asarray(v, compute) for v in vs]
  return Box(cast(x_leaves), cast(d_leaves), cast(lo_leaves), cast(hi_leaves)), treedef, out


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _eta(box, eps, p, method):
  return batched_solver(p, method)(box, eps)[0]


@_eta.defjvp
def _eta_jvp(p, method, primals, tangents):
  box, eps = primals
  eta, beyond = batched_solver(p, method)(box, eps)
  if p == math.inf:  # already a closed form, with no loop in it
    f = eta_inf
  else:
    f = lambda box, eps: closed_form(box, eps, p, 0, eta, beyond)
  _, t = jax.jvp(f, primals, tangents)
  return eta, t


# Compiled once per shape, p and method: called eagerly, the solve's loops would
# otherwise be traced and compiled again at every call (about a second each).
_solve = jax.jit(_eta, static_argnums=(2, 3))


def _rescale(x, delta, eps, p, lower, upper, method):
  """Shared by ``rescale`` and ``perturb``: (eta in the compute dtype, box, treedef, out dtype)."""
  p = _checks.canonical_p(p)
  method = _checks.check_choice("method", method, METHODS)
  box, treedef, out = _prepare(x, delta, lower, upper)
  _checks.check_scalar_eps(eps)
  _checks.check_box(*box)
  eps = jnp.asarray(eps, box.xs[0].dtype)
  if eps.ndim:
    raise ValueError(f"eps must be a scalar, got shape {eps.shape}; use jax.vmap for a batch.")
  # One closed form serves every method at p = inf.
  method = "newton" if p == math.inf else resolve_method(method, box)
  eta = _solve(box, eps, p, method)
  return eta, box, treedef, out


def rescale(
  x: PyTree,
  delta: PyTree,
  eps: jax.typing.ArrayLike,
  *,
  p: float | str = 2,
  lower: PyTree = 0.0,
  upper: PyTree = 1.0,
  method: str = "auto",
) -> jax.Array:
  r"""The exact clipping-aware scale ``eta`` for a step ``delta`` from ``x``.

  Finds ``eta >= 0`` with ``‖clip(x + eta·delta, lower, upper) − x‖_p == eps``.
  Naive rescaling, ``eps / ‖delta‖_p``, undershoots because clipping removes part
  of the step; this is the scale that reaches ``eps`` after clipping.

  ``x`` and ``delta`` may be arrays or pytrees of identical structure, treated as
  one flat vector (leaves are never concatenated, except by ``method="sort"``).
  If ``eps`` exceeds :func:`max_norm`, the result is the smallest ``eta`` that
  reaches the maximum. ``eps == 0`` and an all-zero ``delta`` give ``0``;
  coordinates with ``delta_i == 0`` never move. For ``p = inf`` the norm is flat
  in places and ``eta`` is the smallest scale reaching ``eps``.

  Args:
    x: A point inside ``[lower, upper]``: an array or a pytree of arrays.
    delta: The direction, with the structure and shapes of ``x``.
    eps: The target norm, a scalar ``>= 0`` (traced values are fine).
    p: The norm, any float ``>= 1`` or ``inf`` (``jnp.inf``, ``"inf"``). Static.
    lower: Lower bound: a scalar, an array broadcastable to ``x``, or a pytree
      like ``x``.
    upper: Upper bound, like ``lower``.
    method: ``"newton"`` (exact active-set iteration, one pass over the data per
      step, with a bounded exact fallback), ``"sort"`` (the paper's sort and
      cumulative sums), ``"bisect"`` (bisection over the float bit patterns of
      the scale, then one exact step) or ``"auto"`` (the fastest measured:
      the sort on a single GPU for up to 16384 elements, else newton).
      All are exact to float rounding; for ``p = inf`` all use the closed form.

  Returns:
    A scalar ``eta >= 0`` in the dtype of ``x`` and ``delta`` (half-precision
    inputs are computed in float32). ``NaN`` under ``jit`` when the inputs are
    invalid (eager calls raise ``ValueError`` instead).

  Gradients with respect to ``x``, ``delta``, ``eps`` and the bounds are exact
  almost everywhere: the solve runs without gradients and the closed form of its
  final piece, ``eta = ((eps^p − Σ_S s_i^p) / Σ_{not S} |delta_i|^p)^{1/p}``, is
  differentiated. Under ``jax.vmap`` one batched solve runs (with per-example
  ``eps`` and bounds).

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> x = jnp.array([0.1, 0.5, 0.9])
    >>> delta = jnp.array([1.0, 1.0, 1.0])
    >>> eta = clipjax.rescale(x, delta, 0.5)
    >>> float(jnp.linalg.norm(jnp.clip(x + eta * delta, 0, 1) - x))
    0.5
    >>> float(eta), float(0.5 / jnp.linalg.norm(delta))  # the naive scale is smaller
    (0.3464, 0.2887)

  References:
    Rauber & Bethge, "Fast Differentiable Clipping-Aware Normalization and
    Rescaling", arXiv:2007.07677, 2020.
  """
  eta, _, _, out = _rescale(x, delta, eps, p, lower, upper, method)
  return eta.astype(out)


def max_norm(
  x: PyTree, delta: PyTree, *, p: float | str = 2, lower: PyTree = 0.0, upper: PyTree = 1.0
) -> jax.Array:
  """The largest ``‖clip(x + eta·delta, lower, upper) − x‖_p`` any ``eta`` reaches.

  Every coordinate with ``delta_i != 0`` moves to its bound, so this is the p-norm
  of the room in the direction of ``delta``.

  Args:
    x: A point inside ``[lower, upper]``: an array or a pytree of arrays.
    delta: The direction, with the structure and shapes of ``x``.
    p: The norm, any float ``>= 1`` or ``inf``. Static.
    lower: Lower bound (scalar, broadcastable array, or pytree like ``x``).
    upper: Upper bound, like ``lower``.

  Returns:
    A scalar in the dtype of ``x`` (``NaN`` under ``jit`` for invalid inputs).

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> float(clipjax.max_norm(jnp.array([0.25, 0.5]), jnp.array([1.0, -1.0]), p=1))
    1.25
  """
  p = _checks.canonical_p(p)
  box, _, out = _prepare(x, delta, lower, upper)
  _checks.check_box(*box)
  room = [jnp.where(ad > 0, s, 0) for s, ad in leaves(box)]
  bad = sum(jnp.sum(outside(*leaf)) for leaf in zip(*box))
  return jnp.where(bad == 0, _norms.global_norm(room, p), jnp.nan).astype(out)
