"""Cost of ``clipjax.dp_aggregate`` against ``optax.contrib.differentially_private_aggregate``.

Both get the same per-example gradients of an MLP-shaped pytree and the same
hyperparameters (clip norm 1, noise multiplier 1), so each step does the same
work: per-example norms, the clipped sum and one Gaussian draw per parameter.
clipjax additionally guards against non-finite examples (a ``lax.cond`` that
takes the cheap branch here). Timing is in one process, both jitted and
compiled first, then interleaved (the order alternates every repeat) with
``block_until_ready``; medians are reported, and ``ratio`` is clipjax's median
over optax's.

``sampler_rows(quick)`` times clipjax's noise sampler (``clipjax.privacy._gaussian.normal``,
Box–Muller with a 64-bit radius, reaching 9.49σ) against ``jax.random.normal`` on the
largest noise vector here (the 784-1024-256-10 MLP's 1,068,810 parameters), both
float32, jitted, interleaved in one process; ``ratio`` is the sampler's median over
``jax.random.normal``'s. ``--tail`` adds the tail census of 2.7e8 draws of each: how
many fall beyond 5.45σ and how many distinct values lie beyond 4.5σ.

Run ``python -m benchmarks.privacy_bench [--quick] [--tail]`` for a table, or call
``run(quick)``.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipjax
from clipjax.privacy import _gaussian

# name: (batch size, layer sizes of the MLP whose per-example gradients are fed)
_FULL = {
  "mlp_784_1024_256_10_b256": (256, (784, 1024, 256, 10)),
  "mlp_12x64_b256": (256, (64,) * 12),
}
_QUICK = {"mlp_256_256_128_10_b64": (64, (256, 256, 128, 10))}
_CLIP_NORM = 1.0
_NOISE_MULTIPLIER = 1.0


def _per_example_grads(batch, sizes):
  """Random per-example gradients shaped like an MLP's weights and biases."""
  key = jax.random.key(0)
  grads = []
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    kw, kb = jax.random.split(jax.random.fold_in(key, i))
    grads.append(
      {
        "w": jax.random.normal(kw, (batch, m, n), jnp.float32) / np.sqrt(m),
        "b": jax.random.normal(kb, (batch, n), jnp.float32),
      }
    )
  return grads


def _step(tx):
  state = tx.init(None)
  return jax.jit(lambda grads: tx.update(grads, state)[0])


def _time(fn, grads):
  start = time.perf_counter()
  jax.block_until_ready(fn(grads))
  return time.perf_counter() - start


def run(quick: bool) -> list[dict]:
  """Times both aggregations on each configuration, then the sampler; one row each."""
  configs = _QUICK if quick else _FULL
  repeats = 7 if quick else 15
  rows = []
  for name, (batch, sizes) in configs.items():
    grads = _per_example_grads(batch, sizes)
    candidate = _step(clipjax.dp_aggregate(_CLIP_NORM, _NOISE_MULTIPLIER, jax.random.key(1)))
    baseline = _step(
      optax.contrib.differentially_private_aggregate(
        _CLIP_NORM, _NOISE_MULTIPLIER, jax.random.key(1)
      )
    )
    for fn in (candidate, baseline):  # compile and warm up
      _time(fn, grads)
    times = {candidate: [], baseline: []}
    for r in range(repeats):
      order = (candidate, baseline) if r % 2 == 0 else (baseline, candidate)
      for fn in order:
        times[fn].append(_time(fn, grads))
    median = float(np.median(times[candidate]))
    baseline_median = float(np.median(times[baseline]))
    rows.append(
      {
        "name": f"dp_aggregate/{name}",
        "baseline": "optax.contrib.differentially_private_aggregate",
        "batch": batch,
        "params": sum(x.size // batch for x in jax.tree.leaves(grads)),
        "repeats": repeats,
        "median_s": median,
        "baseline_median_s": baseline_median,
        "ratio": median / baseline_median,
      }
    )
    del grads
  return rows + sampler_rows(quick)


def _interleaved(fns, arg, repeats):
  """Median seconds of each function, called in alternating order after a warm-up."""
  for fn in fns:
    _time(fn, arg)
  times = {fn: [] for fn in fns}
  for r in range(repeats):
    for fn in fns if r % 2 == 0 else fns[::-1]:
      times[fn].append(_time(fn, arg))
  return [float(np.median(times[fn])) for fn in fns]


def sampler_rows(quick: bool) -> list[dict]:
  """The noise sampler's cost against ``jax.random.normal`` on the largest noise vector."""
  batch, sizes = (_QUICK if quick else _FULL)[
    "mlp_256_256_128_10_b64" if quick else "mlp_784_1024_256_10_b256"
  ]
  size = sum(m * n + n for m, n in zip(sizes[:-1], sizes[1:]))
  del batch
  sampler = jax.jit(lambda k: _gaussian.normal(k, (size,), jnp.float32))
  baseline = jax.jit(lambda k: jax.random.normal(k, (size,), jnp.float32))
  median, baseline_median = _interleaved(
    [sampler, baseline], jax.random.key(2), 15 if quick else 41
  )
  return [
    {
      "name": f"noise_sampler/{size}",
      "baseline": "jax.random.normal",
      "batch": 1,
      "params": size,
      "repeats": 15 if quick else 41,
      "median_s": median,
      "baseline_median_s": baseline_median,
      "ratio": median / baseline_median,
    }
  ]


def tail_census(chunks: int = 16, chunk: int = 1 << 24) -> dict:
  """Beyond 5.45σ and distinct values beyond 4.5σ in ``chunks · chunk`` float32 draws."""
  out = {}
  for name, draw in (
    ("clipjax", lambda k: _gaussian.normal(k, (chunk,), jnp.float32)),
    ("jax.random.normal", lambda k: jax.random.normal(k, (chunk,), jnp.float32)),
  ):
    draw = jax.jit(draw)
    far, beyond, top = [], 0, 0.0
    for i in range(chunks):
      x = np.abs(np.asarray(draw(jax.random.fold_in(jax.random.key(6), i))))
      far.append(x[x > 4.5])
      beyond += int(np.sum(x > 5.45))
      top = max(top, float(x.max()))
    far = np.concatenate(far)
    out[name] = {
      "draws": chunks * chunk,
      "beyond_5.45": beyond,
      "beyond_4.5": int(far.size),
      "distinct_beyond_4.5": int(np.unique(far).size),
      "max": top,
    }
  return out


def _print_table(rows):
  print(f"{'name':42s} {'batch':>5s} {'params':>9s} {'clipjax':>10s} {'optax':>10s} {'ratio':>6s}")
  for row in rows:
    print(
      f"{row['name']:42s} {row['batch']:5d} {row['params']:9d} "
      f"{row['median_s'] * 1e3:8.1f}ms {row['baseline_median_s'] * 1e3:8.1f}ms "
      f"{row['ratio']:6.2f}"
    )


if __name__ == "__main__":
  quick = "--quick" in sys.argv[1:]
  _print_table(run(quick))
  if "--tail" in sys.argv[1:]:
    for name, census in tail_census().items():
      print(name, census)
