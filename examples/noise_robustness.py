"""Accuracy under random noise of exact size, versus naive noise that is smaller than claimed.

A small MLP is trained on scikit-learn's digits (pixels in [0, 1]). Each test
image then gets random noise of a claimed size ``eps`` in two ways:

* naive: ``clip(x + eps * g / ||g||_p, 0, 1)`` with ``g`` Gaussian; clipping
  removes part of the noise (about half of it pushes background pixels,
  which are 0, below 0), so the true size ``||noisy - x||_p`` is smaller than ``eps``;
* exact: ``clipjax.random_perturbation``, which rescales the direction so that
  the clipped noise really has size ``eps``.

Accuracy is plotted against the true size for both (L2 and L-inf), so the naive
curve's optimism shows: at a claimed size it is evaluated on much less noise.

Run: ``python examples/noise_robustness.py [--smoke] [--out DIR]``.
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
import _digits  # noqa: E402  (examples/ is on sys.path when run as a script)
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import clipjax  # noqa: E402

NORMS = {"L2": 2.0, "Linf": math.inf}
_LABELS = {
  "exact": "clipjax.random_perturbation",
  "naive": "naive: x + eps·g/‖g‖, clip",
}


def _parse(argv):
  parser = _cli.parser(__doc__)
  parser.add_argument(
    "--eps-l2", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
  )
  parser.add_argument("--eps-linf", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
  parser.add_argument("--draws", type=int, default=8, help="noise draws per test image")
  parser.add_argument("--train-steps", type=int, default=600)
  return _cli.parse(parser, argv, eps_l2=[1.0, 2.5], eps_linf=[0.3], draws=1, train_steps=60)


def _naive_noise(key, x, eps, p):
  """The usual recipe: a direction of norm eps, then clip (which shrinks it)."""
  g = jax.random.normal(key, x.shape, x.dtype)
  return jnp.clip(x + eps * g / jnp.linalg.norm(g, ord=p), 0.0, 1.0)


def _exact_noise(key, x, eps, p):
  return clipjax.random_perturbation(key, x, eps, p=p, lower=0.0, upper=1.0)


_NOISES = {"naive": _naive_noise, "exact": _exact_noise}


@functools.partial(jax.jit, static_argnames=("p", "draws"))
def _evaluate(params, key, x, y, eps, *, p, draws):
  """(accuracy, mean true size, min true size) for naive and exact noise."""
  x = jnp.repeat(x, draws, axis=0)
  y = jnp.repeat(y, draws, axis=0)
  keys = jax.random.split(key, (len(_NOISES), x.shape[0]))
  out = {}
  for k, (name, noise) in zip(keys, _NOISES.items()):
    noisy = jax.vmap(noise, in_axes=(0, 0, None, None))(k, x, eps, p)
    size = jnp.linalg.norm(noisy - x, ord=p, axis=-1)
    correct = jnp.argmax(_digits.logits(params, noisy), -1) == y
    out[name] = (correct.mean(), size.mean(), size.min())
  return out


def _plot(rows, clean_accuracy, path):
  fig, axes = plt.subplots(1, len(NORMS), figsize=(11, 4), sharey=True)
  for ax, norm in zip(axes, NORMS):
    sel = [r for r in rows if r["norm"] == norm]
    claimed = [0.0] + [r["eps"] for r in sel]
    for name, style in (("exact", "o-"), ("naive", "s-")):
      true = [0.0] + [r[f"{name}_size"] for r in sel]
      acc = [clean_accuracy] + [r[f"{name}_acc"] for r in sel]
      ax.plot(true, acc, style, label=f"{_LABELS[name]} (true size)")
    naive_acc = [clean_accuracy] + [r["naive_acc"] for r in sel]
    ax.plot(
      claimed, naive_acc, "s--", color="grey", alpha=0.6, label="naive, plotted at its claimed size"
    )
    ax.set(title=f"{norm} noise", xlabel=f"true perturbation size ‖x̃ − x‖ ({norm})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("test accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = _parse(argv)
  data, params = _digits.trained(seed=args.seed, steps=args.train_steps)
  clean_accuracy = _digits.accuracy(params, data.x_test, data.y_test)

  grids = {"L2": args.eps_l2, "Linf": args.eps_linf}
  jobs = [(norm, eps) for norm, grid in grids.items() for eps in grid]
  rows = []
  key = jax.random.key(args.seed)
  for i, (norm, eps) in enumerate(tqdm(jobs, desc="noise sizes")):
    result = _evaluate(
      params,
      jax.random.fold_in(key, i),
      data.x_test,
      data.y_test,
      eps,
      p=NORMS[norm],
      draws=args.draws,
    )
    row = {"norm": norm, "eps": eps}
    for name, (acc, size, smallest) in result.items():
      row.update(
        {
          f"{name}_acc": float(acc),
          f"{name}_size": float(size),
          f"{name}_min_size": float(smallest),
        }
      )
    rows.append(row)

  path = os.path.join(args.out, "noise_robustness.png")
  _plot(rows, clean_accuracy, path)
  print(
    f"\nclean test accuracy {clean_accuracy:.3f} ({data.x_test.shape[0]} images, "
    f"{args.draws} noise draws each); sizes are means over all noisy images"
  )
  print(
    f"{'norm':<5} {'claimed':>7} {'naive true':>10} {'exact true':>10} "
    f"{'naive/claimed':>13} {'acc naive':>9} {'acc exact':>9}"
  )
  for r in rows:
    print(
      f"{r['norm']:<5} {r['eps']:>7.2f} {r['naive_size']:>10.3f} {r['exact_size']:>10.3f} "
      f"{r['naive_size'] / r['eps']:>13.2f} {r['naive_acc']:>9.3f} {r['exact_acc']:>9.3f}"
    )
  _cli.done(args, path)
  return {"clean_accuracy": clean_accuracy, "rows": rows, "plot": path}


if __name__ == "__main__":
  main(sys.argv[1:])
