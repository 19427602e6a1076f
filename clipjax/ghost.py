"""Sum of per-example clipped gradients, without per-example gradients where possible.

DP-SGD needs every example's gradient norm, but materialising one gradient per example
multiplies the cost of a step by up to the batch size. For a parameter used as
``y = x @ W``, example ``i``'s gradient is ``x_iᵀ g_i`` with ``g_i = ∂L_i/∂y_i``, so its
norm follows from the activations ``x_i`` and output gradients ``g_i`` alone
(Goodfellow, 2015):

* without a sequence axis, ``‖x_iᵀ g_i‖² = ‖x_i‖² ‖g_i‖²``;
* with one, ``‖x_iᵀ g_i‖² = Σ_{t,s} (x_it·x_is)(g_it·g_is)`` (the "ghost" norm of
  Li et al., 2022), or the explicit ``x_iᵀ g_i`` when that is cheaper for the shapes
  (Bu et al., 2022).

The ``g_i`` of every such product come from one batched backward pass with respect to
zero-valued *taps* added to the products' outputs. The clipped sum then reuses those
``x_i`` and ``g_i``: ``Σ_i w_i x_iᵀ g_i`` with ``w_i = min(1, C/‖∇L_i‖)`` is one
contraction per parameter, the "book-keeping" of Bu et al. (2022), so no second backward
pass is run.

The products are found by tracing the per-example loss to a jaxpr and re-evaluating it
with taps; the model is never rewritten. Parameters used in any way that is not
recognised fall back to exact per-example gradients, for those parameters only.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

__all__ = ["clipped_grad"]

# Unary ops through which a parameter stays "a view of one leaf": replaying them and
# taking their VJP maps gradients back to the leaf exactly.
_ISOMETRIC_VIEWS = frozenset(
  {"reshape", "transpose", "convert_element_type", "squeeze", "copy", "copy_p"}
)
_VIEWS = _ISOMETRIC_VIEWS | {"broadcast_in_dim"}
# Call primitives whose body is evaluated inline, so products inside them are found.
_INLINED_CALLS = frozenset({"jit", "pjit"})
# Primitives that are recognised as "parameter view (op) per-example data".
_PRODUCT = "dot_general"
_BIAS = "add"

# Provenance of a value in the per-example program (a `_View` is the fourth kind).
_CONST = "const"  # depends on neither parameters nor the example
_DATA = "data"  # depends on the example
_PARAMS = "params"  # depends on parameters only, not as a plain view of one leaf


class _View(NamedTuple):
  """A value obtained from parameter leaf ``leaf`` by the view equations ``chain``."""

  leaf: int
  chain: tuple


class _Use(NamedTuple):
  """A recognised use of a leaf: ``primitive(..., view(leaf), ...)`` with example data.

  Attributes:
    leaf: index of the parameter leaf.
    path: equation indices leading to the use through inlined calls.
    eqn: the equation of the product or bias addition.
    position: operand index of the parameter view.
    chain: view equations from the leaf to that operand.
  """

  leaf: int
  path: tuple
  eqn: Any
  position: int
  chain: tuple


def _join(provenances):
  if _DATA in provenances:
    return _DATA
  if any(p == _PARAMS or isinstance(p, _View) for p in provenances):
    return _PARAMS
  return _CONST


def _as_use(eqn, provenances, path):
  """The `_Use` if ``eqn`` is a recognised parameter-times-data equation, else None."""
  if eqn.primitive.name not in (_PRODUCT, _BIAS) or len(provenances) != 2:
    return None
  views = [i for i, p in enumerate(provenances) if isinstance(p, _View)]
  if len(views) != 1 or provenances[1 - views[0]] != _DATA:
    return None
  view = provenances[views[0]]
  return _Use(view.leaf, path, eqn, views[0], view.chain)


def _analyse(jaxpr, provenances, path, uses, fallback):
  """Collects recognised uses and fallback leaves; returns the outputs' provenance."""
  env = dict(zip(jaxpr.invars, provenances))
  env.update((v, _CONST) for v in jaxpr.constvars)

  def read(v):
    return _CONST if isinstance(v, jex_core.Literal) else env[v]

  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _INLINED_CALLS:
      outs = _analyse(eqn.params["jaxpr"].jaxpr, ins, here, uses, fallback)
    elif name in _VIEWS and len(ins) == 1 and isinstance(ins[0], _View):
      outs = [_View(ins[0].leaf, ins[0].chain + (eqn,))]
    else:
      use = _as_use(eqn, ins, here)
      if use is None:
        fallback.update(p.leaf for p in ins if isinstance(p, _View))
        outs = [_join(ins)] * len(eqn.outvars)
      else:
        uses.append(use)
        outs = [_DATA]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _evaluate(jaxpr, consts, args, path, taps, records):
  """Evaluates ``jaxpr`` adding ``taps[path]`` to tapped outputs; records their inputs."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    ins = [read(v) for v in eqn.invars]
    if eqn.primitive.name in _INLINED_CALLS:
      inner = eqn.params["jaxpr"]
      outs = _evaluate(inner.jaxpr, inner.consts, ins, here, taps, records)
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
      if here in taps:
        tap, position = taps[here]
        records[here] = [x for j, x in enumerate(ins) if j != position]
        outs = [outs[0] + tap]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _apply_use(use, leaf, others):
  """Recomputes the used equation's output from the leaf and one example's data."""
  operand = leaf
  for eqn in use.chain:
    operand = eqn.primitive.bind(operand, **eqn.params)
  operands = list(others)
  operands.insert(use.position, operand)
  return use.eqn.primitive.bind(*operands, **use.eqn.params)


def _product_layout(use, example_data_shape):
  """Axes of a product: (x's free, x's contracted, output's from x, output's from W)."""
  (contract_lhs, contract_rhs), _ = use.eqn.params["dimension_numbers"]
  data = 1 - use.position
  contracted = (contract_lhs, contract_rhs)[data]
  free = [d for d in range(len(example_data_shape)) if d not in contracted]
  n_out = len(use.eqn.outvars[0].aval.shape)
  if data == 0:
    out_x = list(range(len(free)))
    out_w = list(range(len(free), n_out))
  else:
    out_w = list(range(n_out - len(free)))
    out_x = list(range(n_out - len(free), n_out))
  return free, list(contracted), out_x, out_w


def _ghost_plan(use, example_data_shape):
  """Returns 'norms', 'gram' or None (explicit per-example gradient) for a single use."""
  if use.eqn.primitive.name != _PRODUCT:
    return None
  _, (batch_lhs, _) = use.eqn.params["dimension_numbers"]
  if batch_lhs or any(e.primitive.name not in _ISOMETRIC_VIEWS for e in use.chain):
    return None
  free, contracted, _, out_w = _product_layout(use, example_data_shape)
  steps = _size(example_data_shape, free)
  if steps == 1:
    return "norms"
  d_in = _size(example_data_shape, contracted)
  d_out = _size(use.eqn.outvars[0].aval.shape, out_w)
  # The Gram form costs T²(d_in + d_out) per example; the explicit x_iᵀ g_i, T·d_in·d_out.
  return "gram" if steps * (d_in + d_out) <= d_in * d_out else None


def _size(shape, dims):
  size = 1
  for d in dims:
    size *= shape[d]
  return size


def _ghost_sq_norms(use, plan, x, g):
  """Per-example squared norms of ``x_iᵀ g_i`` from batched ``x`` and ``g``."""
  free, contracted, out_x, out_w = _product_layout(use, x.shape[1:])
  batch = x.shape[0]
  acc = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
  xs = jnp.transpose(x, [0] + [1 + d for d in free + contracted]).astype(acc)
  gs = jnp.transpose(g, [0] + [1 + d for d in out_x + out_w]).astype(acc)
  steps = _size(x.shape[1:], free)
  xs = xs.reshape(batch, steps, -1)
  gs = gs.reshape(batch, steps, -1)
  if plan == "norms":
    return jnp.sum(xs * xs, axis=(1, 2)) * jnp.sum(gs * gs, axis=(1, 2))
  hi = lax.Precision.HIGHEST
  gram_x = jnp.einsum("bti,bsi->bts", xs, xs, precision=hi)
  gram_g = jnp.einsum("bti,bsi->bts", gs, gs, precision=hi)
  return jnp.sum(gram_x * gram_g, axis=(1, 2))


def _per_example_leaf_grads(uses, leaf, records, grads):
  """Exact per-example gradients of one leaf, summed over its recognised uses."""
  total = 0
  for use in uses:

    def one(others, g, use=use):
      _, vjp = jax.vjp(lambda table: _apply_use(use, table, others), leaf)
      return vjp(g)[0]

    total = total + jax.vmap(one)(records[use.path], grads[use.path])
  return total


def _sq_norms(per_example):
  acc = jnp.promote_types(per_example.dtype, jnp.float32)
  flat = per_example.reshape(per_example.shape[0], -1).astype(acc)
  return jnp.sum(flat * flat, axis=1)


def _mask(ok, x):
  return jnp.where(ok.reshape(ok.shape + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _weighted_sum(weights, per_example, dtype):
  return jnp.tensordot(weights.astype(per_example.dtype), per_example, axes=1).astype(dtype)


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

  params_abstract = [jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)) for p in leaves]
  example = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in batch_leaves]
  return jax.make_jaxpr(flat_loss)(*params_abstract, *example), out_treedef[0]


def _find_uses(closed, n_leaves, n_data):
  """Recognised uses of the leaves that need no fallback, and the fallback leaves."""
  uses, fallback = [], set()
  provenances = [_View(k, ()) for k in range(n_leaves)] + [_DATA] * n_data
  outs = _analyse(closed.jaxpr, provenances, (), uses, fallback)
  fallback.update(p.leaf for p in outs if isinstance(p, _View))
  return [u for u in uses if u.leaf not in fallback], sorted(fallback)


def _tapped_backward(closed, uses, fallback, leaves, batch_leaves):
  """One batched forward and backward pass through the taps and the fallback copies.

  Returns per-example outputs, each use's recorded data operands and output
  gradients (keyed by path), and the fallback leaves' per-example gradients.
  """
  size = batch_leaves[0].shape[0]

  def per_example(taps, copies, example):
    args = list(leaves)
    for k, copy in zip(fallback, copies):
      args[k] = copy
    tap_map = {u.path: (t, u.position) for u, t in zip(uses, taps)}
    records = {}
    outs = _evaluate(closed.jaxpr, closed.consts, args + list(example), (), tap_map, records)
    return outs[0], (outs, [records[u.path] for u in uses])

  def summed_loss(taps, copies):
    losses, extra = jax.vmap(per_example)(taps, copies, batch_leaves)
    return jnp.sum(losses), extra

  # Fallback leaves get one copy per example, so their gradient is per example.
  copies = [jnp.broadcast_to(leaves[k], (size,) + jnp.shape(leaves[k])) for k in fallback]
  avals = [u.eqn.outvars[0].aval for u in uses]
  taps = [jnp.zeros((size,) + a.shape, a.dtype) for a in avals]
  grad_fn = jax.grad(summed_loss, (0, 1), has_aux=True)
  (tap_grads, copy_grads), (outs, records) = grad_fn(taps, copies)
  paths = [u.path for u in uses]
  return outs, dict(zip(paths, records)), dict(zip(paths, tap_grads)), copy_grads


def _ghost_clipped_sum(use, leaf, others, g, ok, weights):
  """``Σ_i w_i ∂L_i/∂leaf`` through this use, from masked data and output gradients."""
  shape = (g.shape[0],) + (1,) * (g.ndim - 1)
  cotangent = _mask(ok, g * weights.astype(g.dtype).reshape(shape))
  # Masking the data too keeps a non-finite example's x_i out of x_iᵀ·0.
  others = [_mask(ok, x) for x in others]
  _, vjp = jax.vjp(lambda table: jax.vmap(lambda o: _apply_use(use, table, o))(others), leaf)
  return vjp(cotangent)[0].astype(leaf.dtype)


def _clipped_grad_impl(loss_fn, has_aux, params, clip_norm, *batch):
  leaves, treedef = jax.tree.flatten(params)
  batch_leaves, batch_treedef = jax.tree.flatten(batch)
  if not batch_leaves:
    raise ValueError("clipped_grad needs at least one batch argument with a batch axis.")
  size = batch_leaves[0].shape[0]
  closed, out_treedef = _trace(loss_fn, leaves, treedef, batch_leaves, batch_treedef)
  if closed.out_avals[0].shape != ():
    raise ValueError(
      f"loss_fn must return one scalar loss per example, got shape {closed.out_avals[0].shape}."
    )
  uses, fallback = _find_uses(closed, len(leaves), len(batch_leaves))
  outs, records, grads, copy_grads = _tapped_backward(closed, uses, fallback, leaves, batch_leaves)

  by_leaf = {}
  for use in uses:
    by_leaf.setdefault(use.leaf, []).append(use)
  sq_norms = jnp.zeros((size,), jnp.float32)
  ghost, explicit = {}, dict(zip(fallback, copy_grads))
  for k, leaf_uses in by_leaf.items():
    use = leaf_uses[0]
    x = records[use.path][0]
    plan = _ghost_plan(use, x.shape[1:]) if len(leaf_uses) == 1 else None
    if plan is None:
      explicit[k] = _per_example_leaf_grads(leaf_uses, leaves[k], records, grads)
    else:
      ghost[k] = use
      sq_norms = sq_norms + _ghost_sq_norms(use, plan, x, grads[use.path])
  for per_example in explicit.values():
    sq_norms = sq_norms + _sq_norms(per_example)

  norms = jnp.sqrt(sq_norms)
  ok = jnp.isfinite(norms)
  weights = jnp.where(ok, jnp.where(norms > clip_norm, clip_norm / norms, 1.0), 0.0)

  clipped = [jnp.zeros_like(leaf) for leaf in leaves]
  for k, per_example in explicit.items():
    clipped[k] = _weighted_sum(weights, _mask(ok, per_example), leaves[k].dtype)
  for k, use in ghost.items():
    clipped[k] = _ghost_clipped_sum(use, leaves[k], records[use.path], grads[use.path], ok, weights)

  result = (jax.tree.unflatten(treedef, clipped), norms)
  if has_aux:
    return result, jax.tree.unflatten(out_treedef, outs)[1]
  return result


# Static in the loss function, so grad_fns for several clip norms share one compilation.
_clipped_grad_jit = jax.jit(_clipped_grad_impl, static_argnums=(0, 1))


def clipped_grad(
  loss_fn: Callable[..., Any], clip_norm: Any, *, has_aux: bool = False
) -> Callable[..., Any]:
  """Sum of per-example gradients clipped to ``clip_norm``, and the per-example norms.

  Computes ``Σ_i g_i · min(1, C / ‖g_i‖)`` with ``g_i = ∇ loss_fn(params, *example_i)``
  and ``‖·‖`` the global L2 norm over the whole ``params`` pytree: exactly what clipping
  ``jax.vmap(jax.grad(loss_fn))`` per example and summing gives, at about the cost of one
  non-private gradient.

  The per-example loss is traced to a jaxpr once per input shape (at trace time, so
  free per step under ``jit``) and every ``dot_general`` between a parameter (possibly
  reshaped, transposed or cast) and per-example data is found: ``@``, ``jnp.einsum``,
  ``jnp.dot``, flax ``nn.Dense``/``nn.DenseGeneral``, equinox ``eqx.nn.Linear``, also
  inside ``jax.jit``-wrapped functions. Their norms come from activations and output
  gradients (ghost norms); a bias added to data (``x @ W + b``) gets its per-example
  gradient from the same output gradients. A parameter used in several products
  (weight tying) gets exact per-example gradients from those products. Every other
  parameter (embedding lookups, elementwise scales, convolutions, uses inside
  ``scan``/``cond``/``custom_vjp`` and so on) falls back to exact per-example gradients
  for that parameter only; such leaves, tied ones, products with a per-head (batch)
  axis and products whose sequence axis makes the Gram form dearer than ``x_iᵀ g_i``
  hold one gradient per example in memory. The clipped sum reuses the same activations
  and output gradients ("book-keeping"), so there is one forward and one backward pass.

  Examples whose gradient is not finite contribute nothing to the sum (they are zeroed
  without multiplying NaN by zero, so the sum stays finite) and their reported norm is
  NaN or inf. ``grad_fn`` is compiled with ``loss_fn`` as a static argument: reuse the
  same ``loss_fn`` object to reuse the compilation; call it eagerly or under ``jit``.

  Args:
    loss_fn: ``loss_fn(params, *example) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``), the scalar loss of ONE example.
    clip_norm: the clip norm ``C >= 0``; a Python float or a JAX scalar (may be traced).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``grad_fn(params, *batch)``, where every leaf of every batch argument has a leading
    batch axis, returning ``(clipped_sum, per_example_norms)``: a pytree like
    ``params`` and a ``(batch,)`` array of unclipped norms. With ``has_aux`` it
    returns ``((clipped_sum, per_example_norms), aux)``, where ``aux`` is every
    example's aux stacked along a leading batch axis.

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

  References:
    Goodfellow, "Efficient Per-Example Gradient Computations", arXiv 1510.01799, 2015.
    Li, Tramèr, Liang & Hashimoto, "Large Language Models Can Be Strong Differentially
    Private Learners", ICLR 2022 (ghost clipping).
    Bu, Mao & Xu, "Scalable and Efficient Training of Large Convolutional Neural
    Networks with Differential Privacy", NeurIPS 2022 (book-keeping, mixed ghost norm).
  """

  def grad_fn(params, *batch):
    return _clipped_grad_jit(loss_fn, has_aux, params, clip_norm, *batch)

  return grad_fn
