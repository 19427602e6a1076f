"""A float64 NumPy oracle for clipped sums, and the comparison the ghost tests share.

The reference takes every example's gradient with ``jax.vmap(jax.grad(loss_fn))`` (no
ghost machinery involved), then clips, scales, masks and sums in float64 NumPy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import privacy_oracle

import clipjax
from clipjax.privacy import ghost


@functools.partial(jax.jit, static_argnums=0)
def _per_example(loss_fn, params, *batch):
  return jax.vmap(jax.grad(loss_fn), in_axes=(None,) + (0,) * len(batch))(params, *batch)


def per_example_grads(loss_fn, params, *batch):
  """Every example's gradient, one leaf list, as ``jax.vmap(jax.grad(loss_fn))`` gives it
  (compiled once per loss function and shapes)."""
  return [np.asarray(g) for g in jax.tree.leaves(_per_example(loss_fn, params, *batch))]


def group_index(clip_norm, params):
  """The group of every leaf of ``params`` under a clip norm (a scalar or a pytree prefix)."""
  subtrees = jax.tree.structure(clip_norm).flatten_up_to(params)
  return np.repeat(np.arange(len(subtrees)), [len(jax.tree.leaves(t)) for t in subtrees])


def oracle(grads, clip_norm, group, *, scaling="clip", stability=0.01, mask=None):
  """``(sums, norms)``: per-leaf float64 sums of the scaled per-example gradients, and the
  ``(groups, batch)`` unclipped norms (``inf`` for non-finite examples, 0 if masked out)."""
  grads = [np.asarray(g, np.float64) for g in grads]
  size = grads[0].shape[0]
  keep = np.ones(size, bool) if mask is None else np.asarray(mask)
  clip_norms = [float(c) for c in jax.tree.leaves(clip_norm)]
  factors, norms = [], []
  for j, c in enumerate(clip_norms):
    sq = sum(np.sum(g.reshape(size, -1) ** 2, axis=1) for g, k in zip(grads, group) if k == j)
    n = np.sqrt(sq) if np.ndim(sq) else np.zeros(size)
    ok = np.isfinite(n) & keep
    # Non-finite and masked examples: their factor is dropped.
    factors.append(np.where(ok, privacy_oracle.clip_weights(n, c, scaling, stability), 0.0))
    norms.append(np.where(keep, np.where(np.isfinite(n), n, np.inf), 0.0))
  sums = []
  for g, k in zip(grads, group):
    ok = factors[k] != 0
    sums.append(np.tensordot(factors[k][ok], g[ok], axes=1))
  return sums, np.stack(norms)


def assert_close(actual, expected, rtol, floor=0.0, names=None):
  """Leaf by leaf, within ``rtol`` of each leaf's largest entry (at least ``floor``)."""
  for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, (names[i] if names else i, a.shape, e.shape)
    scale = max(np.max(np.abs(e), initial=0.0), floor, 1e-300)
    error = np.max(np.abs(a - e), initial=0.0) / scale
    assert error <= rtol, f"leaf {names[i] if names else i}: relative error {error:.3g} > {rtol}"


def check(loss_fn, params, *batch, clip_norms=(1e-6, 1.0, 1e6), rtol=None, floor=0.0, **options):
  """``clipped_grad`` equals the oracle for every clip norm (one compilation for all).

  ``clip_norms`` are scalars or pytree prefixes of ``params``; ``options`` are
  ``clipped_grad``'s keywords and ``mask``. A leaf whose true gradient is zero (the key
  bias of attention) holds only rounding: ``floor`` (a fraction of the largest entry of
  the whole sum) bounds the scale its error is measured against from below.
  """
  mask = options.pop("mask", None)
  dtype = jnp.result_type(*jax.tree.leaves(params))
  if rtol is None:
    rtol = 1e-10 if dtype == jnp.float64 else 1e-4
  grads = per_example_grads(loss_fn, params, *batch)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for c in clip_norms:
    total, norms = clipjax.clipped_grad(loss_fn, c, **options)(params, *batch, mask=mask)
    sums, want_norms = oracle(grads, c, group_index(c, params), mask=mask, **options)
    top = max(np.max(np.abs(s), initial=0.0) for s in sums)
    assert_close(jax.tree.leaves(total), sums, rtol, floor * top, names)
    got_norms = np.stack([np.asarray(n, np.float64) for n in jax.tree.leaves(norms)])
    np.testing.assert_allclose(got_norms, want_norms, rtol=rtol)
    for leaf, ref in zip(jax.tree.leaves(total), jax.tree.leaves(params)):
      assert leaf.dtype == jnp.promote_types(ref.dtype, jnp.float32) and leaf.shape == ref.shape
  return grads


def plan(loss_fn, params, *batch):
  """How each leaf's per-example gradient is taken (see ``ghost._plan``)."""
  return ghost._plan(loss_fn, params, *batch)
