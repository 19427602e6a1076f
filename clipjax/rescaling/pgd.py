r"""Projected gradient ascent with exact steps and exact projections: ``pgd``.

Each iteration of the PGD attack of Madry et al. (2018) ascends a loss by a step of
fixed size from the current point and projects back onto the feasible set
``C = {z : ‖z − x‖_p <= eps} ∩ [lower, upper]`` around the clean input ``x``. The
usual recipe normalizes the step, adds it, and then clips to the box (so the step
that is really taken is shorter than asked) and projects onto the ball before
clipping (feasible, but not the nearest point of ``C``). Here both parts are exact
and built from the library's own pieces:

* the step's scale is :func:`clipjax.rescale` of the gradient (of its sign for
  ``p = inf``), so that the step *after clipping* has p-norm exactly
  ``step_size``, or the most the box allows in that direction (what
  :func:`clipjax.clipping_aware_normalize` applies to optax updates);
* the projection is :func:`clipjax.project_ball_box`, the nearest point of ``C``,
  applied to the unclipped point ``z + eta·g``: where the ball does not bind it
  is the clip, so the iterate moves by exactly ``step_size``;
* the random start is :func:`clipjax.random_perturbation`: a point at distance
  exactly ``eps`` from ``x`` after clipping.

Why project the unclipped point rather than clip first? ``C`` lies inside the box,
but projecting onto ``C`` after clipping is not projecting onto ``C``: the clip
discards how far a coordinate is pushed past its bound, and the ball projection
then pulls that coordinate back inside, at every iteration. The iteration would
stall short of the constrained maximiser (for ``w·z`` from ``x = (0.1, 0.5,
0.95)``, ``w = (1, −2, 3)``, ``eps = 0.5`` and steps of 0.1, it settles with
``z_3 = 0.9917`` and loss 3.1816 instead of ``z_3 = 1`` and 3.2124). Projecting
``z + eta·g`` keeps the fixed points of projected gradient ascent: the points
where ``g`` lies in the normal cone of ``C``.

For ``p = inf`` the step and the projection coincide with the usual signed step
and clip: the ball ∩ box is a box.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import _checks
from clipjax._typing import PyTree
from clipjax.rescaling.perturbation import random_perturbation
from clipjax.rescaling.projection import project_ball_box
from clipjax.rescaling.rescale import rescale


def _check_args(loss_fn, x, eps, p, steps, step_size, lower, upper, key, random_start):
  """Eager checks that name the user's arguments; returns (p, steps, key, x leaves, treedef)."""
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable, got {loss_fn!r}.")
  p = _checks.canonical_p(p, allowed=(1.0, 2.0, math.inf))
  steps = _checks.check_count("steps", steps, minimum=0)
  _checks.check_scalar_eps(eps)
  if step_size is not None:
    _checks.check_nonnegative("step_size", step_size, finite=True)
  if random_start:
    if key is None:
      raise ValueError("key is required when random_start=True (or pass random_start=False).")
    key = _checks.canonical_key(key)
  leaves, treedef = jax.tree.flatten(x)
  if not leaves:
    raise ValueError("x must contain at least one array.")
  leaves = [jnp.asarray(v) for v in leaves]
  for v in leaves:
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise ValueError(f"x must hold floating-point arrays, got dtype {v.dtype}.")
  shapes = [np.shape(v) for v in leaves]
  lowers = _checks.bound_leaves(lower, treedef, shapes, "lower")
  uppers = _checks.bound_leaves(upper, treedef, shapes, "upper")
  _checks.check_box(leaves, [], lowers, uppers, names=("x", "x"))
  return p, steps, key, leaves, treedef


def _scalar_loss(loss_fn: Callable) -> Callable:
  """``loss_fn``, refusing a non-scalar result with a message that names it."""

  def loss(z):
    value = loss_fn(z)
    if jnp.shape(value) != () or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
      raise ValueError(
        f"loss_fn must return a real floating-point scalar, got shape {jnp.shape(value)} "
        f"and dtype {jnp.result_type(value)}; for a batch, jax.vmap over pgd."
      )
    return value

  return loss


def pgd(
  loss_fn: Callable[[PyTree], jax.Array],
  x: PyTree,
  eps: jax.typing.ArrayLike,
  *,
  p: float | str = 2,
  steps: int = 10,
  step_size: jax.typing.ArrayLike | None = None,
  lower: PyTree = 0.0,
  upper: PyTree = 1.0,
  key: jax.Array | int | None = None,
  random_start: bool = True,
  return_losses: bool = False,
) -> PyTree | tuple[PyTree, jax.Array]:
  r"""Maximises ``loss_fn`` over ``{z : ‖z − x‖_p <= eps} ∩ [lower, upper]`` by PGD.

  Projected gradient ascent (Madry et al., 2018) with exact steps and exact
  projections. From ``z_0``, each of the ``steps`` iterations computes

  .. math::

    g_t = \nabla \mathrm{loss\_fn}(z_t), \quad
    z_{t+1} = \Pi_C(z_t + \eta_t d_t),

  with ``d_t = g_t`` for ``p = 1, 2`` and ``d_t = sign(g_t)`` for ``p = inf``,
  ``Π_C`` the exact projection :func:`clipjax.project_ball_box` onto
  ``C = {z : ‖z − x‖_p <= eps} ∩ [lower, upper]``, and ``eta_t`` the
  clipping-aware scale :func:`clipjax.rescale`: the step after clipping,
  ``clip(z_t + eta_t·d_t) − z_t``, has p-norm exactly ``step_size`` (or the most
  the box allows along ``d_t``). Where the ball does not bind, ``Π_C`` is that
  clip and the iterate moves by exactly ``step_size``; where it binds, the
  unclipped point is projected, so the fixed points are those of projected
  gradient ascent (see the module notes on why clipping first would stall).
  Every iterate is feasible. A zero gradient gives a zero step, never NaN.

  Args:
    loss_fn: The objective, ``loss_fn(z) -> scalar``, with ``z`` structured like
      ``x``; it is maximised.
    x: The clean input, inside ``[lower, upper]``: a floating-point array or a
      pytree of them.
    eps: The radius of the ball, a scalar ``>= 0`` (traced values are fine; use
      :func:`jax.vmap` for per-example radii).
    p: ``1``, ``2`` or ``inf`` (``jnp.inf``, ``float("inf")`` or ``"inf"``). Static.
    steps: The number of iterations, a Python int ``>= 0``. Static. With 0 the
      start point is returned.
    step_size: The p-norm of each step after clipping, a scalar ``>= 0``.
      ``None`` means ``2.5 * eps / steps`` (Madry et al.).
    lower: Lower bound of the box: a scalar, an array broadcastable to ``x``, or
      a pytree like ``x``.
    upper: Upper bound, like ``lower``.
    key: A :func:`jax.random.key`, a raw ``uint32`` key or an int seed; required
      when ``random_start`` is true.
    random_start: Whether to start at a random point at distance ``eps``.
    return_losses: Whether to also return the losses.

  Returns:
    ``x_adv``, the last iterate, with the structure, shapes and dtypes of ``x``.
    With ``return_losses=True``, ``(x_adv, losses)`` where ``losses[t]`` is
    ``loss_fn`` at the iterate before step ``t`` (shape ``(steps,)``;
    ``losses[0]`` is the loss at the start point, and the loss at ``x_adv``
    itself is not included).

  Raises:
    ValueError: naming the argument, with concrete values: ``p`` not in
      {1, 2, inf}; ``eps`` or ``step_size`` negative, NaN, inf or not a scalar;
      ``steps`` not an int ``>= 0``; ``random_start`` without ``key``; ``x``
      outside the box, not floating-point, or with NaN or inf; bounds of another
      structure or shape, or ``lower > upper``; ``loss_fn`` not returning a
      scalar. Under :func:`jax.jit` invalid values give NaN.

  The random start (``random_start=True``) is
  ``z_0 = Π_C(random_perturbation(key, x, eps))``: a point at distance exactly
  ``eps`` from ``x`` after clipping (the projection only absorbs rounding), in a
  Gaussian direction for ``p = 1, 2`` and along i.i.d. uniform coordinates for
  ``p = inf``, which rescaled to exact L∞ size is Madry et al.'s uniform start in
  the ball with its largest coordinate pushed to ``eps``. Without it, ``z_0 = x``.

  For ``p = inf`` the iteration is the usual signed step and clip. For
  ``p = 1, 2`` the usual normalize-then-clip step is shorter than ``step_size``
  whenever a coordinate reaches a bound, and project-then-clip is feasible but
  not nearest.

  The loop is a :func:`jax.lax.scan`, so ``pgd`` is pure and works under
  :func:`jax.jit` (``steps`` and ``p`` static), and under :func:`jax.vmap` over a
  batch with per-example ``x``, ``eps`` and keys (the ball is per call, so batch
  with ``vmap``, not by summing a batch loss). Gradients of a function of the
  result with respect to ``x``, ``eps``, ``step_size``, the bounds or values
  ``loss_fn`` closes over run through the unrolled iterations (they need
  ``loss_fn`` twice differentiable): they are the exact derivative of the
  algorithm's output, as in meta-learning, almost everywhere (away from the kinks
  where a coordinate reaches a bound or the ball's active set changes; the sign
  of ``p = inf`` has derivative zero). Adversarial training needs the other
  gradient, of the loss at a fixed ``x_adv`` with respect to the model
  (Danskin's theorem): wrap the result in :func:`jax.lax.stop_gradient`.

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> x = jnp.array([0.1, 0.5, 0.95])
    >>> w = jnp.array([1.0, -2.0, 3.0])
    >>> x_adv, losses = clipjax.pgd(
    ...   lambda z: jnp.dot(w, z), x, 0.5, steps=5, key=0, return_losses=True
    ... )
    >>> print(x_adv)  # the maximiser over the ball ∩ box is (0.3225, 0.055, 1)
    [0.33   0.0588 1.    ]
    >>> round(float(jnp.linalg.norm(x_adv - x)), 4)
    0.5
    >>> print(losses)  # at z_0, ..., z_4
    [2.1351 2.9148 3.2001 3.2095 3.2117]

    One step from ``x`` (no random start, a ball that does not bind) moves by
    exactly ``step_size``; the usual normalize-then-clip step falls short:

    >>> y = clipjax.pgd(
    ...   lambda z: jnp.dot(w, z), x, 1.0, steps=1, step_size=0.3, random_start=False
    ... )
    >>> round(float(jnp.linalg.norm(y - x)), 4)
    0.3
    >>> naive = jnp.clip(x + 0.3 * w / jnp.linalg.norm(w), 0.0, 1.0)
    >>> round(float(jnp.linalg.norm(naive - x)), 4)
    0.1861

  References:
    Madry, Makelov, Schmidt, Tsipras & Vladu, `Towards Deep Learning Models
    Resistant to Adversarial Attacks <https://arxiv.org/abs/1706.06083>`_,
    ICLR 2018

    Rauber & Bethge, `Fast Differentiable Clipping-Aware Normalization and
    Rescaling <https://arxiv.org/abs/2007.07677>`_, 2020
  """
  p, steps, key, leaves, treedef = _check_args(
    loss_fn, x, eps, p, steps, step_size, lower, upper, key, random_start
  )
  x = jax.tree.unflatten(treedef, leaves)
  dtype = jnp.result_type(*leaves)
  # Half precision cannot hold eps to the accuracy the solvers work in (float32).
  eps = jnp.asarray(eps, jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype)
  box = dict(p=p, lower=lower, upper=upper)
  start = x
  if random_start:
    # Gaussian coordinates give a uniformly random direction; for L∞, uniform
    # coordinates rescaled to exact size spread the start over the ball's box.
    distribution = "uniform" if p == math.inf else "gaussian"
    start = random_perturbation(key, x, eps, distribution=distribution, **box)
    start = project_ball_box(start, x, eps, **box)
  if steps == 0:
    return (start, jnp.zeros((0,), eps.dtype)) if return_losses else start

  alpha = 2.5 * eps / steps if step_size is None else step_size
  loss_and_grad = jax.value_and_grad(_scalar_loss(loss_fn))

  def iteration(z, _):
    value, g = loss_and_grad(z)
    if p == math.inf:
      g = jax.tree.map(jnp.sign, g)
    eta = rescale(z, g, alpha, **box)
    # Leaves keep their dtypes, so the iterates of mixed-precision pytrees do too.
    y = jax.tree.map(lambda zi, gi: (zi + eta * gi).astype(zi.dtype), z, g)
    return project_ball_box(y, x, eps, **box), value

  x_adv, losses = jax.lax.scan(iteration, start, length=steps)
  return (x_adv, losses) if return_losses else x_adv
