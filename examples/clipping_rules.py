"""Clipping rules compared at the same privacy budget: DP-SGD on scikit-learn's digits.

Every run uses the same Poisson batches (expected 64), the same noise multiplier σ
(calibrated for ε = 2, δ = 1e-5, with the PLD accountant for this sampler), Adam and
the fast :func:`clipjax.clipped_grad` path. Only the clipping rule changes:

* ``flat``: every example's gradient clipped to norm C = 1 (Abadi et al., 2016);
* ``automatic``: every example scaled by ``C / (‖g‖ + 0.01)`` (Bu et al., 2023);
* ``per-layer, equal``: each layer's gradient clipped to its own ``C_k = C/√2``;
* ``per-layer, tuned``: ``C_k`` proportional to each layer's median gradient norm at
  initialisation (estimated here on training data for illustration; a deployment would
  use public data or spend privacy on it), scaled so that ``sqrt(Σ C_k²) = C``;
* ``adaptive``: the clip norm follows the median per-example norm (Andrew et al.,
  2021, :func:`clipjax.adaptive_dp_noise`), starting from 1;
* ``adaptive per-layer``: each layer's clip norm follows its own median, from ``C/√2``.

The sum's sensitivity is ``sqrt(Σ C_k²)`` (:func:`clipjax.sensitivity`), which is C for
every static rule here, so the same σ means the same noise on the sum and the same ε;
the adaptive rules spend part of that budget on their noised counts (the sum's
multiplier grows so that the total stays one Gaussian query of multiplier σ).

Several seeds per rule; the plot shows test accuracy per epoch (mean and range over
seeds) and the adaptive clip norms.

    python examples/clipping_rules.py [--out examples/out] [--seeds 3] [--epochs 40] [--smoke]
"""

import math
import os
import sys

import _cli  # examples/ is on sys.path when run as a script
import _digits
import _private_training as pt
import jax
import matplotlib
import numpy as np
from tqdm.auto import tqdm

import clipjax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EPSILON = 2.0


def tuned_split(data, clip_norm, seed, examples=256):
  """Per-layer clip norms proportional to each layer's median per-example gradient norm
  at initialisation, with ``sqrt(Σ C_k²) = clip_norm``."""
  params = _digits.init_mlp(jax.random.key(seed))
  per_layer = [math.inf] * len(params)  # no clipping: the norms as they are
  _, norms = clipjax.clipped_grad(pt.example_loss, per_layer)(
    params, data.x_train[:examples], data.y_train[:examples]
  )
  medians = np.array([float(np.median(n)) for n in norms])
  return [float(c) for c in clip_norm * medians / np.linalg.norm(medians)]


def rules(data, seed):
  equal = [1.0 / math.sqrt(2)] * 2
  return [
    pt.Rule("flat", 1.0),
    pt.Rule("automatic", 1.0, scaling="automatic"),
    pt.Rule("per-layer, equal", equal),
    pt.Rule("per-layer, tuned", tuned_split(data, 1.0, seed)),
    pt.Rule("adaptive", 1.0, adaptive=True),
    pt.Rule("adaptive per-layer", equal, adaptive=True),
  ]


def _plot(results, epochs, path):
  # Two panels share the text column's width in the docs: fonts sized for that scale.
  with plt.rc_context({"font.size": 13, "axes.titlesize": 13, "legend.fontsize": 11}):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    x = np.arange(1, epochs + 1)
    for name, r in results.items():
      acc = np.asarray(r["accuracy"])  # (seeds, epochs)
      (line,) = left.plot(x, acc.mean(0), label=name)
      left.fill_between(x, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
      if r["adaptive"]:
        norms = np.asarray(r["clip_norms"][0], dtype=float).reshape(epochs, -1)
        for k in range(norms.shape[1]):
          suffix = f" layer {k}" if norms.shape[1] > 1 else ""
          right.plot(x, norms[:, k], label=f"{name}{suffix}")
    left.set(
      xlabel="epoch", ylabel="test accuracy", title=f"same ε = {EPSILON:g}, δ = {pt.DELTA:g}"
    )
    right.set(
      xlabel="epoch", ylabel="clip norm (seed 0)", yscale="log", title="adaptive clip norms"
    )
    for ax in (left, right):
      ax.grid(alpha=0.3)
      ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parse(argv):
  parser = pt.arguments(__doc__)
  parser.add_argument("--seeds", type=int, default=3)
  return _cli.parse(parser, argv, seeds=1, epochs=2)


def main(argv=None):
  args = _parse(argv)
  data = _digits.load(seed=0)
  n = int(data.x_train.shape[0])
  steps_per_epoch = round(n / args.batch_size)
  steps = args.epochs * steps_per_epoch
  sampler = pt.poisson_sampler(n, args.batch_size, steps)
  sigma = clipjax.calibrate_noise(
    EPSILON, pt.DELTA, steps=steps, accountant="pld", **sampler.accounting
  )
  spent = clipjax.dp_epsilon(
    sigma, steps=steps, delta=pt.DELTA, accountant="pld", **sampler.accounting
  )
  print(f"σ = {sigma:.4f} for ε = {spent:.3f} (PLD), δ = {pt.DELTA:g}, {steps} steps")
  schedule = dict(
    epochs=args.epochs, steps_per_epoch=steps_per_epoch, learning_rate=args.learning_rate
  )

  candidates = rules(data, seed=0)
  if args.smoke:  # one static, one group-wise adaptive rule
    candidates = [candidates[1], candidates[-1]]
  results = {}
  for rule in tqdm(candidates, desc="clipping rules"):
    runs = [
      pt.train(data, sampler, rule, sigma, seed=seed, **schedule) for seed in range(args.seeds)
    ]
    results[rule.name] = {
      "clip_norm": rule.clip_norm,
      "adaptive": rule.adaptive,
      "accuracy": [r[1] for r in runs],
      "clip_norms": [r[2] for r in runs],
      "final": [r[1][-1] for r in runs],
      "sensitivity": float(clipjax.sensitivity(rule.clip_norm)),
    }

  print(f"\n{'rule':<20} {'clip norm(s)':<24} {'final test accuracy (mean ± sd, seeds)':<40}")
  for name, r in results.items():
    final = np.asarray(r["final"])
    clip = r["clip_norm"]
    clip = ", ".join(f"{c:.3f}" for c in clip) if isinstance(clip, list) else f"{clip:.3f}"
    if r["adaptive"]:
      clip = f"{clip} (initial)"
    print(
      f"{name:<20} {clip:<24} {final.mean():.3f} ± {final.std():.3f}  "
      f"({', '.join(f'{a:.3f}' for a in final)})"
    )
  path = os.path.join(args.out, "clipping_rules.png")
  _plot(results, args.epochs, path)
  _cli.done(args, path)
  return {"results": results, "sigma": sigma, "epsilon": spent, "plot": path}


if __name__ == "__main__":
  main(sys.argv[1:])
