"""Clipped versus plain streaming SGD on high-dimensional least squares.

Each step draws one fresh sample ``x ~ N(0, I_d)``, ``y = <x, w*> + noise`` and
takes an SGD step on ``(<x, w> - y)**2 / 2``, with or without
``clipjax.clip_by_norm`` on the per-sample gradient. The label noise is Gaussian
or Student-t (df = 2.5, scaled to the same variance). The learning rate and the
clip threshold are swept, and the best clipped run is compared with the best
plain run by final excess risk ``||w - w*||**2 / 2`` (mean over seeds).

Marshall et al. ("A Clipped Trip", 2024) show that in high dimensions clipping
cannot beat tuned SGD under Gaussian noise, but can under heavy-tailed noise; the
printed table and ``clipped_sgd_least_squares.png`` in ``--out`` show both.

Run: ``python examples/clipped_sgd_least_squares.py [--smoke] [--out DIR]``.
"""

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import _cli  # noqa: E402  (examples/ is on sys.path when run as a script)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import clipjax  # noqa: E402

_STUDENT_DF = 2.5
NOISES = ("gaussian", "student-t")


def _parse(argv):
  parser = _cli.parser(__doc__, seed=False)
  parser.add_argument("--dim", type=int, default=500)
  parser.add_argument("--steps", type=int, default=4000)
  parser.add_argument("--seeds", type=int, default=4)
  parser.add_argument("--noise-std", type=float, default=1.0)
  parser.add_argument("--num-lrs", type=int, default=16)
  parser.add_argument(
    "--clip-factors",
    type=float,
    nargs="+",
    default=[0.25, 0.5, 1.0, 2.0],
    help="thresholds in units of noise_std * sqrt(dim), a typical gradient norm",
  )
  return _cli.parse(parser, argv, dim=50, steps=400, seeds=2, num_lrs=5)


def _grid(args):
  """(learning rates, thresholds), one entry per run; threshold inf = plain SGD."""
  # Plain SGD on isotropic data is stable for lr * dim < 2.
  lrs = np.geomspace(0.03, 1.5, args.num_lrs) / args.dim
  thresholds = [math.inf] + [f * args.noise_std * math.sqrt(args.dim) for f in args.clip_factors]
  lr, threshold = np.meshgrid(lrs, thresholds, indexing="ij")
  return jnp.asarray(lr.ravel()), jnp.asarray(threshold.ravel())


def _label_noise(key, heavy_tailed, std):
  key_gauss, key_t = jax.random.split(key)
  # Student-t with df > 2 has variance df / (df - 2).
  student = jax.random.t(key_t, _STUDENT_DF) / math.sqrt(_STUDENT_DF / (_STUDENT_DF - 2))
  # Both are drawn so that one compilation serves both noise models.
  return std * jnp.where(heavy_tailed, student, jax.random.normal(key_gauss))


def _sgd_update(grad, lr, threshold):
  # With an infinite threshold clip_by_norm is the identity: plain SGD.
  tx = optax.chain(clipjax.clip_by_norm(threshold), optax.sgd(lr))
  updates, _ = tx.update(grad, tx.init(grad))
  return updates


@functools.partial(jax.jit, static_argnames=("dim", "steps"))
def _excess_risk_curves(key, lrs, thresholds, heavy_tailed, std, *, dim, steps):
  """Excess risk after every step, shape (steps, runs); all runs see one stream."""
  key_target, key_stream = jax.random.split(key)
  target = jax.random.normal(key_target, (dim,)) / math.sqrt(dim)
  weights = jnp.zeros((lrs.shape[0], dim))

  def step(weights, step_key):
    key_x, key_noise = jax.random.split(step_key)
    x = jax.random.normal(key_x, (dim,))
    y = x @ target + _label_noise(key_noise, heavy_tailed, std)
    grads = (weights @ x - y)[:, None] * x
    weights = weights + jax.vmap(_sgd_update)(grads, lrs, thresholds)
    return weights, 0.5 * jnp.sum((weights - target) ** 2, axis=1)

  _, risks = jax.lax.scan(step, weights, jax.random.split(key_stream, steps))
  return risks


def _best(final, thresholds, clipped):
  """Index of the run with the lowest final risk among clipped or plain runs."""
  candidates = np.flatnonzero(np.isfinite(thresholds) == clipped)
  return int(candidates[np.argmin(final[candidates])])


def main(argv=None):
  args = _parse(argv)
  lrs, thresholds = _grid(args)
  tail = max(1, args.steps // 10)
  curves = {noise: [] for noise in NOISES}
  jobs = [(noise, seed) for noise in NOISES for seed in range(args.seeds)]
  for noise, seed in tqdm(jobs, desc="SGD runs (noise, seed)"):
    risks = _excess_risk_curves(
      jax.random.key(seed),
      lrs,
      thresholds,
      noise == "student-t",
      args.noise_std,
      dim=args.dim,
      steps=args.steps,
    )
    curves[noise].append(np.asarray(risks))

  lrs, thresholds = np.asarray(lrs), np.asarray(thresholds)
  unit = args.noise_std * math.sqrt(args.dim)
  results = {}
  fig, axes = plt.subplots(1, len(NOISES), figsize=(11, 4), sharey=True)
  print(
    f"\nd = {args.dim}, {args.steps} steps, {args.seeds} seeds, "
    f"{len(lrs)} runs per noise; final excess risk = mean of the last "
    f"{tail} steps, mean over seeds"
  )
  print(f"{'noise':<10} {'run':<8} {'lr*d':>6} {'clip/(std*sqrt d)':>18} {'final excess risk':>18}")
  for ax, noise in zip(axes, NOISES):
    mean_curve = np.mean(curves[noise], axis=0)  # (steps, runs)
    final = mean_curve[-tail:].mean(axis=0)
    best = {
      "plain": _best(final, thresholds, clipped=False),
      "clipped": _best(final, thresholds, clipped=True),
    }
    for name, i in best.items():
      factor = thresholds[i] / unit
      print(f"{noise:<10} {name:<8} {lrs[i] * args.dim:>6.3f} {factor:>18.2f} {final[i]:>18.4g}")
      label = f"best {name}: lr·d = {lrs[i] * args.dim:.2f}"
      if name == "clipped":
        label += f", clip = {factor:.2f}·σ√d"
      ax.plot(np.arange(1, args.steps + 1), mean_curve[:, i], label=label)
    results[noise] = {
      "plain": float(final[best["plain"]]),
      "clipped": float(final[best["clipped"]]),
      "ratio": float(final[best["clipped"]] / final[best["plain"]]),
    }
    ax.set(
      title=f"{noise} noise: best clipped / best plain = {results[noise]['ratio']:.2f}",
      xlabel="step (one fresh sample each)",
      yscale="log",
    )
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].set_ylabel("excess risk ½‖w − w*‖² (mean over seeds)")
  fig.tight_layout()
  path = os.path.join(args.out, "clipped_sgd_least_squares.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  for noise, r in results.items():
    print(f"{noise}: best clipped / best plain final excess risk = {r['ratio']:.3f}")
  _cli.done(args, path)
  return {"results": results, "plot": path}


if __name__ == "__main__":
  main(sys.argv[1:])
