"""DP-SGD on scikit-learn's digits, end to end: the guarantee, and what it costs in accuracy.

Every piece is the one the accounting assumes:

1. **Batches** come from :class:`clipjax.PoissonSampler`: each training example joins
   each step's batch independently with probability ``q`` (expected batch 64), padded
   to a static ``max_batch_size`` with a mask. The padding is chosen so that a draw
   overflows with negligible probability, and the accountant is told about it.
2. **Gradients**: :func:`clipjax.clipped_grad` returns the sum of the real examples'
   gradients, each clipped to norm ``C``, without per-example gradients.
3. **Noise**: :func:`clipjax.dp_noise` adds ``N(0, (σC)²)`` and divides by the
   EXPECTED batch size ``q·n`` (not the realized one, which would leak it).
4. **Accounting**: ``σ`` is calibrated for each target ε with the PLD accountant, for
   exactly this sampler (``**sampler.accounting``: Poisson, add-or-remove-one
   neighbours, truncation to ``max_batch_size``), δ = 1e-5; the ε spent is reported by
   RDP and PLD.
5. **Audit**: a one-step canary experiment on the mechanism of step 3 (a canary
   gradient of norm ``C`` in or out of the sum, many independent noise draws) gives
   the ε that :func:`clipjax.audit_epsilon` certifies, beside the accountant's ε for
   that one step. The certified bound must stay below the claim.

The same MLP is trained at several target ε (and without privacy, on the same
batches); the plot shows test accuracy against the ε spent so far.

    python examples/dp_sgd.py [--out examples/out] [--epsilons 1 2 4 8] [--epochs 40] [--smoke]
"""

import os
import sys

import _cli  # examples/ is on sys.path when run as a script
import _digits
import _private_training as pt
import jax
import matplotlib
import numpy as np
import optax
from tqdm.auto import tqdm

import clipjax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

DELTA = pt.DELTA
FLAT = pt.Rule("flat", clip_norm=1.0)


def audit_one_step(data, params, sampler, sigma, trials, seed):
  """The ε a canary experiment certifies for one step of the mechanism (``dp_noise``).

  Runs with the canary add a gradient of norm C (an example's clipped gradient) to
  the clipped sum of a real batch; runs without it do not. Each run draws fresh noise
  through ``dp_noise``; the score is the output's projection on the canary direction.
  """
  expected_batch = sampler.num_examples * sampler.sample_rate
  clip_norm = FLAT.clip_norm
  grad_fn = clipjax.clipped_grad(pt.example_loss, clip_norm)
  indices, mask = sampler(jax.random.key(seed))
  base, _ = grad_fn(params, data.x_train[indices], data.y_train[indices], mask=mask)
  # The canary: a test image with a wrong label, its gradient clipped to norm exactly C.
  x, y = data.x_test[:1], (data.y_test[:1] + 1) % 10
  canary, norms = grad_fn(params, x, y)
  canary = jax.tree.map(lambda c: c * (clip_norm / norms[0]), canary)
  direction = jax.tree.map(lambda c: c / clip_norm, canary)

  @jax.jit
  def scores(keys, present):
    summed = jax.tree.map(lambda b, c: b + present * c, base, canary)

    def one(key):
      tx = clipjax.dp_noise(clip_norm, sigma, expected_batch, key)
      noisy, _ = tx.update(summed, tx.init(None))
      # Undo the division by the batch size and the known part of the sum.
      return optax.tree.vdot(
        jax.tree.map(lambda n, b: n * expected_batch - b, noisy, base), direction
      )

    return jax.lax.map(one, keys, batch_size=256)

  keys_in, keys_out = jax.random.split(jax.random.key(seed + 1), 2 * trials).reshape(2, trials)
  scores_in = np.asarray(scores(keys_in, 1.0), np.float64)
  scores_out = np.asarray(scores(keys_out, 0.0), np.float64)
  return clipjax.audit_epsilon(scores_in, scores_out, DELTA)


def _plot(rows, baseline, epochs, path):
  # Two panels share the text column's width in the docs: fonts sized for that scale.
  with plt.rc_context({"font.size": 13, "axes.titlesize": 13, "legend.fontsize": 11}):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for row in rows:
      label = f"target ε = {row['target']:g} (σ = {row['sigma']:.2f})"
      left.plot(row["epsilon_curve"], row["accuracy_curve"], "o-", ms=3, label=label)
      right.plot(np.arange(1, epochs + 1), row["accuracy"], label=label)
    right.plot(np.arange(1, epochs + 1), baseline, "k--", label="non-private")
    left.axhline(baseline[-1], color="k", ls="--", label="non-private (final)")
    left.set(xlabel=f"ε spent (PLD, δ = {DELTA:g})", ylabel="test accuracy", xscale="log")
    # Plain labels at powers of two: the log axis's own minor labels overlap.
    ticks = [2.0**k for k in range(-2, 4)]
    left.set_xticks(ticks, [f"{t:g}" for t in ticks])
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set(xlabel="epoch", ylabel="test accuracy")
    left.set_title("DP-SGD on digits: accuracy against privacy spent")
    right.set_title("Poisson batches (expected 64), clip norm 1")
    for ax in (left, right):
      ax.grid(alpha=0.3)
      ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parse(argv):
  parser = pt.arguments(__doc__)
  parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
  parser.add_argument("--audit-trials", type=int, default=100_000)
  parser.add_argument("--seed", type=int, default=0)
  return _cli.parse(parser, argv, epsilons=[4.0], epochs=2, audit_trials=1_000)


def main(argv=None):
  args = _parse(argv)
  data = _digits.load(seed=args.seed)
  n = int(data.x_train.shape[0])
  sample_rate = args.batch_size / n
  steps_per_epoch = round(1 / sample_rate)
  steps = args.epochs * steps_per_epoch
  sampler = pt.poisson_sampler(n, args.batch_size, steps)
  print(
    f"n = {n} training images; Poisson batches, q = {sample_rate:.4f} (expected "
    f"{args.batch_size}), padded to {sampler.max_batch_size} (overflow per step "
    f"{sampler.overflow_probability:.1e}); {steps} steps; δ = {DELTA:g}"
  )

  schedule = dict(
    epochs=args.epochs,
    steps_per_epoch=steps_per_epoch,
    learning_rate=args.learning_rate,
    seed=args.seed,
  )
  _, baseline, _ = pt.train(data, sampler, None, None, **schedule)
  rows = []
  checkpoints = sorted({max(1, round(f * args.epochs)) for f in np.linspace(0.1, 1.0, 8)})
  for target in tqdm(args.epsilons, desc="target ε"):
    sigma = clipjax.calibrate_noise(
      target, DELTA, steps=steps, accountant="pld", **sampler.accounting
    )
    params, accuracy, _ = pt.train(data, sampler, FLAT, sigma, **schedule)
    spent = {
      accountant: clipjax.dp_epsilon(
        sigma, steps=steps, delta=DELTA, accountant=accountant, **sampler.accounting
      )
      for accountant in ("rdp", "pld")
    }
    curve = [
      clipjax.dp_epsilon(
        sigma, steps=e * steps_per_epoch, delta=DELTA, accountant="pld", **sampler.accounting
      )
      for e in checkpoints
    ]
    one_step = clipjax.dp_epsilon(sigma, 1.0, 1, DELTA, accountant="pld")
    audited = audit_one_step(data, params, sampler, sigma, args.audit_trials, args.seed)
    rows.append(
      {
        "target": target,
        "sigma": sigma,
        "epsilon_rdp": spent["rdp"],
        "epsilon_pld": spent["pld"],
        "accuracy": accuracy,
        "epsilon_curve": curve,
        "accuracy_curve": [accuracy[e - 1] for e in checkpoints],
        "one_step_epsilon": one_step,
        "audit_epsilon": audited,
      }
    )

  print(f"\nnon-private test accuracy: {baseline[-1]:.3f}")
  print(
    f"{'target ε':>8} {'σ':>6} {'ε (RDP)':>8} {'ε (PLD)':>8} {'test acc':>9}   "
    f"one step: {'accountant ε':>12} {'audit ε >=':>10}"
  )
  for r in rows:
    print(
      f"{r['target']:>8g} {r['sigma']:>6.3f} {r['epsilon_rdp']:>8.3f} {r['epsilon_pld']:>8.3f} "
      f"{r['accuracy'][-1]:>9.3f}             {r['one_step_epsilon']:>12.3f} "
      f"{r['audit_epsilon']:>10.3f}"
    )
  print(
    "The guarantee: (ε, δ)-DP for adding or removing one training example, for the "
    "Poisson sampler that ran (truncation included), every released update counted."
  )
  path = os.path.join(args.out, "dp_sgd.png")
  _plot(rows, baseline, args.epochs, path)
  _cli.done(args, path)
  return {"rows": rows, "baseline": baseline, "plot": path, "sampler": sampler}


if __name__ == "__main__":
  main(sys.argv[1:])
