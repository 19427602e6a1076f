"""One parameter leaf with recognised uses: its per-example squared norm and clipped sum.

A leaf's per-example gradient is the sum of its uses' gradients (weight tying, a layer
applied twice, the iterations of a scan), so its squared norm is
``Σ_a ‖G_a‖² + 2 Σ_{a<b} ⟨G_a, G_b⟩``. Each use is taken either in *ghost* form (the
Gram form of its factors, never the gradient itself) or *explicitly* (its per-example
gradient, one batched contraction), whichever costs less for its shapes (Bu, Mao & Xu,
2022), the explicit form only where its gradients fit the memory budget (``_cost.held``).
Two ghost uses pair through their factors when they lay the leaf out alike (or
transposed, as an embedding's lookup and its tied output projection do) or touch
disjoint elements (slices of a stacked leaf); otherwise the cheaper one goes explicit.
A ghost use pairs with the explicit ones through their sum ``S_i``.

The clipped sum of a ghost use contracts its factors once the weights are known,
``Σ_{i,p} A_ip ⊗ w_i B_ip`` (the use's own weight gradient: a matrix product, on the
patches for a convolution, a scatter-add for an embedding), the "book-keeping" of Bu
et al. that needs no second backward pass; explicit gradients are summed with their
weights directly.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from clipjax import _norms
from clipjax.privacy.ghost import _factors, _layout, _walk


class Leaf(NamedTuple):
  """A leaf's per-example norm parts and what its clipped sum needs.

  Attributes:
    terms: ``(multiplicity, Scaled)`` pairs that sum to the squared norm of the ghost
      part (cross terms included), each with its rounding bound; see :func:`root`.
    slack: one :class:`~clipjax.privacy.ghost._factors.Scaled` per ghost use, in norm units:
      how far its contraction into the clipped sum may stray per unit weight.
    explicit: ``(batch, *leaf.shape)`` explicit per-example gradient (the explicit
      uses' sum), or None.
    explicit_in_terms: whether ``terms`` already count ``explicit`` (a leaf with both
      kinds of use: the cross terms may be negative, so the parts cannot be combined
      as norms).
    ghost: the uses taken in ghost form.
  """

  terms: list
  slack: list
  explicit: Any
  explicit_in_terms: bool
  ghost: list


def _relation(a: _layout.Layout, b: _layout.Layout, leaf_shape) -> str | None:
  """How two uses' ``(H, L, R)`` layouts of one leaf relate, for pairing their factors:
  ``"same"``, ``"swapped"``, ``"disjoint"``, or None (overlapping, or not known)."""
  if a.indices is None or b.indices is None:
    return None
  return _layout.relation(a.indices, b.indices, leaf_shape)


def _choose(uses, factors, layouts, leaf_shape, allowed) -> tuple[list[bool], dict]:
  """Ghost or explicit for every use, and how every two ghost uses pair."""
  ghost = [
    allowed
    and u.isometric
    and lay.injective
    and (f.gram_cost < f.explicit_cost or not f.explicit_held)
    for u, f, lay in zip(uses, factors, layouts)
  ]
  relations = {}
  for i, j in itertools.combinations(range(len(uses)), 2):
    relations[i, j] = _relation(layouts[i], layouts[j], leaf_shape)
  while True:
    unpaired = [(i, j) for (i, j), r in relations.items() if r is None and ghost[i] and ghost[j]]
    if not unpaired:
      return ghost, relations
    i, j = unpaired[0]
    # The one whose explicit gradient is cheaper gives up its ghost form.
    ghost[i if factors[i].explicit_cost <= factors[j].explicit_cost else j] = False


def norm_parts(uses, leaf, records, cotangents, dtype, extra=None, ghost_allowed=True) -> Leaf:
  """The squared norm parts of one leaf from its uses' records and output cotangents.

  ``extra`` is a per-example gradient the leaf receives otherwise (pulled back from a
  transformed use), counted with its explicit uses; ``ghost_allowed=False`` takes
  every use explicitly.
  """
  layouts = [_factors.layout(u, leaf.shape) for u in uses]
  factors = [
    _factors.of_use(u, records[u.path], cotangents[u.path], lay.shape[1], dtype)
    for u, lay in zip(uses, layouts)
  ]
  ghost, relations = _choose(uses, factors, layouts, leaf.shape, ghost_allowed)
  weighted = [jnp.result_type(records[u.path][0], cotangents[u.path]) for u in uses]
  paired = lambda i: any(
    ghost[j] and relations[min(i, j), max(i, j)] != "disjoint" for j in range(len(uses)) if j != i
  )
  explicit = None if extra is None else extra.astype(dtype)
  zero = jnp.zeros(leaf.shape, dtype)
  for u, f, g in zip(uses, factors, ghost):
    if g:
      continue
    _, back = jax.vjp(lambda v, u=u: _factors.to_blocks(u, v), zero)
    part = jax.vmap(lambda blocks, back=back: back(blocks)[0])(_factors.explicit(f))
    explicit = part if explicit is None else explicit + part
  # A use without positions, paired with no other, is a product of two norms.
  alone = [
    g and f.positions == 1 and not paired(i) and explicit is None
    for i, (f, g) in enumerate(zip(factors, ghost))
  ]
  gram = [i for i in range(len(uses)) if ghost[i] and not alone[i]]
  terms, slack = [], []  # (multiplicity, Scaled); Scaled
  for i in range(len(uses)):
    if alone[i]:
      square, s = _factors.plain(factors[i], weighted[i])
      terms.append((1, square))
      slack.append(s)
  if gram:
    gram_terms, gram_slack = _gram_terms(uses, factors, gram, relations, weighted, explicit)
    terms += gram_terms
    slack += gram_slack
  mixed = explicit is not None and bool(gram)
  return Leaf(terms, slack, explicit, mixed, [u for u, g in zip(uses, ghost) if g])


class Transformed(NamedTuple):
  """A virtual leaf (a derived parameter operand, see ``_walk.Virtual``) in ghost form:
  its parts count for its sources, and ``back`` maps its clipped sum to theirs (in
  the sums' precision: it only rearranges)."""

  parts: Leaf
  value: Any
  back: Any
  sources: list


def transformed_parts(analysis, leaves, records, cotangents, dtype, group_of):
  """Every leaf's norm parts, virtual leaves included.

  A virtual leaf whose pull-back preserves norms (``_walk.isometric``: a fused kernel
  of distinct leaves) and whose sources are used nowhere else, outside the pass and in
  one clip group, is taken like a leaf (ghost or explicit) and returned in
  ``fused``; any other has its per-example gradient formed explicitly and pulled back
  to its sources through the VJP of its recipe, exactly (``v / ‖v‖`` included).

  Returns:
    ``(parts, fused, extra)``: parts of the parameter leaves with uses, by index; the
    fused virtual leaves, by index; and the pulled-back per-example gradients of
    leaves that have no recognised use of their own.
  """
  n = len(leaves)
  by_leaf = {}
  for use in analysis.uses:
    by_leaf.setdefault(use.leaf, []).append(use)
  reached = {}
  for v in analysis.virtuals:
    for k, _ in v.sources:
      reached[k] = reached.get(k, 0) + 1
  fused, extra = {}, {}
  for j, v in enumerate(analysis.virtuals):
    sources = [k for k, _ in v.sources]
    alone = all(k not in by_leaf and reached[k] == 1 and k not in analysis.in_pass for k in sources)
    groups = {int(group_of[k]) for k in sources}
    ok = _walk.isometric(v) and alone and len(groups) == 1
    # A fused operand's pull-back only rearranges: taken on the leaves in the sums'
    # precision, it maps the float32 clipped sum back without rounding it.
    inputs = [leaves[k] for k in sources]
    if ok:
      inputs = [x.astype(_norms.accumulation_dtype([x])) for x in inputs]
    value, back = jax.vjp(functools.partial(_walk.virtual_value, v), *inputs)
    part = norm_parts(by_leaf[n + j], value, records, cotangents, dtype, ghost_allowed=ok)
    if ok:
      fused[n + j] = Transformed(part, value, back, sources)
      continue
    grads = jax.vmap(back)(part.explicit.astype(value.dtype))
    for k, g in zip(sources, grads):
      if k not in analysis.in_pass:
        extra[k] = g if k not in extra else extra[k] + g
  parts = {
    k: norm_parts(uses, leaves[k], records, cotangents, dtype, extra=extra.pop(k, None))
    for k, uses in by_leaf.items()
    if k < n
  }
  return parts, fused, extra


def _gram_terms(uses, factors, gram, relations, weighted, explicit):
  """The Gram-form terms and slacks of the uses ``gram`` (indices), with the explicit
  part's if any."""
  prepared, terms, slack = {}, [], []
  for i in gram:
    n, term = _factors.own(factors[i])
    prepared[i] = n
    terms.append((1, term))
    slack.append(_factors.contraction_slack(n, weighted[i]))
  for i, j in itertools.combinations(gram, 2):
    if relations[i, j] != "disjoint":
      swapped = relations[i, j] == "swapped"
      terms.append((2, _factors.cross(prepared[i], prepared[j], swapped)))
  if explicit is not None:
    # The explicit part enters as it is computed: its own squared norm (a sum of
    # squares, nothing cancels) and its inner products with the ghost uses (bounded).
    own = _norms.norms([explicit], 2.0, 1)
    e = own.exponent
    for i in gram:
      blocks = jax.vmap(lambda s, u=uses[i]: _factors.to_blocks(u, s))(explicit)
      blocks = _norms.times_pow2(blocks, -e.reshape((-1,) + (1,) * (blocks.ndim - 1)))
      terms.append((2, _factors.against(prepared[i], blocks, e, own.unit)))
    square = own.unit * own.unit
    terms.append((1, _factors.Scaled(square, 2 * e, jnp.zeros_like(square))))
  return terms, slack


def root(terms, slack=()) -> _norms.Norms:
  """Certified norms: at least the norm whose square is ``Σ_t m_t · value_t · 2^exponent_t``
  with every value anywhere within its bound, plus the contraction slack.

  The terms are brought to a common power of two (exact, or flushed to zero below
  the float range: at most ``tiny`` each) and summed, which adds at most
  ``γ_T Σ_t |m_t value_t|`` for ``T`` terms; a negative total (cancellation) counts
  as zero, and the square root and the final additions are widened by ``4u``. The
  result can exceed the true norm (over-clipping an ill-conditioned example) but
  never falls short of it.
  """
  top = terms[0][1].exponent
  for _, t in terms[1:]:
    top = jnp.maximum(top, t.exponent)
  dtype = terms[0][1].value.dtype
  u = _factors.unit_roundoff(dtype)
  tiny = float(jnp.finfo(dtype).tiny)
  values = [m * _norms.times_pow2(t.value, t.exponent - top) for m, t in terms]
  total = sum(values)
  magnitude = sum(jnp.abs(v) for v in values)
  bound = sum(abs(m) * _norms.times_pow2(t.bound, t.exponent - top) for m, t in terms)
  bound = bound + _factors.gamma(len(terms) + 2, dtype) * magnitude + 4 * len(terms) * tiny
  square = jnp.maximum(total, 0) + bound * (1 + 4 * u)
  half = top // 2
  unit = jnp.sqrt(_norms.times_pow2(square, top - 2 * half)) * (1 + 4 * u)
  for s in slack:
    unit = unit + _norms.times_pow2(s.value, s.exponent - half) * (1 + 4 * u) + tiny
  return _norms.Norms(half.astype(jnp.int32), unit)


def _masked(x, w: _norms.Weights):
  keep = w.keep.reshape(w.keep.shape + (1,) * (x.ndim - 1))
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


def _weighed(x, w: _norms.Weights, plain):
  """``_norms.scale_examples(x, w)``, by one multiplication when ``plain`` (every example
  kept and unshifted), where it agrees."""
  factor = lambda: x * w.factor.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return lax.cond(plain, factor, lambda: _norms.scale_examples(x, w))


def ghost_sum(leaf_parts: Leaf, leaf, records, cotangents, w: _norms.Weights, plain):
  """``Σ_i w_i G_i`` over the leaf's ghost uses, in at least float32."""
  acc = _norms.accumulation_dtype([leaf])
  total = jnp.zeros(leaf.shape, acc)
  for use in leaf_parts.ghost:
    ct, data = cotangents[use.path], records[use.path]
    # The weight goes on whichever operand is smaller (an output projection's
    # cotangent is far larger than its input; a dense factor is linear in the data);
    # the other is only masked, so that a dropped example's NaN never meets a zero
    # weight (NaN · 0 = NaN).
    if not use.rule.indexed and data[0].size < ct.size:
      data = [_weighed(data[0], w, plain)]
      ct = _masked(ct, w)
    else:
      ct = _weighed(ct, w, plain)
      data = [_masked(x, w) for x in data]
    blocks = jax.eval_shape(lambda v, use=use: _factors.to_blocks(use, v), leaf)
    f = _factors.of_use(use, data, ct, blocks.shape[1])
    _, back = jax.vjp(lambda v, use=use: _factors.to_blocks(use, v), total)
    total = total + back(_factors.summed(f).astype(acc))[0]
  return total
