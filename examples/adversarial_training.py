"""Adversarial training on digits with exact perturbations: clipjax.pgd in the training loop.

A small MLP on scikit-learn's digits (pixels in [0, 1]) is trained six ways, with
the same steps, optimizer and seed:

* ``plain``: on the clean images;
* ``exact noise L2``: on images with random noise of L2 size exactly ``eps``
  after clipping (``clipjax.random_perturbation``), a fresh draw every step;
* ``PGD-L2 clipjax`` / ``PGD-Linf clipjax``: adversarially (Madry et al. 2018),
  on the points ``clipjax.pgd`` finds in the eps-ball ∩ [0, 1] around each
  image: random start at distance exactly eps, steps of exact size after
  clipping, exact projections;
* ``PGD-L2 usual`` / ``PGD-Linf usual``: the same adversarial training with the
  recipe of attack libraries: normalize the gradient, step, project onto the
  ball, clip to [0, 1] (the start too is normalized, then clipped). For L∞ this
  is the same iteration as clipjax's (the signed step is coordinate-wise and the
  ball ∩ box is a box); only the random start differs, so that pair shows how
  much two equivalent trainings differ by chance.

Every model is then attacked with a stronger ``clipjax.pgd`` (more steps than in
training, several random starts) at several L2 and L∞ radii; robust accuracy is
the fraction of test images that no start misclassifies. The table also reports
how much of its budget each training attack really used (the usual L2 recipe's
steps are shortened by clipping, so its final perturbations are smaller than
eps), and the robust accuracy at the L2 training radius under the usual recipe
as the attack.

Run: ``python examples/adversarial_training.py [--smoke] [--out DIR]``.
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
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import clipjax  # noqa: E402

# Training method -> (norm of its perturbation, how it perturbs).
METHODS = {
  "plain": (None, None),
  "exact noise L2": (2.0, "noise"),
  "PGD-L2 clipjax": (2.0, "clipjax"),
  "PGD-L2 usual": (2.0, "usual"),
  "PGD-Linf clipjax": (math.inf, "clipjax"),
  "PGD-Linf usual": (math.inf, "usual"),
}
COLORS = dict(zip(METHODS, ("C0", "C1", "C2", "C2", "C3", "C3")))
NORMS = {"L2": 2.0, "Linf": math.inf}


def _parse(argv):
  parser = _cli.parser(__doc__)
  parser.add_argument("--train-eps-l2", type=float, default=1.0)
  parser.add_argument("--train-eps-linf", type=float, default=0.1)
  parser.add_argument("--eps-l2", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.5])
  parser.add_argument("--eps-linf", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--batch", type=int, default=150, help="divides the 450 test images")
  parser.add_argument("--pgd-steps", type=int, default=7, help="PGD steps in training")
  parser.add_argument("--attack-steps", type=int, default=20, help="PGD steps of the evaluation")
  parser.add_argument("--restarts", type=int, default=5, help="random starts of the evaluation")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  # L2 only, and as many attack steps as training steps: compiling the attacks is
  # most of the run's time.
  args = _cli.parse(
    parser,
    argv,
    methods=["plain", "PGD-L2 clipjax", "PGD-L2 usual"],
    eps_linf=[],
    epochs=2,
    pgd_steps=2,
    attack_steps=2,
    restarts=1,
  )
  if args.smoke:
    args.eps_l2 = [args.train_eps_l2]
  return args


def _example_loss(params, x, label):
  return optax.softmax_cross_entropy_with_integer_labels(_digits.logits(params, x), label)


def _usual_pgd(loss_fn, x, eps, key, *, p, steps):
  """The attack-library recipe: normalize, step, project onto the ball, then clip."""
  alpha = 2.5 * eps / steps
  if p == math.inf:
    start = x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  else:
    g = jax.random.normal(key, x.shape, x.dtype)
    start = x + eps * g / jnp.linalg.norm(g)

  def project_then_clip(y):
    if p == math.inf:
      return jnp.clip(x + jnp.clip(y - x, -eps, eps), 0.0, 1.0)
    d = y - x
    norm = jnp.linalg.norm(d)
    return jnp.clip(x + d * jnp.minimum(1.0, eps / jnp.where(norm > 0, norm, 1.0)), 0.0, 1.0)

  def iteration(z, _):
    g = jax.grad(loss_fn)(z)
    if p == math.inf:
      step = jnp.sign(g)
    else:
      norm = jnp.linalg.norm(g)
      step = g / jnp.where(norm > 0, norm, 1.0)
    return project_then_clip(z + alpha * step), None

  z, _ = jax.lax.scan(iteration, project_then_clip(start), length=steps)
  return z


@functools.partial(jax.jit, static_argnames=("p", "kind", "steps"))
def _perturb_batch(params, key, x, y, eps, *, p, kind, steps):
  """One perturbed copy of every image of the batch.

  Jitted once per (norm, kind, steps) and batch shape: training batches and test
  batches have the same size, so training and evaluation share the compiled attack
  where their steps agree.
  """
  keys = jax.random.split(key, x.shape[0])

  def one(x, label, key):
    loss_fn = lambda z: _example_loss(params, z, label)
    if kind == "noise":
      return clipjax.random_perturbation(key, x, eps, p=p)
    if kind == "clipjax":
      return clipjax.pgd(loss_fn, x, eps, p=p, steps=steps, key=key)
    return _usual_pgd(loss_fn, x, eps, key, p=p, steps=steps)

  return jax.vmap(one)(x, y, keys)


_OPTIMIZER = optax.adamw(3e-3, weight_decay=1e-4)


@jax.jit
def _train_step(params, opt_state, x, y):
  # Danskin: the model's gradient is the loss gradient at the perturbed points, held
  # fixed (they arrive as plain inputs, so nothing flows back into the attack).
  grads = jax.grad(_digits.loss)(params, x, y)
  updates, opt_state = _OPTIMIZER.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _batches(data, batch, seed):
  """Shuffled training batches of one epoch (the remainder is dropped: one shape)."""
  order = np.random.default_rng(seed).permutation(data.x_train.shape[0])
  for i in range(0, len(order) - batch + 1, batch):
    idx = order[i : i + batch]
    yield data.x_train[idx], data.y_train[idx]


def _train(data, method, args):
  """Minibatch AdamW; returns params and the mean ‖x' − x‖_p / eps over the last epoch."""
  p, kind = METHODS[method]
  eps = args.train_eps_l2 if p == 2 else args.train_eps_linf
  params = _digits.init_mlp(jax.random.key(args.seed))
  opt_state = _OPTIMIZER.init(params)
  key = jax.random.key(args.seed + 1)
  sizes = []
  for epoch in tqdm(range(args.epochs), desc=f"training: {method}", unit="epoch", leave=False):
    epoch_key = jax.random.fold_in(key, epoch)
    for i, (x, y) in enumerate(_batches(data, args.batch, (args.seed, epoch))):
      if kind is not None:
        x_pert = _perturb_batch(
          params, jax.random.fold_in(epoch_key, i + 1), x, y, eps, p=p, kind=kind,
          steps=args.pgd_steps,
        )  # fmt: skip
        if epoch == args.epochs - 1:
          sizes.append(jnp.linalg.norm(x_pert - x, ord=p, axis=-1) / eps)
        x = x_pert
      params, opt_state = _train_step(params, opt_state, x, y)
  return params, float(jnp.mean(jnp.concatenate(sizes))) if sizes else None


def _robust_accuracy(params, data, eps, key, *, p, args, kind="clipjax"):
  """Fraction of test images that PGD with ``attack_steps`` fails to misclassify.

  An image counts as robust only if every one of ``restarts`` random starts fails.
  """
  robust = 0
  for i in range(0, data.x_test.shape[0], args.batch):
    x, y = data.x_test[i : i + args.batch], data.y_test[i : i + args.batch]
    correct = jnp.ones(y.shape, bool)
    for r in range(args.restarts):
      x_adv = _perturb_batch(
        params, jax.random.fold_in(key, i * args.restarts + r), x, y, eps, p=p, kind=kind,
        steps=args.attack_steps,
      )  # fmt: skip
      correct &= jnp.argmax(_digits.logits(params, x_adv), -1) == y
    robust += int(jnp.sum(correct))
  return robust / data.x_test.shape[0]


def _plot(rows, grids, args, path):
  grids = {norm: grid for norm, grid in grids.items() if grid}
  fig, axes = plt.subplots(1, len(grids), figsize=(6 * len(grids), 4.2), squeeze=False)
  for ax, (norm, grid) in zip(axes[0], grids.items()):
    for r in rows:
      usual = r["method"].endswith("usual")
      ax.plot(
        [0.0, *grid],
        [r["clean"], *(r[norm][e] for e in grid)],
        "s--" if usual else "o-",
        color=COLORS[r["method"]],
        alpha=0.7 if usual else 1.0,
        label=r["method"],
      )
    ax.set(
      title=f"{norm} attack: clipjax.pgd, {args.attack_steps} steps, {args.restarts} starts",
      xlabel=f"{norm} radius eps",
      ylabel="robust test accuracy",
    )
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  args = _parse(argv)
  data = _digits.load(seed=args.seed)
  grids = {"L2": args.eps_l2, "Linf": args.eps_linf}
  key = jax.random.key(args.seed + 2)

  rows = []
  for method in tqdm(args.methods, desc="methods"):
    params, budget = _train(data, method, args)
    row = {
      "method": method,
      "clean": _digits.accuracy(params, data.x_test, data.y_test),
      "budget_used": budget,
    }
    for norm, grid in grids.items():
      row[norm] = {
        eps: _robust_accuracy(params, data, eps, key, p=NORMS[norm], args=args) for eps in grid
      }
    # The same evaluation with the usual recipe as the attack, for comparison.
    row["L2 usual attack"] = _robust_accuracy(
      params, data, args.train_eps_l2, key, p=2.0, args=args, kind="usual"
    )
    rows.append(row)

  path = os.path.join(args.out, "adversarial_training.png")
  _plot(rows, grids, args, path)
  print(
    f"\n{data.x_test.shape[0]} test images; training eps L2 {args.train_eps_l2}, "
    f"Linf {args.train_eps_linf}, {args.pgd_steps} PGD steps in training; robust accuracy "
    f"under clipjax.pgd with {args.attack_steps} steps, worst of {args.restarts} random starts"
  )
  header = "".join(f"{f'L2 {e:g}':>8}" for e in args.eps_l2)
  header += "".join(f"{f'Linf {e:g}':>10}" for e in args.eps_linf)
  print(f"{'method':<18} {'budget':>6} {'clean':>6}{header} {'usual L2':>9}")
  for r in rows:
    budget = "" if r["budget_used"] is None else f"{r['budget_used']:.3f}"
    line = "".join(f"{r['L2'][e]:>8.3f}" for e in args.eps_l2)
    line += "".join(f"{r['Linf'][e]:>10.3f}" for e in args.eps_linf)
    print(f"{r['method']:<18} {budget:>6} {r['clean']:>6.3f}{line} {r['L2 usual attack']:>9.3f}")
  print(
    "budget: mean ‖x' − x‖ / eps of the training perturbations in the last epoch; "
    f"usual L2: robust accuracy at L2 eps {args.train_eps_l2:g} under the usual PGD "
    "(normalize, project, clip) with the same steps and starts"
  )
  _cli.done(args, path)
  return {"rows": rows, "plot": path}


if __name__ == "__main__":
  main(sys.argv[1:])
