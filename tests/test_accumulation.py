"""Tests for clipjax.privacy.accumulation: logical batches equal one big batch, exactly.

The clipped-sum function here is the per-example reference (``vmap(grad)``, clip,
sum) with a mask, the contract of ``clipjax.clipped_grad``. Exactness is checked bit
for bit on dyadic data, where every clipped contribution and every partial sum is a
float32 number (so any order of summation gives the same bits), and to float64
rounding on random data. The noise added once per logical batch is measured in
tests/test_noise_scale.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipjax import (
  AccumulateState,
  accumulate,
  adaptive_dp_noise,
  dp_noise,
  microbatch,
  per_example_clip,
)

BATCH = 24


def _loss(params, x, y):
  """Linear in the parameters: the gradient of example (x, y) is (x·y, y)."""
  return y * (x @ params["w"] + params["b"])


def _grad_fn(clip_norm, *, aux=False):
  """A clipped_grad-style function: ``(Σ_i clip(∇L_i), norms)``, masked examples dropped."""

  def grad_fn(params, x, y, mask=None):
    grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))(params, x, y)
    clipped, norms = per_example_clip(grads, clip_norm, mask=mask)
    out = jax.tree.map(lambda g: g.sum(0), clipped), norms
    return (out, {"y": y, "x0": x[:, 0]}) if aux else out

  return grad_fn


def _dyadic_batch():
  """Examples whose gradients (3, 4)·2^j·y have norms 5·2^j, clipped at 5: exact."""
  rng = np.random.default_rng(0)
  scale = 2.0 ** rng.integers(-3, 4, size=BATCH)
  x = np.zeros((BATCH, 3))
  x[:, 0], x[:, 2] = 3 * scale, 4 * scale
  y = rng.choice([-1.0, 1.0], size=BATCH)
  # The bias gradient y (norm 1) is a clip-norm group of its own, at 1: exact too.
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _params(dtype):
  return {"w": jnp.zeros(3, dtype), "b": jnp.zeros((), dtype)}


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_microbatch_is_the_big_batch_bit_for_bit(k):
  x, y = _dyadic_batch()
  mask = jnp.arange(BATCH) % 5 != 2
  # Clip the weights alone so every factor is a power of two: C = 5 with bias 0.
  grad_fn = _grad_fn({"w": 5.0, "b": 1.0})
  run = jax.jit(
    lambda m: (
      grad_fn(_params(jnp.float32), x, y, m),
      microbatch(grad_fn, k)(_params(jnp.float32), x, y, mask=m),
    )
  )
  (want, want_norms), (got, got_norms) = run(mask)
  for a, b in zip(jax.tree.leaves((got, got_norms)), jax.tree.leaves((want, want_norms))):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.all(np.asarray(got_norms["w"])[~np.asarray(mask)] == 0)
  assert float(jnp.abs(got["w"]).sum()) > 0


def test_microbatch_float64_random_with_aux():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(BATCH, 3)) * 10 ** rng.uniform(-1, 1, (BATCH, 1)))
  y = jnp.asarray(rng.normal(size=BATCH))
  params = {"w": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(0.5)}
  grad_fn = _grad_fn(1.0, aux=True)
  ((want, want_norms), want_aux) = grad_fn(params, x, y)
  ((got, got_norms), got_aux) = jax.jit(microbatch(grad_fn, 4, has_aux=True))(params, x, y)
  # Four partial sums, then their sum: another order of additions. Every term is clipped
  # to norm 1, so the difference is a few BATCH · 2^-52, whatever the sum's size.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=BATCH * 2e-16), got, want)
  np.testing.assert_array_equal(got_norms, want_norms)  # per example: same bits, same order
  jax.tree.map(np.testing.assert_array_equal, got_aux, want_aux)
  assert got["w"].dtype == jnp.float64


def test_microbatch_calls_without_mask_when_none_given():
  calls = []

  def grad_fn(params, x):  # no mask argument at all
    calls.append(x.shape)
    return params * x.sum(), jnp.abs(x).sum(1)

  total, norms = microbatch(grad_fn, 3)(jnp.asarray(2.0), jnp.arange(12.0).reshape(6, 2))
  assert set(calls) == {(2, 2)}  # micro-batches of two examples, and no mask
  assert float(total) == 2 * 66.0
  np.testing.assert_array_equal(norms, np.arange(12.0).reshape(6, 2).sum(1))


def test_microbatch_validates():
  x, y = _dyadic_batch()
  fn = microbatch(_grad_fn(1.0), 5)
  with pytest.raises(ValueError, match="num_microbatches must divide the batch size 24"):
    fn(_params(jnp.float32), x, y)
  with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
    microbatch(_grad_fn(1.0), 0)
  with pytest.raises(ValueError, match="num_microbatches must be a Python integer"):
    microbatch(_grad_fn(1.0), 2.0)
  with pytest.raises(ValueError, match="mask must have shape"):
    microbatch(_grad_fn(1.0), 2)(_params(jnp.float32), x, y, mask=jnp.ones(3, bool))
  with pytest.raises(ValueError, match="same leading batch axis"):
    microbatch(_grad_fn(1.0), 2)(_params(jnp.float32), x, y[:4])


def _close(a, b):
  """Equal to float32 rounding of sums whose terms are at most about 1 in size."""
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    a, b = jax.random.key_data(a), jax.random.key_data(b)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _physical(k):
  """The dyadic batch with a mask, whole and as ``k`` physical batches."""
  x, y = _dyadic_batch()
  mask = jnp.arange(BATCH) % 7 != 3
  size = BATCH // k
  parts = [(x, y, mask)[j][i * size : (i + 1) * size] for i in range(k) for j in range(3)]
  return [tuple(parts[3 * i : 3 * i + 3]) for i in range(k)], (x, y, mask)


@pytest.mark.parametrize("k", [1, 3])
def test_accumulated_sum_is_the_big_batch_bit_for_bit(k):
  params = _params(jnp.float32)
  grad_fn = jax.jit(_grad_fn({"w": 5.0, "b": 1.0}))
  physical, whole = _physical(k)
  tx = accumulate(optax.identity(), k)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for xb, yb, mb in physical:
    total, state = update(grad_fn(params, xb, yb, mb)[0], state)
  want = grad_fn(params, *whole)[0]
  jax.tree.map(np.testing.assert_array_equal, total, want)
  assert float(jnp.abs(total["w"]).sum()) > 0


@pytest.mark.parametrize("k", [1, 3])
def test_accumulate_steps_once_per_logical_batch(k):
  params = {"w": jnp.ones(3, jnp.float32), "b": jnp.ones((), jnp.float32)}
  grad_fn = jax.jit(_grad_fn({"w": 5.0, "b": 1.0}))
  physical, whole = _physical(k)
  inner = optax.chain(dp_noise({"w": 5.0, "b": 1.0}, 0.0, 20.0, key=0), optax.adam(0.1))
  tx = accumulate(inner, k)
  state, reference_state = tx.init(params), inner.init(params)
  assert isinstance(state, AccumulateState)
  update = jax.jit(tx.update)
  for logical in range(2):  # two logical batches: the buffers reset between them
    for i, (xb, yb, mb) in enumerate(physical):
      summed, _ = grad_fn(params, xb, yb, mb)
      updates, state = update(summed, state, params)
      if i < k - 1:
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    big, _ = grad_fn(params, *whole)
    want, reference_state = jax.jit(inner.update)(big, reference_state, params)
    # The same computation, compiled apart: equal to float32 rounding.
    jax.tree.map(_close, (updates, state.inner_state), (want, reference_state))
    assert int(state.step) == 0
    assert int(state.inner_state[1][0].count) == logical + 1  # adam stepped once per logical batch
    params = optax.apply_updates(params, updates)


def test_accumulate_adaptive_counts_the_whole_logical_batch():
  k = 3
  params = _params(jnp.float32)
  physical, whole = _physical(k)
  hyper = dict(count_noise_stddev=0.0, clip_learning_rate=0.5, target_quantile=0.3)
  inner = adaptive_dp_noise(4.0, 0.0, 20.0, key=0, **hyper)
  like = jax.eval_shape(_grad_fn(1.0), params, *physical[0])[1]
  tx = accumulate(inner, k, per_example={"norms": like, "mask": physical[0][2]})
  state = tx.init(params)
  update = jax.jit(tx.update)
  reference = inner.init(params)
  for _ in range(3):
    clip_norm = optax.tree_utils.tree_get(state, "clip_norm")
    for xb, yb, mb in physical:
      summed, norms = _grad_fn(clip_norm)(params, xb, yb, mb)
      updates, state = update(summed, state, params, norms=norms, mask=mb)
    big, big_norms = _grad_fn(reference.clip_norm)(params, *whole)
    want, reference = inner.update(big, reference, params, norms=big_norms, mask=whole[2])
    jax.tree.map(_close, updates, want)
    # One example more or less among the 24 counted would move it by 2.5%.
    _close(state.inner_state.clip_norm, reference.clip_norm)
  assert float(reference.clip_norm) < 3.95  # it moved


def test_accumulate_validates():
  tx = accumulate(dp_noise(1.0, 0.0, 4, key=0), 2, per_example={"mask": jnp.ones(4, bool)})
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError, match="mask is a per-example argument"):
    tx.update(jnp.zeros(2), state)
  with pytest.raises(ValueError, match="mask must match"):
    tx.update(jnp.zeros(2), state, mask=jnp.ones(5, bool))
  with pytest.raises(ValueError, match="num_batches must be >= 1"):
    accumulate(dp_noise(1.0, 0.0, 4, key=0), 0)
  with pytest.raises(ValueError, match="leading batch axis"):
    accumulate(dp_noise(1.0, 0.0, 4, key=0), 2, per_example={"mask": True})
