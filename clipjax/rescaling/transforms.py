"""optax transformations: clipping-aware normalization and global p-norm clipping.

Both are factories in the optax style: they close over their hyperparameters and
return an :class:`optax.GradientTransformation` whose state is
:class:`optax.EmptyState`. Hyperparameters are Python floats or JAX scalars, so
they work under :func:`optax.inject_hyperparams`; ``p`` selects code paths and
must stay static there (``static_args=("p",)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clipjax import _checks, _norms
from clipjax._typing import PyTree
from clipjax.rescaling.rescale import rescale

_NO_PARAMS_MSG = (
  "clipping_aware_normalize needs the current parameters: call "
  "`update(updates, state, params)`. The box constrains params + updates, so "
  "the transformation cannot work without them."
)


def _per_leaf(bound, params):
  """Broadcasts a scalar or array bound to one bound per leaf of ``params``."""
  if jax.tree.structure(bound) == jax.tree.structure(params):
    return bound
  return jax.tree.map(lambda _: bound, params)


def _settle(x, step, lower, upper):
  """Nudges ``step`` by one ulp where ``x + step`` would round out of the box.

  ``clip(...) - x`` is rounded, and adding it back to ``x`` (what
  :func:`optax.apply_updates` does) can land one ulp outside the box; the next
  call would then see infeasible params. The difference was rounded to
  nearest, so moving it one ulp back toward the box always suffices.
  """
  dtype = jnp.result_type(x, step)
  lower = jnp.asarray(lower, x.dtype).astype(dtype)
  upper = jnp.asarray(upper, x.dtype).astype(dtype)
  # nextafter has no derivative: nudge a constant copy, then add the (exact,
  # one-ulp) difference so that gradients flow through `step` unchanged.
  x, const = jax.lax.stop_gradient((x, step))
  fixed = jnp.where(x + const > upper, jnp.nextafter(const, -jnp.inf), const)
  fixed = jnp.where(x + fixed < lower, jnp.nextafter(fixed, jnp.inf), fixed)
  return step + (fixed - const)


def clipping_aware_normalize(
  norm: jax.typing.ArrayLike,
  *,
  p: float | str = 2,
  lower: PyTree = 0.0,
  upper: PyTree = 1.0,
) -> optax.GradientTransformation:
  r"""Rescales updates so that the *clipped* step has global p-norm ``norm``.

  With params :math:`x` inside the box :math:`[l, u]` and incoming updates
  :math:`\delta`, the new updates are

  .. math::

    \mathrm{clip}(x + \eta\,\delta, l, u) - x, \qquad
    \|\mathrm{clip}(x + \eta\,\delta, l, u) - x\|_p = \text{norm},

  where :math:`\eta \ge 0` is found exactly by :func:`clipjax.rescale`, treating
  the whole pytree as one vector (it is never concatenated). If ``norm`` is
  more than the box allows in that direction, the step has the largest
  reachable norm. :func:`optax.apply_updates` then keeps the params inside the
  box exactly, including float rounding, when updates and params share a
  dtype. Naive normalization (``norm * delta / ||delta||_p``, then clipping)
  takes shorter steps than requested whenever a coordinate hits a bound.

  Args:
    norm: The global p-norm of each step, a Python float or JAX scalar >= 0.
    p: The norm: any float >= 1, or ``inf`` (``jnp.inf``, ``float("inf")`` or
      ``"inf"``). Static.
    lower: Lower bound of the box: a scalar, an array broadcastable to every
      leaf, or a pytree with the params' structure.
    upper: Upper bound of the box, like ``lower``.

  Returns:
    A :class:`optax.GradientTransformation` whose ``update`` requires
    ``params`` (inside the box) and raises ``ValueError`` without them.

  Raises:
    ValueError: If ``p`` is not a valid norm or ``norm`` is a negative number.

  Updates are added to params, so put this transformation last in a chain and
  give it the direction to move in (e.g. after ``optax.scale(-1.0)`` to descend
  the loss, or directly on the gradient to ascend it, as in attacks).

  Under :func:`optax.inject_hyperparams`, ``norm`` may follow a schedule; ``p``
  must be listed in ``static_args``. Scalar or array ``lower``/``upper`` become
  hyperparameters stored in the state (cast to the params' dtype); pytree
  bounds are not numeric hyperparameters and stay fixed in the closure.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipjax
    >>> params = jnp.array([0.2, 0.9, 0.5], dtype=jnp.float32)
    >>> direction = jnp.array([1.0, 1.0, -0.5], dtype=jnp.float32)
    >>> tx = clipjax.clipping_aware_normalize(0.5, lower=0.0, upper=1.0)
    >>> updates, _ = tx.update(direction, tx.init(params), params)
    >>> print(updates)
    [ 0.4382  0.1    -0.2191]
    >>> print(jnp.linalg.norm(updates))
    0.5
    >>> print(optax.apply_updates(params, updates))
    [0.6382 1.     0.2809]

  References:
    Rauber & Bethge, `Fast Differentiable Clipping-Aware Normalization and
    Rescaling <https://arxiv.org/abs/2007.07677>`_, 2020
  """
  p = _checks.canonical_p(p)
  _checks.check_nonnegative("norm", norm)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    eta = rescale(params, updates, norm, p=p, lower=lower, upper=upper)
    lowers = _per_leaf(lower, params)
    uppers = _per_leaf(upper, params)

    def step(x, u, lo, hi):
      target = jnp.clip(x + eta * u, lo, hi).astype(x.dtype)
      return _settle(x, (target - x).astype(u.dtype), lo, hi)

    return jax.tree.map(step, params, updates, lowers, uppers), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip_by_norm(
  max_norm: jax.typing.ArrayLike,
  *,
  p: float | str = 2,
) -> optax.GradientTransformation:
  r"""Scales updates down so that their global p-norm is at most ``max_norm``.

  The whole pytree is one vector: with :math:`n = \|\text{updates}\|_p`,
  updates are returned unchanged if :math:`n < \text{max\_norm}` and multiplied
  by :math:`\text{max\_norm} / n` otherwise. For ``p = 2`` this is
  :func:`optax.clip_by_global_norm`, with the same values; unlike it, a zero
  norm or a zero ``max_norm`` gives no NaN, in values or in gradients. For
  general ``p`` the magnitudes are divided by the largest one before taking
  powers, so float32 does not overflow.

  Args:
    max_norm: The largest global p-norm allowed, a Python float or JAX scalar
      >= 0.
    p: The norm: any float >= 1, or ``inf`` (``jnp.inf``, ``float("inf")`` or
      ``"inf"``). Static (list it in ``static_args`` under
      :func:`optax.inject_hyperparams`).

  Returns:
    A :class:`optax.GradientTransformation` object.

  Raises:
    ValueError: If ``p`` is not a valid norm or ``max_norm`` is a negative
      number.

  Example:
    >>> import jax.numpy as jnp
    >>> import clipjax
    >>> grads = {"b": jnp.array([12.0]), "w": jnp.array([3.0, 4.0])}
    >>> tx = clipjax.clip_by_norm(1.0)  # global L2 norm 13
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> print(updates["b"], updates["w"])
    [0.9231] [0.2308 0.3077]
    >>> tx = clipjax.clip_by_norm(1.0, p=jnp.inf)  # largest magnitude 12
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> print(updates["b"], updates["w"])
    [1.] [0.25   0.3333]

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013

    Marshall et al., `A Clipped Trip: the Dynamics of SGD with Gradient
    Clipping in High-Dimensions <https://arxiv.org/abs/2406.11733>`_, 2024
  """
  p = _checks.canonical_p(p)
  _checks.check_nonnegative("max_norm", max_norm)

  def update_fn(updates, state, params=None):
    del params
    n = _norms.norms(updates, p, nb=0)
    trigger = jnp.squeeze(n.value < max_norm)
    # Dividing by 2^exponent first (exact) keeps a finite update whose norm overflows
    # finite; otherwise exponent is 0 and this is optax's t / norm · max_norm. A zero
    # norm only happens for all-zero updates, where any divisor gives the right
    # value; 1 keeps 0/0 out of both values and gradients.
    safe_unit = jnp.where(n.unit > 0, n.unit, 1)

    def clip_fn(t):
      # Half precision is scaled in float32 (its norm may exceed its own range).
      acc = jnp.promote_types(t.dtype, safe_unit.dtype)
      unit = _norms.scale_exact(t.astype(acc), -n.exponent) / safe_unit
      return jax.lax.select(trigger, t, (unit * jnp.asarray(max_norm, acc)).astype(t.dtype))

    return jax.tree.map(clip_fn, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
