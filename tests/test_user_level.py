"""User-level DP: the user sampler, per-user clipped sums against a float64 oracle, and
the accounting's unit.

The oracle takes every EXAMPLE's gradient with ``jax.vmap(jax.grad(example_loss))`` (no
user structure, no ghost machinery), then groups them by user, sums or averages each
user's real examples, clips each user's gradient and sums over the real users, all in
float64 NumPy.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import clipjax

# Users own 1 to 6 examples; with K = 3 some have fewer than K, some more.
COUNTS = np.array([1, 2, 3, 6, 4, 1, 5, 2])
USER_IDS = np.repeat(np.arange(COUNTS.size) * 7 + 3, COUNTS)  # arbitrary ids
K = 3


def _sampler(rate=0.4, max_users=6):
  return clipjax.UserSampler(USER_IDS, rate, max_users=max_users, examples_per_user=K)


def _dense(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return (h @ params["w2"] - y) ** 2


def _conv(params, x, y):
  out = lax.conv_general_dilated(
    x[None], params["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return (jnp.sum(jnp.tanh(out) * params["v"]) - y) ** 2


def _embedding(params, x, y):
  h = jnp.mean(params["table"][x], axis=0)
  return (h @ params["w"] - y) ** 2


def _tied(params, x, y):
  h = jnp.tanh(jnp.sum(params["table"][x], axis=0) @ params["w"])
  logits = params["table"] @ h  # the embedding is also the output projection
  return -jax.nn.log_softmax(logits)[y % params["table"].shape[0]]


def _model(name, rng):
  n = USER_IDS.size
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape))
  if name == "dense":
    params = {"w1": normal(4, 5), "b1": normal(5), "w2": normal(5)}
    return _dense, params, (normal(n, 4), normal(n))
  if name == "conv":
    params = {"k": normal(3, 3, 1, 2), "v": normal(5, 5, 2)}
    return _conv, params, (normal(n, 5, 5, 1), normal(n))
  ids = jnp.asarray(rng.integers(0, 9, size=(n, 3)))
  if name == "embedding":
    params = {"table": normal(9, 4), "w": normal(4)}
    return _embedding, params, (ids, normal(n))
  params = {"table": normal(9, 4), "w": normal(4, 4)}
  return _tied, params, (ids, jnp.asarray(rng.integers(0, 9, size=n)))


def _user_loss(example_loss, reduce):
  """A loss for ONE user's K examples (the loss of the issue): the masked sum or mean."""

  def loss(params, x, y, example_mask):
    losses = jax.vmap(example_loss, (None, 0, 0))(params, x, y)
    total = jnp.sum(jnp.where(example_mask, losses, 0.0))
    if reduce == "mean":
      total = total / jnp.maximum(jnp.sum(example_mask), 1)
    return total

  return loss


def _oracle(example_loss, params, data, indices, user_mask, example_mask, clip_norm, reduce):
  """``(clipped sum per leaf, per-user norms)`` in float64 from per-example gradients."""
  grads = jax.vmap(jax.grad(example_loss), (None, 0, 0))(params, *data)
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  indices, user_mask, example_mask = map(np.asarray, (indices, user_mask, example_mask))
  sums = [np.zeros(g.shape[1:]) for g in leaves]
  norms = np.zeros(len(user_mask))
  for u in np.flatnonzero(user_mask):
    rows = indices[u][example_mask[u]]
    weight = 1.0 / max(rows.size, 1) if reduce == "mean" else 1.0
    user = [weight * g[rows].sum(axis=0) for g in leaves]
    norms[u] = np.sqrt(sum(np.sum(g**2) for g in user))
    factor = min(1.0, clip_norm / norms[u]) if norms[u] > 0 else 1.0
    for total, g in zip(sums, user):
      total += factor * g
  return sums, norms


@pytest.mark.parametrize(
  "name, reduce",
  [("dense", "sum"), ("dense", "mean"), ("conv", "sum"), ("embedding", "sum"), ("tied", "mean")],
)
def test_user_clipped_sums_match_float64_oracle(name, reduce):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    example_loss, params, data = _model(name, rng)
    sampler = _sampler()
    indices, user_mask, example_mask = sampler(jax.random.key(3))
    # Both masks matter: some rows are padding, some users have fewer than K examples.
    assert 0 < int(user_mask.sum()) < sampler.max_users
    counts = np.asarray(example_mask.sum(axis=1))[np.asarray(user_mask)]
    assert (counts < K).any() and (counts == K).any()
    batch = tuple(d[indices] for d in data)
    loss = _user_loss(example_loss, reduce)
    for clip_norm in (1e-3, 1.0, 1e3):
      summed, norms = clipjax.clipped_grad(loss, clip_norm)(
        params, *batch, example_mask, mask=user_mask
      )
      want, want_norms = _oracle(
        example_loss, params, data, indices, user_mask, example_mask, clip_norm, reduce
      )
      np.testing.assert_allclose(norms, want_norms, rtol=1e-10, atol=1e-12)
      for got, expected in zip(jax.tree.leaves(summed), want):
        scale = max(np.abs(expected).max(), 1e-300)
        np.testing.assert_allclose(np.asarray(got) / scale, expected / scale, atol=1e-10)


def test_per_example_clip_stats_and_adaptive_work_on_per_user_gradients():
  """Per-user gradients (``vmap`` of ``grad`` over users) through ``per_example_clip``
  give ``clipped_grad``'s sum, ``clipping_stats`` averages over real users, and
  ``adaptive_dp_noise`` counts users, not examples."""
  rng = np.random.default_rng(1)
  example_loss, params, data = _model("dense", rng)
  indices, user_mask, example_mask = _sampler()(jax.random.key(5))
  batch = tuple(d[indices] for d in data)
  loss = _user_loss(example_loss, "sum")
  clip_norm = 10.0
  summed, norms = clipjax.clipped_grad(loss, clip_norm)(
    params, *batch, example_mask, mask=user_mask
  )
  per_user = jax.vmap(jax.grad(loss), (None, 0, 0, 0))(params, *batch, example_mask)
  clipped, clip_norms = clipjax.per_example_clip(per_user, clip_norm, mask=user_mask)
  for got, want in zip(jax.tree.leaves(summed), jax.tree.leaves(clipped)):
    np.testing.assert_allclose(got, want.sum(axis=0), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(clip_norms, norms, rtol=1e-5)
  stats = clipjax.clipping_stats(per_user, clip_norm, mask=user_mask)
  real = np.asarray(norms, np.float64)[np.asarray(user_mask)]
  assert 0 < np.mean(real > clip_norm) < 1  # some users clipped, some not
  assert float(stats.fraction_clipped) == pytest.approx(np.mean(real > clip_norm))
  assert float(stats.mean_norm) == pytest.approx(real.mean(), rel=1e-5)

  expected_users = 4.0
  tx = clipjax.adaptive_dp_noise(clip_norm, 0.0, expected_users, key=0, clip_learning_rate=0.3)
  _, state = tx.update(summed, tx.init(params), norms=norms, mask=user_mask)
  fraction = np.sum((real <= clip_norm) - 0.5) / expected_users + 0.5
  want = clip_norm * np.exp(-0.3 * (np.clip(fraction, 0, 1) - 0.5))
  np.testing.assert_allclose(float(state.clip_norm), want, rtol=1e-6)


def test_user_sampler_rates():
  """Users join at q; a drawn user brings a uniformly random min(K, c) of its c examples."""
  rate, draws = 0.3, 4000
  sampler = _sampler(rate, max_users=COUNTS.size)  # never truncated
  indices, user_mask, example_mask = jax.jit(jax.vmap(sampler))(
    jax.random.split(jax.random.key(0), draws)
  )
  indices, user_mask, example_mask = map(np.asarray, (indices, user_mask, example_mask))
  owner = np.repeat(np.arange(COUNTS.size), COUNTS)
  # Every slot of a real user holds an example of one and the same user, without repeats.
  user_of = np.full(indices.shape[:2], -1)
  joined = np.zeros((draws, COUNTS.size), int)
  subsets = {}
  for d in range(draws):
    for j in np.flatnonzero(user_mask[d]):
      rows = indices[d, j][example_mask[d, j]]
      (u,) = set(owner[rows])
      assert rows.size == min(K, COUNTS[u]) == np.unique(rows).size
      assert not example_mask[d, j, rows.size :].any()
      user_of[d, j] = u
      joined[d, u] += 1
      subsets.setdefault(u, []).append(tuple(rows))
    assert not example_mask[d][~user_mask[d]].any()
  frequency = joined.mean(axis=0)
  bound = 5 * np.sqrt(rate * (1 - rate) / draws)
  np.testing.assert_array_less(np.abs(frequency - rate), bound)
  # A user with 6 examples: each of the C(6, 3) = 20 subsets equally likely.
  big = int(np.argmax(COUNTS))
  _, times = np.unique(np.array(subsets[big]), axis=0, return_counts=True)
  total = times.sum()
  assert times.size == 20
  p = 1 / 20
  np.testing.assert_array_less(np.abs(times / total - p), 5 * np.sqrt(p * (1 - p) / total))


def test_user_sampler_truncates_and_validates():
  sampler = _sampler(rate=1.0, max_users=3)
  _, user_mask, _ = sampler(0)
  assert int(user_mask.sum()) == 3
  assert sampler.overflow_probability == 1.0
  with pytest.raises(ValueError, match="user_ids"):
    clipjax.UserSampler(np.zeros((2, 2), int), 0.5, 2, 2)
  with pytest.raises(ValueError, match="examples_per_user"):
    clipjax.UserSampler(USER_IDS, 0.5, 2, 0)


def test_accounting_unit_is_the_user():
  sampler = _sampler(rate=0.05, max_users=6)
  accounting = sampler.accounting
  assert accounting["unit"] == "user" and accounting["num_examples"] == COUNTS.size
  eps = clipjax.dp_epsilon(2.0, steps=50, delta=1e-5, **accounting)
  # The unit does not change the number: the user is the unit of the same Poisson scheme.
  example_level = dict(accounting, unit="example")
  assert eps == clipjax.dp_epsilon(2.0, steps=50, delta=1e-5, **example_level)
  sigma = clipjax.calibrate_noise(eps, 1e-5, steps=50, **accounting)
  assert sigma == pytest.approx(2.0, rel=1e-3)
  statement = clipjax.privacy_statement(eps, 1e-5, **accounting)
  assert "user level" in statement and "one user together with all of their examples" in statement
  assert "at most K examples" in statement and f"over {COUNTS.size} users" in statement
  assert "example level" in clipjax.privacy_statement(eps, 1e-5)
  with pytest.raises(ValueError, match="unit"):
    clipjax.dp_epsilon(2.0, 0.1, 50, 1e-5, unit="person")


def test_example_smoke(tmp_path, monkeypatch):
  """``examples/user_level.py --smoke``: both units run; the example-level run protects a
  user with several examples less than its example-level target."""
  pytest.importorskip("jax_privacy")  # its user-level accountant reports the example-level run
  monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
  result = __import__("user_level").main(["--smoke", "--out", str(tmp_path)])
  assert pathlib.Path(result["plot"]).stat().st_size > 0
  assert result["users"].accounting["unit"] == "user" and result["counts"].max() > 8
  (example_level, user_level) = (next(iter(c.values())) for c in result["table"].values())
  assert example_level["user_epsilon"] > 4.0
  assert user_level["user_epsilon"] <= 4.0 * (1 + 1e-9)
