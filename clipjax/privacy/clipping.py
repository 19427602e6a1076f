"""Per-example clipping and noisy aggregation for differentially private SGD.

:func:`per_example_clip`, :func:`dp_aggregate` and :func:`clipping_stats` take
*per-example* gradients: a pytree whose leaves all carry the batch on their leading
axis (what ``jax.vmap(jax.grad(loss))`` returns). :func:`dp_noise` takes the *sum* of
clipped gradients that :func:`clipjax.clipped_grad` computes without per-example
gradients. Norms, clip factors and weighted sums are those of ``clipjax._norms``: exact
over the whole float range, plain reductions over the non-batch axes, so everything
runs under ``jax.jit`` with the batch axis sharded and never gathers a leaf.

Each function that clips takes the same clipping arguments:

* ``clip_norm``: a scalar ``C``, or a pytree prefix of the gradients (group-wise
  clipping: each group ``k`` of each example, say each layer, is clipped to its own
  ``C_k``; the per-example norms are then returned per group, a pytree like the
  prefix of ``(batch,)`` arrays).
* ``scaling``: the per-example factor, ``"clip"`` (``min(1, C/‖g‖)``, Abadi et al.),
  ``"automatic"`` (``C/(‖g‖ + stability)``, Bu et al.) or ``"normalize"`` (``C/‖g‖``,
  zero gradients stay zero). Every rule bounds each group's contribution by its
  ``C_k``, so the sum's L2 sensitivity is :func:`sensitivity`, ``sqrt(Σ_k C_k²)``
  (for ``p <= 2``; see below).
* ``mask``: ``None`` or a boolean ``(batch,)`` array, False for padding (Poisson
  batches of static shape). Padded examples contribute nothing to sums, counts,
  statistics or norms (their norm is reported as 0).

An example with a NaN or inf entry (in any group) is zeroed in every group: it
contributes nothing, its norm is reported as ``inf``, and the other examples are
untouched. A finite example is never treated as non-finite, even when its norm
exceeds the dtype's range.

**What the noise covers.** The Gaussian noise has standard deviation
``noise_multiplier · sensitivity(clip_norm)``: one Gaussian query on the sum of
clipped gradients, under the add/remove-one-example relation, whose accounting
(:func:`clipjax.dp_epsilon`) takes ``noise_multiplier`` as it is. The L2 norm of a
vector is at most its p-norm for ``p <= 2``, so the guarantee holds for ``p <= 2``; for
``p > 2`` the sum's L2 sensitivity can exceed ``sensitivity(clip_norm)``, and
:func:`dp_aggregate` refuses it. The noisy sum is divided by the number of examples it stands for:
the physical batch size, or ``expected_batch_size`` (``sample_rate · num_examples``
under Poisson sampling, never the realized or padded size).

The optax factories close over their hyperparameters, which may be Python floats or
JAX scalars, so they work under :func:`optax.inject_hyperparams` (``p`` and
``scaling`` must stay static there: ``static_args=("p", "scaling")``). They are
``optax.GradientTransformationExtraArgs``: ``mask`` is an extra argument,
``tx.update(grads, state, mask=mask)``, and other extra arguments are ignored, so they
compose in :func:`optax.chain`. Keys are typed ``jax.Array`` PRNG keys, raw ``uint32``
keys or int seeds; the key lives in the state and is split on every update.

References:
  Abadi et al., `Deep Learning with Differential Privacy
  <https://arxiv.org/abs/1607.00133>`_, CCS 2016.

  Chen, Wu & Hong, `Understanding Gradient Clipping in Private SGD: A
  Geometric Perspective <https://arxiv.org/abs/2006.15429>`_, NeurIPS 2020.

  Bu, Wang, Zha & Karypis, `Automatic Clipping: Differentially Private Deep
  Learning Made Easier and Stronger <https://arxiv.org/abs/2206.07136>`_,
  NeurIPS 2023.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipjax import _checks, _norms
from clipjax.privacy import _aggregate


class DPAggregateState(NamedTuple):
  """State of :func:`dp_aggregate`.

  Attributes:
    key: typed PRNG key of the next update; each update splits it, uses the
      pieces for its noise and stores the remainder here.
  """

  key: jax.Array


class DPNoiseState(NamedTuple):
  """State of :func:`dp_noise`.

  Attributes:
    key: typed PRNG key of the next update, split on every update.
  """

  key: jax.Array


class ClippingStats(NamedTuple):
  """Diagnostics of per-example clipping, from :func:`clipping_stats`.

  Means are over the real examples (``mask`` True). With a group-wise clip norm,
  ``fraction_clipped`` and ``mean_norm`` are pytrees like it, one value per group.

  Attributes:
    fraction_clipped: fraction of examples with norm ``> clip_norm`` (non-finite
      examples count as clipped).
    mean_norm: mean per-example norm (``inf`` if any example is non-finite).
    bias_norm: ``‖mean(clip(g)) − mean(g)‖``, the L2 distance between the mean
      clipped gradient and the mean gradient.
    cosine: cosine between ``mean(clip(g))`` and ``mean(g)``; 1 when both are
      zero, 0 when exactly one is.
  """

  fraction_clipped: Any
  mean_norm: Any
  bias_norm: jax.Array
  cosine: jax.Array


# ---------------------------------------------------------------------------
# Clipping, shared by every function here and by clipjax.adaptive
# ---------------------------------------------------------------------------


def sensitivity(clip_norm: Any) -> jax.Array:
  r"""The L2 sensitivity of a sum of per-example gradients clipped to ``clip_norm``.

  With a group-wise clip norm (a pytree prefix of the gradients, one :math:`C_k` per
  group), adding or removing one example changes the clipped sum by a vector whose
  group :math:`k` has norm at most :math:`C_k`, so by at most
  :math:`\sqrt{\sum_k C_k^2}` in L2 norm. A scalar clip norm is its own sensitivity.
  :func:`dp_aggregate`, :func:`dp_noise` and the adaptive transformations scale their
  noise by it.

  Args:
    clip_norm: a scalar :math:`C >= 0`, or a pytree of scalars (Python floats or JAX
      scalars, traced values allowed).

  Returns:
    :math:`\sqrt{\sum_k C_k^2}` as a JAX scalar of at least float32, computed without
    overflow.

  Example:
    >>> import clipjax
    >>> print(clipjax.sensitivity({"dense": 3.0, "out": 4.0}))
    5.0
    >>> print(clipjax.sensitivity(1.5))
    1.5
  """
  _checks.check_clip_norm(clip_norm)
  return _sensitivity_jit(clip_norm)


_sensitivity_jit = jax.jit(_aggregate.sensitivity)


def per_example_clip(
  grads: Any,
  clip_norm: Any,
  *,
  p: float | str = 2,
  scaling: str = "clip",
  stability: jax.typing.ArrayLike = 0.01,
  mask: jax.Array | None = None,
) -> tuple[Any, Any]:
  """Scales every example's gradient by a clipping rule, group by group.

  With ``scaling="clip"`` example ``i`` becomes ``g_i · min(1, C / ‖g_i‖_p)``, where
  ``‖g_i‖_p`` is the p-norm of example ``i``'s slice of all leaves (of its group's
  leaves, with a group-wise clip norm) taken together. ``"automatic"`` uses
  ``C / (‖g_i‖_p + stability)``, ``"normalize"`` ``C / ‖g_i‖_p``. Examples with NaN or
  inf entries and masked-out examples come back as zeros. ``clip_norm = 0`` zeroes
  every example.

  Args:
    grads: per-example gradients, a pytree whose leaves all have the batch on their
      leading axis.
    clip_norm: the bound ``C >= 0`` (``inf`` means no clipping under ``"clip"``), or
      a pytree prefix of ``grads`` with one bound per group.
    p: the norm, any float ``>= 1`` or ``inf`` (or ``"inf"``); static.
    scaling: ``"clip"``, ``"automatic"`` or ``"normalize"``; static.
    stability: ``γ > 0`` of ``"automatic"``.
    mask: ``None`` or a boolean ``(batch,)`` array, False for padding.

  Returns:
    ``(clipped, norms)``: ``clipped`` has the structure and dtypes of ``grads``;
    ``norms`` holds the norms before clipping, a ``(batch,)`` array (a pytree like
    ``clip_norm`` of them, group-wise): ``inf`` for non-finite examples, 0 for
    masked-out ones.

  Example:
    >>> import jax.numpy as jnp
    >>> from clipjax import per_example_clip
    >>> grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [jnp.nan, 1.0]])}
    >>> clipped, norms = per_example_clip(grads, 1.0)
    >>> print(clipped["w"])
    [[0.6 0.8]
     [0.3 0.4]
     [0.  0. ]]
    >>> print(norms)
    [5.  0.5 inf]
    >>> grads = {"a": jnp.array([[3.0], [0.5]]), "b": jnp.array([[0.0, 4.0], [0.0, 0.0]])}
    >>> clipped, norms = per_example_clip(grads, {"a": 1.0, "b": 2.0})  # group-wise
    >>> print(clipped["a"].ravel(), clipped["b"][0])
    [1.  0.5] [0. 2.]
    >>> print(norms["b"])
    [4. 0.]

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, CCS 2016.

    Bu, Wang, Zha & Karypis, `Automatic Clipping: Differentially Private Deep
    Learning Made Easier and Stronger <https://arxiv.org/abs/2206.07136>`_,
    NeurIPS 2023.
  """
  _checks.check_differentiable(grads, "grads")
  p = _aggregate.check_clipping(p, clip_norm, scaling, stability)
  mask = _checks.check_mask(mask, _checks.batch_size(grads))
  return _per_example_clip(grads, clip_norm, stability, mask, p=p, scaling=scaling)


# Compiled as one program (here and in clipping_stats), so that an eager call compiles
# once per shape instead of once per primitive; inside a user's `jit` it is inlined.
@functools.partial(jax.jit, static_argnames=("p", "scaling"))
def _per_example_clip(grads, clip_norm, stability, mask, *, p, scaling):
  c = _aggregate.clip(grads, clip_norm, p, scaling, stability, mask)
  clipped = [
    jax.tree.map(lambda g, w=w: _norms.scale_examples(g, w), t)
    for t, w in zip(c.subtrees, c.weights)
  ]
  return c.prefix.unflatten(clipped), c.prefix.unflatten(c.norms)


def dp_aggregate(
  clip_norm: Any,
  noise_multiplier: jax.typing.ArrayLike,
  key: jax.Array | int,
  *,
  pre_clip_noise: jax.typing.ArrayLike = 0.0,
  p: float | str = 2,
  scaling: str = "clip",
  stability: jax.typing.ArrayLike = 0.01,
  expected_batch_size: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips per-example gradients, sums them, adds Gaussian noise, averages.

  From per-example gradients :math:`g_1, \dots, g_B` (leading batch axis on every
  leaf) the update is

  .. math::

    \frac{1}{B'}\Big(\sum_{i\ \mathrm{real}} \mathrm{clip}(g_i + k\,\zeta_i, C)
      + \mathcal{N}(0, (\sigma\, \Delta)^2 I)\Big),
    \qquad \mathrm{clip}(g, C) = g \min(1, C / \|g\|_p),

  with :math:`\zeta_i \sim \mathcal{N}(0, I)`, :math:`k` = ``pre_clip_noise``,
  :math:`\Delta` = :func:`sensitivity` of the clip norm (:math:`C` itself when it is
  a scalar), and :math:`B'` = ``expected_batch_size``, or the physical (padded) batch
  size :math:`B` when it is ``None``. Under Poisson sampling pass
  ``expected_batch_size = sample_rate · num_examples`` and the batch's ``mask``:
  dividing by the realized batch size would make the divisor depend on the data.
  ``scaling`` replaces ``clip`` by ``C/(‖g‖ + stability)`` (``"automatic"``) or
  ``C/‖g‖`` (``"normalize"``); with a group-wise clip norm (a pytree prefix of the
  gradients) each group of each example is clipped to its own :math:`C_k`. An example
  with a NaN or inf entry is dropped. The noise is drawn in float32 (float64 for
  float64 leaves), added and divided there, and cast to each leaf's dtype at the end;
  its largest draw is 9.49σ (see the private SGD guide).

  With :math:`k = 0` this is DP-SGD's aggregation; with :math:`k > 0` it is Chen et
  al.'s bias correction: symmetric noise before clipping makes the clipped mean
  point back toward the true gradient. The pre-clipping noise is a per-example
  perturbation, not a privacy mechanism: the guarantee comes from :math:`\sigma`
  alone (every clipped term still has norm :math:`\le C`). It is skipped when
  ``pre_clip_noise`` is a Python zero; a traced zero still draws (and adds zero
  times) the noise.

  It must be the first transformation of a chain, since later ones expect ordinary
  (aggregated) gradients. To accumulate a logical batch over several physical ones,
  use :func:`clipjax.microbatch` or :func:`clipjax.accumulate` with
  :func:`dp_noise`, not ``optax.MultiSteps`` (see :func:`clipjax.accumulate`).

  Args:
    clip_norm: per-example clip norm :math:`C >= 0`, finite, or a pytree prefix of
      the gradients (group-wise); not all zero when :math:`\sigma > 0`.
    noise_multiplier: :math:`\sigma >= 0`, finite, the noise standard deviation in
      units of the sensitivity.
    key: a typed PRNG key, a raw ``uint32`` key or an int seed.
    pre_clip_noise: :math:`k >= 0`, the standard deviation of the perturbation added
      to each example before clipping.
    p: the clipping norm, a float in ``[1, 2]``: the Gaussian mechanism's guarantee
      needs ``p <= 2``, and larger ``p`` is refused. Static.
    scaling: ``"clip"``, ``"automatic"`` or ``"normalize"``. Static.
    stability: ``γ > 0`` of ``"automatic"``.
    expected_batch_size: :math:`B' > 0`, the divisor; ``None`` for the physical
      batch size.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`DPAggregateState`,
    whose ``update(per_example_grads, state, params=None, *, mask=None)`` ignores
    other extra arguments.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from clipjax import dp_aggregate
    >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [9.0, 9.0]])}
    >>> tx = dp_aggregate(clip_norm=1.0, noise_multiplier=0.0, key=0, expected_batch_size=2)
    >>> state = tx.init(None)
    >>> mask = jnp.array([True, True, False])  # the third example is padding
    >>> updates, state = tx.update(per_example, state, mask=mask)
    >>> print(updates["w"])  # (0.6 + 0.3, 0.8 + 0.4) / 2
    [0.45 0.6 ]

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, CCS 2016.

    Chen, Wu & Hong, `Understanding Gradient Clipping in Private SGD: A
    Geometric Perspective <https://arxiv.org/abs/2006.15429>`_, NeurIPS 2020.
  """
  p = _aggregate.check_clipping(p, clip_norm, scaling, stability)
  if p > 2:
    # The L2 norm exceeds the p-norm for p > 2: clipping would not bound the sensitivity.
    raise ValueError(
      f"dp_aggregate needs p <= 2 (the Gaussian noise is calibrated to the sum's L2 "
      f"sensitivity, which a p-norm clip bounds only for p <= 2), got p={p}."
    )
  _aggregate.check_noise(clip_norm, noise_multiplier)
  _checks.check_nonnegative("pre_clip_noise", pre_clip_noise)
  if expected_batch_size is not None:
    _checks.check_positive("expected_batch_size", expected_batch_size, finite=True)
  initial_key = _checks.canonical_key(key)

  def init_fn(params):
    del params
    return DPAggregateState(key=initial_key)

  def update_fn(updates, state, params=None, *, mask=None, **extra):
    del params, extra
    size = _checks.batch_size(updates)
    mask = _checks.check_mask(mask, size)
    next_key, perturb_key, noise_key = jax.random.split(state.key, 3)
    summed, _ = _aggregate.clipped_sum(
      updates,
      clip_norm=clip_norm,
      p=p,
      scaling=scaling,
      stability=stability,
      mask=mask,
      pre_clip_noise=pre_clip_noise,
      key=perturb_key,
    )
    divisor = size if expected_batch_size is None else expected_batch_size
    stddev = _aggregate.noise_stddev(noise_multiplier, clip_norm)
    noisy = _aggregate.noisy_mean(summed, stddev=stddev, divisor=divisor, key=noise_key)
    return _aggregate.cast_like(noisy, updates), DPAggregateState(key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dp_noise(
  clip_norm: Any,
  noise_multiplier: jax.typing.ArrayLike,
  batch_size: jax.typing.ArrayLike,
  key: jax.Array | int,
) -> optax.GradientTransformationExtraArgs:
  r"""Turns a sum of clipped gradients into DP-SGD's noisy mean.

  The update is :math:`(s + \mathcal{N}(0, (\sigma\, \Delta)^2 I)) / B` for an
  incoming sum :math:`s` of per-example gradients each already clipped to
  ``clip_norm`` (e.g. by :func:`clipjax.clipped_grad`), with :math:`\Delta` =
  :func:`sensitivity` of the clip norm: :math:`C` for a scalar, :math:`\sqrt{\sum_k
  C_k^2}` for a group-wise one. With it, DP-SGD is ``clipped_grad`` followed by
  ``optax.chain(dp_noise(...), optax.adam(...))``.

  Args:
    clip_norm: the clip norm the sum was clipped with: :math:`C >= 0`, finite, or a
      pytree of per-group clip norms; not all zero when :math:`\sigma > 0`.
    noise_multiplier: :math:`\sigma >= 0`, finite.
    batch_size: :math:`B > 0`, the number of examples the sum stands for: the batch
      size of a fixed-size batch, the EXPECTED batch size ``sample_rate ·
      num_examples`` under Poisson sampling (not the realized or padded size), the
      whole logical batch's under :func:`clipjax.accumulate`.
    key: a typed PRNG key, a raw ``uint32`` key or an int seed.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`DPNoiseState`;
    extra arguments to ``update`` are ignored.

  Example:
    >>> import jax.numpy as jnp
    >>> from clipjax import dp_noise
    >>> tx = dp_noise(clip_norm=1.0, noise_multiplier=0.0, batch_size=4, key=0)
    >>> updates, state = tx.update(jnp.array([2.0, 1.0]), tx.init(None))
    >>> print(updates)
    [0.5  0.25]

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, CCS 2016.
  """
  _checks.check_clip_norm(clip_norm)
  _aggregate.check_noise(clip_norm, noise_multiplier)
  _checks.check_positive("batch_size", batch_size, finite=True)
  initial_key = _checks.canonical_key(key)

  def init_fn(params):
    del params
    return DPNoiseState(key=initial_key)

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    next_key, noise_key = jax.random.split(state.key)
    stddev = _aggregate.noise_stddev(noise_multiplier, clip_norm)
    return _aggregate.noisy_mean(
      updates, stddev=stddev, divisor=batch_size, key=noise_key
    ), DPNoiseState(key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clipping_stats(
  per_example_grads: Any,
  clip_norm: Any,
  *,
  p: float | str = 2,
  scaling: str = "clip",
  stability: jax.typing.ArrayLike = 0.01,
  mask: jax.Array | None = None,
) -> ClippingStats:
  """Measures how much per-example clipping distorts the mean gradient.

  ``clip(g)`` is :func:`per_example_clip`'s, with the same arguments. Means are over
  the real examples (``mask`` True); non-finite examples are zeroed in both means and
  count as clipped.

  Args:
    per_example_grads: a pytree with the batch on every leaf's leading axis.
    clip_norm: the clip norm ``C >= 0``, or a pytree prefix of the gradients.
    p: the norm of the per-example norms; static.
    scaling: ``"clip"``, ``"automatic"`` or ``"normalize"``; static.
    stability: ``γ > 0`` of ``"automatic"``.
    mask: ``None`` or a boolean ``(batch,)`` array, False for padding.

  Returns:
    A :class:`ClippingStats`. All-zero gradients (or no real example) give
    ``fraction_clipped = 0``, ``bias_norm = 0`` and ``cosine = 1``.

  Example:
    >>> import jax.numpy as jnp
    >>> from clipjax import clipping_stats
    >>> grads = jnp.array([[4.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    >>> stats = clipping_stats(grads, 1.0, mask=jnp.array([True, True, False]))
    >>> print(stats.fraction_clipped, stats.mean_norm, stats.bias_norm)
    0.5 2.5 1.5

  References:
    Chen, Wu & Hong, `Understanding Gradient Clipping in Private SGD: A
    Geometric Perspective <https://arxiv.org/abs/2006.15429>`_, NeurIPS 2020.
  """
  p = _aggregate.check_clipping(p, clip_norm, scaling, stability)
  mask = _checks.check_mask(mask, _checks.batch_size(per_example_grads))
  return _clipping_stats(per_example_grads, clip_norm, stability, mask, p=p, scaling=scaling)


@functools.partial(jax.jit, static_argnames=("p", "scaling"))
def _clipping_stats(per_example_grads, clip_norm, stability, mask, *, p, scaling):
  size = _checks.batch_size(per_example_grads)
  c = _aggregate.clip(per_example_grads, clip_norm, p, scaling, stability, mask)
  dtype = c.norms[0].dtype
  real = jnp.asarray(size if mask is None else jnp.sum(mask), dtype)
  count = jnp.maximum(real, 1)
  keep = c.weights[0].keep  # the same in every group

  def mean(weights):
    scaled = [w._replace(factor=w.factor / count) for w in weights]
    return c.prefix.unflatten([_norms.weighted_sum(t, w) for t, w in zip(c.subtrees, scaled)])

  clipped_mean = mean(c.weights)
  unclipped = _norms.Weights(keep.astype(dtype), jnp.zeros(size, jnp.int32), keep)
  plain_mean = mean([unclipped] * len(c.subtrees))
  clipped_length = _norms.global_norm(clipped_mean, 2.0)
  length = _norms.global_norm(plain_mean, 2.0)

  def direction(tree, norm):
    return jax.tree.map(lambda v: v / jnp.where(norm > 0, norm, 1).astype(v.dtype), tree)

  both = (clipped_length > 0) & (length > 0)
  dot = optax.tree.vdot(direction(clipped_mean, clipped_length), direction(plain_mean, length))
  cosine = jnp.where(both, jnp.clip(dot, -1, 1), jnp.where(clipped_length == length, 1.0, 0.0))
  clip_norms = jax.tree.leaves(clip_norm)
  return ClippingStats(
    fraction_clipped=c.prefix.unflatten(
      [jnp.sum(n > jnp.asarray(C, dtype)) / count for n, C in zip(c.norms, clip_norms)]
    ),
    mean_norm=c.prefix.unflatten([jnp.sum(n) / count for n in c.norms]),
    bias_norm=_norms.global_norm(optax.tree.sub(clipped_mean, plain_mean), 2.0),
    cosine=cosine.astype(dtype),
  )
