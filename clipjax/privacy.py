"""Per-example clipping and noisy aggregation for differentially private SGD.

Everything here takes *per-example* gradients: a pytree whose leaves all carry
the batch on their leading axis (what ``jax.vmap(jax.grad(loss))`` returns).
An example's norm is the global p-norm of its slice across all leaves, written
as plain reductions over the non-batch axes, so it runs under ``jax.jit`` with
the batch axis sharded over a device mesh and never gathers a leaf.

An example whose norm is not finite (it contains NaN or inf, or its norm
overflows the dtype) is zeroed: it contributes nothing to any sum, its norm is
reported as ``inf``, and the other examples are untouched.

The optax factories close over their hyperparameters, which may be Python
floats or JAX scalars, so they work under :func:`optax.inject_hyperparams`
(``p`` must stay static there: ``static_args=("p",)``). Keys are typed
``jax.Array`` PRNG keys, raw ``uint32`` keys or int seeds; the key lives in the
state and is split on every update, so every step draws fresh noise.

References:
  Abadi et al., `Deep Learning with Differential Privacy
  <https://arxiv.org/abs/1607.00133>`_, CCS 2016.

  Chen, Wu & Hong, `Understanding Gradient Clipping in Private SGD: A
  Geometric Perspective <https://arxiv.org/abs/2006.15429>`_, NeurIPS 2020.

  Andrew, Thakkar, McMahan & Ramaswamy, `Differentially Private Learning with
  Adaptive Clipping <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


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


class AdaptiveDPAggregateState(NamedTuple):
  """State of :func:`adaptive_dp_aggregate`.

  Attributes:
    clip_norm: the clip norm the *next* update will use (a scalar). It starts
      at ``initial_clip_norm``; each update clips with it and only then moves
      it toward the target quantile.
    key: typed PRNG key of the next update, split on every update.
  """

  clip_norm: jax.Array
  key: jax.Array


class ClippingStats(NamedTuple):
  """Diagnostics of per-example clipping, from :func:`clipping_stats`.

  Attributes:
    fraction_clipped: fraction of examples with norm ``> clip_norm``
      (non-finite examples count as clipped).
    mean_norm: mean per-example L2 norm (``inf`` if any example is
      non-finite).
    bias_norm: ``‖mean(clip(g)) − mean(g)‖``, the L2 distance between the mean
      clipped gradient and the mean gradient.
    cosine: cosine between ``mean(clip(g))`` and ``mean(g)``; 1 when both are
      zero, 0 when exactly one is.
  """

  fraction_clipped: jax.Array
  mean_norm: jax.Array
  bias_norm: jax.Array
  cosine: jax.Array


def _canonical_key(key) -> jax.Array:
  """Returns a typed PRNG key from a typed key, a raw uint32 key or a seed."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  key = jnp.asarray(key)
  if key.ndim == 0:
    return jax.random.key(key)
  return jax.random.wrap_key_data(key)


def _static_p(p) -> float:
  if isinstance(p, jax.core.Tracer):
    raise ValueError(
      "p must be static, not traced. Under optax.inject_hyperparams pass static_args=('p',)."
    )
  if isinstance(p, str):
    if p.lower() != "inf":
      raise ValueError(f"p must be a number >= 1 or 'inf', got {p!r}.")
    return math.inf
  p = float(p)
  if not p >= 1:
    raise ValueError(f"p must be >= 1 (or inf), got {p!r}.")
  return p


def _check_nonnegative(name: str, value) -> None:
  # Python numbers only: JAX scalars may be traced (schedules and
  # inject_hyperparams under jit), and reading a concrete one back would sync.
  if isinstance(value, (int, float)) and not value >= 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}.")


def _is_static_zero(value) -> bool:
  """True only for a Python zero: then the noise draw can be skipped."""
  return isinstance(value, (int, float)) and value == 0


def _batch_size(grads) -> int:
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError("per-example gradients must have at least one leaf.")
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
      "per-example gradients need the same leading batch axis on every "
      f"leaf; got leaf shapes {[leaf.shape for leaf in leaves]}."
    )
  return sizes.pop()


def _per_example(vector, like):
  """Reshapes a (batch,) vector to broadcast against a per-example leaf."""
  return vector.reshape((-1,) + (1,) * (like.ndim - 1))


def _per_example_norms(grads, p: float) -> jax.Array:
  """Per-example global p-norms (NaN or inf for non-finite examples)."""

  def reduce(fn, leaf, op=jnp.sum):
    # Half-precision leaves are reduced in float32 (the cast fuses into the
    # reduction), so their squares neither overflow nor lose the small terms.
    leaf = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
    return op(fn(leaf), axis=tuple(range(1, leaf.ndim)))

  leaves = jax.tree.leaves(grads)
  if p == 2:
    return jnp.sqrt(sum(reduce(jnp.square, g) for g in leaves))
  if p == 1:
    return sum(reduce(jnp.abs, g) for g in leaves)
  if p == math.inf:
    # `initial` keeps leaves with an empty non-batch axis reducible.
    maxima = [reduce(jnp.abs, g, functools.partial(jnp.max, initial=0)) for g in leaves]
    norms = maxima[0]
    for m in maxima[1:]:
      norms = jnp.maximum(norms, m)
    return norms
  return sum(reduce(lambda x: jnp.abs(x) ** p, g) for g in leaves) ** (1 / p)


def _clip_factors(norms, clip_norm):
  """Returns ``(scale, finite)``: ``min(1, C/‖g_i‖)``, 0 for bad examples."""
  finite = jnp.isfinite(norms)
  over = norms > clip_norm
  # The inner `where` keeps 0/0 out of the untaken branch when C = ‖g‖ = 0.
  scale = jnp.where(over, clip_norm / jnp.where(over, norms, 1), 1)
  return jnp.where(finite, scale, 0).astype(norms.dtype), finite


def _sum_sharding(leaf):
  """The sharding of a sum over ``leaf``'s batch axis, for explicit meshes.

  Contracting an explicitly sharded batch axis is ambiguous to JAX's sharding
  rules, so the output keeps the remaining axes' specs; elsewhere XLA decides.
  """
  sharding = jax.typeof(leaf).sharding
  if jax.sharding.AxisType.Explicit not in sharding.mesh.axis_types:
    return None
  # A NamedSharding, not a bare spec: it also works without ``jax.set_mesh``.
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))


def _weighted_sum(grads, weights, finite):
  """``Σ_i w_i g_i`` over the batch axis, skipping non-finite examples.

  A zero weight does not silence a NaN (0·NaN = NaN), so bad examples must be
  masked out; the mask costs a pass over the gradients, so it only runs
  (inside ``lax.cond``) when some example is actually bad. ``tensordot`` is a
  matrix-vector product here: XLA's CPU reduction over a leading axis is an
  order of magnitude slower.
  """

  def dot(gs):
    return jax.tree.map(
      lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1, out_sharding=_sum_sharding(g)),
      gs,
    )

  def masked_dot(gs):
    return dot(jax.tree.map(lambda g: jnp.where(_per_example(finite, g), g, 0), gs))

  return jax.lax.cond(jnp.all(finite), dot, masked_dot, grads)


def _perturb(grads, pre_clip_noise, key):
  """``g_i + k·ζ_i`` with ``ζ_i ~ N(0, I)``; skipped for a Python zero ``k``."""
  if _is_static_zero(pre_clip_noise):
    return grads
  noise = optax.tree.random_like(key, grads)
  return jax.tree.map(lambda g, z: (g + pre_clip_noise * z).astype(g.dtype), grads, noise)


def _clipped_sum(grads, clip_norm, p, pre_clip_noise, key):
  """Returns ``(Σ_i clip(g_i + k·ζ_i, C), norms of g_i + k·ζ_i)``."""
  grads = _perturb(grads, pre_clip_noise, key)
  norms = _per_example_norms(grads, p)
  scale, finite = _clip_factors(norms, clip_norm)
  return _weighted_sum(grads, scale, finite), jnp.where(finite, norms, jnp.inf)


def _noise_stddev(noise_multiplier, clip_norm):
  """``σ·C``, or a Python zero (no draw) when ``σ`` is a Python zero."""
  return 0.0 if _is_static_zero(noise_multiplier) else noise_multiplier * clip_norm


def _noisy_mean(summed, stddev, batch_size, key):
  """``(summed + N(0, stddev²·I)) / batch_size``, leaf dtypes kept."""
  if _is_static_zero(stddev):
    return jax.tree.map(lambda s: (s / batch_size).astype(s.dtype), summed)
  noise = optax.tree.random_like(key, summed)
  return jax.tree.map(
    lambda s, z: ((s + stddev * z) / batch_size).astype(s.dtype),
    summed,
    noise,
  )


def per_example_clip(grads, clip_norm, *, p: float = 2):
  """Scales every example's gradient to global p-norm at most ``clip_norm``.

  Example ``i`` becomes ``g_i · min(1, C / ‖g_i‖_p)``, where ``‖g_i‖_p`` is
  the p-norm of example ``i``'s slice of all leaves taken together. An example
  whose norm is not finite (NaN or inf inside, or a norm that overflows) is
  replaced by zeros and reported with norm ``inf``; the others are unaffected.
  ``clip_norm = 0`` zeroes every example.

  Args:
    grads: per-example gradients, a pytree whose leaves all have the batch on
      their leading axis.
    clip_norm: the bound ``C >= 0``, a Python float or JAX scalar (``inf``
      means no clipping).
    p: the norm, any float ``>= 1`` or ``inf`` (or ``"inf"``); static.

  Returns:
    ``(clipped, norms)``: ``clipped`` has the structure and dtypes of
    ``grads``; ``norms`` has shape ``(batch,)`` and holds the norms before
    clipping (``inf`` for non-finite examples).

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

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, CCS 2016.
  """
  p = _static_p(p)
  _check_nonnegative("clip_norm", clip_norm)
  _batch_size(grads)
  norms = _per_example_norms(grads, p)
  scale, finite = _clip_factors(norms, clip_norm)
  clipped = jax.tree.map(
    lambda g: jnp.where(_per_example(finite, g), g * _per_example(scale, g).astype(g.dtype), 0),
    grads,
  )
  return clipped, jnp.where(finite, norms, jnp.inf)


def dp_aggregate(
  clip_norm: jax.typing.ArrayLike,
  noise_multiplier: jax.typing.ArrayLike,
  key: jax.Array | int,
  *,
  pre_clip_noise: jax.typing.ArrayLike = 0.0,
  p: float = 2,
) -> optax.GradientTransformation:
  r"""Clips per-example gradients, sums them, adds Gaussian noise, averages.

  From per-example gradients :math:`g_1, \dots, g_B` (leading batch axis on
  every leaf) the update is

  .. math::

    \frac{1}{B}\Big(\sum_i \mathrm{clip}(g_i + k\,\zeta_i, C)
      + \mathcal{N}(0, (\sigma C)^2 I)\Big),
    \qquad \mathrm{clip}(g, C) = g \min(1, C / \|g\|_p),

  with :math:`\zeta_i \sim \mathcal{N}(0, I)` and :math:`k` =
  ``pre_clip_noise``. With :math:`k = 0` this is DP-SGD's aggregation; with
  :math:`k > 0` it is Chen et al.'s bias correction: symmetric noise before
  clipping makes the clipped mean point back toward the true gradient. The
  pre-clipping noise is a per-example perturbation, not a privacy mechanism:
  the guarantee comes from :math:`\sigma` alone (every clipped term still has
  norm :math:`\le C`). The perturbation is skipped when ``pre_clip_noise`` is
  a Python zero; a traced zero still draws (and adds zero times) the noise.

  It must be the first transformation of a chain, since later ones expect
  ordinary (aggregated) gradients.

  Args:
    clip_norm: per-example clip norm :math:`C >= 0`.
    noise_multiplier: :math:`\sigma >= 0`, the noise standard deviation in
      units of :math:`C`.
    key: a typed PRNG key, a raw ``uint32`` key or an int seed.
    pre_clip_noise: :math:`k >= 0`, the standard deviation of the
      perturbation added to each example before clipping.
    p: the clipping norm (any float ``>= 1`` or ``inf``); the Gaussian
      mechanism's guarantee needs ``p = 2``. Static.

  Returns:
    An :class:`optax.GradientTransformation` with state
    :class:`DPAggregateState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from clipjax import dp_aggregate
    >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> tx = dp_aggregate(clip_norm=1.0, noise_multiplier=0.0, key=0)
    >>> state = tx.init(None)
    >>> updates, state = tx.update(per_example, state)
    >>> print(updates["w"])  # (0.6 + 0.3, 0.8 + 0.4) / 2
    [0.45 0.6 ]

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, CCS 2016.

    Chen, Wu & Hong, `Understanding Gradient Clipping in Private SGD: A
    Geometric Perspective <https://arxiv.org/abs/2006.15429>`_, NeurIPS 2020.
  """
  p = _static_p(p)
  _check_nonnegative("clip_norm", clip_norm)
  _check_nonnegative("noise_multiplier", noise_multiplier)
  _check_nonnegative("pre_clip_noise", pre_clip_noise)
  initial_key = _canonical_key(key)

  def init_fn(params):
    del params
    return DPAggregateState(key=initial_key)

  def update_fn(updates, state, params=None):
    del params
    batch_size = _batch_size(updates)
    next_key, perturb_key, noise_key = jax.random.split(state.key, 3)
    summed, _ = _clipped_sum(updates, clip_norm, p, pre_clip_noise, perturb_key)
    stddev = _noise_stddev(noise_multiplier, clip_norm)
    updates = _noisy_mean(summed, stddev, batch_size, noise_key)
    return updates, DPAggregateState(key=next_key)

  return optax.GradientTransformation(init_fn, update_fn)


def _check_split(noise_multiplier, count_noise_stddev) -> None:
  z, sigma_b = noise_multiplier, count_noise_stddev
  if (
    isinstance(z, (int, float)) and isinstance(sigma_b, (int, float)) and z > 0 and z >= 2 * sigma_b
  ):
    raise ValueError(
      "noise_multiplier must be < 2 * count_noise_stddev to leave noise for "
      f"the sum; got noise_multiplier={z!r}, count_noise_stddev={sigma_b!r}."
      " Raise count_noise_stddev (or the batch size, for the default B/20) "
      "or lower noise_multiplier."
    )


def _count_noise_and_sum_multiplier(noise_multiplier, count_noise_stddev, batch_size):
  """Returns ``(σ_b, z_Δ)``: the count's noise and the sum's multiplier.

  Andrew et al. (Theorem 1) show that the sum noised with ``z_Δ`` plus the
  count noised with ``σ_b`` cost what one Gaussian query with multiplier ``z``
  costs when ``z_Δ^−2 + (2σ_b)^−2 = z^−2``.
  """
  if count_noise_stddev is None:
    # `z > 0` is a bool for Python numbers and a traced bool otherwise; z = 0
    # (no privacy) gets no count noise either.
    count_noise_stddev = (batch_size / 20) * (noise_multiplier > 0)
  _check_split(noise_multiplier, count_noise_stddev)
  z = noise_multiplier
  positive = z > 0
  z_safe = jnp.where(positive, z, 1.0)
  split = (z_safe**-2.0 - jnp.asarray(2.0 * count_noise_stddev) ** -2.0) ** -0.5
  # Under tracing an invalid split is the square root of a negative: NaN,
  # never a silently wrong finite multiplier.
  return count_noise_stddev, jnp.where(positive, split, 0.0)


def adaptive_dp_aggregate(
  initial_clip_norm: jax.typing.ArrayLike,
  noise_multiplier: jax.typing.ArrayLike,
  key: jax.Array | int,
  *,
  target_quantile: jax.typing.ArrayLike = 0.5,
  clip_learning_rate: jax.typing.ArrayLike = 0.2,
  count_noise_stddev: jax.typing.ArrayLike | None = None,
  pre_clip_noise: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
  r""":func:`dp_aggregate` with the clip norm adapted toward a norm quantile.

  Each update, with the current clip norm :math:`C` (``state.clip_norm``):

  1. the output is :func:`dp_aggregate`'s with clip norm :math:`C` and noise
     multiplier :math:`z_\Delta` (L2 norm);
  2. each example reports :math:`b_i = 1[\|g_i + k\zeta_i\| \le C]`
     (non-finite examples report 0), and the noised fraction is
     :math:`\bar b = \mathrm{clamp}((\sum_i (b_i - \frac12) + \mathcal{N}(0,
     \sigma_b^2)) / B + \frac12, 0, 1)`;
  3. the clip norm for the *next* update is
     :math:`C \exp(-\eta_C (\bar b - \gamma))`.

  So the update at a step uses the clip norm from *before* that step's
  adaptation, as in the paper; ``state.clip_norm`` after the update holds the
  adapted value. The geometric step moves :math:`C` up while fewer than a
  fraction :math:`\gamma` of the examples fit, and down otherwise, tracking
  the :math:`\gamma`-quantile of the per-example norms.

  Privacy: the count is a Gaussian query of sensitivity ½. With
  :math:`z_\Delta = (z^{-2} - (2\sigma_b)^{-2})^{-1/2}` on the sum, the pair
  costs exactly what one Gaussian query with multiplier :math:`z` costs, so
  account for ``noise_multiplier`` as usual. This requires
  :math:`z < 2\sigma_b`; otherwise a ``ValueError`` is raised (for Python
  numbers; traced values that violate it give NaN updates). ``z = 0`` means no
  privacy: no noise on the sum and, unless ``count_noise_stddev`` is given, none
  on the count either (``σ_b`` defaults to ``B/20`` only when ``z > 0``).

  Args:
    initial_clip_norm: the first clip norm, ``> 0``.
    noise_multiplier: :math:`z >= 0`, the multiplier of the equivalent single
      Gaussian query (the one to give to :func:`clipjax.dp_epsilon`).
    key: a typed PRNG key, a raw ``uint32`` key or an int seed.
    target_quantile: :math:`\gamma \in [0, 1]`, the fraction of examples that
      should end up unclipped.
    clip_learning_rate: :math:`\eta_C >= 0`, the geometric step size.
    count_noise_stddev: :math:`\sigma_b >= 0`; ``None`` gives ``B / 20`` (0
      when ``z = 0``), with ``B`` the batch size.
    pre_clip_noise: :math:`k >= 0`, as in :func:`dp_aggregate`.

  Returns:
    An :class:`optax.GradientTransformation` with state
    :class:`AdaptiveDPAggregateState`.

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
  _check_nonnegative("noise_multiplier", noise_multiplier)
  _check_nonnegative("clip_learning_rate", clip_learning_rate)
  _check_nonnegative("pre_clip_noise", pre_clip_noise)
  if count_noise_stddev is not None:
    _check_nonnegative("count_noise_stddev", count_noise_stddev)
    _check_split(noise_multiplier, count_noise_stddev)
  if isinstance(initial_clip_norm, (int, float)) and not initial_clip_norm > 0:
    raise ValueError(f"initial_clip_norm must be > 0, got {initial_clip_norm!r}.")
  if isinstance(target_quantile, (int, float)) and not 0 <= target_quantile <= 1:
    raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile!r}.")
  initial_key = _canonical_key(key)

  def init_fn(params):
    del params
    clip_norm = jnp.asarray(initial_clip_norm)
    dtype = clip_norm.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      dtype = jnp.result_type(float)
    # A strong dtype: a weakly typed initial state would change type after
    # the first update and make `jit` compile the step twice.
    return AdaptiveDPAggregateState(clip_norm=jnp.array(clip_norm, dtype=dtype), key=initial_key)

  def update_fn(updates, state, params=None):
    del params
    batch_size = _batch_size(updates)
    count_stddev, sum_multiplier = _count_noise_and_sum_multiplier(
      noise_multiplier, count_noise_stddev, batch_size
    )
    next_key, perturb_key, noise_key, count_key = jax.random.split(state.key, 4)
    clip_norm = state.clip_norm
    summed, norms = _clipped_sum(updates, clip_norm, 2.0, pre_clip_noise, perturb_key)
    # The sum's noise is z_Δ·C alone (z_Δ already stands for z); a Python
    # z = 0 skips the draw, a traced one adds z_Δ = 0 times it.
    stddev = 0.0 if _is_static_zero(noise_multiplier) else sum_multiplier * clip_norm
    updates = _noisy_mean(summed, stddev, batch_size, noise_key)

    unclipped = jnp.sum(norms <= clip_norm).astype(clip_norm.dtype)
    count_noise = count_stddev * jax.random.normal(count_key, (), clip_norm.dtype)
    fraction = jnp.clip((unclipped - batch_size / 2 + count_noise) / batch_size + 0.5, 0.0, 1.0)
    new_clip_norm = clip_norm * jnp.exp(-clip_learning_rate * (fraction - target_quantile))
    return updates, AdaptiveDPAggregateState(
      clip_norm=new_clip_norm.astype(clip_norm.dtype), key=next_key
    )

  return optax.GradientTransformation(init_fn, update_fn)


def clipping_stats(per_example_grads, clip_norm) -> ClippingStats:
  """Measures how much per-example L2 clipping distorts the mean gradient.

  Non-finite examples are zeroed (as :func:`per_example_clip` does) in both
  means, and count as clipped.

  Args:
    per_example_grads: a pytree with the batch on every leaf's leading axis.
    clip_norm: the clip norm ``C >= 0``.

  Returns:
    A :class:`ClippingStats` of scalars. All-zero gradients give
    ``fraction_clipped = 0``, ``bias_norm = 0`` and ``cosine = 1``.

  Example:
    >>> import jax.numpy as jnp
    >>> from clipjax import clipping_stats
    >>> grads = jnp.array([[4.0, 0.0], [0.0, 1.0]])
    >>> stats = clipping_stats(grads, 1.0)
    >>> print(stats.fraction_clipped, stats.mean_norm, stats.bias_norm)
    0.5 2.5 1.5

  References:
    Chen, Wu & Hong, `Understanding Gradient Clipping in Private SGD: A
    Geometric Perspective <https://arxiv.org/abs/2006.15429>`_, NeurIPS 2020.
  """
  _check_nonnegative("clip_norm", clip_norm)
  batch_size = _batch_size(per_example_grads)
  norms = _per_example_norms(per_example_grads, 2.0)
  scale, finite = _clip_factors(norms, clip_norm)
  norms = jnp.where(finite, norms, jnp.inf)
  clipped_mean = _weighted_sum(per_example_grads, scale / batch_size, finite)
  mean = _weighted_sum(per_example_grads, finite.astype(norms.dtype) / batch_size, finite)
  clipped_length = optax.tree.norm(clipped_mean)
  length = optax.tree.norm(mean)
  denominator = clipped_length * length
  cosine = jnp.where(
    denominator > 0,
    optax.tree.vdot(clipped_mean, mean) / jnp.where(denominator > 0, denominator, 1),
    jnp.where((clipped_length == 0) & (length == 0), 1.0, 0.0),
  )
  return ClippingStats(
    fraction_clipped=jnp.mean(norms > clip_norm),
    mean_norm=jnp.mean(norms),
    bias_norm=optax.tree.norm(optax.tree.sub(clipped_mean, mean)),
    cosine=cosine.astype(norms.dtype),
  )


def dp_noise(
  clip_norm: jax.typing.ArrayLike,
  noise_multiplier: jax.typing.ArrayLike,
  batch_size: jax.typing.ArrayLike,
  key: jax.Array | int,
) -> optax.GradientTransformation:
  r"""Turns a sum of clipped gradients into DP-SGD's noisy mean.

  The update is :math:`(s + \mathcal{N}(0, (\sigma C)^2 I)) / B` for an
  incoming sum :math:`s` of ``batch_size`` per-example gradients each already
  clipped to L2 norm :math:`C`, e.g. from :func:`clipjax.clipped_grad`. With
  it, DP-SGD is ``clipped_grad`` followed by
  ``optax.chain(dp_noise(...), optax.adam(...))``.

  Args:
    clip_norm: the clip norm :math:`C >= 0` the sum was clipped with.
    noise_multiplier: :math:`\sigma >= 0`.
    batch_size: :math:`B > 0`, the number of examples summed (the expected
      batch size under Poisson sampling).
    key: a typed PRNG key, a raw ``uint32`` key or an int seed.

  Returns:
    An :class:`optax.GradientTransformation` with state :class:`DPNoiseState`.

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
  _check_nonnegative("clip_norm", clip_norm)
  _check_nonnegative("noise_multiplier", noise_multiplier)
  if isinstance(batch_size, (int, float)) and not batch_size > 0:
    raise ValueError(f"batch_size must be > 0, got {batch_size!r}.")
  initial_key = _canonical_key(key)

  def init_fn(params):
    del params
    return DPNoiseState(key=initial_key)

  def update_fn(updates, state, params=None):
    del params
    next_key, noise_key = jax.random.split(state.key)
    stddev = _noise_stddev(noise_multiplier, clip_norm)
    return _noisy_mean(updates, stddev, batch_size, noise_key), DPNoiseState(key=next_key)

  return optax.GradientTransformation(init_fn, update_fn)
