"""A universal perturbation learned through exact gradients of clipjax.perturb.

One direction ``delta``, shared by every image of scikit-learn's digits (pixels in
[0, 1]), is learned by gradient ascent on a trained MLP's loss, where each image
is perturbed by

* exact: ``clipjax.perturb(x, delta, eps)``, a per-image scale chosen so that every
  perturbed image is exactly ``eps`` away from its original after clipping. The
  gradient with respect to ``delta`` runs through that scale and is exact (the
  script checks it against central differences in float64);
* naive: ``clip(x + eps * delta / ||delta||, 0, 1)``, rescale then clip: clipping
  removes part of the perturbation, by a different amount on every image, so the
  true sizes are smaller than ``eps`` and uneven.

The fooling rate is the fraction of test images whose predicted class changes. A
comparison at equal claimed ``eps`` flatters the exact method, which really
spends its budget; so for every claimed ``eps`` the exact perturbation is also
learned at the naive one's mean true size, and the two are compared at equal
true size (the same mean distance; exact puts every image at that distance).

Run: ``python examples/universal_perturbation.py [--smoke] [--out DIR]``.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import _cli  # noqa: E402  (examples/ is on sys.path when run as a script)
import _digits  # noqa: E402  (examples/ is on sys.path when run as a script)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import clipjax  # noqa: E402


def _exact(x, delta, eps):
  return jax.vmap(clipjax.perturb, in_axes=(0, None, None))(x, delta, eps)


def _naive(x, delta, eps):
  return jnp.clip(x + eps * delta / jnp.linalg.norm(delta), 0.0, 1.0)


PERTURBATIONS = {"exact": _exact, "naive": _naive}
_OPTIMIZER = optax.adam(0.05)
_LABELS = {"exact": "clipjax.perturb", "naive": "naive: rescale, then clip"}


def _parse(argv):
  parser = _cli.parser(__doc__)
  parser.add_argument("--eps", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25])
  parser.add_argument("--steps", type=int, default=150, help="Adam steps on delta")
  parser.add_argument("--restarts", type=int, default=4, help="random starts per delta")
  parser.add_argument("--train-steps", type=int, default=600, help="steps training the MLP")
  return _cli.parse(parser, argv, eps=[1.0], steps=20, restarts=2, train_steps=60)


def _objective(params, x, y, delta, eps, method):
  """Mean cross-entropy of the perturbed images: what ``delta`` ascends."""
  logits = _digits.logits(params, PERTURBATIONS[method](x, delta, eps))
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnames=("method", "n"))
def _ascend(params, x, y, deltas, opt_state, eps, *, method, n):
  """``n`` Adam steps on each of the independent restarts ``deltas`` (restarts, pixels)."""
  objectives = jax.vmap(_objective, in_axes=(None, None, None, 0, None, None))
  # optax descends, and Adam works coordinate by coordinate: the negated sum ascends
  # every restart on its own.
  grad = jax.grad(lambda d: -jnp.sum(objectives(params, x, y, d, eps, method)))

  def step(carry, _):
    deltas, opt_state = carry
    updates, opt_state = _OPTIMIZER.update(grad(deltas), opt_state)
    return (optax.apply_updates(deltas, updates), opt_state), None

  (deltas, opt_state), _ = jax.lax.scan(step, (deltas, opt_state), length=n)
  return deltas, opt_state, objectives(params, x, y, deltas, eps, method)


def _learn(params, data, eps, method, args):
  """A universal ``delta`` for the training images: the best of ``restarts`` ascents.

  Both objectives have local optima, and which one a random start reaches varies
  from start to start, so every method gets the same random starts.
  """
  rng = np.random.default_rng(args.seed)
  deltas = jnp.asarray(rng.standard_normal((args.restarts, data.x_train.shape[1])), jnp.float32)
  opt_state = _OPTIMIZER.init(deltas)
  chunks = max(1, min(10, args.steps))
  sizes = np.full(chunks, args.steps // chunks)
  sizes[: args.steps % chunks] += 1
  for n in tqdm(sizes, desc=f"{method} delta, eps {eps:.3g}", unit="chunk", leave=False):
    deltas, opt_state, objective = _ascend(
      params, data.x_train, data.y_train, deltas, opt_state, eps, method=method, n=int(n)
    )
  return deltas[jnp.argmax(objective)]


@functools.partial(jax.jit, static_argnames="method")
def _evaluate(params, x, delta, eps, *, method):
  """(fooling rate, true sizes ‖x̃ − x‖ per image) on the test images."""
  perturbed = PERTURBATIONS[method](x, delta, eps)
  clean = jnp.argmax(_digits.logits(params, x), -1)
  fooled = jnp.argmax(_digits.logits(params, perturbed), -1) != clean
  return fooled.mean(), jnp.linalg.norm(perturbed - x, axis=-1)


def _gradient_check(params, data, delta, eps):
  """Relative errors of the directional derivative of the exact objective, in float64.

  Against central differences: through ``clipjax.perturb`` and, for contrast,
  with each image's scale ``eta`` held constant (the derivative that ignores how
  the scale moves with ``delta``).
  """

  def frozen(params, x, y, d):
    etas = jax.vmap(clipjax.rescale, in_axes=(0, None, None))(x, d, eps)
    moved = jnp.clip(x + jax.lax.stop_gradient(etas)[:, None] * d, 0.0, 1.0)
    logits = _digits.logits(params, moved)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def derivatives(params, x, y, delta, direction):
    f = lambda d: _objective(params, x, y, d, eps, "exact")
    h = 1e-6
    fd = (f(delta + h * direction) - f(delta - h * direction)) / (2 * h)
    _, exact = jax.jvp(f, (delta,), (direction,))
    _, held = jax.jvp(lambda d: frozen(params, x, y, d), (delta,), (direction,))
    return fd, exact, held

  with jax.enable_x64(True):
    to64 = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
    args = jax.tree.map(to64, (params, data.x_test[:64], data.y_test[:64], delta))
    direction = jnp.asarray(np.random.default_rng(7).standard_normal(delta.shape))
    fd, exact, held = derivatives(*args, direction)
    return float(abs(exact - fd) / abs(fd)), float(abs(held - fd) / abs(fd))


def _plot(rows, deltas, path):
  fig, axes = plt.subplots(
    1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [2.2, 1, 1]}, constrained_layout=True
  )
  ax = axes[0]
  exact_at = sorted([(r["eps"], r["exact_fool"]) for r in rows] + [
    (r["naive_size"], r["exact_matched_fool"]) for r in rows
  ])  # fmt: skip
  ax.plot(*zip(*exact_at), "o-", label=f"{_LABELS['exact']} (true size)")
  ax.plot(
    [r["naive_size"] for r in rows],
    [r["naive_fool"] for r in rows],
    "s-",
    label=f"{_LABELS['naive']} (mean true size)",
  )
  ax.plot(
    [r["eps"] for r in rows],
    [r["naive_fool"] for r in rows],
    "s--",
    color="grey",
    alpha=0.6,
    label="naive, plotted at its claimed size",
  )
  ax.set(xlabel="L2 size of the perturbation ‖x̃ − x‖", ylabel="test fooling rate")
  ax.set_title("one universal perturbation for all images")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  eps = rows[-1]["eps"]
  for ax, (method, delta) in zip(axes[1:], deltas.items()):
    unit = np.reshape(delta / jnp.linalg.norm(delta), (8, 8))
    limit = float(np.max(np.abs(unit)))
    image = ax.imshow(unit, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(f"{method} delta / ‖delta‖, eps {eps:g}", fontsize=10)
    ax.axis("off")
    fig.colorbar(image, ax=ax, shrink=0.8)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  args = _parse(argv)
  data, params = _digits.trained(seed=args.seed, steps=args.train_steps)
  clean_accuracy = _digits.accuracy(params, data.x_test, data.y_test)

  rows, deltas = [], {}
  for eps in tqdm(args.eps, desc="eps"):
    row = {"eps": eps}
    for method in PERTURBATIONS:
      deltas[method] = _learn(params, data, eps, method, args)
      fool, sizes = _evaluate(params, data.x_test, deltas[method], eps, method=method)
      row.update(
        {
          f"{method}_fool": float(fool),
          f"{method}_size": float(jnp.mean(sizes)),
          f"{method}_min_size": float(jnp.min(sizes)),
          f"{method}_max_size": float(jnp.max(sizes)),
        }
      )
    # The exact perturbation at the naive one's mean true size.
    matched = _learn(params, data, row["naive_size"], "exact", args)
    fool, sizes = _evaluate(params, data.x_test, matched, row["naive_size"], method="exact")
    row["exact_matched_fool"] = float(fool)
    row["exact_matched_max_error"] = float(jnp.max(jnp.abs(sizes - row["naive_size"])))
    rows.append(row)

  grad_error, held_error = _gradient_check(params, data, deltas["exact"], args.eps[-1])
  path = os.path.join(args.out, "universal_perturbation.png")
  _plot(rows, deltas, path)
  print(
    f"\nclean test accuracy {clean_accuracy:.3f} ({data.x_test.shape[0]} test images); "
    f"one delta learned on {data.x_train.shape[0]} training images, {args.steps} Adam steps"
  )
  print(
    f"{'claimed':>7} {'exact size':>10} {'exact fool':>10} | {'naive size':>10} "
    f"{'(min, max)':>12} {'naive fool':>10} | {'exact at naive size':>19}"
  )
  for r in rows:
    print(
      f"{r['eps']:>7.2f} {r['exact_size']:>10.3f} {r['exact_fool']:>10.3f} | "
      f"{r['naive_size']:>10.3f} {r['naive_min_size']:>5.2f}, {r['naive_max_size']:<5.2f} "
      f"{r['naive_fool']:>10.3f} | {r['exact_matched_fool']:>19.3f}"
    )
  print(
    "gradient of the exact objective along a random direction, float64, relative to "
    f"central differences: error {grad_error:.1e}; holding each image's scale constant "
    f"instead: error {held_error:.1e}"
  )
  _cli.done(args, path)
  return {
    "clean_accuracy": clean_accuracy,
    "rows": rows,
    "gradient_error": grad_error,
    "held_scale_error": held_error,
    "plot": path,
  }


if __name__ == "__main__":
  main(sys.argv[1:])
