"""User-level against example-level DP-SGD on digits split among users with unequal counts.

The 1,347 training images are dealt to synthetic users with heavy-tailed weights
(Pareto, shape 1.1): most users own a few images, a handful own a hundred or more. The
same MLP is trained for the same number of steps at each target ε in two ways:

1. **Example-level**: :class:`clipjax.PoissonSampler` over examples (expected batch 64),
   every example's gradient clipped to 1, ε for adding or removing ONE EXAMPLE. A user
   with ``m`` examples is protected far less: jax_privacy's
   ``DpsgdTrainingUserLevelAccountant`` (Chua et al., 2024) gives the ε of the same run
   for a user with ``m`` examples, reported for ``m = 4`` (it grows with ``m``; the
   largest user owns many more).
2. **User-level**: :class:`clipjax.UserSampler` draws users by Poisson sampling
   (expected 16 users a step) and up to K = 8 of each drawn user's examples; the loss of
   ONE user is the mean over its (masked) examples, so :func:`clipjax.clipped_grad`
   clips each user's gradient to 1 (mask over users); the noise is over the expected
   number of users; ε from :func:`clipjax.calibrate_noise` with ``unit="user"``
   (``**sampler.accounting``), for adding or removing ONE USER with all of their
   examples.

Several seeds; the table gives test accuracy and both guarantees. δ = 1e-5.

    python examples/user_level.py [--out examples/out] [--epsilons 1 2 4 8] [--epochs 20]
        [--seeds 3] [--smoke]
"""

import os
import sys

import _cli
import _digits  # examples/ is on sys.path when run as a script
import _private_training as pt
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from jax_privacy import accounting as jp_accounting
from tqdm.auto import tqdm

import clipjax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DELTA = pt.DELTA
CLIP = 1.0
USERS = 150
USERS_PER_STEP = 16
K = 8
M_REPORTED = 4  # examples of the user whose ε the example-level run is reported for


def synthetic_users(n, seed=0):
  """Each example's user: users weighted by a Pareto(1.1) draw, empty users dropped."""
  rng = np.random.default_rng(seed)
  weights = rng.pareto(1.1, USERS) + 1.0
  owners = rng.choice(USERS, size=n, p=weights / weights.sum())
  return np.unique(owners, return_inverse=True)[1].reshape(-1)


def _user_loss(params, x, y, example_mask):
  """The loss of ONE user: the mean over its real examples (the sum would also do)."""
  losses = jax.vmap(pt.example_loss, (None, 0, 0))(params, x, y)
  return jnp.sum(jnp.where(example_mask, losses, 0.0)) / jnp.maximum(jnp.sum(example_mask), 1)


def _trainer(data, level, sampler, steps, learning_rate):
  """``run(key, sigma) -> test accuracy``, compiled once per level (σ, keys traced)."""
  if level == "example":
    grad_fn = clipjax.clipped_grad(pt.example_loss, CLIP)
    expected = sampler.sample_rate * sampler.num_examples
  else:
    grad_fn = clipjax.clipped_grad(_user_loss, CLIP)
    expected = sampler.sample_rate * sampler.num_users

  @jax.jit
  def run(key, sigma):
    init_key, noise_key, sample_key = jax.random.split(key, 3)
    tx = optax.chain(clipjax.dp_noise(CLIP, sigma, expected, noise_key), optax.adam(learning_rate))
    params = _digits.init_mlp(init_key)

    def step(carry, t):
      params, state = carry
      key = jax.random.fold_in(sample_key, t)
      if level == "example":
        indices, mask = sampler(key)
        batch = (data.x_train[indices], data.y_train[indices])
      else:
        indices, mask, example_mask = sampler(key)
        batch = (data.x_train[indices], data.y_train[indices], example_mask)
      summed, _ = grad_fn(params, *batch, mask=mask)
      updates, state = tx.update(summed, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    predictions = jnp.argmax(_digits.logits(params, data.x_test), axis=-1)
    return jnp.mean(predictions == data.y_test)

  return run


def user_epsilon_of_example_level_run(sigma, steps, n, batch, m, discretization=1e-3):
  """The ε of the example-level run for a user owning ``m`` examples (jax_privacy)."""
  params = jp_accounting.DpParams(
    noise_multipliers=sigma, num_samples=n, delta=DELTA, batch_size=batch, examples_per_user=m
  )
  config = jp_accounting.PldAccountantConfig(value_discretization_interval=discretization)
  return jp_accounting.DpsgdTrainingUserLevelAccountant(config).compute_epsilon(steps, params)


def _plot(epsilons, table, path):
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, cells in table.items():
    mean = [np.mean(cells[e]["accuracy"]) for e in epsilons]
    std = [np.std(cells[e]["accuracy"]) for e in epsilons]
    ax.errorbar(epsilons, mean, yerr=std, marker="o", capsize=3, label=name)
  ax.set(xscale="log", xlabel=f"target ε of the run's own unit (δ = {DELTA:g})")
  ax.set(ylabel="test accuracy")
  ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
  ax.minorticks_off()
  ax.set_title("Digits among users with heavy-tailed counts")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _parse(argv):
  parser = pt.arguments(__doc__)
  parser.set_defaults(epochs=20)
  parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
  parser.add_argument("--seeds", type=int, default=3)
  return _cli.parse(parser, argv, epsilons=[4.0], epochs=1, seeds=1)


def main(argv=None):
  args = _parse(argv)
  data = _digits.load()
  n = int(data.x_train.shape[0])
  steps = args.epochs * round(n / args.batch_size)
  user_ids = synthetic_users(n)
  examples = pt.poisson_sampler(n, args.batch_size, steps)
  counts = np.bincount(user_ids)
  rate = USERS_PER_STEP / counts.size
  max_users = USERS_PER_STEP
  while steps * clipjax.poisson_overflow_probability(counts.size, rate, max_users) > DELTA * 1e-7:
    max_users += 1
  users = clipjax.UserSampler(user_ids, rate, max_users=max_users, examples_per_user=K)
  print(
    f"n = {n} examples among {counts.size} users: median {np.median(counts):g}, largest "
    f"{counts.max()}, {np.mean(counts > K):.0%} of users own more than K = {K}; {steps} steps"
  )
  runs = {
    "example-level": (examples, "example"),
    f"user-level (K = {K})": (users, "user"),
  }
  accountant = "rdp" if args.smoke else "pld"  # RDP: faster, looser
  table = {}
  for name, (sampler, level) in tqdm(runs.items(), desc="unit"):
    run = _trainer(data, level, sampler, steps, args.learning_rate)
    table[name] = {}
    for eps in tqdm(args.epsilons, desc=name, leave=False):
      sigma = clipjax.calibrate_noise(
        eps, DELTA, steps=steps, accountant=accountant, **sampler.accounting
      )
      accuracy = [float(run(jax.random.key(seed), sigma)) for seed in range(args.seeds)]
      if level == "example":
        user_eps = user_epsilon_of_example_level_run(
          sigma, steps, n, args.batch_size, M_REPORTED, 1e-2 if args.smoke else 1e-3
        )
      else:
        user_eps = clipjax.dp_epsilon(
          sigma, steps=steps, delta=DELTA, accountant=accountant, **sampler.accounting
        )
      table[name][eps] = {"sigma": sigma, "accuracy": accuracy, "user_epsilon": user_eps}

  print(f"\n{'run':<22}{'target ε':>9}{'σ':>7}{'test accuracy':>17}  user-level ε")
  for name, cells in table.items():
    for eps, c in cells.items():
      which = f"(a user with {M_REPORTED} examples)" if name == "example-level" else "(any user)"
      print(
        f"{name:<22}{eps:>9g}{c['sigma']:>7.2f}{np.mean(c['accuracy']):>10.3f} ± "
        f"{np.std(c['accuracy']):.3f}  {c['user_epsilon']:>8.2f} {which}"
      )
  eps = args.epsilons[-1]
  print("User-level guarantee:", clipjax.privacy_statement(eps, DELTA, **users.accounting))
  path = os.path.join(args.out, "user_level.png")
  _plot(args.epsilons, table, path)
  _cli.done(args, path)
  return {"table": table, "plot": path, "users": users, "examples": examples, "counts": counts}


if __name__ == "__main__":
  main(sys.argv[1:])
