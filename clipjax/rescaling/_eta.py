"""The scale ``eta`` of a box problem, shared by ``rescale``, ``perturb`` and ``project``.

:func:`prepare_box` flattens and checks ``x``, ``delta`` and the bounds into a
:class:`~clipjax.rescaling._breakpoints.Box`; :func:`solve_eta` checks the remaining arguments and
runs the jitted solve, whose gradient is that of the closed form of the final piece.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from clipjax import _checks, _norms
from clipjax.rescaling import _rescale_config
from clipjax.rescaling._batching import batched_solver
from clipjax.rescaling._breakpoints import Box, closed_form, eta_inf
from clipjax.rescaling._solvers import SOLVERS, resolve_method

METHODS = ("auto", *SOLVERS)


def prepare_box(x, delta, *, lower, upper, names=("x", "delta")) -> tuple[Box, Any, Any]:
  """Flattens and checks the inputs. Returns (box, treedef, result dtype).

  The box holds the leaves in the compute dtype: at least float32, so half-precision
  inputs are computed in float32 and rounded once at the end. ``names`` name ``x``
  and ``delta`` in error messages.
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _eta(box, eps, p, method, config):
  return batched_solver(p, method, config)(box, eps)[0]


@_eta.defjvp
def _eta_jvp(p, method, config, primals, tangents):
  box, eps = primals
  eta, beyond = batched_solver(p, method, config)(box, eps)
  if p == math.inf:  # already a closed form, with no loop in it
    f = lambda box, eps: eta_inf(box, eps, 0, config)
  else:
    f = lambda box, eps: closed_form(box, eps, p, 0, eta, beyond, config)
  _, t = jax.jvp(f, primals, tangents)
  return eta, t


# Compiled once per shape, p, method and configuration: called eagerly, the solve's
# loops would otherwise be traced and compiled again at every call (about a second
# each). The configuration is static, so a different setting is a different program.
_solve = jax.jit(_eta, static_argnums=(2, 3, 4))


def solve_eta(x, delta, eps, *, p, lower, upper, method, config=None):
  """Checks the arguments and solves. Returns (eta in the compute dtype, box, treedef, dtype).

  ``config`` is a :class:`~clipjax.rescaling._rescale_config.RescaleConfig` (the backend's
  default if None); it is marked sharded where the inputs may be.
  """
  p = _checks.canonical_p(p)
  method = _checks.check_choice("method", method, METHODS)
  box, treedef, out = prepare_box(x, delta, lower=lower, upper=upper)
  _checks.check_scalar_eps(eps)
  _checks.check_box(*box)
  eps = jnp.asarray(eps, box.xs[0].dtype)
  if eps.ndim:
    raise ValueError(f"eps must be a scalar, got shape {eps.shape}; use jax.vmap for a batch.")
  config = _rescale_config.for_inputs(box.xs + box.ds, config)
  # One closed form serves every method at p = inf.
  method = "newton" if p == math.inf else resolve_method(method, box, config)
  eta = _solve(box, eps, p, method, config)
  return eta, box, treedef, out
