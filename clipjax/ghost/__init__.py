"""Sum of per-example clipped gradients, without per-example gradients where possible.

The package is laid out as the computation runs:

* ``_walk``: trace one example's loss, find where parameters meet data (through
  ``jit``, ``checkpoint`` and ``scan``), and evaluate it with zero taps on those uses;
* ``_rules``: the rule table, one rule per way a parameter meets data;
* ``_factors``: per-example gradients in factored form (Gram norms, cross terms,
  explicit gradients);
* ``_leaves``: per leaf, ghost or explicit per use, the squared norm with the cross
  terms between uses, and the clipped sum;
* this module: :func:`clipped_grad`, the one batched backward pass, clip weights per
  group, masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax import _checks, _norms
from clipjax.ghost import _leaves, _walk

__all__ = ["clipped_grad"]


def _trace(loss_fn, leaves, treedef, batch_leaves, batch_treedef):
  """Traces one example's loss; returns the closed jaxpr and the output treedef."""
  n = len(leaves)
  out_treedef = []

  def flat_loss(*flat):
    example = jax.tree.unflatten(batch_treedef, flat[n:])
    out = loss_fn(jax.tree.unflatten(treedef, flat[:n]), *example)
    out_leaves, tree = jax.tree.flatten(out)
    out_treedef.append(tree)
    return out_leaves

  params = [jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)) for p in leaves]
  example = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in batch_leaves]
  return jax.make_jaxpr(flat_loss)(*params, *example), out_treedef[0]


def _backward_pass(closed, uses, in_pass, leaves, batch_leaves):
  """One batched forward and backward pass through the taps and the leaves in the pass.

  Returns every use's output cotangents and recorded data (keyed by path), the
  per-example gradients of the leaves in the pass, and the per-example outputs.
  """
  avals = [u.eqn.outvars[0].aval for u in uses]

  def per_example(in_pass_values, example):
    def loss(taps, in_pass_values):
      args = list(leaves)
      for k, v in zip(in_pass, in_pass_values):
        args[k] = v
      tap_map = {u.path: (t, u.position) for u, t in zip(uses, taps)}
      records = {}
      outs = _walk.evaluate(closed.jaxpr, closed.consts, args + list(example), (), tap_map, records)
      return outs[0], (outs, [records[u.path] for u in uses])

    # Zero taps made per example, so that they are batched (and sharded) like the data.
    taps = [jnp.zeros(u.lengths + a.shape, a.dtype) for u, a in zip(uses, avals)]
    grads, aux = jax.grad(loss, (0, 1), has_aux=True)(taps, in_pass_values)
    return grads, aux

  in_pass_values = [leaves[k] for k in in_pass]
  (tap_grads, pass_grads), (outs, records) = jax.vmap(per_example, (None, 0))(
    in_pass_values, batch_leaves
  )
  paths = [u.path for u in uses]
  return dict(zip(paths, tap_grads)), dict(zip(paths, records)), pass_grads, outs


def _settled(w: _norms.Weights) -> tuple[_norms.Weights, jax.Array]:
  """The same weights, computed once, and whether all are kept and unshifted.

  XLA would fuse the few dozen scalar operations behind each example's weight into
  every element of a large cotangent that is scaled or masked with it, redoing them per
  element (seconds on a language model's logits). A conditional's results are never
  fused into their consumers; its branches agree, as all weights are kept and unshifted
  when the first one is taken.
  """
  plain = jnp.all(w.keep) & jnp.all(w.shift == 0)
  settle = lambda f, s, k: (f, jnp.zeros_like(s), jnp.ones_like(k))
  return _norms.Weights(*lax.cond(plain, settle, lambda *w: w, *w)), plain


def _clipped_grad_impl(loss_fn, has_aux, scaling, params, clip_norm, stability, mask, *batch):
  leaves, treedef = jax.tree.flatten(params)
  batch_leaves, batch_treedef = jax.tree.flatten(batch)
  size = batch_leaves[0].shape[0]
  closed, out_treedef = _trace(loss_fn, leaves, treedef, batch_leaves, batch_treedef)
  if closed.out_avals[0].shape != ():
    raise ValueError(
      f"loss_fn must return one scalar loss per example, got shape {closed.out_avals[0].shape}."
    )
  uses, in_pass = _walk.find_uses(closed, len(leaves), len(batch_leaves))
  cotangents, records, pass_grads, outs = _backward_pass(
    closed, uses, in_pass, leaves, batch_leaves
  )

  prefix, clip_norms, subtrees = _norms.groups(clip_norm, params)
  group_of = np.repeat(np.arange(len(subtrees)), [len(jax.tree.leaves(t)) for t in subtrees])
  dtype = _norms.accumulation_dtype(leaves)
  by_leaf = {}
  for use in uses:
    by_leaf.setdefault(use.leaf, []).append(use)
  parts = {
    k: _leaves.norm_parts(leaf_uses, leaves[k], records, cotangents, dtype)
    for k, leaf_uses in by_leaf.items()
  }

  # Per group: one norm from the ghost parts' squared sums and one from the explicit
  # per-example gradients (those of the leaves in the pass and explicit uses).
  explicit = [{} for _ in clip_norms]
  for k, g in zip(in_pass, pass_grads):
    explicit[group_of[k]][k] = g
  sq = [jnp.zeros((size,), dtype) for _ in clip_norms]
  for k, part in parts.items():
    j = group_of[k]
    if part.sq is not None:
      sq[j] = sq[j] + part.sq.astype(dtype)
    if part.explicit is not None:
      explicit[j][k] = part.explicit
  clipped = [jnp.zeros_like(leaf) for leaf in leaves]
  reported = []
  for j, c in enumerate(clip_norms):
    norms = _norms.Norms(jnp.zeros_like(sq[j], jnp.int32), jnp.sqrt(sq[j]))
    counted = {k: g for k, g in explicit[j].items() if not (k in parts and parts[k].explicit_in_sq)}
    if counted:
      norms = _norms.combine([norms, _norms.norms(counted, 2.0, 1, mask)], 2.0)
    w = _norms.clip_weights(norms, c, scaling=scaling, stability=stability, mask=mask)
    w, plain = _settled(w)
    reported.append(_norms.reported(norms, mask))
    for k, total in _norms.weighted_sum(explicit[j], w).items():
      clipped[k] = total.astype(leaves[k].dtype)
    for k, part in parts.items():
      if group_of[k] == j and part.ghost:
        clipped[k] = clipped[k] + _leaves.ghost_sum(part, leaves[k], records, cotangents, w, plain)

  result = (jax.tree.unflatten(treedef, clipped), prefix.unflatten(reported))
  if has_aux:
    return result, jax.tree.unflatten(out_treedef, outs)[1]
  return result


# Static in the loss function, so grad_fns for several clip norms share one compilation.
_clipped_grad_jit = jax.jit(_clipped_grad_impl, static_argnums=(0, 1, 2))


def clipped_grad(
  loss_fn: Callable[..., Any],
  clip_norm: Any,
  *,
  has_aux: bool = False,
  scaling: str = "clip",
  stability: Any = 0.01,
) -> Callable[..., Any]:
  """Sum of per-example clipped gradients, and the per-example norms.

  (Docstring to come.)
  """
  for c in jax.tree.leaves(clip_norm):
    _checks.check_nonnegative("clip_norm", c)
  _norms.check_scaling(scaling, stability)

  def grad_fn(params, *batch, mask=None):
    _norms.groups(clip_norm, params)
    size = _checks.batch_size(batch, "batch arguments")
    mask = _checks.check_mask(mask, size)
    return _clipped_grad_jit(loss_fn, has_aux, scaling, params, clip_norm, stability, mask, *batch)

  return grad_fn
