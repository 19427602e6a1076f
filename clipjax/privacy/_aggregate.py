"""What clipping, noisy aggregation and adaptive clipping share: per-example clip weights
over groups, the clipped sum (with Chen et al.'s pre-clip perturbation), the sensitivity,
the noisy mean, and the checks on noise and clip norms.

``clipping`` and ``adaptive`` call these with keyword arguments.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipjax import _checks, _norms
from clipjax.privacy import _gaussian


class Clipping(NamedTuple):
  """Per-example clipping of a tree, group by group (one group for a scalar clip norm).

  ``prefix.unflatten(per_group)`` rebuilds a per-group list into the clip norm's
  structure (subtrees into the gradients' structure).
  """

  prefix: Any
  subtrees: list
  weights: list
  norms: list  # reported: 0 where masked out, inf for non-finite examples


def check_clipping(p, clip_norm, scaling, stability) -> float:
  _checks.check_clip_norm(clip_norm)
  _checks.check_scaling(scaling, stability)
  return _checks.canonical_p(p)


def clip(grads, clip_norm, p, scaling, stability, mask) -> Clipping:
  prefix, clip_norms, subtrees = _norms.groups(clip_norm, grads)
  parts = [_norms.norms(t, p, mask=mask) for t in subtrees]
  finite = parts[0].finite
  for n in parts[1:]:
    finite = finite & n.finite
  # A NaN in one group makes the whole example suspect: it is dropped from every group.
  keep = finite if mask is None else finite & mask
  weights = [
    _norms.clip_weights(n, c, scaling=scaling, stability=stability, mask=keep)
    for n, c in zip(parts, clip_norms)
  ]
  norms = [_norms.reported(n, mask) for n in parts]
  if len(parts) > 1:
    bad = ~finite if mask is None else mask & ~finite
    norms = [jnp.where(bad, jnp.inf, n) for n in norms]
  return Clipping(prefix, subtrees, weights, norms)


def perturb(grads, pre_clip_noise, key):
  """``g_i + k·ζ_i`` with ``ζ_i ~ N(0, I)``; skipped for a Python zero ``k``."""
  if _checks.is_static_zero(pre_clip_noise):
    return grads
  noise = optax.tree.random_like(key, grads)
  return jax.tree.map(lambda g, z: (g + pre_clip_noise * z).astype(g.dtype), grads, noise)


def clipped_sum(grads, *, clip_norm, p, scaling, stability, mask, pre_clip_noise, key):
  """Returns ``(Σ_i clip(g_i + k·ζ_i), the Clipping of the g_i + k·ζ_i)``."""
  c = clip(perturb(grads, pre_clip_noise, key), clip_norm, p, scaling, stability, mask)
  summed = [_norms.weighted_sum(t, w) for t, w in zip(c.subtrees, c.weights)]
  return c.prefix.unflatten(summed), c


def cast_like(noisy, per_example):
  """The noisy mean (sum in at least float32) cast to the per-example gradients' dtypes:
  post-processing, after the noise."""
  return jax.tree.map(lambda n, g: n.astype(g.dtype), noisy, per_example)


def sensitivity(clip_norm) -> jax.Array:
  leaves = [jnp.asarray(c) for c in jax.tree.leaves(clip_norm)]
  if len(leaves) == 1:
    return leaves[0].astype(_norms.accumulation_dtype(leaves))
  return _norms.global_norm(leaves, 2.0)


def noisy_mean(summed, *, stddev, divisor, key):
  """``(summed + N(0, stddev²·I)) / divisor`` leaf by leaf, through ``_gaussian.noisy``.

  The noise is drawn and added in float32 (float64 for float64 leaves) and each leaf is
  cast to its dtype only at the end; a Python zero ``stddev`` draws nothing.
  """
  leaves, treedef = jax.tree.flatten(summed)
  keys = [None] * len(leaves)
  if not _checks.is_static_zero(stddev) and leaves:
    keys = list(jax.random.split(key, len(leaves)))
  out = [_gaussian.noisy(s, stddev, k, divisor) for s, k in zip(leaves, keys)]
  return treedef.unflatten(out)


def check_noise(clip_norm, noise_multiplier, name: str = "clip_norm") -> None:
  """Refuses what would release the sum with no noise, or with infinite noise.

  ``noise_multiplier`` must be finite and ``>= 0``; every clip norm finite and ``>= 0``,
  and not all zero when ``noise_multiplier > 0`` (a zero sensitivity draws no noise).
  Traced values are checked by ``valid_stddev`` instead.
  """
  _checks.check_nonnegative("noise_multiplier", noise_multiplier, finite=True)
  _checks.check_clip_norm(clip_norm, name, finite=True)
  leaves = jax.tree.leaves(clip_norm)
  if not _checks.is_concrete((leaves, noise_multiplier)):
    return
  if float(noise_multiplier) > 0 and all(float(c) == 0 for c in leaves):
    raise ValueError(
      f"{name} must be > 0 when noise_multiplier > 0 (a zero clip norm scales the noise to "
      f"zero and releases the input as it is); got {clip_norm!r}."
    )


def valid_stddev(stddev, noise_multiplier, clip_norm, sensitivity):
  """``stddev``, or NaN where traced values break ``check_noise``'s rules."""
  z = jnp.asarray(noise_multiplier)
  leaves = [jnp.asarray(c) for c in jax.tree.leaves(clip_norm)]
  ok = (z >= 0) & jnp.isfinite(z) & jnp.isfinite(sensitivity) & ((sensitivity > 0) | (z == 0))
  for c in leaves:
    ok = ok & (c >= 0)
  return jnp.where(ok, stddev, jnp.nan)


def noise_stddev(noise_multiplier, clip_norm):
  """``z · sensitivity(C)``, NaN for bad traced values; a Python zero for a Python zero ``z``."""
  if _checks.is_static_zero(noise_multiplier):
    return 0.0
  s = sensitivity(clip_norm)
  return valid_stddev(noise_multiplier * s, noise_multiplier, clip_norm, s)


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------
