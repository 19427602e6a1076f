"""Sensitivity of clipped_grad for every input: adversarial examples against every rule.

Differential privacy needs every example's contribution to the clipped sum to have norm
at most the clip norm ``C``, for any example, an attacker's included. The Gram form of a
per-example norm, ``Σ_{p,q} (a_p·a_q)(b_p·b_q)``, cancels: near-identical positions with
nearly opposite cotangents make its rounding error far larger than the result, and
large or small magnitudes push its inner products out of the float range. Here a seeded
search builds such examples for every rule (dense layers on positions, dot batch axes,
convolutions, embedding rows used twice, the cross terms of a tied embedding, a leaf
with a ghost and an explicit use, group-wise clip norms) and measures each example's
contribution alone in the batch (the others masked out), in float64, for every scaling
rule. Benign examples keep their exact norms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _ghost_oracle import per_example_grads, plan
from jax import lax

import clipjax

F32 = jnp.float32
SCALINGS = ("clip", "automatic", "normalize")
MAGNITUDES = (1.0, 3e4, 1e12, 1e-12, 1e15, 1e-15)


def _cancelling(rng, size, positions, width, magnitude):
  """``positions`` rows: pairs of near-identical rows around a large common offset."""
  base = magnitude * (1 + 0.01 * rng.standard_normal(width))
  rows = np.tile(base, (positions, 1))
  rows[1::2] += magnitude * 10.0 ** rng.uniform(-7, -3) * rng.standard_normal(width)
  return rows


def _opposite(rng, positions, width, magnitude):
  """Cotangent rows that nearly cancel in pairs: ``g, −g + tiny``."""
  g = magnitude * rng.standard_normal(width)
  rows = np.tile(g, (positions, 1))
  rows[1::2] = -g + magnitude * 10.0 ** rng.uniform(-7, -4) * rng.standard_normal(width)
  return rows


def _search(seed, count, make):
  """``count`` crafted examples, each from ``make(rng, magnitude_x, magnitude_g)``."""
  rng = np.random.default_rng(seed)
  examples = []
  for k in range(count):
    mx = MAGNITUDES[k % len(MAGNITUDES)]
    mg = MAGNITUDES[(k // 2 + 1) % len(MAGNITUDES)]
    examples.append(make(rng, mx, mg))
  return [jnp.asarray(np.stack(parts), F32) for parts in zip(*examples)]


def _worst_contribution(loss, params, batch, clip_norm=1.0, ints=()):
  """Per scaling rule, the largest ``‖contribution‖ / sensitivity`` over the examples,
  each measured alone in the batch."""
  batch = [b.astype(jnp.int32) if i in ints else b for i, b in enumerate(batch)]
  size = batch[0].shape[0]
  sens = float(clipjax.sensitivity(clip_norm))
  worst = {}
  for scaling in SCALINGS:
    # One compilation per loss and scaling (the loss function is static, the mask not).
    grad_fn = clipjax.clipped_grad(loss, clip_norm, scaling=scaling)
    ratios = []
    for i in range(size):
      total, _ = grad_fn(params, *batch, mask=jnp.arange(size) == i)
      flat = np.concatenate([np.asarray(t, np.float64).ravel() for t in jax.tree.leaves(total)])
      ratios.append(np.linalg.norm(flat) / sens)
    worst[scaling] = max(ratios)
  return worst


def _form(loss, params, *batch):
  """How the one parameter leaf's uses are taken (ghost or explicit)."""
  (form,) = plan(loss, params, *batch).values()
  return form


def _assert_bounded(worst):
  for scaling, ratio in worst.items():
    assert ratio <= 1 + 1e-5, f"{scaling}: an example contributes {ratio:.6g} x the clip norm"


# --------------------------------------------------------------------------- the rules


def _dense_loss(w, x, c):
  return jnp.sum((x @ w) * c)


def test_dense_on_positions():
  """The issue's example (two tokens, true norm 10, Gram total ≤ 0) and a search."""
  a = np.float32(3e4) * (1 + np.float32(0.01) * np.sin(np.arange(64, dtype=np.float32) + 1))
  e = np.eye(64, dtype=np.float32)[0]
  b = np.full(64, 1.25, np.float32)
  w = jnp.zeros((64, 64), F32)
  assert _form(_dense_loss, w, jnp.asarray([[a, a + e]]), jnp.asarray([[b, -b]])) == ("ghost",)
  _assert_bounded(
    _worst_contribution(_dense_loss, w, [jnp.asarray([[a, a + e]]), jnp.asarray([[b, -b]])])
  )

  def make(rng, mx, mg):
    return _cancelling(rng, 4, 4, 16, mx), _opposite(rng, 4, 16, mg)

  x, c = _search(0, 12, make)
  w = jnp.zeros((16, 16), F32)
  assert _form(_dense_loss, w, x, c) == ("ghost",)
  _assert_bounded(_worst_contribution(_dense_loss, w, [x, c]))


def test_dot_batch_axes():
  """Heads: one matrix per head, positions within each head."""

  def loss(w, x, c):
    return jnp.sum(jnp.einsum("htd,hdk->htk", x, w) * c)

  def make(rng, mx, mg):
    x = np.stack([_cancelling(rng, 4, 4, 12, mx) for _ in range(2)])
    c = np.stack([_opposite(rng, 4, 12, mg) for _ in range(2)])
    return x, c

  x, c = _search(1, 8, make)
  w = jnp.zeros((2, 12, 12), F32)
  assert _form(loss, w, x, c) == ("ghost",)
  _assert_bounded(_worst_contribution(loss, w, [x, c]))


def test_convolution():
  """Overlapping patches of a nearly constant signal, cotangents alternating in sign."""

  def loss(k, x, c):
    y = lax.conv_general_dilated(x[None], k, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    return jnp.sum(y[0] * c)

  def make(rng, mx, mg):
    x = mx * (1 + 1e-6 * rng.standard_normal((10, 16)))
    signs = np.where(np.arange(8) % 2 == 0, 1.0, -1.0)[:, None]
    c = mg * signs * rng.uniform(1, 1 + 1e-5, (8, 32))
    return x, c

  x, c = _search(2, 8, make)
  k = jnp.zeros((3, 16, 32), F32)
  assert _form(loss, k, x, c) == ("ghost",)
  _assert_bounded(_worst_contribution(loss, k, [x, c]))


def test_transposed_convolution():
  """A stride-2 transposed convolution (positions at the input): near-identical input
  rows, output cotangents whose patches alternate in sign."""

  def loss(k, x, c):
    y = lax.conv_transpose(x[None], k, (2,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    return jnp.sum(y[0] * c)

  def make(rng, mx, mg):
    x = mx * (1 + 1e-6 * rng.standard_normal((6, 16)))
    signs = np.where(np.arange(12) // 2 % 2 == 0, 1.0, -1.0)[:, None]
    c = mg * signs * rng.uniform(1, 1 + 1e-5, (12, 16))
    return x, c

  x, c = _search(7, 8, make)
  k = jnp.zeros((3, 16, 16), F32)
  assert _form(loss, k, x, c) == ("ghost",)
  _assert_bounded(_worst_contribution(loss, k, [x, c]))


def test_fused_kernel():
  """A kernel concatenated from two leaves before use (Gram form of the fused kernel,
  pulled back to the leaves), on cancelling positions."""

  def loss(p, x, c):
    return jnp.sum((x @ jnp.concatenate([p["a"], p["b"]], axis=1)) * c)

  def make(rng, mx, mg):
    return _cancelling(rng, 4, 4, 16, mx), _opposite(rng, 4, 24, mg)

  x, c = _search(8, 12, make)
  params = {"a": jnp.zeros((16, 8), F32), "b": jnp.zeros((16, 16), F32)}
  assert set(plan(loss, params, x, c).values()) == {("ghost",)}
  _assert_bounded(_worst_contribution(loss, params, [x, c]))


def test_embedding_rows_used_twice():
  """The same row looked up twice with nearly opposite cotangents."""

  def loss(table, ids, c):
    return jnp.sum(table[ids] * c)

  def make(rng, _, mg):
    ids = np.repeat(rng.integers(0, 256, 4), 2)
    return ids, _opposite(rng, 8, 16, mg)

  ids, c = _search(3, 8, make)
  table = jnp.zeros((256, 16), F32)
  assert _form(loss, table, ids.astype(jnp.int32), c) == ("ghost",)
  _assert_bounded(_worst_contribution(loss, table, [ids, c], ints=(0,)))


def test_tied_embedding_cross_terms():
  """An embedding tied to its output projection whose two gradients nearly cancel: the
  lookup's ``Σ_t e_id ⊗ c_t`` against the projection's ``Σ_t s·e_id ⊗ x_t``."""
  vocab, d, t = 128, 16, 6

  def loss(table, ids, c, x, s):
    looked_up = jnp.sum(table[ids] * c)
    logits = x @ table.T  # (t, vocab)
    return looked_up + jnp.sum(logits * s)

  def make(rng, mx, mg):
    ids = rng.integers(0, vocab, t)
    c = mg * rng.standard_normal((t, d))
    scale = mx
    s = -scale * np.eye(vocab)[ids] * (1 + 1e-6 * rng.standard_normal((t, 1)))
    x = c / scale * (1 + 1e-6 * rng.standard_normal((t, d)))
    return ids, c, x, s

  ids, c, x, s = _search(4, 8, make)
  table = jnp.zeros((vocab, d), F32)
  assert _form(loss, table, ids.astype(jnp.int32), c, x, s) == ("ghost", "ghost")
  _assert_bounded(_worst_contribution(loss, table, [ids, c, x, s], ints=(0,)))


def test_ghost_use_against_explicit_use():
  """One leaf used on a long sequence (explicit form) and a short one (Gram form) whose
  gradients nearly cancel: the inner product between the two forms is bounded."""

  def loss(w, long_x, long_c, x, c):
    return jnp.sum((long_x @ w) * long_c) + jnp.sum((x @ w) * c)

  def make(rng, mx, mg):
    x = _cancelling(rng, 3, 3, 16, mx)
    c = _opposite(rng, 3, 16, mg)
    long_x = np.zeros((40, 16))
    long_c = np.zeros((40, 16))
    long_x[:3], long_c[:3] = x * (1 + 1e-6), -c
    return long_x, long_c, x, c

  batch = _search(5, 8, make)
  w = jnp.zeros((16, 16), F32)
  assert _form(loss, w, *batch) == ("explicit", "ghost")
  _assert_bounded(_worst_contribution(loss, w, batch))


def test_group_wise_clip_norms():
  def loss(p, x, c):
    return _dense_loss(p["a"], x, c) + _dense_loss(p["b"], x * 2, c)

  def make(rng, mx, mg):
    return _cancelling(rng, 4, 4, 16, mx), _opposite(rng, 4, 16, mg)

  x, c = _search(6, 6, make)
  params = {"a": jnp.zeros((16, 16), F32), "b": jnp.zeros((16, 16), F32)}
  _assert_bounded(_worst_contribution(loss, params, [x, c], clip_norm={"a": 1.0, "b": 2.0}))


# ------------------------------------------------------------------- benign data, range


@pytest.mark.parametrize(
  "positions, width, vocabulary, tolerance",
  [(48, 128, 128, 6e-5), (16, 32, 6000, 1e-3), (33, 64, 6000, 1e-3)],
  ids=["many positions", "long inner products", "long inner products, Gram by quarters"],
)
def test_benign_norms_are_tight_at_scale(positions, width, vocabulary, tolerance):
  """The certified bound stays small on benign data where its worst case is large: many
  positions (``P²`` products, summed pairwise: ``γ_(log2 P²)``, not ``γ_(P²)``) and an
  output projection over a vocabulary (softmax cotangents, correlated inputs; inner
  products in blocks: ``γ`` of about ``2√V``, not ``γ_V``). Summed in any order, the
  bound over-clipped these by 1.2e-4 and 2.7e-3."""
  rng = np.random.default_rng(11)
  h = rng.standard_normal((3, positions, width))
  if vocabulary > 1024:
    h = 1 + 0.3 * h  # correlated, as after a LayerNorm
  logits = rng.standard_normal((3, positions, vocabulary))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  c = p - np.eye(vocabulary)[rng.integers(0, vocabulary, (3, positions))]
  x, c = jnp.asarray(h, F32), jnp.asarray(c, F32)
  w = jnp.zeros((width, vocabulary), F32)
  assert _form(_dense_loss, w, x, c) == ("ghost",)
  exact = np.linalg.norm(np.einsum("bpl,bpr->blr", h, np.asarray(c, np.float64)), axis=(1, 2))
  _, norms = clipjax.clipped_grad(_dense_loss, 1.0)(w, x, c)
  over = np.asarray(norms, np.float64) / exact - 1
  assert np.all(over >= -1e-6) and np.all(over <= tolerance), over


@pytest.mark.parametrize("positions, length", [(32, 1500), (33, 1500), (128, 300), (129, 300)])
def test_gram_by_quarters_within_its_rounding_bound(positions, length):
  """A Gram matrix formed by quarters (its symmetry: long vectors, in blocks, or many
  positions) is the full one: every entry of every example within
  ``γ_rounds(L) ‖x_p‖‖x_q‖`` of float64, with per-example shifts, and exactly
  symmetric."""
  from clipjax.privacy.ghost import _factors

  rng = np.random.default_rng(positions)
  x = 1 + 0.3 * rng.standard_normal((3, 2, positions, length))
  x = x * rng.uniform(0.5, 2, (3, 2, 1, 1))
  shift = np.array([-3, 0, 5], np.int32)
  got = np.asarray(_factors.inner(*(jnp.asarray(x, F32), False) * 2, *(jnp.asarray(shift),) * 2))
  xs = np.asarray(jnp.asarray(x, F32), np.float64) * 2.0 ** -shift[:, None, None, None]
  want = np.einsum("bhpl,bhql->bhpq", xs, xs)
  norms = np.linalg.norm(xs, axis=-1)
  bound = _factors.gamma(_factors.rounds(length), F32) * norms[..., :, None] * norms[..., None, :]
  assert np.all(np.abs(got - want) <= bound)
  np.testing.assert_array_equal(got, got.swapaxes(2, 3))


@pytest.mark.parametrize("scale", [1e-30, 1e-19, 1e-12, 1.0, 1e12, 1e20, 1e30])
def test_benign_norms_across_the_float32_range(scale):
  """Gaussian data with a gradient norm of about ``scale``: the Gram form (positions) and
  the no-position form both report the float64 norm to 1e-5, never 0 or inf."""
  rng = np.random.default_rng(7)
  k = np.sqrt(scale)
  x = jnp.asarray(k * rng.standard_normal((4, 3, 32)), F32)
  c = jnp.asarray(k * rng.standard_normal((4, 3, 32)) / 10, F32)
  w = jnp.zeros((32, 32), F32)

  def loss(w, x, c):
    return _dense_loss(w, x, c) + jnp.sum((x[0] @ w) * c[1])

  assert _form(loss, w, x, c) == ("ghost", "ghost")
  grads = per_example_grads(loss, w, x, c)[0].astype(np.float64)
  want = np.linalg.norm(grads.reshape(4, -1), axis=1)
  # The oracle itself, in float32, is only as good as its products: compare in float64.
  x64, c64 = np.asarray(x, np.float64), np.asarray(c, np.float64)
  exact = np.linalg.norm(
    (np.einsum("bpl,bpr->blr", x64, c64) + np.einsum("bl,br->blr", x64[:, 0], c64[:, 1])).reshape(
      4, -1
    ),
    axis=1,
  )
  _, norms = clipjax.clipped_grad(loss, 1.0)(w, x, c)
  norms = np.asarray(norms, np.float64)
  assert np.all(np.isfinite(norms)) and np.all(norms > 0)
  np.testing.assert_allclose(norms, exact, rtol=1e-5)
  if 1e-25 < scale < 1e25:  # where vmap(grad) in float32 is itself in range
    np.testing.assert_allclose(want, exact, rtol=1e-4)


# ------------------------------------------------------------------------- a canary audit

DELTA = 1e-5


@jax.jit
def _released_scores(total, direction, keys):
  """``dp_noise``'s release of ``total`` (batch of 8, C = 1, σ = 1) projected on the
  canary's direction, in units of C / B, one per key."""

  def score(key):
    tx = clipjax.dp_noise(1.0, 1.0, 8, key)
    update, _ = tx.update(total, tx.init(total))
    return jnp.sum(update * direction) * 8

  return jax.vmap(score)(keys)


def test_canary_audit_of_clipped_grad_and_dp_noise():
  """One step at σ = 1 claims ε = 4.73. A crafted canary (two near-identical tokens with
  opposite cotangents, true gradient norm 25 C) is clipped: the audit stays below the
  claim. Let through as the uncertified Gram norm (0) let it, unclipped, the same audit
  certifies far more than the claim."""
  a = np.float32(3e4) * (1 + np.float32(0.01) * np.sin(np.arange(4, dtype=np.float32) + 1))
  e = np.eye(4, dtype=np.float32)[0]
  b = np.full(4, 12.5, np.float32)
  x = np.zeros((8, 2, 4), np.float32)
  c = np.zeros((8, 2, 4), np.float32)
  x[0], c[0] = [a, a + e], [b, -b]
  x[1:] = np.random.default_rng(8).standard_normal((7, 2, 4))
  c[1:] = 0.1 * np.random.default_rng(9).standard_normal((7, 2, 4))
  x, c = jnp.asarray(x), jnp.asarray(c)
  w = jnp.zeros((4, 4), F32)
  assert _form(_dense_loss, w, x, c) == ("ghost",)
  grad_fn = clipjax.clipped_grad(_dense_loss, 1.0)
  with_canary, _ = grad_fn(w, x, c)
  without, _ = grad_fn(w, x, c, mask=jnp.arange(8) != 0)
  raw = np.einsum("pl,pr->lr", np.asarray(x[0], np.float64), np.asarray(c[0], np.float64))
  assert np.linalg.norm(raw) == pytest.approx(25, rel=1e-3)
  direction = jnp.asarray(raw / np.linalg.norm(raw), F32)

  claimed = clipjax.dp_epsilon(1.0, 1.0, 1, DELTA)
  keys = jax.random.split(jax.random.key(10), (4, 100_000))
  audit = lambda inside, k: clipjax.audit_epsilon(
    np.asarray(_released_scores(inside, direction, keys[k])),
    np.asarray(_released_scores(without, direction, keys[k + 1])),
    DELTA,
  )
  assert audit(with_canary, 0) < claimed
  assert audit(without + jnp.asarray(raw, F32), 2) > claimed
