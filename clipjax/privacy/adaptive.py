"""Adaptive clip norms (Andrew et al.), on per-example gradients or on a clipped sum.

The clip norm follows a quantile of the per-example norms, estimated from a noised count
of the examples that fit; with a pytree of clip norms every group follows its own. The
count's noise and the sum's are split so that together they cost one Gaussian query of
the given noise multiplier: :func:`adaptive_dp_noise` states the rule and the split,
:func:`adaptive_dp_aggregate` applies it to per-example gradients through the same code.

References:
  Andrew, Thakkar, McMahan & Ramaswamy, `Differentially Private Learning with
  Adaptive Clipping <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipjax import _checks
from clipjax.privacy import _aggregate, _gaussian


class AdaptiveDPAggregateState(NamedTuple):
  """State of :func:`adaptive_dp_aggregate`.

  Attributes:
    clip_norm: the clip norm the *next* update will use (a scalar, or a pytree like a
      group-wise ``initial_clip_norm``). Each update clips with it and only then moves
      it toward the target quantile.
    key: typed PRNG key of the next update, split on every update.
  """

  clip_norm: Any
  key: jax.Array


class AdaptiveDPNoiseState(NamedTuple):
  """State of :func:`adaptive_dp_noise`.

  Attributes:
    clip_norm: the clip norm to give the next ``clipped_grad`` call (a scalar, or a
      pytree like a group-wise ``initial_clip_norm``); the next ``update`` noises the
      sum with it and only then moves it toward the target quantile.
    key: typed PRNG key of the next update, split on every update.
  """

  clip_norm: Any
  key: jax.Array


def _default_count_stddev(noise_multiplier, count_noise_stddev, batch_size):
  if count_noise_stddev is not None:
    return count_noise_stddev
  # `z > 0` is a bool for Python numbers and a traced bool otherwise: z = 0 (no
  # privacy) gets no count noise either.
  return (batch_size / 20) * (noise_multiplier > 0)


def _check_split(noise_multiplier, count_stddev, groups: int) -> None:
  if not _checks.is_concrete((noise_multiplier, count_stddev)):
    return
  z, sigma_b = float(noise_multiplier), float(count_stddev)
  if z > 0 and z * z * groups >= 4 * sigma_b * sigma_b:
    raise ValueError(
      f"noise_multiplier must be < 2 * count_noise_stddev / sqrt({groups}) (one count per "
      "clip-norm group) to leave noise for the sum; got "
      f"noise_multiplier={noise_multiplier!r}, count_noise_stddev={count_stddev!r}. Raise "
      "count_noise_stddev (or the batch size, for the default B/20) or lower noise_multiplier."
    )


def _sum_multiplier(noise_multiplier, count_stddev, groups: int):
  """``z_Δ = (z^-2 − K·(2σ_b)^-2)^(-1/2)``; 0 for ``z = 0``; NaN for a traced bad split."""
  z = noise_multiplier
  positive = z > 0
  inverse = jnp.where(positive, z, 1.0) ** -2.0 - groups * (2.0 * jnp.asarray(count_stddev)) ** -2.0
  # Explicitly NaN: a power would give (-inf)^(-1/2) = 0 for σ_b = 0, no noise at all.
  split = jnp.where(inverse > 0, jnp.where(inverse > 0, inverse, 1.0) ** -0.5, jnp.nan)
  return jnp.where(positive, split, 0.0)


def _check_adaptive(initial_clip_norm, noise_multiplier, target_quantile, clip_learning_rate):
  _checks.check_clip_norm(initial_clip_norm, "initial_clip_norm", positive=True)
  for c in jax.tree.leaves(initial_clip_norm):
    _checks.check_positive("initial_clip_norm", c, finite=True)
  _checks.check_nonnegative("noise_multiplier", noise_multiplier, finite=True)
  _checks.check_interval("target_quantile", target_quantile, 0.0, 1.0)
  _checks.check_nonnegative("clip_learning_rate", clip_learning_rate)


def _initial_state(initial_clip_norm):
  def strong(c):
    c = jnp.asarray(c)
    dtype = c.dtype if jnp.issubdtype(c.dtype, jnp.floating) else jnp.result_type(float)
    # A weakly typed state would change type after the first update and make `jit`
    # compile the step twice.
    return jnp.array(c, dtype=dtype)

  return jax.tree.map(strong, initial_clip_norm)


def _adapted(clip_norm, norms, mask, count_stddev, divisor, target_quantile, lr, key):
  """The next clip norms: every group's moves toward its norms' target quantile."""
  leaves, prefix = jax.tree.flatten(clip_norm)
  new = []
  for c, n, k in zip(leaves, prefix.flatten_up_to(norms), jax.random.split(key, len(leaves))):
    # A NaN norm is not <= C: non-finite examples count as clipped.
    centred = (n <= c).astype(c.dtype) - 0.5
    if mask is not None:
      centred = jnp.where(mask, centred, 0)
    count = jnp.sum(centred)
    fraction = jnp.clip(_gaussian.noisy(count, count_stddev, k, divisor) + 0.5, 0.0, 1.0)
    new.append((c * jnp.exp(-lr * (fraction - target_quantile))).astype(c.dtype))
  return prefix.unflatten(new)


class _Hyper(NamedTuple):
  noise_multiplier: Any
  count_noise_stddev: Any
  divisor: Any  # the (expected) batch size
  target_quantile: Any
  clip_learning_rate: Any


def _step(summed, norms, mask, clip_norm, key, h: _Hyper):
  """One adaptive step from a clipped sum: ``(noisy mean, next clip norm)``."""
  z = h.noise_multiplier
  groups = len(jax.tree.leaves(clip_norm))
  count_stddev = _default_count_stddev(z, h.count_noise_stddev, h.divisor)
  _check_split(z, count_stddev, groups)
  noise_key, count_key = jax.random.split(key)
  if _checks.is_static_zero(z):
    stddev = 0.0
  else:
    sensitivity = _aggregate.sensitivity(clip_norm)
    stddev = _aggregate.valid_stddev(
      _sum_multiplier(z, count_stddev, groups) * sensitivity, z, clip_norm, sensitivity
    )
  updates = _aggregate.noisy_mean(summed, stddev=stddev, divisor=h.divisor, key=noise_key)
  new = _adapted(
    clip_norm,
    norms,
    mask,
    count_stddev,
    h.divisor,
    h.target_quantile,
    h.clip_learning_rate,
    count_key,
  )
  return updates, new


def _check_norms(norms, clip_norm) -> int:
  """The batch size of ``norms``: a ``(batch,)`` array per clip-norm group."""
  prefix = jax.tree.structure(clip_norm)
  try:
    leaves = prefix.flatten_up_to(norms)
  except (ValueError, TypeError):
    raise ValueError(
      f"norms must be a (batch,) array, or a pytree like the group-wise clip norm "
      f"({prefix}) of them; got structure {jax.tree.structure(norms)}."
    ) from None
  shapes = [np.shape(n) for n in leaves]
  if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1:
    raise ValueError(f"norms must be (batch,) arrays of one batch size, got shapes {shapes}.")
  return shapes[0][0]


def adaptive_dp_noise(
  initial_clip_norm: Any,
  noise_multiplier: jax.typing.ArrayLike,
  batch_size: jax.typing.ArrayLike,
  key: jax.Array | int,
  *,
  target_quantile: jax.typing.ArrayLike = 0.5,
  clip_learning_rate: jax.typing.ArrayLike = 0.2,
  count_noise_stddev: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive clipping on a clipped sum: :func:`clipjax.dp_noise` with a moving clip norm.

  A step of DP-SGD with it reads the clip norm from the state, clips with it, and
  hands the clipped sum and the per-example norms to ``update``::

    grad_fn = clipjax.clipped_grad(loss, state.clip_norm)  # or any clipped-sum function
    clipped_sum, norms = grad_fn(params, x, y)
    updates, state = tx.update(clipped_sum, state, norms=norms, mask=mask)

  The update is :math:`(s + \mathcal{N}(0, (z_\Delta\, \Delta)^2 I)) / B` with
  :math:`\Delta` = :func:`clipjax.sensitivity` of ``state.clip_norm``, the clip norm
  the sum was clipped with. Then every real example reports, for each group
  :math:`k`, whether it fitted, :math:`b_{ik} = 1[\|g_{ik}\| \le C_k]` (non-finite
  norms do not), and each clip norm moves toward the :math:`\gamma`-quantile of its
  group's norms:

  .. math::

    \bar b_k = \mathrm{clamp}\Big(\big(\textstyle\sum_{i\ \mathrm{real}}
      (b_{ik} - \tfrac12) + \mathcal{N}(0, \sigma_b^2)\big) / B + \tfrac12,\ 0,\
      1\Big), \qquad C_k \leftarrow C_k \exp(-\eta_C (\bar b_k - \gamma)).

  **Privacy.** One example moves each of the :math:`K` counts by :math:`\frac12` and
  the sum by at most :math:`\Delta`, so with

  .. math::

    z_\Delta = \big(z^{-2} - K\,(2\sigma_b)^{-2}\big)^{-1/2}

  the sum and the counts together cost what one Gaussian query of multiplier
  :math:`z` costs (Andrew et al., Theorem 1, over :math:`K` counts): tell the
  accountant ``noise_multiplier``. The split needs :math:`z < 2\sigma_b/\sqrt K`, or a
  ``ValueError`` is raised (for concrete values; traced ones that violate it give NaN
  updates). With the default :math:`\sigma_b = B/20`, :math:`B = 256` and
  :math:`z = 1`, the sum's multiplier is 1.0008 for one group, 1.0031 for 4 and
  1.0077 for 10. ``z = 0`` means no privacy: no noise on the sum and, unless
  ``count_noise_stddev`` is given, none on the counts.

  Args:
    initial_clip_norm: the first clip norm, ``> 0`` and finite; a pytree of them (a
      prefix of the gradients) adapts every group on its own.
    noise_multiplier: :math:`z >= 0`, finite, the multiplier of the equivalent single
      Gaussian query (the one to give to :func:`clipjax.dp_epsilon`).
    batch_size: :math:`B > 0`, the number of examples the sum stands for (the EXPECTED
      batch size under Poisson sampling, the logical batch's under
      :func:`clipjax.accumulate`); it divides the sum and the counts.
    key: a typed PRNG key, a raw ``uint32`` key or an int seed.
    target_quantile: :math:`\gamma \in [0, 1]`, the fraction of examples that should
      end up unclipped.
    clip_learning_rate: :math:`\eta_C >= 0`, the geometric step size.
    count_noise_stddev: :math:`\sigma_b >= 0` of every count, finite; ``None`` gives
      :math:`B/20` (0 when :math:`z = 0`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`AdaptiveDPNoiseState`, whose ``update(clipped_sum, state, params=None, *,
    norms, mask=None)`` takes the per-example norms as ``clipped_grad`` returns them (a
    ``(batch,)`` array, or a pytree like a group-wise clip norm) and the batch's mask
    (only real examples are counted); other extra arguments are ignored.

  Example:
    >>> import jax.numpy as jnp
    >>> from clipjax import adaptive_dp_noise
    >>> tx = adaptive_dp_noise(1.0, noise_multiplier=0.0, batch_size=2, key=0)
    >>> state = tx.init(None)
    >>> norms = jnp.array([0.5, 3.0, 7.0])  # clipped_grad's; the third is padding
    >>> mask = jnp.array([True, True, False])
    >>> updates, state = tx.update(jnp.array([1.2, 0.8]), state, norms=norms, mask=mask)
    >>> print(updates)
    [0.6 0.4]
    >>> print(state.clip_norm)  # half the real examples fit, as targeted: unchanged
    1.0

  References:
    Andrew, Thakkar, McMahan & Ramaswamy, `Differentially Private Learning with
    Adaptive Clipping <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021.
  """
  _check_adaptive(initial_clip_norm, noise_multiplier, target_quantile, clip_learning_rate)
  _checks.check_positive("batch_size", batch_size, finite=True)
  if count_noise_stddev is not None:
    _checks.check_nonnegative("count_noise_stddev", count_noise_stddev, finite=True)
  groups = len(jax.tree.leaves(initial_clip_norm))
  _check_split(
    noise_multiplier,
    _default_count_stddev(noise_multiplier, count_noise_stddev, batch_size),
    groups,
  )
  initial_key = _checks.canonical_key(key)
  hyper = _Hyper(
    noise_multiplier, count_noise_stddev, batch_size, target_quantile, clip_learning_rate
  )

  def init_fn(params):
    del params
    return AdaptiveDPNoiseState(clip_norm=_initial_state(initial_clip_norm), key=initial_key)

  def update_fn(updates, state, params=None, *, norms, mask=None, **extra):
    del params, extra
    mask = _checks.check_mask(mask, _check_norms(norms, state.clip_norm))
    next_key, key = jax.random.split(state.key)
    updates, clip_norm = _step(updates, norms, mask, state.clip_norm, key, hyper)
    return updates, AdaptiveDPNoiseState(clip_norm=clip_norm, key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adaptive_dp_aggregate(
  initial_clip_norm: Any,
  noise_multiplier: jax.typing.ArrayLike,
  key: jax.Array | int,
  *,
  target_quantile: jax.typing.ArrayLike = 0.5,
  clip_learning_rate: jax.typing.ArrayLike = 0.2,
  count_noise_stddev: jax.typing.ArrayLike | None = None,
  pre_clip_noise: jax.typing.ArrayLike = 0.0,
  expected_batch_size: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r""":func:`clipjax.dp_aggregate` with the clip norm adapted toward a norm quantile.

  Each update, with the current clip norm :math:`C` (``state.clip_norm``):

  1. the output is :func:`clipjax.dp_aggregate`'s with clip norm :math:`C` (L2
     norm, ``"clip"`` scaling) and noise multiplier :math:`z_\Delta`;
  2. each real example reports :math:`b_i = 1[\|g_i + k\zeta_i\| \le C]` (non-finite
     examples report 0), and the clip norm for the *next* update moves toward the
     :math:`\gamma`-quantile of the norms,

     .. math::

       \bar b = \mathrm{clamp}\Big(\big(\textstyle\sum_{i\ \mathrm{real}} (b_i -
         \tfrac12) + \mathcal{N}(0, \sigma_b^2)\big) / B' + \tfrac12,\ 0,\ 1\Big),
       \qquad C \leftarrow C \exp(-\eta_C (\bar b - \gamma)),

     every group on its own with a group-wise clip norm.

  This is :func:`adaptive_dp_noise` applied to the clipped sum of the per-example
  gradients it is given: the same rule and the same privacy split
  :math:`z_\Delta = (z^{-2} - K(2\sigma_b)^{-2})^{-1/2}` over the :math:`K` group
  counts, so the pair costs what one Gaussian query of multiplier :math:`z` costs:
  account for ``noise_multiplier`` as usual. It needs :math:`z < 2\sigma_b/\sqrt K`
  (a ``ValueError`` for concrete values, NaN updates for traced ones).

  Args:
    initial_clip_norm: the first clip norm, ``> 0`` and finite; or a pytree prefix of
      the gradients with one per group.
    noise_multiplier: :math:`z >= 0`, finite, the multiplier of the equivalent single
      Gaussian query (the one to give to :func:`clipjax.dp_epsilon`).
    key: a typed PRNG key, a raw ``uint32`` key or an int seed.
    target_quantile: :math:`\gamma \in [0, 1]`, the fraction of examples that
      should end up unclipped.
    clip_learning_rate: :math:`\eta_C >= 0`, the geometric step size.
    count_noise_stddev: :math:`\sigma_b >= 0`, finite; ``None`` gives :math:`B'/20` (0 when
      :math:`z = 0`), with :math:`B'` the divisor below.
    pre_clip_noise: :math:`k >= 0`, as in :func:`clipjax.dp_aggregate`.
    expected_batch_size: :math:`B' > 0`, the divisor of the sum and the counts
      (``sample_rate · num_examples`` under Poisson sampling); ``None`` for the
      physical batch size.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`AdaptiveDPAggregateState`, whose ``update(per_example_grads, state,
    params=None, *, mask=None)`` ignores other extra arguments.

  Example:
    >>> import jax.numpy as jnp
    >>> from clipjax import adaptive_dp_aggregate
    >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> tx = adaptive_dp_aggregate(1.0, noise_multiplier=0.0, key=0)
    >>> state = tx.init(None)
    >>> updates, state = tx.update(per_example, state)
    >>> print(updates["w"])  # clipped with C = 1
    [0.45 0.6 ]
    >>> print(state.clip_norm)  # half fit, as targeted: unchanged
    1.0

  References:
    Andrew, Thakkar, McMahan & Ramaswamy, `Differentially Private Learning
    with Adaptive Clipping <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021.
  """
  _check_adaptive(initial_clip_norm, noise_multiplier, target_quantile, clip_learning_rate)
  _checks.check_nonnegative("pre_clip_noise", pre_clip_noise)
  if count_noise_stddev is not None:
    _checks.check_nonnegative("count_noise_stddev", count_noise_stddev, finite=True)
  if expected_batch_size is not None:
    _checks.check_positive("expected_batch_size", expected_batch_size, finite=True)
  groups = len(jax.tree.leaves(initial_clip_norm))
  if count_noise_stddev is not None or expected_batch_size is not None:
    default = _default_count_stddev(noise_multiplier, count_noise_stddev, expected_batch_size)
    _check_split(noise_multiplier, default, groups)
  initial_key = _checks.canonical_key(key)

  def init_fn(params):
    del params
    return AdaptiveDPAggregateState(clip_norm=_initial_state(initial_clip_norm), key=initial_key)

  def update_fn(updates, state, params=None, *, mask=None, **extra):
    del params, extra
    size = _checks.batch_size(updates)
    mask = _checks.check_mask(mask, size)
    next_key, perturb_key, key = jax.random.split(state.key, 3)
    summed, clipping = _aggregate.clipped_sum(
      updates,
      clip_norm=state.clip_norm,
      p=2.0,
      scaling="clip",
      stability=0.01,  # unused by "clip"
      mask=mask,
      pre_clip_noise=pre_clip_noise,
      key=perturb_key,
    )
    divisor = size if expected_batch_size is None else expected_batch_size
    hyper = _Hyper(
      noise_multiplier, count_noise_stddev, divisor, target_quantile, clip_learning_rate
    )
    norms = clipping.prefix.unflatten(clipping.norms)
    noisy, clip_norm = _step(summed, norms, mask, state.clip_norm, key, hyper)
    return _aggregate.cast_like(noisy, updates), AdaptiveDPAggregateState(
      clip_norm=clip_norm, key=next_key
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
