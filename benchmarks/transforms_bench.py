"""Cost of ``clipjax.clipping_aware_normalize`` against ``optax.clip_by_global_norm``.

Both transform the same updates of a pytree of a few leaves (~10M parameters, in
quick mode too, with fewer repeats), jitted, compiled first, then timed interleaved
in one process (``block_until_ready``, medians over repeats). ``ratio`` is
clipjax's median over optax's. clipping_aware_normalize does more: it finds the
exact scale at which the *clipped* step has norm 1, a few passes over (params,
updates), then clips. A fifth of the params sit on each bound of [0, 1] (as in
box-constrained training), so the clipping, and with it the active set, matters.

Run ``python -m benchmarks --only transforms [--quick]``, or call ``run(quick)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipjax
from benchmarks._timing import interleaved_medians

# A conv kernel, two dense layers and a bias: 9.8M parameters.
_SHAPES = {"conv": (3, 3, 256, 512), "dense": (4096, 2048), "head": (2048, 128), "bias": (2048,)}
_NORM = 1.0


def _tree(shapes, seed=0):
  """(params in [0, 1] with 20% at each bound, Gaussian updates) as float32 pytrees."""
  rng = np.random.default_rng(seed)
  params, updates = {}, {}
  for name, shape in shapes.items():
    x = rng.random(shape, dtype=np.float32)
    u = rng.random(shape, dtype=np.float32)
    params[name] = jnp.asarray(np.where(u < 0.2, 0, np.where(u > 0.8, 1, x)))
    updates[name] = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
  return params, updates


def _thunk(tx, updates, params):
  state = tx.init(params)
  step = jax.jit(lambda u, p: tx.update(u, state, p)[0])
  compiled = step.lower(updates, params).compile()
  return lambda: compiled(updates, params)


def run(quick: bool) -> list[dict]:
  """Times both transformations; returns one row (clipjax over optax)."""
  repeats = 5 if quick else 15
  params, updates = _tree(_SHAPES)
  thunks = {
    "clipping_aware_normalize": _thunk(clipjax.clipping_aware_normalize(_NORM), updates, params),
    "clip_by_global_norm": _thunk(optax.clip_by_global_norm(_NORM), updates, params),
  }
  medians, outputs = interleaved_medians(thunks, repeats)
  reached = float(optax.tree.norm(outputs["clipping_aware_normalize"]))
  return [
    {
      "name": "transforms/clipping_aware_normalize",
      "baseline": "optax.clip_by_global_norm",
      "params": sum(v.size for v in jax.tree.leaves(params)),
      "repeats": repeats,
      "median_s": medians["clipping_aware_normalize"],
      "baseline_median_s": medians["clip_by_global_norm"],
      "ratio": medians["clipping_aware_normalize"] / medians["clip_by_global_norm"],
      "step_norm": reached,
    }
  ]
