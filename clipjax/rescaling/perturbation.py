"""Perturbations of exact size inside a box: ``perturb`` and ``random_perturbation``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clipjax import _checks
from clipjax._typing import PyTree
from clipjax.rescaling._eta import solve_eta


def perturb(
  x: PyTree,
  delta: PyTree,
  eps: jax.typing.ArrayLike,
  *,
  p: float | str = 2,
  lower: PyTree = 0.0,
  upper: PyTree = 1.0,
  method: str = "auto",
) -> PyTree:
  """Moves ``x`` along ``delta`` to exactly distance ``eps``, staying in the box.

  Returns ``clip(x + eta·delta, lower, upper)`` with ``eta = rescale(x, delta, eps)``,
  so that ``‖perturb(x, delta, eps) − x‖_p == eps`` (or the largest reachable norm).

  Args:
    x: A point inside ``[lower, upper]``: an array or a pytree of arrays.
    delta: The direction, with the structure and shapes of ``x``.
    eps: The target distance, a scalar ``>= 0``.
    p: The norm, any float ``>= 1`` or ``inf``. Static.
    lower: Lower bound (scalar, broadcastable array, or pytree like ``x``).
    upper: Upper bound, like ``lower``.
    method: The solver, as in :func:`clipjax.rescale`.

  Returns:
    The perturbed point, with the structure, shapes and dtypes of ``x``. Half
    precision inputs are computed in float32 and rounded once at the end.

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> x = jnp.array([0.1, 0.5, 0.9])
    >>> y = clipjax.perturb(x, jnp.ones(3), 0.5)
    >>> y
    Array([0.4464, 0.8464, 1.    ], dtype=float32)
    >>> float(jnp.linalg.norm(y - x))
    0.5
  """
  eta, box, treedef, _ = solve_eta(x, delta, eps, p=p, lower=lower, upper=upper, method=method)
  dtypes = [jnp.result_type(v) for v in jax.tree.leaves(x)]
  out = [
    jnp.clip(xi + eta * di, lo, hi).astype(dt if jnp.issubdtype(dt, jnp.floating) else eta.dtype)
    for xi, di, lo, hi, dt in zip(*box, dtypes)
  ]
  return jax.tree.unflatten(treedef, out)


def random_perturbation(
  key: jax.Array | int,
  x: PyTree,
  eps: jax.typing.ArrayLike,
  *,
  p: float | str = 2,
  lower: PyTree = 0.0,
  upper: PyTree = 1.0,
  distribution: str = "gaussian",
) -> PyTree:
  """A point in the box at distance exactly ``eps`` from ``x`` in a random direction.

  Draws a direction, then applies :func:`perturb`: unlike ``x + eps·g/‖g‖`` followed
  by clipping, the clipped point really is at distance ``eps`` (or at the largest
  distance reachable along that direction).

  Args:
    key: A ``jax.random`` key, or an int seed.
    x: A point inside ``[lower, upper]``: an array or a pytree of arrays.
    eps: The distance, a scalar ``>= 0``.
    p: The norm, any float ``>= 1`` or ``inf``. Static.
    lower: Lower bound (scalar, broadcastable array, or pytree like ``x``).
    upper: Upper bound, like ``lower``.
    distribution: ``"gaussian"`` (i.i.d. standard normal coordinates: a uniformly
      random direction) or ``"uniform"`` (i.i.d. uniform coordinates on [−1, 1]).

  Returns:
    The perturbed point, with the structure, shapes and dtypes of ``x``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import clipjax
    >>> x = jnp.full((28, 28), 0.9)
    >>> y = clipjax.random_perturbation(jax.random.key(0), x, 3.6)
    >>> round(float(jnp.linalg.norm(y - x)), 4)
    3.6
  """
  _checks.check_choice("distribution", distribution, ("gaussian", "uniform"))
  key = _checks.canonical_key(key)
  leaves, treedef = jax.tree.flatten(x)
  keys = jax.random.split(key, len(leaves))
  draw = (
    jax.random.normal
    if distribution == "gaussian"
    else (lambda k, shape: jax.random.uniform(k, shape, minval=-1.0, maxval=1.0))
  )
  delta = jax.tree.unflatten(treedef, [draw(k, jnp.shape(v)) for k, v in zip(keys, leaves)])
  return perturb(x, delta, eps, p=p, lower=lower, upper=upper)
