"""L2 PGD on a digits MLP: clipping-aware steps and exact projections.

Every PGD iteration takes a step from the current point ``x_t`` to ``y`` and
projects ``y`` back onto the feasible set ``{z : ||z - x0||_2 <= eps} ∩ [0, 1]``
around the clean image ``x0``. Three variants, equal budgets, 10 iterations
with step size ``2.5 * eps / 10``:

* ``normalize, project, clip`` (the usual recipe of attack libraries):
  ``y = x_t + alpha * g / ||g||``, then the eps-ball projection, then a clip to
  [0, 1]. Clipping removes part of every step, so the effective step
  ``||clip(y) - x_t||`` is shorter than ``alpha``; the final point is feasible
  but not the nearest feasible point to ``y``.
* ``clipping-aware step``: the step is
  ``optax.chain(optax.scale(-1.0), clipjax.clipping_aware_normalize(alpha))``
  applied to the gradient of the negated loss, so it stays in the box and has
  norm exactly ``alpha``. (``y`` is then in the box, where projecting onto the
  ball is already the exact projection.)
* ``normalize, exact projection``: the usual step, projected with
  ``clipjax.project_ball_box``, the nearest point of ball ∩ box to ``y``.

The table reports, per variant and eps: the mean effective step over alpha, the
mean distance ``||z - y||`` of each projected point to its pre-projection point,
the final perturbation norm and the attack success rate (images correctly
classified before the attack that are misclassified after it).

Run: ``python examples/pgd_attack.py [--smoke] [--out DIR]``.
"""

import functools
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

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


class Variant(NamedTuple):
  """One PGD variant: ``step(grad, x, alpha) -> y`` and ``project(y, x0, eps) -> z``.

  ``grad`` is the gradient of the objective being *minimised* (the negated
  loss), following optax's convention.
  """

  step: Callable
  project: Callable


def _normalized_step(grad, x, alpha):
  # The usual recipe: unit direction times alpha; clipping happens later.
  norm = jnp.linalg.norm(grad)
  return x - alpha * grad / jnp.where(norm > 0, norm, 1)


def _clipping_aware_step(grad, x, alpha):
  tx = optax.chain(optax.scale(-1.0), clipjax.clipping_aware_normalize(alpha, lower=0.0, upper=1.0))
  updates, _ = tx.update(grad, tx.init(x), x)
  return optax.apply_updates(x, updates)


def _project_then_clip(y, x0, eps):
  delta = y - x0
  norm = jnp.linalg.norm(delta)
  shrink = jnp.minimum(1.0, eps / jnp.where(norm > 0, norm, 1))
  return jnp.clip(x0 + shrink * delta, 0.0, 1.0)


def _exact_projection(y, x0, eps):
  return clipjax.project_ball_box(y, x0, eps, lower=0.0, upper=1.0)


VARIANTS = {
  "normalize, project, clip": Variant(_normalized_step, _project_then_clip),
  "clipping-aware step": Variant(_clipping_aware_step, _project_then_clip),
  "normalize, exact projection": Variant(_normalized_step, _exact_projection),
}


def _parse(argv):
  parser = _cli.parser(__doc__)
  parser.add_argument("--eps", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--train-steps", type=int, default=600)
  return _cli.parse(parser, argv, eps=[1.0], steps=5, train_steps=60)


@functools.partial(jax.jit, static_argnames=("variant", "steps"))
def _attack(params, x0, labels, eps, *, variant, steps):
  """Per image: final point, effective steps (steps,) and projection distances (steps,)."""
  step_fn, project = VARIANTS[variant]
  alpha = 2.5 * eps / steps

  def objective(x, label):
    return -optax.softmax_cross_entropy_with_integer_labels(_digits.logits(params, x), label)

  def attack_one(x0, label):
    def iteration(x, _):
      y = step_fn(jax.grad(objective)(x, label), x, alpha)
      z = project(y, x0, eps)
      effective = jnp.linalg.norm(jnp.clip(y, 0.0, 1.0) - x)
      return z, (effective, jnp.linalg.norm(z - y))

    return jax.lax.scan(iteration, x0, length=steps)

  final, (effective, distance) = jax.vmap(attack_one)(x0, labels)
  return final, effective, distance


def _plot(rows, path):
  fig, axes = plt.subplots(1, 4, figsize=(17, 4))
  panels = (
    ("success", "attack success rate"),
    ("step_ratio", "mean effective step / alpha"),
    ("budget_used", "mean ‖x_T − x0‖ / eps"),
    ("distance", "mean ‖z − y‖ (projection distance)"),
  )
  for ax, (field, title) in zip(axes, panels):
    for name in VARIANTS:
      sel = [r for r in rows if r["variant"] == name]
      ax.plot([r["eps"] for r in sel], [r[field] for r in sel], "o-", label=name)
    ax.set(title=title, xlabel="L2 budget eps")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = _parse(argv)
  data, params = _digits.trained(seed=args.seed, steps=args.train_steps)
  correct = np.asarray(jnp.argmax(_digits.logits(params, data.x_test), -1) == data.y_test)
  x0, labels = data.x_test[correct], data.y_test[correct]

  rows = []
  jobs = [(name, eps) for name in VARIANTS for eps in args.eps]
  for name, eps in tqdm(jobs, desc="PGD (variant, eps)"):
    final, effective, distance = _attack(params, x0, labels, eps, variant=name, steps=args.steps)
    alpha = 2.5 * eps / args.steps
    ratio = np.asarray(effective, np.float64) / alpha
    final_norms = jnp.linalg.norm(final - x0, axis=-1)
    rows.append(
      {
        "variant": name,
        "eps": eps,
        "step_ratio": float(ratio.mean()),
        "step_ratio_min": float(ratio.min()),
        "step_ratio_max": float(ratio.max()),
        "distance": float(jnp.mean(distance)),
        "final_norm": float(jnp.mean(final_norms)),
        "max_final_norm": float(jnp.max(final_norms)),
        "budget_used": float(jnp.mean(final_norms)) / eps,
        "success": float(jnp.mean(jnp.argmax(_digits.logits(params, final), -1) != labels)),
      }
    )

  path = os.path.join(args.out, "pgd_attack.png")
  _plot(rows, path)
  print(
    f"\n{len(labels)} correctly classified test images, {args.steps} PGD "
    f"iterations, alpha = 2.5 * eps / {args.steps}; means over images and iterations"
  )
  print(
    f"{'variant':<28} {'eps':>4} {'step/alpha':>10} {'min':>6} "
    f"{'‖z−y‖':>7} {'‖x_T−x0‖':>9} {'success':>7}"
  )
  for r in rows:
    print(
      f"{r['variant']:<28} {r['eps']:>4.2f} {r['step_ratio']:>10.4f} "
      f"{r['step_ratio_min']:>6.3f} {r['distance']:>7.4f} {r['final_norm']:>9.4f} "
      f"{r['success']:>7.3f}"
    )
  _cli.done(args, path)
  return {"rows": rows, "plot": path, "images": len(labels)}


if __name__ == "__main__":
  main(sys.argv[1:])
