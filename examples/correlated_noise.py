"""Correlated noise against DP-SGD on digits: banded MF and BLT through jax_privacy.

The digits MLP of ``examples/dp_sgd.py`` is trained at each target ε, for the same
number of epochs (expected batch 64, 21 steps an epoch), by three mechanisms that share
:func:`clipjax.clipped_grad` (clip norm 1) and SGD with momentum:

1. **DP-SGD**: :class:`clipjax.PoissonSampler` batches, :func:`clipjax.dp_noise`
   (independent noise), σ from :func:`clipjax.calibrate_noise` (PLD).
2. **Banded MF** (amplified): :class:`clipjax.CyclicPoissonSampler` with 7 groups,
   each eligible every 7th step at rate 1/3; a 7-band strategy from
   :func:`clipjax.banded_strategy`; noise ``C⁻¹ z`` from jax_privacy's privatizer
   through :func:`clipjax.correlated_noise`; σ from
   :func:`clipjax.calibrate_correlated_noise` (jax_privacy's PLD accountant, the
   amplified BandMF event).
3. **BLT** (not amplified): balls-in-bins (:class:`clipjax.CyclicPoissonSampler` with
   21 bins at rate 1, each example once an epoch), a buffered linear Toeplitz strategy
   from :func:`clipjax.blt_strategy` optimized for that participation, σ for one
   Gaussian release at the strategy's multi-participation sensitivity.

Several seeds per cell; the table gives the mean test accuracy (± standard deviation),
the plot accuracy against ε. δ = 1e-5; the guarantee is for adding or removing one
example.

    python examples/correlated_noise.py [--out examples/out] [--epsilons 1 2 4 8]
        [--epochs 20] [--seeds 3] [--smoke]
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
from jax_privacy.matrix_factorization.buffered_toeplitz import BufferedToeplitz
from tqdm.auto import tqdm

import clipjax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DELTA = pt.DELTA
CLIP = 1.0
BANDS = 7
MOMENTUM = 0.9


def _sgd(learning_rate):
  return optax.sgd(learning_rate, momentum=MOMENTUM)


def _trainer(data, noise_fn, sample, batch_size, steps, learning_rate):
  """A compiled run: ``run(seed_key, sigma) -> test accuracy``, σ and keys traced, so
  every ε and seed of a mechanism shares one compilation."""
  grad_fn = clipjax.clipped_grad(pt.example_loss, CLIP)

  @jax.jit
  def run(key, sigma):
    init_key, noise_key, sample_key = jax.random.split(key, 3)
    tx = optax.chain(noise_fn(sigma, batch_size, noise_key), _sgd(learning_rate))
    params = _digits.init_mlp(init_key)

    def step(carry, t):
      params, state = carry
      indices, mask = sample(jax.random.fold_in(sample_key, t), t)
      summed, _ = grad_fn(params, data.x_train[indices], data.y_train[indices], mask=mask)
      updates, state = tx.update(summed, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    predictions = jnp.argmax(_digits.logits(params, data.x_test), axis=-1)
    return jnp.mean(predictions == data.y_test)

  return run


def _mechanisms(n, steps, steps_per_epoch, batch, smoke):
  """(name, sampler, noise factory, calibration, batch sampler, expected batch) for the
  three mechanisms. The smoke run calibrates with RDP (faster, looser) instead of PLD."""
  accountant = "rdp" if smoke else "pld"
  poisson = pt.poisson_sampler(n, batch, steps)
  cyclic = clipjax.CyclicPoissonSampler(n, BANDS, sample_rate=batch * BANDS / n)
  bins = clipjax.CyclicPoissonSampler(n, steps_per_epoch)
  if smoke:  # given strategies: jax_privacy's optimizers take seconds to a minute
    banded = clipjax.MFStrategy.from_banded_coefs(steps, np.linspace(1.0, 0.4, BANDS))
    with jax.enable_x64(True):
      blt = clipjax.MFStrategy.from_blt(
        steps, BufferedToeplitz.build(buf_decay=[0.9], output_scale=[0.5])
      )
  else:
    banded = clipjax.banded_strategy(steps, BANDS)
    blt = clipjax.blt_strategy(steps, steps_per_epoch)
  return [
    (
      "DP-SGD",
      poisson,
      lambda s, b, k: clipjax.dp_noise(CLIP, s, b, k),
      lambda eps: clipjax.calibrate_noise(
        eps, DELTA, steps=steps, accountant=accountant, **poisson.accounting
      ),
      lambda key, t: poisson(key),
      poisson.sample_rate * n,
    ),
    (
      f"banded MF ({BANDS} bands)",
      cyclic,
      lambda s, b, k: clipjax.correlated_noise(banded, CLIP, s, b, k, **cyclic.accounting),
      lambda eps: clipjax.calibrate_correlated_noise(
        banded, eps, DELTA, accountant=accountant, **cyclic.accounting
      ),
      cyclic,
      cyclic.expected_batch_size,
    ),
    (
      "BLT (balls-in-bins)",
      bins,
      lambda s, b, k: clipjax.correlated_noise(blt, CLIP, s, b, k, **bins.accounting),
      lambda eps: clipjax.calibrate_correlated_noise(
        blt, eps, DELTA, accountant=accountant, **bins.accounting
      ),
      bins,
      bins.expected_batch_size,
    ),
  ]


def _plot(epsilons, table, path):
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, cells in table.items():
    mean = [np.mean(cells[e]["accuracy"]) for e in epsilons]
    std = [np.std(cells[e]["accuracy"]) for e in epsilons]
    ax.errorbar(epsilons, mean, yerr=std, marker="o", capsize=3, label=name)
  ax.set(xscale="log", xlabel=f"ε (δ = {DELTA:g})", ylabel="test accuracy")
  ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
  ax.minorticks_off()
  ax.set_title("Digits MLP: DP-SGD against correlated noise, same epochs")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _parse(argv):
  parser = pt.arguments(__doc__)
  parser.set_defaults(epochs=20, learning_rate=0.1)
  parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
  parser.add_argument("--seeds", type=int, default=3)
  return _cli.parse(parser, argv, epsilons=[4.0], epochs=1, seeds=1)


def main(argv=None):
  args = _parse(argv)
  data = _digits.load()
  n = int(data.x_train.shape[0])
  steps_per_epoch = round(n / args.batch_size)
  steps = args.epochs * steps_per_epoch
  print(
    f"n = {n}; {args.epochs} epochs of {steps_per_epoch} steps; expected batch {args.batch_size}"
  )
  mechanisms = _mechanisms(n, steps, steps_per_epoch, args.batch_size, args.smoke)
  table = {}
  for name, _, noise_fn, calibrate, sample, batch in tqdm(mechanisms, desc="mechanism"):
    run = _trainer(data, noise_fn, sample, batch, steps, args.learning_rate)
    table[name] = {}
    for eps in tqdm(args.epsilons, desc=name, leave=False):
      sigma = calibrate(eps)
      accuracy = [float(run(jax.random.key(seed), sigma)) for seed in range(args.seeds)]
      table[name][eps] = {"sigma": sigma, "accuracy": accuracy}

  print(f"\ntest accuracy, mean ± std over {args.seeds} seeds (σ in parentheses)")
  print(f"{'mechanism':<22}" + "".join(f"{'ε = ' + format(e, 'g'):>20}" for e in args.epsilons))
  for name, cells in table.items():
    row = "".join(
      f"{np.mean(c['accuracy']):>9.3f} ± {np.std(c['accuracy']):.3f} ({c['sigma']:.2f})"
      for c in (cells[e] for e in args.epsilons)
    )
    print(f"{name:<22}{row}")
  print(
    "The guarantee: (ε, δ)-DP for adding or removing one training example, for the "
    "schedule each mechanism ran (ε by jax_privacy's accountants for the correlated ones)."
  )
  path = os.path.join(args.out, "correlated_noise.png")
  _plot(args.epsilons, table, path)
  _cli.done(args, path)
  return {"table": table, "plot": path, "samplers": [m[1] for m in mechanisms], "steps": steps}


if __name__ == "__main__":
  main(sys.argv[1:])
