"""The privacy noise of every mechanism, measured: its standard deviation to 1%.

Each case draws at least 10^6 noise values and divides them by the scale the
accountant is told about: ``z·Δ/B`` for the Gaussian sum, with ``Δ`` the sensitivity
of the clip norm (``C``, or ``sqrt(Σ_k C_k²)`` group-wise) and ``B`` the (expected,
logical) batch size; ``z_Δ·Δ/B`` with Andrew et al.'s split for adaptive clipping,
``z_Δ = (z^-2 − K·(2σ_b)^-2)^(-1/2)`` over ``K`` group counts. The pooled values must
have mean 0 and standard deviation 1 within six standard errors (0.4%, well inside
1%). Noise multipliers below and above 1 are both checked: an implementation that
multiplies the scale by ``z`` once too often agrees at ``z = 1`` alone.

The first tests build the two plain mechanisms with a Python ``z``, one compilation
per case, as users do; the others build each mechanism inside ``jax.vmap`` over the
three multipliers (and three keys), one compilation for all three.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax

DRAWS = 1 << 20  # noise values per case
MULTIPLIERS = [0.5, 1.0, 3.0]


def _assert_standard_normal(x, label=""):
  x = np.asarray(x, np.float64).ravel()
  assert x.size >= 1_000_000
  se = 1 / math.sqrt(2 * (x.size - 1))  # of a sample standard deviation
  assert abs(x.std() - 1) < 6 * se, f"{label}: noise std is {x.std():.4f} of the claimed scale"
  assert abs(x.mean()) < 6 / math.sqrt(x.size), f"{label}: noise mean {x.mean():.2e}"


def _sum_multiplier(z, count_stddev, groups=1):
  return (z**-2 - groups * (2 * count_stddev) ** -2) ** -0.5


def _over_multipliers(run, *data, multipliers=MULTIPLIERS, optimize=False):
  """``run(z, key, *data)`` for every z in ``multipliers``, vmapped and compiled once.

  The data are arguments, not constants closed over: XLA would constant-fold their
  norms at compile time. ``optimize`` compiles with LLVM's optimisations (XLA's default
  level, as users compile), which tests/conftest.py turns off for the compile-bound
  suite: for the cases that draw noise per example, whose time goes to running the
  program (tens of millions of draws), not to compiling it. The program is the same.
  """
  keys = jax.random.split(jax.random.key(len(multipliers)), len(multipliers))
  spec = (0, 0) + (None,) * len(data)
  options = {"xla_backend_optimization_level": 3} if optimize else None
  vmapped = jax.jit(jax.vmap(run, in_axes=spec), compiler_options=options)
  return vmapped(jnp.asarray(multipliers, jnp.float32), keys, *data)


def _steps(tx, updates, steps, **extra):
  """``steps`` updates of an adaptive transformation on the same input: each step's
  output, and the clip norm that step used (the state's before the update)."""

  def step(state, _):
    out, new_state = tx.update(updates, state, **extra)
    return new_state, (out, state.clip_norm)

  return jax.lax.scan(step, tx.init(None), None, length=steps)[1]


def _pre_clip_variance(pre_clip_noise, batch, dim, clip_norm):
  """Variance per coordinate that pre-clip noise adds to the sum of zero gradients.

  ``‖k·ζ_i‖ ≈ k·√dim ≫ C``, so every example is clipped to ``C·ζ_i/‖ζ_i‖``, whose
  coordinates have variance ``C²/dim`` exactly.
  """
  return 0.0 if pre_clip_noise == 0 else batch * clip_norm**2 / dim


# ---------------------------------------------------------------------------- Python z


@pytest.mark.parametrize("z", MULTIPLIERS)
def test_dp_aggregate(z):
  batch, clip_norm = 4, 0.7
  grads = jnp.zeros((batch, DRAWS), jnp.float32)
  tx = clipjax.dp_aggregate(clip_norm, z, key=jax.random.key(1))
  out, _ = jax.jit(tx.update)(grads, tx.init(None))
  _assert_standard_normal(np.asarray(out, np.float64) * batch / (z * clip_norm))


@pytest.mark.parametrize("z", MULTIPLIERS)
def test_dp_noise(z):
  batch, clip_norm = 16, 1.3
  summed = jnp.full((DRAWS,), 2.0, jnp.float32)
  tx = clipjax.dp_noise(clip_norm, z, batch, key=jax.random.key(2))
  out, _ = jax.jit(tx.update)(summed, tx.init(summed))
  _assert_standard_normal((np.asarray(out, np.float64) * batch - 2.0) / (z * clip_norm))


# ---------------------------------------------------------------------------- vmapped z


def test_dp_aggregate_pre_clip_noise():
  batch, clip_norm, pre_clip_noise = 4, 0.7, 1.0

  def run(z, key, grads):
    tx = clipjax.dp_aggregate(clip_norm, z, key, pre_clip_noise=pre_clip_noise)
    return tx.update(grads, tx.init(None))[0]

  outs = _over_multipliers(run, jnp.zeros((batch, DRAWS), jnp.float32), optimize=True)
  for i, z in enumerate(MULTIPLIERS):
    var = (z * clip_norm) ** 2 + _pre_clip_variance(pre_clip_noise, batch, DRAWS, clip_norm)
    _assert_standard_normal(np.asarray(outs[i], np.float64) * batch / math.sqrt(var), f"z={z}")


@pytest.mark.parametrize("pre_clip_noise", [0.0, 1.0])
def test_adaptive_dp_aggregate_default_split(pre_clip_noise):
  # The default count noise B/20 = 1.6 on a physical batch of 32: z_Δ = 8.6 at z = 3.
  # The clip norm moves after every step, so each step's values are divided by the
  # clip norm that step used (the state's before the update).
  batch, dim, steps, clip_norm = 32, DRAWS // 16, 16, 0.5

  def run(z, key, grads):
    tx = clipjax.adaptive_dp_aggregate(clip_norm, z, key, pre_clip_noise=pre_clip_noise)
    return _steps(tx, grads, steps)

  zeros = jnp.zeros((batch, dim), jnp.float32)
  outs, used = _over_multipliers(run, zeros, optimize=pre_clip_noise > 0)
  for i, z in enumerate(MULTIPLIERS):
    c = np.asarray(used[i], np.float64)
    # All zero gradients fit (without pre-clip noise): the clip norm really moved.
    assert c[-1] < 0.9 * c[0] or pre_clip_noise
    var = (_sum_multiplier(z, batch / 20) * c) ** 2 + _pre_clip_variance(
      pre_clip_noise, batch, dim, c
    )
    x = np.asarray(outs[i], np.float64) * batch / np.sqrt(var)[:, None]
    _assert_standard_normal(x, f"z={z}")


def test_adaptive_dp_aggregate_explicit_count_noise():
  batch, clip_norm, count_stddev = 4, 2.0, 2.0

  def run(z, key, grads):
    tx = clipjax.adaptive_dp_aggregate(clip_norm, z, key, count_noise_stddev=count_stddev)
    out, state = tx.update(grads, tx.init(None))
    return out, state.clip_norm

  outs, new = _over_multipliers(run, jnp.zeros((batch, DRAWS), jnp.float32))
  for i, z in enumerate(MULTIPLIERS):
    assert float(new[i]) != clip_norm  # the next step's clip norm moved
    x = np.asarray(outs[i], np.float64) * batch / (_sum_multiplier(z, count_stddev) * clip_norm)
    _assert_standard_normal(x, f"z={z}")


def test_dp_aggregate_group_wise_masked_expected_batch_size():
  # Sensitivity sqrt(0.3² + 0.4²) = 0.5, divided by the expected batch size 2.5, not
  # by the 4 padded or 3 real examples; automatic clipping of zeros adds nothing.
  grads = {
    "a": jnp.zeros((4, DRAWS // 2), jnp.float32),
    "b": jnp.zeros((4, DRAWS // 2), jnp.float32),
  }
  mask = jnp.array([True, True, False, True])

  def run(z, key, grads, mask):
    tx = clipjax.dp_aggregate(
      {"a": 0.3, "b": 0.4}, z, key, scaling="automatic", expected_batch_size=2.5
    )
    return tx.update(grads, tx.init(None), mask=mask)[0]

  outs = _over_multipliers(run, grads, mask)
  for i, z in enumerate(MULTIPLIERS):
    x = np.concatenate([np.asarray(outs["a"][i]), np.asarray(outs["b"][i])])
    _assert_standard_normal(x * 2.5 / (z * 0.5), f"z={z}")


def test_dp_noise_group_wise():
  clip_norm = {"conv": 1.2, "dense": {"w": 0.4, "b": 0.3}}  # sensitivity 1.3
  summed = {
    "conv": jnp.ones(DRAWS // 2),
    "dense": {"w": jnp.ones(DRAWS // 4), "b": jnp.ones(DRAWS // 4)},
  }

  def run(z, key, summed):
    tx = clipjax.dp_noise(clip_norm, z, 8.0, key)
    return tx.update(summed, tx.init(None))[0]

  outs = _over_multipliers(run, summed)
  for i, z in enumerate(MULTIPLIERS):
    x = np.concatenate([np.asarray(v[i], np.float64) for v in jax.tree.leaves(outs)])
    _assert_standard_normal((x * 8.0 - 1.0) / (z * 1.3), f"z={z}")


def test_adaptive_dp_aggregate_group_wise_masked_expected_batch_size():
  # The scale of the bug report: expected batch 256 with the default σ_b = 256/20, here
  # on a padded physical batch of 4 with two groups (K = 2).
  steps, dim = 8, DRAWS // 16
  grads = {"a": jnp.zeros((4, dim), jnp.float32), "b": jnp.zeros((4, dim), jnp.float32)}
  mask = jnp.array([True, False, True, True])

  def run(z, key, grads, mask):
    tx = clipjax.adaptive_dp_aggregate(
      {"a": 0.5, "b": 1.2},
      z,
      key,
      expected_batch_size=256.0,
      clip_learning_rate=0.5,
      target_quantile=0.0,  # three real examples barely move a count over 256
    )
    return _steps(tx, grads, steps, mask=mask)

  outs, used = _over_multipliers(run, grads, mask)
  for i, z in enumerate(MULTIPLIERS):
    sens = np.hypot(np.asarray(used["a"][i], np.float64), np.asarray(used["b"][i], np.float64))
    assert sens[-1] < 0.9 * sens[0]  # the clip norms moved
    scale = _sum_multiplier(z, 256 / 20, groups=2) * sens[:, None] / 256
    x = np.concatenate([np.asarray(outs["a"][i]) / scale, np.asarray(outs["b"][i]) / scale])
    _assert_standard_normal(x, f"z={z}")


def test_adaptive_dp_noise_group_wise():
  # Four groups, batch 256 with the default σ_b: z_Δ = (z^-2 − 4·(25.6)^-2)^(-1/2). The
  # norms make every group shrink its clip norm; each step's values are divided by the
  # sensitivity of the clip norms that step used.
  steps, batch = 16, 256
  groups = {k: 0.5 + 0.25 * i for i, k in enumerate("abcd")}
  summed = {k: jnp.zeros(DRAWS // (4 * steps), jnp.float32) for k in groups}
  norms = {k: jnp.zeros(batch) for k in groups}

  def run(z, key, summed, norms):
    tx = clipjax.adaptive_dp_noise(groups, z, batch, key)
    return _steps(tx, summed, steps, norms=norms)

  outs, used = _over_multipliers(run, summed, norms)
  for i, z in enumerate(MULTIPLIERS):
    sens = np.sqrt(sum(np.asarray(used[k][i], np.float64) ** 2 for k in groups))
    assert sens[-1] < 0.5 * sens[0]
    scale = _sum_multiplier(z, batch / 20, groups=4) * sens[:, None] / batch
    _assert_standard_normal(np.concatenate([outs[k][i] / scale for k in groups]), f"z={z}")


def test_adaptive_dp_noise_uses_the_clip_norm_it_was_given():
  # One step moving the clip norm by exp(-0.5) (39%): the noise has the scale of the
  # clip norm the sum was clipped with, and is told apart from that of the next one.
  batch, clip_norm = 64, 2.0

  def run(z, key, summed, norms):
    tx = clipjax.adaptive_dp_noise(clip_norm, z, batch, key, clip_learning_rate=1.0)
    out, state = tx.update(summed, tx.init(None), norms=norms)
    return out, state.clip_norm

  outs, new = _over_multipliers(run, jnp.zeros(DRAWS, jnp.float32), jnp.zeros(batch))
  for i, z in enumerate(MULTIPLIERS):
    assert float(new[i]) < 0.9 * clip_norm
    x = np.asarray(outs[i], np.float64) * batch / _sum_multiplier(z, batch / 20)
    _assert_standard_normal(x / clip_norm, f"z={z}")
    assert abs(np.std(x / float(new[i])) - 1) > 0.1


def test_accumulate_adds_the_noise_of_one_logical_batch():
  # Four physical batches, one logical batch of 64: one draw of z·C, divided by 64.
  k, logical, clip_norm = 4, 64.0, 1.5
  params = jnp.zeros(DRAWS, jnp.float32)

  def run(z, key, params):
    tx = clipjax.accumulate(clipjax.dp_noise(clip_norm, z, logical, key), k)
    state, outs = tx.init(params), []
    for i in range(k):
      out, state = tx.update(params + i, state, params)
      outs.append(out)
    return jnp.stack(outs)

  outs = np.asarray(_over_multipliers(run, params), np.float64)
  for i, z in enumerate(MULTIPLIERS):
    assert np.all(outs[i, :-1] == 0)
    _assert_standard_normal((outs[i, -1] * logical - 6.0) / (z * clip_norm), f"z={z}")


def test_accumulate_adaptive_group_wise():
  k, logical, physical = 2, 80.0, 40
  groups = {"a": 1.0, "b": 2.0}
  params = {"a": jnp.zeros(DRAWS // 2, jnp.float32), "b": jnp.zeros(DRAWS // 2, jnp.float32)}
  like = {"norms": {g: jnp.zeros(physical) for g in groups}, "mask": jnp.ones(physical, bool)}

  def run(z, key, params, like):
    tx = clipjax.accumulate(clipjax.adaptive_dp_noise(groups, z, logical, key), k, per_example=like)
    state = tx.init(params)
    for _ in range(k):
      out, state = tx.update(params, state, params, **like)
    return out, optax.tree_utils.tree_get(state, "clip_norm")

  outs, new = _over_multipliers(run, params, like)
  for i, z in enumerate(MULTIPLIERS):
    assert float(new["a"][i]) < 0.95  # all norms 0 fit: the clip norms shrank
    scale = _sum_multiplier(z, logical / 20, groups=2) * math.sqrt(5.0) / logical
    x = np.concatenate([np.asarray(outs[g][i], np.float64) for g in groups]) / scale
    _assert_standard_normal(x, f"z={z}")


# ---------------------------------------------------------------------------- half precision

# The noise of bfloat16 and float16 leaves is drawn in float32, added and divided there,
# and cast once: its standard deviation, its tail and its number of distinct values are
# those of float32 Gaussian noise cast to the leaf's dtype. Noise drawn in bfloat16
# would take 128 distinct values and none beyond 2.89σ.
HALF = {"bf16": jnp.bfloat16, "f16": jnp.float16}
HALF_MULTIPLIERS = [0.5, 3.0]  # below and above 1
DISTINCT = 1 << 17  # draws whose distinct values and tail are compared


def _half_tree(batch=None):
  shape = (DRAWS,) if batch is None else (batch, DRAWS)
  return {name: jnp.zeros(shape, dtype) for name, dtype in HALF.items()}


def _float32_cast_once(scale, dtype, seed):
  """Float32 Gaussian noise of ``scale``, cast to ``dtype``, as float64 values."""
  rng = np.random.default_rng(seed)
  noise = (rng.standard_normal(DISTINCT).astype(np.float32) * np.float32(scale)).astype(np.float32)
  return np.asarray(jnp.asarray(noise).astype(dtype), np.float64)


def _assert_half_precision_noise(outs, scales, label):
  """``outs[name][i]``: the noise at ``HALF_MULTIPLIERS[i]``, with std ``scales[i]``."""
  for i, z in enumerate(HALF_MULTIPLIERS):
    for name, dtype in HALF.items():
      got = np.asarray(outs[name][i])
      assert got.dtype == dtype, (label, name)
      values = got.astype(np.float64)
      _assert_standard_normal(values / scales[i], f"{label} {name} z={z}")
      head = values[:DISTINCT]
      ref = _float32_cast_once(scales[i], dtype, seed=i)
      # Distinct values: a few thousand (bfloat16) or tens of thousands (float16), from
      # the same rounding of the same distribution; they agree to a few percent.
      distinct, ref_distinct = np.unique(head).size, np.unique(ref).size
      assert abs(distinct / ref_distinct - 1) < 0.05, (label, name, z, distinct, ref_distinct)
      # The tail: about 354 draws beyond 3σ (Poisson bounds of five standard deviations),
      # and a largest draw beyond 3.8σ (expected 4.4σ), like the reference's.
      for sample in (head, ref):
        beyond = int(np.sum(np.abs(sample) > 3 * scales[i]))
        assert 260 < beyond < 450, (label, name, z, beyond)
        assert np.max(np.abs(sample)) > 3.8 * scales[i], (label, name, z)


def test_half_precision_dp_noise():
  batch, clip_norm = 4, 1.5

  def run(z, key, summed):
    tx = clipjax.dp_noise(clip_norm, z, batch, key)
    return tx.update(summed, tx.init(None))[0]

  outs = _over_multipliers(run, _half_tree(), multipliers=HALF_MULTIPLIERS)
  _assert_half_precision_noise(outs, [z * clip_norm / batch for z in HALF_MULTIPLIERS], "dp_noise")


def test_half_precision_dp_aggregate():
  batch, clip_norm = 2, 1.0

  def run(z, key, grads):
    tx = clipjax.dp_aggregate(clip_norm, z, key)
    return tx.update(grads, tx.init(None))[0]

  outs = _over_multipliers(run, _half_tree(batch), multipliers=HALF_MULTIPLIERS)
  scales = [z * clip_norm / batch for z in HALF_MULTIPLIERS]
  _assert_half_precision_noise(outs, scales, "dp_aggregate")


def test_half_precision_adaptive_dp_aggregate():
  batch, clip_norm, count_stddev = 2, 1.0, 4.0

  def run(z, key, grads):
    tx = clipjax.adaptive_dp_aggregate(clip_norm, z, key, count_noise_stddev=count_stddev)
    return tx.update(grads, tx.init(None))[0]

  outs = _over_multipliers(run, _half_tree(batch), multipliers=HALF_MULTIPLIERS)
  scales = [_sum_multiplier(z, count_stddev) * clip_norm / batch for z in HALF_MULTIPLIERS]
  _assert_half_precision_noise(outs, scales, "adaptive_dp_aggregate")


def test_half_precision_adaptive_dp_noise():
  batch, clip_norm = 64, 2.0

  def run(z, key, summed, norms):
    tx = clipjax.adaptive_dp_noise(clip_norm, z, batch, key)
    return tx.update(summed, tx.init(None), norms=norms)[0]

  outs = _over_multipliers(run, _half_tree(), jnp.zeros(batch), multipliers=HALF_MULTIPLIERS)
  scales = [_sum_multiplier(z, batch / 20) * clip_norm / batch for z in HALF_MULTIPLIERS]
  _assert_half_precision_noise(outs, scales, "adaptive_dp_noise")


def test_half_precision_accumulate():
  k, logical, clip_norm = 2, 4.0, 1.0

  def run(z, key, params):
    tx = clipjax.accumulate(clipjax.dp_noise(clip_norm, z, logical, key), k)
    state = tx.init(params)
    for _ in range(k):
      out, state = tx.update(params, state, params)
    return out

  outs = _over_multipliers(run, _half_tree(), multipliers=HALF_MULTIPLIERS)
  scales = [z * clip_norm / logical for z in HALF_MULTIPLIERS]
  _assert_half_precision_noise(outs, scales, "accumulate")
