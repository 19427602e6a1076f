"""Sum of per-example clipped gradients, without per-example gradients where possible.

The package is laid out as the computation runs:

* ``_walk``: trace one example's loss, find where parameters meet data (through
  ``jit``, ``checkpoint`` and ``scan``), and evaluate it with zero taps on those uses;
* ``_rules``: one rule per way a parameter meets data, registered by primitive object
  (:func:`register_rule`, public: a user adds a layer type the same way);
* ``_layout``: which leaf elements a use touches, by strides (O(rank) per use);
* ``_factors``: per-example gradients in factored form (Gram norms, cross terms,
  explicit gradients);
* ``_leaves``: per leaf, ghost or explicit per use, the squared norm with the cross
  terms between uses, and the clipped sum;
* this module: :func:`clipped_grad`, the one batched backward pass, clip weights per
  group, masks; :func:`plan`, what each leaf takes and why.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clipjax import _checks, _norms
from clipjax._typing import PyTree
from clipjax.privacy.ghost import _leaves, _walk
from clipjax.privacy.ghost._rules import Rule, register_rule, rule_for

__all__ = [
  "FallbackWarning",
  "LeafPlan",
  "Rule",
  "UsePlan",
  "clipped_grad",
  "plan",
  "register_rule",
  "rule_for",
]


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


# Per-example gradients up to this size are packed into one array per dtype.
_SMALL = 1 << 14


def _pack(grads: dict, packable) -> tuple[list, Callable]:
  """Per-example gradients as a list in which the small ones among ``packable`` (the
  leaves taken in the pass: biases, normalization scales) sit side by side in one
  ``(batch, n)`` array per dtype, and the function that maps sums of that list back.

  There are many of them and each is tiny; one array makes one kernel of every norm
  and sum instead of dozens (and compiles in a fraction of the time). Large leaves stay
  apart, and so do the explicit gradients of recognised uses, which a parameter-sharded
  (FSDP) model shards like their leaves: packing them would gather them.
  """
  small = {}
  for k, g in grads.items():
    if k in packable and g[0].size <= _SMALL:
      small.setdefault(jnp.dtype(g.dtype), []).append(k)
  large = [k for k in grads if not any(k in keys for keys in small.values())]
  packed = [grads[k] for k in large]
  packed += [
    jnp.concatenate([grads[k].reshape(len(grads[k]), -1) for k in keys], 1)
    for keys in small.values()
  ]

  def unpack(sums: list) -> dict:
    out = dict(zip(large, sums))
    for keys, total in zip(small.values(), sums[len(large) :]):
      offsets = np.cumsum([0] + [grads[k][0].size for k in keys])
      for k, start, stop in zip(keys, offsets[:-1], offsets[1:]):
        out[k] = total[start:stop].reshape(grads[k].shape[1:])
    return out

  return packed, unpack


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


def _clipped_grad_impl(
  loss_fn, has_aux, scaling, warn_fallback, params, clip_norm, stability, mask, *batch
):
  """``_clipped_grad`` (explicit mesh axes are made automatic inside it)."""
  body = functools.partial(_clipped_grad, loss_fn, has_aux, scaling, warn_fallback)
  args = (params, clip_norm, stability, mask, *batch)
  sharding = jax.typeof(jax.tree.leaves(batch)[0]).sharding
  if jax.sharding.AxisType.Explicit not in sharding.mesh.axis_types:
    return body(*args)
  # Under explicit axes every reshape of a batch-sharded record would need its output
  # sharding spelled out; inside, the partitioner infers them. Sums come out sharded
  # like the parameters, per-example results like the batch.
  mesh, batch_axis = sharding.mesh, sharding.spec[0] if sharding.spec else None
  per_example = lambda ndim: NamedSharding(mesh, P(batch_axis, *[None] * ndim))
  clipped = jax.tree.map(lambda leaf: jax.typeof(leaf).sharding, params)
  norms = jax.tree.map(lambda _: per_example(0), clip_norm)
  out_sharding = (clipped, norms)
  if has_aux:
    leaves, treedef = jax.tree.flatten(params)
    batch_leaves, batch_treedef = jax.tree.flatten(batch)
    closed, out_treedef = _trace(loss_fn, leaves, treedef, batch_leaves, batch_treedef)
    aux = jax.tree.unflatten(out_treedef, [per_example(len(a.shape)) for a in closed.out_avals])
    out_sharding = (out_sharding, aux[1])
  return jax.sharding.auto_axes(body, out_sharding=out_sharding)(*args)


def _clipped_grad(
  loss_fn, has_aux, scaling, warn_fallback, params, clip_norm, stability, mask, *batch
):
  leaves, treedef = jax.tree.flatten(params)
  batch_leaves, batch_treedef = jax.tree.flatten(batch)
  size = batch_leaves[0].shape[0]
  closed, out_treedef = _trace(loss_fn, leaves, treedef, batch_leaves, batch_treedef)
  if closed.out_avals[0].shape != ():
    raise ValueError(
      f"loss_fn must return one scalar loss per example, got shape {closed.out_avals[0].shape}."
    )
  analysis = _walk.find_uses(closed, len(leaves), len(batch_leaves))
  if warn_fallback:
    _warn_fallback(params, analysis.reasons)
  in_pass = analysis.in_pass
  cotangents, records, pass_grads, outs = _backward_pass(
    closed, analysis.uses, in_pass, leaves, batch_leaves
  )

  prefix, clip_norms, subtrees = _norms.groups(clip_norm, params)
  group_of = np.repeat(np.arange(len(subtrees)), [len(jax.tree.leaves(t)) for t in subtrees])
  dtype = _norms.accumulation_dtype(leaves)
  parts, fused, extra = _leaves.transformed_parts(
    analysis, leaves, records, cotangents, dtype, group_of
  )
  # A fused virtual leaf counts in its sources' group, as a leaf of its own.
  values, group_of = dict(enumerate(leaves)), dict(enumerate(group_of))
  for k, t in fused.items():
    parts[k], values[k], group_of[k] = t.parts, t.value, group_of[t.sources[0]]

  # Per group: the ghost parts' norms, and one norm of the explicit per-example
  # gradients (those of the leaves in the pass, of explicit uses and pulled back).
  explicit = [{} for _ in clip_norms]
  for k, g in [*zip(in_pass, pass_grads), *extra.items()]:
    explicit[group_of[k]][k] = g
  packable = {*in_pass, *extra}
  terms = [[] for _ in clip_norms]
  slack = [[] for _ in clip_norms]
  for k, part in parts.items():
    terms[group_of[k]] += part.terms
    slack[group_of[k]] += part.slack
    if part.explicit is not None:
      explicit[group_of[k]][k] = part.explicit
  # Sums stay in at least float32: rounding them to bfloat16 before the noise could
  # move them by more than one example's clip norm.
  clipped = {k: jnp.zeros(v.shape, _norms.accumulation_dtype([v])) for k, v in values.items()}
  reported = []
  for j, c in enumerate(clip_norms):
    counted = {
      k: g for k, g in explicit[j].items() if not (k in parts and parts[k].explicit_in_terms)
    }
    norm_parts = [_leaves.root(terms[j], slack[j])] if terms[j] else []
    if counted:
      norm_parts.append(_norms.norms(_pack(counted, packable)[0], 2.0, 1, mask))
    if not norm_parts:  # a group the loss does not depend on
      zero = jnp.zeros((size,), dtype)
      norm_parts.append(_norms.Norms(jnp.zeros((size,), jnp.int32), zero))
    norms = _norms.combine(norm_parts, 2.0)
    w = _norms.clip_weights(norms, c, scaling=scaling, stability=stability, mask=mask)
    w, plain = _settled(w)
    reported.append(_norms.reported(norms, mask))
    packed, unpack = _pack(explicit[j], packable)
    for k, total in unpack(_norms.weighted_sum(packed, w)).items():
      clipped[k] = total.astype(clipped[k].dtype)
    for k, part in parts.items():
      if group_of[k] == j and part.ghost:
        clipped[k] = clipped[k] + _leaves.ghost_sum(part, values[k], records, cotangents, w, plain)
  for k, t in fused.items():
    for source, total in zip(t.sources, t.back(clipped.pop(k))):
      clipped[source] = clipped[source] + total

  clipped = [clipped[k] for k in range(len(leaves))]
  result = (jax.tree.unflatten(treedef, clipped), prefix.unflatten(reported))
  if has_aux:
    return result, jax.tree.unflatten(out_treedef, outs)[1]
  return result


class UsePlan(NamedTuple):
  """One recognised use of a leaf in :func:`plan`.

  Attributes:
    primitive: the primitive's name (``"dot_general"``, ...).
    rule: the name of the rule's class.
    form: ``"ghost"`` (its norm from the Gram form of its factors) or ``"explicit"``
      (its per-example gradient as one batched contraction), whichever costs less,
      the explicit form only where its gradients fit the memory budget (no more
      entries than the factors, or 64 MiB in float32).
    through: for a parameter transformed before use (a fused kernel, ``w * g``), the
      primitives that transform it (empty for a direct use): the rule takes the
      transformed operand and its per-example gradient is pulled back to this leaf
      (in ghost form where that only rearranges it and the leaf has no other use).
  """

  primitive: str
  rule: str
  form: str
  through: tuple = ()


class LeafPlan(NamedTuple):
  """How :func:`clipjax.clipped_grad` takes one leaf's per-example gradient.

  Attributes:
    form: ``"ghost"``, ``"explicit"`` or ``"ghost+explicit"`` (its recognised uses'
      forms); ``"pass"``: in the batched backward pass, as ``vmap(grad)`` would (exact,
      at that leaf's share of the per-example cost); ``"unused"``: the loss does not
      depend on it.
    uses: the recognised uses, in program order (empty for ``"pass"``).
    reasons: for ``"pass"``, why: every way the leaf is used that no rule takes.
  """

  form: str
  uses: tuple
  reasons: tuple


class FallbackWarning(UserWarning):
  """Some leaves' per-example gradients are taken in the batched backward pass."""


def _paths(params) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _fallback_message(paths, reasons) -> str:
  lines = [f"  {paths[k]}: {'; '.join(why)}" for k, why in sorted(reasons.items())]
  return (
    f"clipped_grad takes {len(reasons)} leaves in the batched backward pass (their "
    "per-example gradients cost what vmap(grad) costs):\n" + "\n".join(lines)
  )


def _warn_fallback(params, reasons) -> None:
  """Warns (once per compilation) which leaves fall back, and why: not the biases and
  normalization scales, which are in the pass by design."""
  slow = {
    k: why for k, why in reasons.items() if any(not r.startswith(_walk.BY_DESIGN) for r in why)
  }
  if slow:
    warnings.warn(_fallback_message(_paths(params), slow), FallbackWarning, stacklevel=2)


def plan(loss_fn, params, *batch, warn: bool = False) -> dict[str, LeafPlan]:
  """How :func:`clipjax.clipped_grad` takes every leaf's per-example gradient, and why.

  Traces ``loss_fn`` as ``clipped_grad`` does (shapes only: nothing is computed, the
  arguments may be ``jax.ShapeDtypeStruct``) and reports, by leaf path
  (``jax.tree_util.keystr``), which rule recognises each use of the leaf and in which
  form, or why the leaf falls back to the batched backward pass (an equation no rule
  takes, ``cond`` or ``while_loop``, ``custom_vjp``, a penalty on the parameters
  alone, ...). A fallback is exact; it costs what ``vmap(grad)`` costs for that leaf.

  Args:
    loss_fn: as for :func:`clipjax.clipped_grad`, the loss of ONE example.
    params: the parameters.
    *batch: the batch arguments, with a leading batch axis.
    warn: also emit a :class:`FallbackWarning` listing the leaves that fall back
      (other than biases and normalization scales: elementwise uses, which are in
      the pass by design).

  Returns:
    ``{path: LeafPlan(form, uses, reasons)}`` in the order of ``params``' leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> from clipjax import ghost
    >>> def loss(p, x):
    ...   h = jnp.tanh(x @ p["w"] + p["b"]) @ jnp.sin(p["v"])
    ...   return jnp.sum(h) + jnp.sum(p["s"] ** 2)
    >>> params = {"w": jnp.ones((16, 16)), "b": jnp.zeros(16), "v": jnp.ones(16), "s": jnp.ones(2)}
    >>> for path, leaf in ghost.plan(loss, params, jnp.ones((8, 2, 16))).items():
    ...   print(path, leaf.form, [(u.form, u.through) for u in leaf.uses], leaf.reasons)
    ['b'] pass [] ('elementwise `add` with data (a small per-example gradient, by design)',)
    ['s'] pass [] ('elementwise `add` with data (a small per-example gradient, by design)',)
    ['v'] explicit [('explicit', ('sin',))] ()
    ['w'] ghost [('ghost', ())] ()
  """
  paths = _paths(params)
  leaves, treedef = jax.tree.flatten(params)
  batch_leaves, batch_treedef = jax.tree.flatten(batch)
  closed, _ = _trace(loss_fn, leaves, treedef, batch_leaves, batch_treedef)
  analysis = _walk.find_uses(closed, len(leaves), len(batch_leaves))
  out = {paths[k]: LeafPlan("pass", (), tuple(analysis.reasons[k])) for k in analysis.in_pass}

  def forms(part, uses) -> list[str]:
    ghost = {id(u) for u in part.ghost}
    return ["ghost" if id(u) in ghost else "explicit" for u in uses]

  def run(leaves, batch_leaves):
    uses, n = analysis.uses, len(leaves)
    cotangents, records, _, _ = _backward_pass(closed, uses, analysis.in_pass, leaves, batch_leaves)
    dtype = _norms.accumulation_dtype(leaves)
    group_of = np.zeros(n, int)  # the plan does not depend on the clip groups
    parts, fused, _ = _leaves.transformed_parts(
      analysis, leaves, records, cotangents, dtype, group_of
    )
    found = {k: [] for k in range(n) if k not in analysis.in_pass}
    for k, part in parts.items():
      leaf_uses = [u for u in uses if u.leaf == k]
      for u, f in zip(leaf_uses, forms(part, leaf_uses)):
        found[k].append(UsePlan(u.eqn.primitive.name, type(u.rule).__name__, f))
    for j, v in enumerate(analysis.virtuals):
      leaf_uses = [u for u in uses if u.leaf == n + j]
      # A virtual leaf not fused has every use explicit, pulled back to its sources.
      used = (
        forms(fused[n + j].parts, leaf_uses) if n + j in fused else ["explicit"] * len(leaf_uses)
      )
      for k, _ in v.sources:
        for u, f in zip(leaf_uses, used):
          if k in found:
            found[k].append(UsePlan(u.eqn.primitive.name, type(u.rule).__name__, f, v.names))
    for k, used in found.items():
      if used:
        out[paths[k]] = LeafPlan(
          "+".join(sorted({u.form for u in used}, reverse=True)), tuple(used), ()
        )

  jax.eval_shape(run, leaves, batch_leaves)
  if warn:
    _warn_fallback(params, analysis.reasons)
  return {p: out.get(p, LeafPlan("unused", (), ())) for p in paths}


def _plan(loss_fn, params, *batch) -> dict[str, Any]:
  """:func:`plan` in brief: ``"pass"``, ``"unused"``, or the forms of the uses."""
  return {
    path: leaf.form if leaf.form in ("pass", "unused") else tuple(u.form for u in leaf.uses)
    for path, leaf in plan(loss_fn, params, *batch).items()
  }


# Static in the loss function, so grad_fns for several clip norms share one compilation.
_clipped_grad_jit = jax.jit(_clipped_grad_impl, static_argnums=(0, 1, 2, 3))


def clipped_grad(
  loss_fn: Callable[..., jax.Array | tuple[jax.Array, PyTree]],
  clip_norm: float | jax.Array | PyTree,
  *,
  has_aux: bool = False,
  scaling: str = "clip",
  stability: float | jax.Array = 0.01,
  warn_fallback: bool = False,
) -> Callable[..., tuple[PyTree, PyTree] | tuple[tuple[PyTree, PyTree], PyTree]]:
  """Sum of per-example clipped gradients, and the per-example norms, at about the cost
  of one non-private gradient.

  Computes ``Σ_i w_i g_i`` with ``g_i = ∇ loss_fn(params, *example_i)`` and the weight
  ``w_i`` of example ``i`` given by ``scaling`` from its gradient's L2 norm over the
  whole ``params`` pytree (or over each group of a group-wise ``clip_norm``): exactly
  what clipping ``jax.vmap(jax.grad(loss_fn))`` example by example and summing gives,
  without holding one gradient per example where the model allows.

  Args:
    loss_fn: ``loss_fn(params, *example) -> loss`` (or ``(loss, aux)`` with ``has_aux``),
      the scalar loss of ONE example.
    clip_norm: ``C >= 0``, a scalar (Python or JAX, may be traced); or a pytree prefix
      of ``params`` with one scalar per group (each layer, say), each group of each
      example then scaled by its own ``C_k`` (the sum's sensitivity is
      ``sqrt(Σ_k C_k²)``).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    scaling: the weight of an example (of a group) with norm ``‖g‖``: ``"clip"``,
      ``min(1, C/‖g‖)`` (Abadi et al. 2016); ``"automatic"``, ``C/(‖g‖ + stability)``
      (Bu et al. 2023); ``"normalize"``, ``C/‖g‖`` (zero gradients stay zero). Each
      bounds every example's contribution by ``C``.
    stability: the ``γ > 0`` of ``"automatic"``.
    warn_fallback: emit a :class:`clipjax.ghost.FallbackWarning` (once per
      compilation) naming every leaf whose per-example gradient falls back to the
      batched backward pass, and why (biases and normalization scales, in the pass
      by design, are not named); :func:`clipjax.ghost.plan` reports every leaf
      without compiling.

  Returns:
    ``grad_fn(params, *batch, mask=None)``, where every leaf of every batch argument
    has a leading batch axis and ``mask`` (optional) is a boolean ``(batch,)`` array,
    True for real examples. It returns ``(clipped_sum, norms)``: a pytree like
    ``params``, and the unclipped per-example norms, a ``(batch,)`` array (a pytree like
    ``clip_norm`` of such arrays for group-wise clipping). With ``has_aux`` it returns
    ``((clipped_sum, norms), aux)``, every example's aux stacked on a leading axis.
    ``params`` holds the trainable floating-point arrays only: from a flax NNX model,
    ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``; from an equinox
    one, ``params, static = eqx.partition(model, eqx.is_inexact_array)``.

  Raises:
    ValueError: eagerly, naming the argument: a negative or NaN clip norm, a
      ``clip_norm`` that is no prefix of ``params``, an unknown ``scaling``, a
      non-positive ``stability``, a mask of the wrong shape or dtype, batch arguments
      without a common leading axis, a loss that is not a scalar, a leaf of ``params``
      that cannot be differentiated (integer or key arrays, functions: its path and the
      fix are named).

  **How it works.** The per-example loss is traced to a jaxpr once per input shape,
  and every place where a parameter (possibly reshaped, transposed, sliced or cast)
  meets the example's data is matched against the rule registered for its primitive
  (:func:`clipjax.ghost.register_rule` adds one), also inside ``jax.jit``,
  ``jax.checkpoint`` and ``lax.scan`` (stacked layers, flax ``nn.scan``):

  ==========================  ===========================================================
  rule                        recognises
  ==========================  ===========================================================
  ``dot_general``             ``@``, ``jnp.einsum``, ``jnp.dot``, flax ``Dense``,
                              ``DenseGeneral``, attention projections, equinox
                              ``Linear``; with or without a sequence axis or dot batch
                              (head) axes
  ``conv_general_dilated``    1-D, 2-D and 3-D convolutions with any strides, padding,
                              dilations and feature groups (grouped, depthwise);
                              transposed convolutions from their undilated input
  ``gather``                  embedding lookups: ``table[ids]``, ``jnp.take``, flax
                              ``Embed``
  ==========================  ===========================================================

  A parameter transformed before use (a kernel concatenated from several leaves, as
  flax ``OptimizedLSTMCell`` does; ``w * g``; weight normalisation; a flipped kernel)
  is taken by the rule as an operand of its own, and its per-example gradient is pulled
  back to the leaves through the transformation's VJP: in Gram form where that only
  rearranges distinct leaves used nowhere else, else from the explicit gradient.

  One batched forward and backward pass gives every use's input
  and output cotangent; the per-example squared norm then comes either from the Gram
  form (``Σ_{t,s} (x_t·x_s)(g_t·g_s)`` over positions, ``[id_t = id_s] g_t·g_s`` for an
  embedding: Li et al. 2022) or from the per-example gradient itself computed as one
  batched contraction, whichever costs less for the shapes (Bu, Mao & Xu 2022), the
  latter only where the per-example gradients hold no more entries than the factors
  they come from, or 2^24 in all (they are kept until the clip weights are known). A leaf
  used several times (an embedding tied to the output projection, a layer applied
  twice, a layer shared by a scan's iterations) gets the norm of the sum over its uses,
  cross terms included. The clipped sum is one contraction per use of its inputs and
  clip-weighted output cotangents (a matrix product as large as a plain step's weight
  gradient, a scatter-add for an embedding): no second backward pass. Elementwise
  parameters (biases, LayerNorm, GroupNorm and RMSNorm scales), and every leaf used in
  a way no rule recognises (inside ``cond``, ``while``, ``custom_jvp`` or
  ``custom_vjp`` calls, a penalty on the parameters alone, ...), get their per-example gradient
  from the same batched backward pass, as ``vmap(grad)`` would: exact, at that leaf's
  share of the per-example cost. :func:`clipjax.ghost.plan` says which leaves do and
  why.

  The norms are certified: each is an upper bound, in the arithmetic actually used,
  of the norm of what the example contributes to the sum, whatever the input (Gram
  sums that cancel carry a rigorous bound of their rounding error; every example's
  factors are divided by powers of two before any inner product, exactly, so that
  none leaves the float range), so a crafted example
  can be over-clipped but never passes unclipped. On benign data the bound is of the
  order of the unit roundoff times the layer widths (``ghost._factors`` derives it).

  Examples whose gradient is not finite contribute nothing (they are zeroed without
  multiplying NaN by zero) and report an infinite norm; examples masked out contribute
  nothing and report 0, whatever their data (padding may even produce NaN). Norms are
  accumulated in at least float32, and so is the clipped sum (the parameters' dtype
  promoted to float32): rounded to bfloat16 before the noise, one example could move
  it by more than C. ``dp_noise`` adds the noise in that precision, and
  ``optax.apply_updates`` casts the update to the parameters' dtype.
  ``grad_fn`` is compiled with ``loss_fn`` as a static argument: reuse the same
  ``loss_fn`` object to reuse the compilation (clip norms may change freely).

  Example:
    >>> import jax, jax.numpy as jnp, clipjax
    >>> def loss(w, x, y):
    ...   return 0.5 * jnp.sum((x @ w - y) ** 2)
    >>> w = jnp.ones((3, 1))
    >>> x = jnp.array([[1., 0., 0.], [0., 3., 0.]]); y = jnp.zeros((2, 1))
    >>> total, norms = clipjax.clipped_grad(loss, 1.0)(w, x, y)
    >>> print(norms)
    [1. 9.]
    >>> print(total.ravel())
    [1. 1. 0.]
    >>> total, norms = clipjax.clipped_grad(loss, 1.0)(w, x, y, mask=jnp.array([True, False]))
    >>> print(norms, total.ravel())
    [1. 0.] [1. 0. 0.]

  References:
    Goodfellow, "Efficient Per-Example Gradient Computations", arXiv 1510.01799, 2015.

    Li, Tramèr, Liang & Hashimoto, "Large Language Models Can Be Strong Differentially
    Private Learners", ICLR 2022 (ghost clipping).

    Bu, Mao & Xu, "Scalable and Efficient Training of Large Convolutional Neural
    Networks with Differential Privacy", NeurIPS 2022 (mixed ghost norms, book-keeping).

    Bu, Wang, Zha & Karypis, "Automatic Clipping: Differentially Private Deep Learning
    Made Easier and Stronger", NeurIPS 2023.
  """
  _checks.check_clip_norm(clip_norm)
  _checks.check_scaling(scaling, stability)

  def grad_fn(params, *batch, mask=None):
    _checks.check_differentiable(params)
    _norms.groups(clip_norm, params)
    size = _checks.batch_size(batch, "batch arguments")
    mask = _checks.check_mask(mask, size)
    return _clipped_grad_jit(
      loss_fn, has_aux, scaling, warn_fallback, params, clip_norm, stability, mask, *batch
    )

  return grad_fn
