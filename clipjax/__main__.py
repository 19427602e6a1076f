"""``python -m clipjax``: naive versus clipping-aware rescaling, and the solvers' speed.

A batch like the one in Rauber & Bethge (2020): 28x28 inputs in [0, 1], Gaussian
directions, a target L2 norm of 3.6. Rescaling each direction to norm 3.6 and then
clipping to the box lands short of 3.6; ``clipjax.perturb`` lands on it exactly.
No data or network is needed.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import clipjax

TARGETS = {1.0: 30.0, 2.0: 3.6, float("inf"): 0.3}


def _norms(diff, p):
  return jnp.linalg.norm(diff.reshape(diff.shape[0], -1), ord=p, axis=1)


@functools.cache
def _batched_rescale(method, p=2.0):
  """One compiled batched solve per (method, p): the comparison and the timings share
  p = 2's, since compiling dominates this demo's run time."""
  return jax.jit(jax.vmap(lambda x, d, e: clipjax.rescale(x, d, e, p=p, method=method)))


def compare_norms(x, delta):
  """Per p: (target, naive norms, clipping-aware norms) over the batch."""
  rows = []
  x, delta = x.reshape(x.shape[0], -1), delta.reshape(delta.shape[0], -1)
  for p, eps in TARGETS.items():
    naive = jnp.clip(x + eps * delta / _norms(delta, p)[:, None], 0, 1)
    eta = _batched_rescale("newton", p)(x, delta, jnp.full(x.shape[0], eps))
    exact = jnp.clip(x + eta[:, None] * delta, 0, 1)  # what clipjax.perturb returns
    rows.append((p, eps, _norms(naive - x, p), _norms(exact - x, p)))
  return rows


def _median_times(fns, args, repeats):
  """Median seconds per call of each function, the calls interleaved (the order
  reversed every other round) so that drifting load hits every candidate alike."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compile outside the timing
  times = {name: [] for name in fns}
  for r in range(repeats):
    for name in list(fns)[:: 1 if r % 2 == 0 else -1]:
      start = time.perf_counter()
      jax.block_until_ready(fns[name](*args))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def time_methods(shape, repeats, methods=("newton", "sort", "bisect")):
  """Median seconds per batched solve, next to one fused pass over the same data."""
  kx, kd = jax.random.split(jax.random.key(1))
  x = jax.random.uniform(kx, shape)
  d = jax.random.normal(kd, shape)
  eps = jnp.full(shape[0], TARGETS[2.0])  # reachable: far below max_norm at these sizes
  # Summed over the whole batch: XLA:CPU reduces that faster than row by row.
  floor = jax.jit(lambda x, d, e: jnp.sum(jnp.where(d >= 0, 1 - x, x) * jnp.abs(d)) * e)
  candidates = {"one fused pass (floor)": floor}
  for method in methods:
    candidates[method] = _batched_rescale(method)
  return _median_times(candidates, (x, d, eps), repeats)


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
  args = parser.parse_args(argv)

  kx, kd = jax.random.split(jax.random.key(0))
  x = jax.random.uniform(kx, (args.batch, 28, 28))
  delta = jax.random.normal(kd, (args.batch, 28, 28))
  backend = jax.default_backend()
  print(f"clipjax {clipjax.__version__} on {backend}: {args.batch} inputs of 28x28 in [0, 1]\n")
  print("norm of clip(x + eta*delta) - x over the batch (min .. max)")
  print(f"{'p':>4} {'target':>7}   {'naive rescale, then clip':>26}   {'clipjax.perturb':>22}")
  for p, eps, naive, exact in compare_norms(x, delta):
    print(
      f"{p:>4} {eps:>7.3g}   {float(naive.min()):>12.4f} .. {float(naive.max()):<9.4f}"
      f"   {float(exact.min()):>9.4f} .. {float(exact.max()):<9.4f}",
      flush=True,
    )

  # Each solver compiled once per size costs more than all the solves: the demo times
  # newton (what auto picks off the GPU) and bisect; `python -m benchmarks` times them all.
  sizes = {(args.batch, 784): ("newton", "bisect")}
  if not args.quick:
    sizes[args.batch, 3 * 224 * 224] = ("newton",)
  print("\nrescale under jax.vmap, p = 2, median time (ratio to one fused pass over the data)")
  for shape, methods in sizes.items():
    times = time_methods(shape, 2 if args.quick else 5, methods)
    floor = times["one fused pass (floor)"]
    cells = "   ".join(f"{k} {v * 1e3:.2f} ms ({v / floor:.1f}x)" for k, v in times.items())
    print(f"  {shape[0]} x {shape[1]}: {cells}", flush=True)
  print(
    "\nmethod='auto' is newton, or the sort on a single GPU for up to 16384 elements;"
    " every method is exact to float rounding."
  )


if __name__ == "__main__":
  main()
