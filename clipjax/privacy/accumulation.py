r"""Logical batches larger than memory: clipped sums accumulated, the noise added once.

DP-SGD's noise is drawn once per step, with standard deviation :math:`\sigma\Delta`
whatever the batch, so its share of the update falls as :math:`1/B`: large batches
(thousands of examples) train best. A logical batch that does not fit in memory is
summed over several physical ones, and the noise must still be added ONCE, to the
whole clipped sum, which is then divided by the logical batch size. Two ways:

* :func:`microbatch`, inside one jitted step: a clipped-sum function run over
  micro-batches of the batch under ``lax.scan``, returning the big batch's clipped sum
  and norms at one micro-batch's memory for activations and gradients. Follow it with
  :func:`clipjax.dp_noise` or :func:`clipjax.adaptive_dp_noise` as for any batch.
* :func:`accumulate`, for physical batches fed one at a time from the host: an optax
  wrapper that sums the clipped sums of ``num_batches`` updates, keeps their
  per-example extra arguments (norms, masks), and calls the wrapped noise and
  optimizer once per logical batch. Its docstring says why ``optax.MultiSteps`` and
  ``optax.apply_every`` do not do this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from clipjax import _checks, _norms


class AccumulateState(NamedTuple):
  """State of :func:`accumulate`.

  Attributes:
    step: physical batches already summed in the current logical batch (0 to
      ``num_batches − 1``).
    summed: the running sum of the incoming clipped sums, like the parameters, in at
      least float32.
    per_example: the per-example extra arguments of the logical batch so far: for
      each name, its leaves with one slot per physical batch in front.
    inner_state: the wrapped transformation's state, updated once per logical batch.
  """

  step: jax.Array
  summed: Any
  per_example: dict
  inner_state: Any


def microbatch(
  grad_fn: Callable[..., Any], num_microbatches: int, *, has_aux: bool = False
) -> Callable[..., Any]:
  """Runs a clipped-sum function over micro-batches and adds up what it returns.

  ``grad_fn(params, *batch, mask=None) -> (clipped_sum, norms)`` is what
  :func:`clipjax.clipped_grad` returns (or any function with that contract: a sum of
  per-example clipped gradients, and the per-example norms, a ``(batch,)`` array or a
  pytree of them). The returned function splits every batch argument and the mask
  into ``num_microbatches`` micro-batches, runs ``grad_fn`` on each in a
  ``lax.scan``, sums the clipped sums (in at least float32) and puts the norms back
  in batch order. Clipping is per example, so this is the whole batch's clipped sum,
  computed with one micro-batch's activations and gradients in memory.

  Micro-batch ``j`` holds examples ``j, j + k, j + 2k, ...``: with the batch axis
  sharded in blocks over devices, every micro-batch is spread over all of them.

  Args:
    grad_fn: the clipped-sum function; it is called with ``mask=`` only when a mask
      is given.
    num_microbatches: ``k >= 1``, which must divide the batch size.
    has_aux: whether ``grad_fn`` returns ``((clipped_sum, norms), aux)`` with ``aux``
      per example (a leading batch axis on every leaf), as ``clipped_grad(...,
      has_aux=True)`` does.

  Returns:
    ``fn(params, *batch, mask=None)`` returning what ``grad_fn`` would on the whole
    batch: ``(clipped_sum, norms)``, or ``((clipped_sum, norms), aux)``.

  Example:
    >>> import jax, jax.numpy as jnp, clipjax
    >>> def grad_fn(w, x, mask=None):  # the clipped sum of the gradients of x·w
    ...   clipped, norms = clipjax.per_example_clip(x, 1.0, mask=mask)
    ...   return clipped.sum(0), norms
    >>> x = jnp.array([[3.0, 4.0], [0.3, 0.4], [0.0, 2.0], [1.0, 0.0]])
    >>> total, norms = clipjax.microbatch(grad_fn, 2)(jnp.zeros(2), x)
    >>> print(total, norms)
    [1.9 2.2] [5.  0.5 2.  1. ]
  """
  k = _checks.check_count("num_microbatches", num_microbatches)

  def wrapped(params, *batch, mask=None):
    size = _checks.batch_size(batch, "batch arguments")
    if size % k:
      raise ValueError(f"num_microbatches must divide the batch size {size}, got {k}.")
    mask = _checks.check_mask(mask, size)

    def split(x):
      return jnp.moveaxis(jnp.reshape(x, (size // k, k) + x.shape[1:]), 1, 0)

    def merge(x):
      return jnp.reshape(jnp.moveaxis(x, 0, 1), (size,) + x.shape[2:])

    def run(micro):
      micro_batch, micro_mask = micro
      kwargs = {} if micro_mask is None else {"mask": micro_mask}
      out = grad_fn(params, *micro_batch, **kwargs)
      (summed, norms), aux = out if has_aux else (out, None)
      return summed, (norms, aux)

    micro = jax.tree.map(split, (batch, mask))
    shapes = jax.eval_shape(run, jax.tree.map(lambda x: x[0], micro))[0]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, _norms.accumulation_dtype(s)), shapes)

    def body(total, micro):
      summed, per_example = run(micro)
      return jax.tree.map(lambda t, s: t + s.astype(t.dtype), total, summed), per_example

    total, per_example = lax.scan(body, zeros, micro)
    total = jax.tree.map(lambda t, s: t.astype(s.dtype), total, shapes)
    norms, aux = jax.tree.map(merge, per_example)
    return ((total, norms), aux) if has_aux else (total, norms)

  return wrapped


def accumulate(
  tx: optax.GradientTransformation, num_batches: int, *, per_example: dict | None = None
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps a noise-and-optimizer chain so that it runs once per logical batch.

  ``tx`` is fed the clipped sums of physical batches (from
  :func:`clipjax.clipped_grad` or :func:`microbatch`), e.g.
  ``optax.chain(clipjax.dp_noise(C, z, B, key), optax.adam(1e-3))`` with ``B`` the
  LOGICAL batch size (``num_batches`` times the physical one; the expected one under
  Poisson sampling). The wrapper adds up the clipped sums of ``num_batches``
  successive updates and returns zeros for the first ``num_batches − 1``, so the
  parameters do not move; the last one hands the total to ``tx``, which adds its
  noise once and steps its optimizer once, and its output is returned. The total is
  handed over in at least float32, so that half-precision leaves are not rounded
  before the noise (which would move the sum by more than the clip norm); ``tx``'s
  output and state are cast back to the dtypes they had.

  Why not optax's accumulation (optax issues #515 and #527): ``optax.MultiSteps``
  around :func:`clipjax.dp_aggregate` averages the per-example gradient arrays of
  successive physical batches slot by slot before :func:`clipjax.dp_aggregate` sees
  them, so it would clip means of unrelated examples and divide by the physical batch
  size (in optax 0.2.8 it fails outright: its accumulator is shaped like the
  parameters). ``optax.apply_every`` after :func:`clipjax.dp_aggregate` adds up
  updates that were each noised already: :math:`k` draws per logical batch, a noise
  standard deviation :math:`\sqrt k` times the one the logical batch's accounting
  needs. ``optax.MultiSteps(..., use_grad_mean=False)`` around
  :func:`clipjax.dp_noise` does noise once, but hands the inner transformation the
  extra arguments of the last physical batch only: adaptive clipping would count a
  fraction of the logical batch. This wrapper sums, runs the inner transformation only
  on the last update, and concatenates the per-example arguments.

  Per-example extra arguments of ``update`` (the ``norms`` and ``mask`` that
  :func:`clipjax.adaptive_dp_noise` needs) are named in ``per_example``, with an
  example of their value for one physical batch (only shapes and dtypes are used);
  the inner transformation gets them concatenated over the logical batch, in the
  order of the updates. Other extra arguments are passed on from the last update.
  With adaptive clipping the clip norm to clip with is the inner state's,
  ``optax.tree_utils.tree_get(state, "clip_norm")``: it changes once per logical
  batch.

  Args:
    tx: the transformation to run once per logical batch.
    num_batches: ``k >= 1`` physical batches per logical batch.
    per_example: ``{name: value}`` for the per-example extra arguments, each leaf
      with the physical batch on its leading axis; ``None`` for none.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`AccumulateState`.
    Its ``init`` needs the parameters (the shapes of the clipped sums).

  Example:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> tx = clipjax.accumulate(
    ...   optax.chain(clipjax.dp_noise(1.0, 0.0, batch_size=4, key=0), optax.sgd(1.0)), 2)
    >>> state = tx.init(jnp.zeros(2))
    >>> first, state = tx.update(jnp.array([1.0, 0.5]), state)  # physical batch 1
    >>> second, state = tx.update(jnp.array([1.0, 1.5]), state)  # physical batch 2
    >>> print(first, second)  # nothing, then -(sum of both) / 4
    [0. 0.] [-0.5 -0.5]
  """
  k = _checks.check_count("num_batches", num_batches)
  inner = optax.with_extra_args_support(tx)
  template = dict(per_example or {})
  for name, value in template.items():
    if any(np.ndim(leaf) < 1 for leaf in jax.tree.leaves(value)):
      raise ValueError(f"per_example[{name!r}] must have a leading batch axis on every leaf.")
  slots = {
    name: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), value)
    for name, value in template.items()
  }

  def init_fn(params):
    summed = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _norms.accumulation_dtype(p)), params)
    buffers = jax.tree.map(lambda s: jnp.zeros((k,) + s.shape, s.dtype), slots)
    return AccumulateState(jnp.zeros((), jnp.int32), summed, buffers, inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    examples = {}
    for name, like in slots.items():
      if name not in extra:
        raise ValueError(f"{name} is a per-example argument of accumulate: pass it to update.")
      value = extra.pop(name)
      got = jax.tree.map(lambda x: (np.shape(x), jnp.result_type(x)), value)
      want = jax.tree.map(lambda s: (s.shape, s.dtype), like)
      if got != want:
        raise ValueError(f"{name} must match per_example[{name!r}]: {want}; got {got}.")
      examples[name] = value
    summed = jax.tree.map(lambda a, u: a + u.astype(a.dtype), state.summed, updates)
    buffers = jax.tree.map(
      lambda b, v: lax.dynamic_update_index_in_dim(b, v, state.step, 0), state.per_example, examples
    )

    def emit(summed, buffers, inner_state):
      # The total goes in unrounded (at least float32): rounding it to a half-precision
      # leaf dtype before the noise would move it by up to half an ulp of the sum, far
      # more than the clip norm the noise is calibrated to. The output and the inner
      # state come back in the dtypes they would have had.
      logical = jax.tree.map(lambda b: jnp.reshape(b, (-1,) + b.shape[2:]), buffers)
      out, new_state = inner.update(summed, inner_state, params, **extra, **logical)
      out = jax.tree.map(lambda o, u: o.astype(u.dtype), out, updates)
      new_state = jax.tree.map(
        lambda s, old: s.astype(jnp.result_type(old)), new_state, inner_state
      )
      return out, new_state

    shapes = jax.eval_shape(emit, summed, buffers, state.inner_state)[0]

    def hold(summed, buffers, inner_state):
      del summed, buffers
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), inner_state

    last = state.step == k - 1
    out, inner_state = lax.cond(last, emit, hold, summed, buffers, state.inner_state)
    summed = jax.tree.map(lambda s: jnp.where(last, jnp.zeros_like(s), s), summed)
    step = jnp.where(last, 0, state.step + 1).astype(jnp.int32)
    return out, AccumulateState(step, summed, buffers, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
