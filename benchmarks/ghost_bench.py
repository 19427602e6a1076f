"""Cost of one DP-SGD gradient relative to a non-private gradient, for two MLPs.

Candidates, timed interleaved in one process (compiled first, medians over repeats):

* ``grad``: non-private ``jax.grad`` of the summed loss (the baseline);
* ``vmap_grad_clip``: ``jax.vmap(jax.grad)``, per-example clipping, sum;
* ``clipped_grad``: ``clipjax.clipped_grad`` (per-example norms without per-example
  gradients).

Run ``python -m benchmarks.ghost_bench [--quick]`` for a table, or call ``run(quick)``.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import clipjax

_MODELS = {"mlp_64_256_256_10": (64, 256, 256, 10), "mlp_3072_512_512_10": (3072, 512, 512, 10)}
_CLIP_NORM = 1.0


def _init(rng, sizes):
  # NumPy, not jax.random: eager JAX ops would each compile, which quick mode can't afford.
  return [
    (
      jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(m), jnp.float32),
      jnp.zeros((n,), jnp.float32),
    )
    for m, n in zip(sizes[:-1], sizes[1:])
  ]


def _loss(params, x, y):
  """Softmax cross-entropy of one example under a ReLU MLP."""
  h = x
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return -jax.nn.log_softmax(h @ w + b)[y]


def _summed_grad(params, x, y):
  return jax.grad(lambda p: jnp.sum(jax.vmap(_loss, (None, 0, 0))(p, x, y)))(params)


def _per_example_clipped(params, x, y):
  grads = jax.vmap(jax.grad(_loss), (None, 0, 0))(params, x, y)
  leaves = jax.tree.leaves(grads)
  norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves))
  scale = jnp.minimum(1.0, _CLIP_NORM / norms)
  return jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1), grads), norms


def _candidates():
  return {
    "grad": jax.jit(_summed_grad),
    "vmap_grad_clip": jax.jit(_per_example_clipped),
    "clipped_grad": jax.jit(clipjax.clipped_grad(_loss, _CLIP_NORM)),
  }


def _time_per_call(fn, args, number):
  start = time.perf_counter()
  for _ in range(number):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / number


def _bench_model(name, sizes, batch, repeats):
  rng = np.random.default_rng(0)
  params = _init(rng, sizes)
  x = jnp.asarray(rng.standard_normal((batch, sizes[0])), jnp.float32)
  y = jnp.asarray(rng.integers(0, sizes[-1], batch), jnp.int32)
  args = (params, x, y)
  fns = _candidates()
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  # Each sample averages enough calls to last ~20 ms, which steadies the fast candidates.
  numbers = {c: max(1, min(50, int(0.02 / _time_per_call(fn, args, 1)))) for c, fn in fns.items()}
  times = {c: [] for c in fns}
  for r in range(repeats):
    # Alternate the order so drift in machine load hits every candidate alike.
    order = list(fns) if r % 2 == 0 else list(fns)[::-1]
    for c in order:
      times[c].append(_time_per_call(fns[c], args, numbers[c]))
  medians = {c: float(np.median(t)) for c, t in times.items()}
  rows = []
  for c, median in medians.items():
    rows.append(
      {
        "name": f"{name}/{c}",
        "model": name,
        "candidate": c,
        "batch": batch,
        "repeats": repeats,
        "baseline": f"{name}/grad",
        "median_s": median,
        "baseline_median_s": medians["grad"],
        "ratio": median / medians["grad"],
        "ratio_vs_per_example": median / medians["vmap_grad_clip"],
      }
    )
  return rows


def run(quick: bool) -> list[dict]:
  """Times the candidates on both MLPs; returns one dict per (model, candidate).

  Args:
    quick: fewer repeats, and batch 16 for the wide MLP, to finish in seconds.

  Returns:
    Dicts with ``name``, ``baseline``, ``median_s``, ``baseline_median_s``, ``ratio``
    (median over the non-private baseline's), ``ratio_vs_per_example`` and the setup.
  """
  rows = []
  for name, sizes in _MODELS.items():
    # The per-example path on the wide MLP takes seconds a step; quick mode shrinks it.
    batch = 16 if quick and sizes[0] > 1000 else 256
    rows += _bench_model(name, sizes, batch, repeats=5 if quick else 21)
  return rows


def _main(argv):
  quick = "--quick" in argv
  rows = run(quick)
  print(f"{'name':42s} {'batch':>5s} {'median ms':>10s} {'vs grad':>8s} {'vs per-ex':>9s}")
  for r in rows:
    print(
      f"{r['name']:42s} {r['batch']:5d} {1e3 * r['median_s']:10.3f} "
      f"{r['ratio']:8.2f} {r['ratio_vs_per_example']:9.3f}"
    )


if __name__ == "__main__":
  _main(sys.argv[1:])
