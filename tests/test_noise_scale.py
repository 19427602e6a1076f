"""The privacy noise of every mechanism, measured: its standard deviation to 1%.

Each case draws at least 10^6 noise values and divides them by the scale the
accountant is told about (``z·C/B`` for the Gaussian sum; ``z_Δ·C/B`` with
Andrew et al.'s split for adaptive clipping). The pooled values must have mean 0
and standard deviation 1 within six standard errors (0.4%, well inside 1%).
Noise multipliers below and above 1 are both checked: an implementation that
multiplies the scale by ``z`` once too often agrees at ``z = 1`` alone.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax

DRAWS = 1 << 20  # noise values per case
MULTIPLIERS = [0.5, 1.0, 3.0]


def _assert_standard_normal(x):
  x = np.asarray(x, np.float64).ravel()
  assert x.size >= 1_000_000
  se = 1 / math.sqrt(2 * (x.size - 1))  # of a sample standard deviation
  assert abs(x.std() - 1) < 6 * se, f"noise std is {x.std():.4f} of the claimed scale"
  assert abs(x.mean()) < 6 / math.sqrt(x.size)


def _pre_clip_variance(pre_clip_noise, batch, dim, clip_norm):
  """Variance per coordinate that pre-clip noise adds to the sum of zero gradients.

  ``‖k·ζ_i‖ ≈ k·√dim ≫ C``, so every example is clipped to ``C·ζ_i/‖ζ_i‖``, whose
  coordinates have variance ``C²/dim`` exactly.
  """
  return 0.0 if pre_clip_noise == 0 else batch * clip_norm**2 / dim


@pytest.mark.parametrize("pre_clip_noise", [0.0, 1.0])
@pytest.mark.parametrize("z", MULTIPLIERS)
def test_dp_aggregate(z, pre_clip_noise):
  batch, clip_norm = 4, 0.7
  grads = jnp.zeros((batch, DRAWS), jnp.float32)
  tx = clipjax.dp_aggregate(clip_norm, z, key=jax.random.key(1), pre_clip_noise=pre_clip_noise)
  out, _ = jax.jit(tx.update)(grads, tx.init(None))
  var = (z * clip_norm) ** 2 + _pre_clip_variance(pre_clip_noise, batch, DRAWS, clip_norm)
  _assert_standard_normal(np.asarray(out, np.float64) * batch / math.sqrt(var))


@pytest.mark.parametrize("z", MULTIPLIERS)
def test_dp_noise(z):
  batch, clip_norm = 16, 1.3
  summed = jnp.full((DRAWS,), 2.0, jnp.float32)
  tx = clipjax.dp_noise(clip_norm, z, batch, key=jax.random.key(2))
  out, _ = jax.jit(tx.update)(summed, tx.init(summed))
  _assert_standard_normal((np.asarray(out, np.float64) * batch - 2.0) / (z * clip_norm))


def _sum_multiplier(z, count_stddev):
  return (z**-2 - (2 * count_stddev) ** -2) ** -0.5


@pytest.mark.parametrize("pre_clip_noise", [0.0, 1.0])
@pytest.mark.parametrize("z", MULTIPLIERS)
def test_adaptive_dp_aggregate_default_split(z, pre_clip_noise):
  # Batch 256 with the default count noise B/20 = 12.8, as in the report of the
  # z·z_Δ bug. The clip norm moves after every step, so each step's values are
  # divided by the clip norm that step used (the state's before the update).
  batch, dim, steps, clip_norm = 256, DRAWS // 16, 16, 0.5
  tx = clipjax.adaptive_dp_aggregate(
    clip_norm, z, key=jax.random.key(3), pre_clip_noise=pre_clip_noise, clip_learning_rate=0.2
  )
  grads = jnp.zeros((batch, dim), jnp.float32)

  def step(state, _):
    out, new_state = tx.update(grads, state)
    return new_state, (out, state.clip_norm)

  _, (outs, used) = jax.jit(lambda s: jax.lax.scan(step, s, None, length=steps))(tx.init(None))
  used = np.asarray(used, np.float64)
  # All zero gradients fit (without pre-clip noise): the clip norm really moved.
  assert used[-1] < 0.9 * used[0] or pre_clip_noise
  z_sum = _sum_multiplier(z, batch / 20)
  var = (z_sum * used) ** 2 + _pre_clip_variance(pre_clip_noise, batch, dim, used)
  _assert_standard_normal(np.asarray(outs, np.float64) * batch / np.sqrt(var)[:, None])


@pytest.mark.parametrize("z", MULTIPLIERS)
def test_adaptive_dp_aggregate_explicit_count_noise(z):
  batch, clip_norm, count_stddev = 4, 2.0, 2.0
  grads = jnp.zeros((batch, DRAWS), jnp.float32)
  tx = clipjax.adaptive_dp_aggregate(
    clip_norm, z, key=jax.random.key(4), count_noise_stddev=count_stddev
  )
  out, state = jax.jit(tx.update)(grads, tx.init(None))
  assert float(state.clip_norm) != clip_norm  # the next step's clip norm moved
  z_sum = _sum_multiplier(z, count_stddev)
  _assert_standard_normal(np.asarray(out, np.float64) * batch / (z_sum * clip_norm))
