"""Correlated noise through jax_privacy: the noise's covariance over steps against the
strategy's matrix, the sensitivity against brute force, ε against jax_privacy's
accountants called directly, full-precision noise, and the cyclic sampler."""

import itertools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax

jax_privacy = pytest.importorskip("jax_privacy")
from jax_privacy import accounting as jp_accounting  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def strategies():
  # Given parameters: jax_privacy's optimizers take a minute to compile.
  with jax.enable_x64(True):
    blt = jax_privacy.matrix_factorization.buffered_toeplitz.BufferedToeplitz.build(
      buf_decay=[0.8, 0.3], output_scale=[0.4, 0.2]
    )
  return {
    "banded": clipjax.MFStrategy.from_banded_coefs(STEPS, [1.0, 0.6, 0.3]),
    "blt": clipjax.MFStrategy.from_blt(STEPS, blt),
  }


def _brute_force_sensitivity(c, min_sep, max_participations):
  """max ‖C u‖ over 0/1 vectors u with ones at least ``min_sep`` apart, float64."""
  n = c.shape[0]
  best = 0.0
  for k in range(1, max_participations + 1):
    for steps in itertools.combinations(range(n), k):
      if all(b - a >= min_sep for a, b in zip(steps, steps[1:])):
        best = max(best, float(np.sum(c[:, list(steps)].sum(axis=1) ** 2)))
  return math.sqrt(best)


def _noise(strategy, schedule, noise_multiplier, draws, dtype=jnp.float32, batch_size=2.0):
  """``(draws, STEPS, 3)``: every step's output minus the incoming sum over B."""
  signal = jnp.linspace(-1.0, 1.0, 3)

  def run(key):
    tx = clipjax.correlated_noise(strategy, 1.5, noise_multiplier, batch_size, key, **schedule)

    def step(state, _):
      out, state = tx.update(signal.astype(dtype), state)
      return state, out.astype(jnp.float32) - signal.astype(dtype).astype(jnp.float32) / batch_size

    return jax.lax.scan(step, tx.init(jnp.zeros(3, dtype)), length=STEPS)[1]

  keys = jax.random.split(jax.random.key(0), draws)
  return np.asarray(jax.jit(jax.vmap(run))(keys), np.float64)


@pytest.mark.parametrize("kind", ["banded", "blt"])
@pytest.mark.parametrize("noise_multiplier", [0.5, 3.0])
def test_noise_covariance_over_steps(strategies, kind, noise_multiplier):
  """Cov over steps = (σ·Δ·κ/B)² C⁻¹C⁻ᵀ, κ = 1 (amplified banded) or sens(C) (BLT)."""
  strategy = strategies[kind]
  cycle = 3 if kind == "banded" else 2
  schedule = dict(sampling="cyclic_poisson", sample_rate=0.5, cycle_length=cycle)
  noise = _noise(strategy, schedule, noise_multiplier, draws=6000)
  samples = noise.transpose(0, 2, 1).reshape(-1, STEPS)  # coordinates are independent
  c = strategy.materialize()
  if kind == "banded":
    kappa = 1.0
  else:
    kappa = _brute_force_sensitivity(c, cycle, math.ceil(STEPS / cycle))
    assert strategy.sensitivity(cycle) == pytest.approx(kappa, rel=1e-9)
  c_inv = np.linalg.inv(c)
  want = (noise_multiplier * 1.5 * kappa / 2.0) ** 2 * c_inv @ c_inv.T
  got = samples.T @ samples / samples.shape[0]
  standard_error = np.sqrt((np.outer(np.diag(want), np.diag(want)) + want**2) / samples.shape[0])
  np.testing.assert_array_less(np.abs(got - want), 5 * standard_error)
  # Not diagonal: the noise is correlated (DP-SGD's would be).
  assert np.abs(want - np.diag(np.diag(want))).max() > 10 * standard_error.max()


def test_noise_is_drawn_at_full_precision(strategies):
  """bfloat16 leaves: the float32 computation, cast once at the end."""
  schedule = dict(sampling="cyclic_poisson", sample_rate=1.0, cycle_length=2)
  low = _noise(strategies["blt"], schedule, 1.0, draws=4, dtype=jnp.bfloat16, batch_size=1.0)
  full = _noise(strategies["blt"], schedule, 1.0, draws=4, batch_size=1.0)
  signal = np.linspace(-1.0, 1.0, 3)
  want = np.asarray(jnp.asarray(full + signal, jnp.bfloat16), np.float64)
  cast = np.asarray(jnp.asarray(signal, jnp.bfloat16), np.float64)
  np.testing.assert_array_equal(low + cast, want)


def test_epsilon_equals_jax_privacy_accountants(strategies):
  n, batch, cycle, z, delta = 1200, 50, 3, 0.8, 1e-6
  sampler = clipjax.CyclicPoissonSampler(n, cycle, sample_rate=batch / (n // cycle))
  banded = clipjax.MFStrategy.from_banded_coefs(30, [1.0, 0.7, 0.5])
  params = jp_accounting.DpParams(
    noise_multipliers=z, num_samples=n, delta=delta, batch_size=batch, cycle_length=cycle
  )
  for name, config in [
    ("pld", jp_accounting.PldAccountantConfig()),
    ("rdp", jp_accounting.RdpAccountantConfig()),
  ]:
    direct = jp_accounting.DpsgdTrainingAccountant(config).compute_epsilon(30, params)
    bridge = clipjax.correlated_epsilon(banded, z, delta, accountant=name, **sampler.accounting)
    assert bridge == pytest.approx(direct, rel=1e-12)

  # No amplification (BLT): one Gaussian release of multiplier σ.
  blt = strategies["blt"]
  single = jp_accounting.SingleReleaseTrainingAccountant(jp_accounting.PldAccountantConfig())
  direct = single.compute_epsilon(STEPS, params)
  schedule = dict(sampling="cyclic_poisson", sample_rate=1.0, cycle_length=2)
  assert clipjax.correlated_epsilon(blt, z, delta, **schedule) == pytest.approx(direct, rel=1e-12)

  rdp = dict(sampler.accounting, accountant="rdp")
  sigma = clipjax.calibrate_correlated_noise(banded, 2.0, delta, **rdp)
  assert clipjax.correlated_epsilon(banded, sigma, delta, **rdp) <= 2.0
  assert clipjax.correlated_epsilon(banded, 0.99 * sigma, delta, **rdp) > 2.0


def test_refusals(strategies):
  schedule = dict(sampling="cyclic_poisson", sample_rate=0.5, cycle_length=3)
  with pytest.raises(ValueError, match="sampling"):
    clipjax.correlated_epsilon(
      strategies["banded"], 1.0, 1e-5, **dict(schedule, sampling="poisson")
    )
  with pytest.raises(ValueError, match="noise_multiplier"):
    clipjax.correlated_noise(strategies["banded"], 1.0, 0.0, 1.0, 0, **schedule)
  with pytest.raises(ValueError, match="strategy"):
    clipjax.correlated_epsilon(np.ones(3), 1.0, 1e-5, **schedule)
  # dp_epsilon does not account for a cyclic schedule.
  with pytest.raises(TypeError, match="cycle_length"):
    clipjax.dp_epsilon(1.0, steps=10, delta=1e-5, **clipjax.CyclicPoissonSampler(30, 3).accounting)


def test_cyclic_sampler_schedule_and_rates():
  n, cycle, rate, draws = 40, 4, 0.3, 3000
  sampler = clipjax.CyclicPoissonSampler(n, cycle, sample_rate=rate, seed=1)
  keys = jax.random.split(jax.random.key(0), draws)
  steps = jnp.arange(draws)
  indices, mask = map(np.asarray, jax.jit(jax.vmap(sampler))(keys, steps))
  seen = np.zeros((cycle, n), int)
  for t in range(draws):
    seen[t % cycle, indices[t][mask[t]]] += 1
  # Each example is eligible in exactly one residue class of steps.
  assert ((seen > 0).sum(axis=0) == 1).all()
  frequency = seen.sum(axis=0) / (draws / cycle)
  np.testing.assert_array_less(
    np.abs(frequency - rate), 5 * np.sqrt(rate * (1 - rate) * cycle / draws)
  )
  assert sampler.expected_batch_size == pytest.approx(rate * n / cycle)
  # Rate 1 is balls-in-bins: the whole bin every time.
  full = clipjax.CyclicPoissonSampler(n, cycle, seed=1)
  for t in range(cycle):
    _, m = full(jax.random.key(t), t)
    assert int(m.sum()) == int((seen[t] > 0).sum())


def test_training_step_composes_with_optax(strategies):
  """clipped_grad → correlated_noise → sgd under jit, driven by the sampler."""
  x = jax.random.normal(jax.random.key(0), (30, 4))
  y = x @ jnp.arange(4.0)
  sampler = clipjax.CyclicPoissonSampler(30, 3, sample_rate=0.8)
  tx = optax.chain(
    clipjax.correlated_noise(
      strategies["banded"], 1.0, 0.5, sampler.expected_batch_size, 0, **sampler.accounting
    ),
    optax.sgd(0.1),
  )
  loss = lambda w, xi, yi: (xi @ w - yi) ** 2

  @jax.jit
  def step(w, state, t):
    indices, mask = sampler(jax.random.fold_in(jax.random.key(1), t), t)
    summed, _ = clipjax.clipped_grad(loss, 1.0)(w, x[indices], y[indices], mask=mask)
    updates, state = tx.update(summed, state, w)
    return optax.apply_updates(w, updates), state

  w = jnp.zeros(4)
  state = tx.init(w)
  for t in range(STEPS):
    w, state = step(w, state, t)
  assert w.shape == (4,) and bool(jnp.isfinite(w).all())


def test_example_smoke(tmp_path, monkeypatch):
  """``examples/correlated_noise.py --smoke``: the three mechanisms run and meet ε."""
  monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
  result = __import__("correlated_noise").main(["--smoke", "--out", str(tmp_path)])
  assert pathlib.Path(result["plot"]).stat().st_size > 0
  (poisson, cyclic, bins) = result["samplers"]
  assert cyclic.accounting["cycle_length"] == 7 and bins.accounting["sample_rate"] == 1.0
  for name, cells in result["table"].items():
    (cell,) = cells.values()
    assert cell["sigma"] > 0 and 0.0 <= cell["accuracy"][0] <= 1.0, name
