"""Tests for clipjax.privacy against float64 NumPy oracles written here.

The oracle takes per-example gradients, splits them into the clip norm's groups,
computes every group's p-norm in float64 and applies the scaling rule by hand.
Statistical checks of the noise live in tests/test_noise_scale.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import privacy_oracle
import pytest
from jax import lax

from clipjax import (
  ClippingStats,
  DPAggregateState,
  DPNoiseState,
  adaptive_dp_aggregate,
  adaptive_dp_noise,
  clipping_stats,
  dp_aggregate,
  dp_noise,
  per_example_clip,
  sensitivity,
)

BATCH = 16
SCALINGS = ("clip", "automatic", "normalize")

# per_example_clip and clipping_stats compile themselves (once per shape and static
# argument), so eager calls here cost one compilation, not one per primitive.
_clip = per_example_clip
_stats = clipping_stats


def _tree(seed=0, batch=BATCH, dtype=np.float32):
  """Per-example pytree with ranks 1 to 3 and norms spread over two decades."""
  rng = np.random.default_rng(seed)
  scales = 10.0 ** rng.uniform(-1, 1, size=batch)
  tree = {
    "dense": {
      "w": rng.normal(size=(batch, 5, 3)),
      "b": rng.normal(size=(batch, 3)),
    },
    "conv": rng.normal(size=(batch, 2, 2, 2)),
    "scalar": rng.normal(size=(batch,)),
  }
  return jax.tree.map(
    lambda x: jnp.asarray(x * scales.reshape((-1,) + (1,) * (x.ndim - 1)), dtype),
    tree,
  )


def _flat(tree):
  """(batch, n) float64 NumPy matrix: the oracle's view of a per-example tree."""
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1)


def _vector(tree):
  """An aggregated tree as one float64 vector, in the oracle's order."""
  return _flat(jax.tree.map(lambda x: x[None], tree))[0]


def _oracle_clip(flat, clip_norm, p, scaling="clip", mask=None):
  """Returns ``(clipped, norms)`` of one group's (batch, n) matrix."""
  norms = np.linalg.norm(flat, ord=p, axis=1)
  weights = privacy_oracle.clip_weights(norms, clip_norm, scaling)
  if mask is not None:
    weights, norms = np.where(mask, weights, 0.0), np.where(mask, norms, 0.0)
  return flat * weights[:, None], norms


def _oracle(grads, clip_norm, p=2, scaling="clip", mask=None):
  """Per group: ``(clipped (batch, n) matrices, norms, the clip norms)``, in leaf order."""
  if isinstance(clip_norm, dict):
    parts = [(grads[k], clip_norm[k]) for k in sorted(clip_norm)]
  else:
    parts = [(grads, clip_norm)]
  out = [_oracle_clip(_flat(g), c, p, scaling, mask) for g, c in parts]
  return [o[0] for o in out], [o[1] for o in out], [c for _, c in parts]


# ---------------------------------------------------------------------------- models


def _mlp(dtype):
  rng = np.random.default_rng(1)
  params = {
    "hidden": {"w": rng.normal(size=(6, 8)) / 2, "b": rng.normal(size=8)},
    "out": {"w": rng.normal(size=(8, 3)) / 2, "b": rng.normal(size=3)},
  }

  def loss(params, x, y):
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return -jax.nn.log_softmax(h @ params["out"]["w"] + params["out"]["b"])[y]

  x = rng.normal(size=(BATCH, 6)) * 10.0 ** rng.uniform(-1, 1, size=(BATCH, 1))
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), params), loss, jnp.asarray(x, dtype)


def _cnn(dtype):
  rng = np.random.default_rng(2)
  params = {
    "conv": {"w": rng.normal(size=(3, 3, 1, 4)) / 3, "b": rng.normal(size=4)},
    "out": {"w": rng.normal(size=(64, 3)) / 8, "b": rng.normal(size=3)},
  }

  def loss(params, x, y):
    h = lax.conv_general_dilated(
      x[None], params["conv"]["w"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(h + params["conv"]["b"]).reshape(-1)
    return -jax.nn.log_softmax(h @ params["out"]["w"] + params["out"]["b"])[y]

  x = rng.normal(size=(BATCH, 6, 6, 1)) * 10.0 ** rng.uniform(-1, 1, size=(BATCH, 1, 1, 1))
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), params), loss, jnp.asarray(x, dtype)


@functools.cache
def _per_example_grads(model, dtype=jnp.float64):
  params, loss, x = model(dtype)
  y = jnp.asarray(np.arange(BATCH) % 3)
  return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(params, x, y)


# ---------------------------------------------------------------------------- per_example_clip


@pytest.mark.parametrize("p", [1, 1.5, 2, np.inf, "inf", "Infinity"])
def test_every_example_within_bound(p):
  tree = _tree()
  p_num = 2 if p == 2 else np.inf if isinstance(p, str) else p
  # The median norm: half the examples are clipped, half are not.
  clip_norm = float(np.median(np.linalg.norm(_flat(tree), ord=p_num, axis=1)))
  clipped, norms = _clip(tree, clip_norm, p=p)
  expected, expected_norms = _oracle_clip(_flat(tree), clip_norm, p_num)
  got = _flat(clipped)
  np.testing.assert_allclose(norms, expected_norms, rtol=2e-6)
  np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
  assert np.all(np.linalg.norm(got, ord=p_num, axis=1) <= clip_norm * (1 + 1e-6))
  assert np.sum(expected_norms > clip_norm) == BATCH // 2
  assert jax.tree.map(lambda x: x.dtype, clipped) == jax.tree.map(lambda x: x.dtype, tree)


@pytest.mark.parametrize("model", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_rules_against_the_per_example_reference(model):
  """vmap(grad), then the rule applied by hand in NumPy, for every rule and grouping."""
  grads = _per_example_grads(model)
  mask = np.arange(BATCH) % 5 != 3
  layers = sorted(grads)
  # Clip norms at the median: every rule meets examples above and below them.
  median = lambda g: float(np.median(np.linalg.norm(_flat(g), axis=1)))
  clip_norms = {"flat": median(grads), "per_layer": {k: median(grads[k]) for k in layers}}
  assert np.ptp(np.log(np.linalg.norm(_flat(grads), axis=1))) > 2  # over two decades
  cases = [(scaling, grouping) for scaling in SCALINGS for grouping in clip_norms]

  @jax.jit
  def run(g, m):
    out = {}
    for scaling, grouping in cases:
      c = clip_norms[grouping]
      clipped, norms = per_example_clip(g, c, scaling=scaling, mask=m)
      # dp_aggregate's sum once per rule (both groupings would double the compile time).
      tx = dp_aggregate(c, 0.0, key=0, scaling=scaling)
      aggregated = tx.update(g, tx.init(None), mask=m)[0] if grouping == "per_layer" else None
      out[scaling, grouping] = clipped, norms, aggregated
    return out

  results = run(grads, jnp.asarray(mask))
  for (scaling, grouping), (clipped, norms, aggregated) in results.items():
    case = f"{scaling}, {grouping}"
    want_clipped, want_norms, bounds = _oracle(grads, clip_norms[grouping], 2, scaling, mask)
    grouped = grouping == "per_layer"
    got_groups = [clipped[k] for k in layers] if grouped else [clipped]
    got_norms = [norms[k] for k in layers] if grouped else [norms]
    for got, want, got_n, want_n, c in zip(got_groups, want_clipped, got_norms, want_norms, bounds):
      np.testing.assert_allclose(_flat(got), want, rtol=1e-12, atol=1e-300, err_msg=case)
      np.testing.assert_allclose(got_n, want_n, rtol=1e-12, err_msg=case)
      # Every rule bounds each example's contribution to each group by that group's C.
      assert np.all(np.linalg.norm(_flat(got), axis=1) <= c * (1 + 1e-12)), case
      assert np.all(_flat(got)[~mask] == 0), case
    if aggregated is not None:
      want_sum = np.concatenate([w.sum(0) for w in want_clipped]) / BATCH
      got_sum = _vector(aggregated)
      np.testing.assert_allclose(got_sum, want_sum, rtol=1e-12, atol=1e-15, err_msg=case)


def test_float32_models_match_the_float64_reference():
  grads = _per_example_grads(_cnn, jnp.float32)
  clip_norm = {"conv": 0.5, "out": 1.0}
  clipped, norms = _clip(grads, clip_norm, scaling="automatic")
  want, want_norms, _ = _oracle(grads, clip_norm, scaling="automatic")
  for k, w, n in zip(sorted(clip_norm), want, want_norms):
    assert clipped[k]["w"].dtype == jnp.float32
    np.testing.assert_allclose(_flat(clipped[k]), w, rtol=2e-6, atol=1e-8)
    np.testing.assert_allclose(norms[k], n, rtol=2e-6)


@pytest.mark.parametrize("p", [1, 1.5, 2, np.inf])
def test_bad_examples_zeroed_others_intact(p):
  tree = _tree()
  tree["dense"]["w"] = tree["dense"]["w"].at[3, 0, 0].set(jnp.nan)
  tree["conv"] = tree["conv"].at[7, 1, 0, 1].set(jnp.inf)
  tree["scalar"] = tree["scalar"].at[11].set(-jnp.inf)
  bad = np.zeros(BATCH, bool)
  bad[[3, 7, 11]] = True
  clipped, norms = _clip(tree, 1.0, p=p)
  got = _flat(clipped)
  assert np.all(np.isfinite(got))
  assert np.all(got[bad] == 0)
  assert np.all(np.isinf(np.asarray(norms)[bad]))
  expected, expected_norms = _oracle_clip(_flat(tree)[~bad], 1.0, p)
  np.testing.assert_allclose(got[~bad], expected, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(norms)[~bad], expected_norms, rtol=2e-6)


def test_group_wise_bad_example_is_dropped_from_every_group():
  tree = _tree()
  tree["conv"] = tree["conv"].at[4, 0, 0, 0].set(jnp.nan)
  clip_norm = {"conv": 1.0, "dense": 2.0, "scalar": 0.5}
  clipped, norms = _clip(tree, clip_norm)
  for k in clip_norm:
    assert np.all(_flat(clipped[k])[4] == 0), k
    assert np.isinf(norms[k][4]), k
    assert np.all(np.isfinite(norms[k][np.arange(BATCH) != 4])), k


def test_large_finite_example_is_clipped_not_zeroed():
  # Issue #16: with p = 8 in float32, 1e5^8 overflows, and the example used to be
  # reported with norm inf and zeroed as if it held a NaN.
  grads = {"w": jnp.asarray([[1e5, 1.0], [0.5, 0.5]], jnp.float32)}
  clipped, norms = _clip(grads, 1.0, p=8)
  flat = np.asarray([[1e5, 1.0], [0.5, 0.5]], np.float32).astype(np.float64)
  want, want_norms = _oracle_clip(flat, 1.0, 8)
  np.testing.assert_allclose(norms, want_norms, rtol=1e-6)
  np.testing.assert_allclose(_flat(clipped), want, rtol=1e-6)
  assert np.all(np.isfinite(norms)) and float(np.abs(clipped["w"][0, 0])) > 0.99


def test_masked_examples_contribute_nothing():
  tree = _tree()
  mask = np.arange(BATCH) % 3 != 0
  # Padding may hold anything, NaN included: it must never reach a sum.
  tree["scalar"] = tree["scalar"].at[0].set(jnp.nan)
  clipped, norms = _clip(tree, 1.0, mask=jnp.asarray(mask))
  want, want_norms = _oracle_clip(_flat(tree), 1.0, 2, mask=mask)
  want[0], want_norms[0] = 0.0, 0.0
  np.testing.assert_allclose(_flat(clipped), want, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(norms, want_norms, rtol=2e-6)
  assert np.all(np.asarray(norms)[~mask] == 0)

  tx = dp_aggregate(1.0, 0.0, key=0, expected_batch_size=5.5)
  updates, _ = jax.jit(tx.update)(tree, tx.init(None), mask=jnp.asarray(mask))
  np.testing.assert_allclose(_vector(updates), want.sum(0) / 5.5, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
  "mask",
  [np.ones(BATCH - 1, bool), np.ones((BATCH, 1), bool), np.ones(BATCH, np.int32), [1.0] * BATCH],
  ids=["short", "2d", "int", "float_list"],
)
def test_bad_masks_are_refused(mask):
  tree = _tree()
  match = "mask must"
  with pytest.raises(ValueError, match=match):
    per_example_clip(tree, 1.0, mask=mask)
  with pytest.raises(ValueError, match=match):
    clipping_stats(tree, 1.0, mask=mask)
  tx = dp_aggregate(1.0, 1.0, key=0)
  with pytest.raises(ValueError, match=match):
    tx.update(tree, tx.init(None), mask=mask)


def test_zero_clip_norm_and_zero_gradients_no_nan():
  tree = _tree()
  zeros = jax.tree.map(jnp.zeros_like, tree)

  @jax.jit
  def run(tree, zeros, c):
    return {
      (name, scaling, clip_norm): per_example_clip(grads, c * clip_norm, scaling=scaling)
      for name, grads in (("grads", tree), ("zeros", zeros))
      for scaling in SCALINGS
      for clip_norm in (0.0, 1.0)
    }

  for (name, _, clip_norm), (clipped, norms) in run(tree, zeros, jnp.float32(1.0)).items():
    assert np.all(np.isfinite(norms))
    if name == "zeros" or clip_norm == 0:
      assert np.all(_flat(clipped) == 0)
    if name == "zeros":
      assert np.all(np.asarray(norms) == 0)


def test_infinite_clip_norm_is_identity():
  tree = _tree()
  clipped, _ = _clip(tree, jnp.inf)
  np.testing.assert_array_equal(_flat(clipped), _flat(tree))


def test_half_precision_norms_do_not_overflow():
  # 300² overflows float16; the norms are reduced in float32.
  grads = {"w": jnp.full((2, 4), 300.0, jnp.float16)}
  clipped, norms = _clip(grads, 1.0)
  np.testing.assert_allclose(norms, 600.0, rtol=1e-3)
  assert clipped["w"].dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(clipped["w"], np.float32), 0.5, rtol=1e-3)


# ---------------------------------------------------------------------------- one rule, one message


def _aggregate(tx, grads):
  return tx.update(grads, tx.init(None))


_CALLS = {
  "per_example_clip": lambda g, c, **kw: per_example_clip(g, c, **kw),
  "clipping_stats": lambda g, c, **kw: clipping_stats(g, c, **kw),
  "dp_aggregate": lambda g, c, **kw: _aggregate(dp_aggregate(c, 1.0, key=0, **kw), g),
}


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_same_argument_same_answer_everywhere(name):
  call, tree = _CALLS[name], {"w": jnp.ones((3, 2))}
  # Accepted: tracing is enough to tell, nothing needs compiling. (dp_aggregate refuses
  # p > 2, where its noise would not cover the L2 sensitivity.)
  if name == "dp_aggregate":
    with pytest.raises(ValueError, match="p <= 2"):
      call(tree, 1.0, p="Infinity")
  else:
    jax.eval_shape(lambda t: call(t, 1.0, p="Infinity"), tree)
  jax.eval_shape(lambda t: call(t, {"w": 1.0}, p=1, scaling="normalize"), tree)
  bad = [
    (dict(p=0.5), "p must be >= 1"),
    (dict(p="two"), "p must be a number >= 1 or 'inf'"),
    (dict(scaling="clipped"), "scaling must be one of"),
    (dict(scaling="automatic", stability=0.0), "stability must be > 0"),
  ]
  for kwargs, message in bad:
    with pytest.raises(ValueError, match=message):
      call(tree, 1.0, **kwargs)
  for clip_norm, message in [
    (-1.0, "clip_norm must be >= 0"),
    ({"w": -1.0}, "clip_norm must be >= 0"),
    ({"v": 1.0}, "clip_norm must be a scalar or a pytree prefix"),
    (None, "clip_norm must be a scalar or a pytree prefix"),
  ]:
    with pytest.raises(ValueError, match=message):
      call(tree, clip_norm)
  with pytest.raises(ValueError, match="batch axis"):
    call({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}, 1.0)


def test_sensitivity():
  assert float(sensitivity(1.5)) == 1.5
  assert float(sensitivity({"a": 3.0, "b": {"c": jnp.float32(4.0)}})) == 5.0
  np.testing.assert_allclose(sensitivity([0.1, 0.2, 0.2, 0.4]), 0.5, rtol=1e-12)
  # Squares of these would overflow float32; the norm does not.
  assert float(sensitivity([jnp.float32(3e30), jnp.float32(4e30)])) == pytest.approx(5e30)
  assert float(jax.jit(sensitivity)({"a": 6.0, "b": 8.0})) == 10.0
  with pytest.raises(ValueError, match="clip_norm must be >= 0"):
    sensitivity({"a": 1.0, "b": -1.0})
  with pytest.raises(ValueError, match="clip_norm must be a scalar or a pytree"):
    sensitivity({})


# ---------------------------------------------------------------------------- dp_aggregate


def test_zero_noise_equals_optax_per_example_global_norm_clip_mean():
  tree = {"dense": _tree()["dense"]}  # optax draws (zero-scaled) noise per leaf
  leaves, treedef = jax.tree.flatten(tree)
  summed, _ = optax.per_example_global_norm_clip(leaves, 1.5)
  expected = jax.tree.unflatten(treedef, [s / BATCH for s in summed])
  tx = dp_aggregate(1.5, 0.0, key=jax.random.key(3))
  updates, state = jax.jit(tx.update)(tree, tx.init(None))
  assert isinstance(state, DPAggregateState)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), updates, expected
  )
  reference = optax.contrib.differentially_private_aggregate(1.5, 0.0, key=0)
  ref_updates, _ = jax.jit(reference.update)(tree, reference.init(None))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), updates, ref_updates
  )


def test_bad_examples_skipped_by_dp_aggregate():
  tree = _tree()
  tree["conv"] = tree["conv"].at[5].set(jnp.nan)
  tx = dp_aggregate(1.0, 0.0, key=0)
  updates, _ = jax.jit(tx.update)(tree, tx.init(None))
  good = np.arange(BATCH) != 5
  expected = _oracle_clip(_flat(tree)[good], 1.0, 2)[0].sum(0) / BATCH
  np.testing.assert_allclose(_vector(updates), expected, rtol=2e-6, atol=1e-7)


def test_fresh_noise_every_step():
  grads = {"w": jnp.zeros((4, 50_000), jnp.float32)}
  tx = dp_aggregate(0.7, 1.3, key=jax.random.key(42))
  update = jax.jit(tx.update)
  first, state = update(grads, tx.init(None))
  second, _ = update(grads, state)
  x, y = np.asarray(first["w"], np.float64), np.asarray(second["w"], np.float64)
  assert abs(np.corrcoef(x, y)[0, 1]) < 6 / math.sqrt(x.size)


def _clamp_mean_closed_form(g):
  """E[clamp(g + ζ, −1, 1)] for ζ ~ N(0, 1): clipping a scalar at C = 1."""
  cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))
  pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
  lo, hi = -1 - g, 1 - g
  inside = g * (cdf(hi) - cdf(lo)) + pdf(lo) - pdf(hi)
  return -cdf(lo) + (1 - cdf(hi)) + inside


def test_chen_wu_hong_one_dimensional_example():
  # Losses ½(x − a_i)² with a = (−3, 3): at x = 1 the per-example gradients are 4
  # and −2. Clipped at C = 1 they cancel; with k = 1 the mean points back toward the
  # optimum x = 0.
  grads = jnp.array([[4.0], [-2.0]], jnp.float32)
  tx = dp_aggregate(1.0, 0.0, key=0)
  assert float(jax.jit(tx.update)(grads, tx.init(None))[0][0]) == 0.0

  expected = (_clamp_mean_closed_form(4.0) + _clamp_mean_closed_form(-2.0)) / 2
  assert abs(expected - 0.0413) < 5e-5
  draws = 1_000_000
  batch = jnp.tile(grads, (draws, 1))  # every copy gets its own ζ_i
  tx = dp_aggregate(1.0, 0.0, key=jax.random.key(7), pre_clip_noise=1.0)
  clipped = jnp.clip(batch + jax.random.normal(jax.random.key(8), batch.shape, jnp.float32), -1, 1)
  # The estimate averages i.i.d. pairs; their spread gives its standard error.
  pairs = clipped[:, 0].reshape(draws, 2).mean(axis=1)
  std_error = float(jnp.std(pairs)) / math.sqrt(draws)
  estimate = float(jax.jit(tx.update)(batch, tx.init(None))[0][0])
  assert abs(estimate - expected) < 6 * std_error
  assert std_error < 0.001  # the test can tell 0.0413 from 0


def test_keys_seed_typed_and_raw_agree():
  grads = jnp.zeros((3, 5), jnp.float32)
  outs = []
  for key in (5, jax.random.key(5), jax.random.PRNGKey(5)):
    tx = dp_aggregate(1.0, 1.0, key=key)
    outs.append(np.asarray(jax.jit(tx.update)(grads, tx.init(None))[0]))
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], outs[2])
  assert np.any(outs[0] != 0)


def test_dp_aggregate_validates():
  with pytest.raises(ValueError, match="noise_multiplier"):
    dp_aggregate(1.0, -1.0, key=0)
  with pytest.raises(ValueError, match="pre_clip_noise"):
    dp_aggregate(1.0, 1.0, key=0, pre_clip_noise=-0.1)
  for bad in (0, -3.0, np.inf):
    with pytest.raises(ValueError, match="expected_batch_size"):
      dp_aggregate(1.0, 1.0, key=0, expected_batch_size=bad)
  with pytest.raises(ValueError, match="key"):
    dp_aggregate(1.0, 1.0, key="seed")


def test_p_norm_aggregation():
  tree = _tree()
  tx = dp_aggregate(1.0, 0.0, key=0, p=1)
  updates, _ = jax.jit(tx.update)(tree, tx.init(None))
  expected = _oracle_clip(_flat(tree), 1.0, 1)[0].mean(0)
  np.testing.assert_allclose(_vector(updates), expected, rtol=2e-6, atol=1e-7)


def test_inject_hyperparams_dp_aggregate():
  tree = {"w": _tree()["dense"]["w"], "b": _tree()["scalar"]}
  params = jax.tree.map(lambda x: x[0], tree)
  tx = optax.inject_hyperparams(dp_aggregate, static_args=("p", "scaling"))(
    clip_norm=1.0, noise_multiplier=0.0, key=0, pre_clip_noise=0.0, expected_batch_size=8.0
  )
  state = tx.init(params)
  state.hyperparams["clip_norm"] = jnp.asarray(0.25)
  state.hyperparams["expected_batch_size"] = jnp.asarray(4.0)
  update = jax.jit(tx.update)
  updates, state = update(tree, state, params)
  expected = _oracle_clip(_flat(tree), 0.25, 2)[0].sum(0) / 4.0
  got = _vector(updates)
  np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
  # Traced noise hyperparameters draw noise.
  state.hyperparams["noise_multiplier"] = jnp.asarray(1.0)
  state.hyperparams["pre_clip_noise"] = jnp.asarray(0.5)
  assert not np.allclose(_vector(update(tree, state, params)[0]), got)
  # A traced p gets a helpful message.
  bad = optax.inject_hyperparams(dp_aggregate)(1.0, 0.0, key=0)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(bad.update)(tree, bad.init(params), params)


def test_in_a_chain_with_extra_arguments():
  tree = {"w": _tree()["dense"]["w"]}
  params = jax.tree.map(lambda x: jnp.zeros_like(x[0]), tree)
  mask = jnp.arange(BATCH) < 10
  tx = optax.chain(dp_aggregate(1.0, 0.0, key=1, expected_batch_size=10.0), optax.sgd(0.5))
  # `value` is another transformation's extra argument: passed along, ignored here.
  step = jax.jit(lambda p, s: tx.update(tree, s, p, mask=mask, value=jnp.asarray(1.0)))
  updates, _ = step(params, tx.init(params))
  expected = -0.5 * _oracle_clip(_flat(tree), 1.0, 2, mask=np.asarray(mask))[0].sum(0) / 10
  np.testing.assert_allclose(_vector(updates), expected, rtol=2e-6, atol=1e-7)


# ---------------------------------------------------------------------------- clipping_stats


def _oracle_stats(tree, clip_norm, mask):
  clipped, norms, clip_norms = _oracle(tree, clip_norm, mask=mask)
  real = mask.sum()
  flat_means = np.concatenate([c.sum(0) for c in clipped]) / real
  plain = np.concatenate(
    [_flat(tree[k]) for k in sorted(clip_norm)] if isinstance(clip_norm, dict) else [_flat(tree)],
    axis=1,
  )
  mean = (plain * mask[:, None]).sum(0) / real
  fractions = [np.sum((n > c) & mask) / real for n, c in zip(norms, clip_norms)]
  mean_norms = [n.sum() / real for n in norms]
  cosine = flat_means @ mean / np.linalg.norm(flat_means) / np.linalg.norm(mean)
  return fractions, mean_norms, np.linalg.norm(flat_means - mean), cosine


@pytest.mark.parametrize("grouped", [False, True], ids=["flat", "grouped"])
def test_clipping_stats_against_oracle(grouped):
  tree = _tree(dtype=np.float64)
  mask = np.arange(BATCH) % 4 != 1
  clip_norm = {"conv": 1.0, "dense": 3.0, "scalar": 0.5} if grouped else 2.0
  stats = _stats(tree, clip_norm, mask=jnp.asarray(mask))
  assert isinstance(stats, ClippingStats)
  fractions, mean_norms, bias, cosine = _oracle_stats(tree, clip_norm, mask)
  got_fractions = (
    [stats.fraction_clipped[k] for k in sorted(clip_norm)] if grouped else [stats.fraction_clipped]
  )
  got_means = [stats.mean_norm[k] for k in sorted(clip_norm)] if grouped else [stats.mean_norm]
  np.testing.assert_allclose(got_fractions, fractions, rtol=1e-12)
  np.testing.assert_allclose(got_means, mean_norms, rtol=1e-12)
  np.testing.assert_allclose(stats.bias_norm, bias, rtol=1e-12)
  np.testing.assert_allclose(stats.cosine, cosine, rtol=1e-12)
  assert np.min(fractions) > 0 and np.max(fractions) < 1


def test_clipping_stats_safe_when_zero():
  zeros = jax.tree.map(jnp.zeros_like, _tree())
  for clip_norm in (0.0, 1.0):
    stats = _stats(zeros, clip_norm)
    assert tuple(map(float, stats)) == (0.0, 0.0, 0.0, 1.0)
  # Everything clipped to zero while the mean is not: cosine 0, not NaN.
  stats = _stats(_tree(), 0.0)
  assert float(stats.cosine) == 0.0 and float(stats.fraction_clipped) == 1.0
  # No real example at all.
  stats = _stats(_tree(), 1.0, mask=jnp.zeros(BATCH, bool))
  assert tuple(map(float, stats)) == (0.0, 0.0, 0.0, 1.0)


def test_clipping_stats_with_bad_example():
  tree = _tree()
  tree["scalar"] = tree["scalar"].at[0].set(jnp.nan)
  stats = _stats(tree, 2.0)
  assert np.isinf(stats.mean_norm)
  assert np.isfinite(stats.bias_norm) and np.isfinite(stats.cosine)
  # Masked out, the same example no longer counts.
  stats = _stats(tree, 2.0, mask=jnp.arange(BATCH) != 0)
  assert np.isfinite(stats.mean_norm)


# ---------------------------------------------------------------------------- dp_noise


def test_dp_noise_divides_and_chains():
  summed = jnp.array([2.0, -4.0])
  tx = dp_noise(1.0, 0.0, 4, key=0)
  state = tx.init(summed)
  assert isinstance(state, DPNoiseState)
  chained = optax.chain(tx, optax.sgd(1.0))
  updates, _ = chained.update(summed, chained.init(jnp.zeros(2)), norms=jnp.ones(3))
  np.testing.assert_allclose(updates, [-0.5, 1.0])
  # Group-wise: a pytree of clip norms is accepted; the noise uses their sensitivity.
  tx = dp_noise({"a": 1.0, "b": 2.0}, 1.0, 4, key=0)
  out, state = jax.jit(tx.update)({"a": jnp.zeros(3), "b": jnp.zeros(2)}, tx.init(None))
  assert np.all(np.isfinite(_vector(out))) and np.any(_vector(out) != 0)
  out2, _ = jax.jit(tx.update)({"a": jnp.zeros(3), "b": jnp.zeros(2)}, state)
  assert not np.array_equal(_vector(out), _vector(out2))


def test_inject_hyperparams_dp_noise():
  tx = optax.inject_hyperparams(dp_noise)(1.0, 0.0, 4, key=0)
  params = jnp.zeros(3, jnp.float32)
  state = tx.init(params)
  state.hyperparams["batch_size"] = jnp.asarray(2.0)
  updates, _ = jax.jit(tx.update)(jnp.ones(3, jnp.float32), state, params)
  np.testing.assert_allclose(updates, 0.5)


def test_dp_noise_validates():
  for bad in (0, -1.0, np.inf, np.float32(0.0)):
    with pytest.raises(ValueError, match="batch_size"):
      dp_noise(1.0, 1.0, bad, key=0)
  with pytest.raises(ValueError, match="clip_norm must be >= 0"):
    dp_noise({"a": 1.0, "b": -2.0}, 1.0, 4, key=0)
  with pytest.raises(ValueError, match="noise_multiplier"):
    dp_noise(1.0, np.nan, 4, key=0)


# ------------------------------------------------------------ refusals of bad noise settings


def _noise_factories():
  """``name: (build(clip_norm, z), run(tx))`` for every transformation that adds noise."""
  per_example = jnp.ones((2, 3), jnp.float32)
  summed = jnp.ones(3, jnp.float32)
  norms = jnp.ones(2, jnp.float32)
  return {
    "dp_noise": (
      lambda c, z: dp_noise(c, z, 4, key=0),
      lambda tx: tx.update(summed, tx.init(None))[0],
    ),
    "dp_aggregate": (
      lambda c, z: dp_aggregate(c, z, key=0),
      lambda tx: tx.update(per_example, tx.init(None))[0],
    ),
    "adaptive_dp_noise": (
      lambda c, z: adaptive_dp_noise(c, z, 4, key=0, count_noise_stddev=2.0),
      lambda tx: tx.update(summed, tx.init(None), norms=norms)[0],
    ),
    "adaptive_dp_aggregate": (
      lambda c, z: adaptive_dp_aggregate(c, z, key=0, count_noise_stddev=2.0),
      lambda tx: tx.update(per_example, tx.init(None))[0],
    ),
  }


BAD_NOISE = [
  ("noise_multiplier", 1.0, -1.0),
  ("noise_multiplier", 1.0, np.nan),
  ("noise_multiplier", 1.0, np.inf),
  ("clip_norm", 0.0, 1.0),
  ("clip_norm", -1.0, 1.0),
  ("clip_norm", np.nan, 1.0),
  ("clip_norm", np.inf, 1.0),
]


@pytest.mark.parametrize("name", list(_noise_factories()))
def test_noise_transforms_refuse_bad_settings(name):
  build, _ = _noise_factories()[name]
  for argument, c, z in BAD_NOISE:
    with pytest.raises(ValueError, match=argument):
      build(c, z)
    with pytest.raises(ValueError, match=argument):  # NumPy and JAX scalars alike
      build(jnp.float32(c), np.float32(z))
  if name.startswith("dp_"):
    with pytest.raises(ValueError, match="clip_norm must be > 0 when noise_multiplier > 0"):
      build({"a": 0.0, "b": 0.0}, 0.5)  # group-wise, all zero
    build({"a": 0.0, "b": 1.0}, 0.5)  # one group may be zero
    build(0.0, 0.0)  # no noise, nothing to scale
  build(1.0, 0.0)


@pytest.mark.parametrize("name", list(_noise_factories()))
def test_noise_transforms_give_nan_for_bad_traced_settings(name):
  build, run = _noise_factories()[name]
  cases = BAD_NOISE + [("", 1.0, 0.5), ("", 2.0, 0.0)]
  c = jnp.asarray([case[1] for case in cases], jnp.float32)
  z = jnp.asarray([case[2] for case in cases], jnp.float32)
  out = np.asarray(jax.jit(jax.vmap(lambda c, z: run(build(c, z))))(c, z))
  bad = len(BAD_NOISE)
  assert np.all(np.isnan(out[:bad])), out[:bad]
  assert np.all(np.isfinite(out[bad:]))


@pytest.mark.parametrize("p", [2.5, 3, np.inf])
def test_dp_aggregate_refuses_p_above_two(p):
  # The L2 sensitivity that the noise is calibrated to is bounded by a p-norm clip only
  # for p <= 2: (1, 1, ..., 1) has inf-norm 1 and L2 norm sqrt(n).
  with pytest.raises(ValueError, match="p <= 2"):
    dp_aggregate(1.0, 1.0, key=0, p=p)
  dp_aggregate(1.0, 1.0, key=0, p=1.5)
