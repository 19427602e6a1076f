"""DP-SGD on scikit-learn's digits: flat, bias-corrected and adaptive clipping.

A small pure-JAX MLP (64-64-10, tanh) is trained three ways at the same privacy
budget (ε from :func:`clipjax.dp_epsilon`, δ = 1e-5, noise multiplier from
:func:`clipjax.calibrate_noise`):

* ``flat``: per-example clipping at C = 1 (``clipjax.dp_aggregate``);
* ``bias_corrected``: the same with Chen et al.'s symmetric perturbation before
  clipping (``pre_clip_noise``);
* ``adaptive``: Andrew et al.'s clip norm tracking the median per-example norm
  (``clipjax.adaptive_dp_aggregate``). Its ``noise_multiplier`` is the one of
  the equivalent single query (the sum gets the larger ``z_Δ``, the count the
  rest), so the same σ gives the same ε.

Batches are fixed-size samples without replacement while the accountant
assumes Poisson sampling at rate ``batch / n``: the usual approximation, kept
for static shapes. Every epoch prints ε and test accuracy and records
``clipjax.clipping_stats`` on a fixed probe batch at the method's current
clip norm. Plots go to ``dp_sgd.png`` in ``--out``.

The per-example gradient computation is one function (``per_example_grads``);
when ``clipjax.clipped_grad`` is available (it computes the clipped sum from
per-example norms without per-example gradients), the flat run uses it with
``clipjax.dp_noise`` instead, and the script prints its step time against a
non-private step.

    python examples/dp_sgd.py [--out examples/out] [--epsilon 3] [--epochs 40] [--smoke]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import clipjax

DELTA = 1e-5
HIDDEN = 64


def load_data(smoke):
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
    x, digits.target, test_size=0.2, random_state=0, stratify=digits.target
  )
  if smoke:
    x_train, y_train = x_train[:512], y_train[:512]
  return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


def init_params(seed, sizes):
  # NumPy, not jax.random: eager JAX ops would each compile, for nothing.
  rng = np.random.default_rng(seed)
  return [
    (
      jnp.asarray(rng.normal(size=(m, n)) * np.sqrt(2 / m), jnp.float32),
      jnp.zeros((n,), jnp.float32),
    )
    for m, n in zip(sizes[:-1], sizes[1:])
  ]


def logits_fn(params, x):
  for w, b in params[:-1]:
    x = jnp.tanh(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def example_loss(params, x, y):
  """Cross-entropy of one example: the loss clipped_grad expects."""
  return -jax.nn.log_softmax(logits_fn(params, x))[y]


def per_example_grads(params, x, y):
  """Per-example gradients, the batch on every leaf's leading axis."""
  return jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)


@jax.jit
def _accuracy(params, x, y):
  return jnp.mean(jnp.argmax(logits_fn(params, x), axis=1) == y)


def accuracy(params, x, y):
  return float(_accuracy(params, x, y))


@jax.jit
def probe_stats(params, x, y, clip_norm):
  """``clipping_stats`` of the per-example gradients on a probe batch."""
  return clipjax.clipping_stats(per_example_grads(params, x, y), clip_norm)


def _clip_norm_of(method, opt_state, clip_norm):
  if method == "adaptive":
    return opt_state[0].clip_norm
  return clip_norm


def make_optimizer(method, args, sigma, key):
  # Adam's step does not grow with the clip norm, so the adaptive run's
  # changing C alters the signal-to-noise ratio, not the step size.
  sgd = optax.adam(args.learning_rate)
  if method == "flat":
    return optax.chain(clipjax.dp_aggregate(args.clip_norm, sigma, key), sgd)
  if method == "flat_clipped_grad":
    return optax.chain(clipjax.dp_noise(args.clip_norm, sigma, args.batch_size, key), sgd)
  if method == "bias_corrected":
    # Perturbation of norm ≈ k·√d, set to half the clip norm.
    d = sum(m * n + n for m, n in zip(args.sizes[:-1], args.sizes[1:]))
    k = args.pre_clip_noise * args.clip_norm / np.sqrt(d)
    return optax.chain(clipjax.dp_aggregate(args.clip_norm, sigma, key, pre_clip_noise=k), sgd)
  return optax.chain(clipjax.adaptive_dp_aggregate(args.initial_clip_norm, sigma, key), sgd)


def make_step(method, tx, clip_norm):
  if method == "flat_clipped_grad":
    clipped = clipjax.clipped_grad(example_loss, clip_norm)

    def gradient(params, x, y):
      return clipped(params, x, y)[0]  # the clipped sum; dp_noise averages
  else:
    gradient = per_example_grads

  @jax.jit
  def step(params, opt_state, x, y):
    updates, opt_state = tx.update(gradient(params, x, y), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _clipped_grad_available(params, x, y, clip_norm):
  try:
    summed, _ = jax.jit(clipjax.clipped_grad(example_loss, clip_norm))(params, x, y)
  except NotImplementedError:
    return False
  # Use it only if it agrees with per-example clipping.
  clipped, _ = jax.jit(clipjax.per_example_clip)(per_example_grads(params, x, y), clip_norm)
  expected = jax.tree.map(lambda g: np.sum(g, axis=0), clipped)
  return all(
    np.allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(summed), jax.tree.leaves(expected))
  )


def _median_time(fn, repeats=20):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def compare_step_times(params, x, y, clip_norm):
  """Prints a clipped_grad step's time against a non-private step's."""
  non_private = jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(example_loss, (None, 0, 0))(p, x, y))))
  private = jax.jit(lambda p: clipjax.clipped_grad(example_loss, clip_norm)(p, x, y))
  per_example = jax.jit(lambda p: per_example_grads(p, x, y))
  for fn in (non_private, private, per_example):
    jax.block_until_ready(fn(params))
  base = _median_time(lambda: non_private(params))
  ghost = _median_time(lambda: private(params))
  vmapped = _median_time(lambda: per_example(params))
  print(
    f"gradient time per step (batch {x.shape[0]}): non-private "
    f"{base * 1e3:.2f} ms, clipped_grad {ghost * 1e3:.2f} ms "
    f"({ghost / base:.2f}x), vmap per-example {vmapped * 1e3:.2f} ms "
    f"({vmapped / base:.2f}x)"
  )


def train(method, args, data, sigma, epsilons, key):
  x_train, y_train, x_test, y_test = data
  n = len(x_train)
  steps_per_epoch = n // args.batch_size
  params = init_params(args.seed, args.sizes)
  tx = make_optimizer(method, args, sigma, key)
  opt_state = tx.init(params)
  step = make_step(method, tx, args.clip_norm)
  probe_x, probe_y = x_train[: args.batch_size], y_train[: args.batch_size]
  rng = np.random.default_rng(args.seed)
  history = {
    "accuracy": [],
    "epsilon": [],
    "clip_norm": [],
    "bias_norm": [],
    "fraction_clipped": [],
    "cosine": [],
  }
  bar = tqdm(range(args.epochs), desc=method)
  for epoch in bar:
    order = rng.permutation(n)
    for s in range(steps_per_epoch):
      batch = order[s * args.batch_size : (s + 1) * args.batch_size]
      params, opt_state = step(params, opt_state, x_train[batch], y_train[batch])
    clip_norm = _clip_norm_of(method, opt_state, args.clip_norm)
    stats = probe_stats(params, probe_x, probe_y, jnp.float32(clip_norm))
    history["accuracy"].append(accuracy(params, x_test, y_test))
    history["epsilon"].append(epsilons[epoch])
    history["clip_norm"].append(float(clip_norm))
    for name in ("bias_norm", "fraction_clipped", "cosine"):
      history[name].append(float(getattr(stats, name)))
    bar.set_postfix(
      acc=f"{history['accuracy'][-1]:.3f}",
      eps=f"{epsilons[epoch]:.2f}",
      C=f"{float(clip_norm):.2f}",
    )
  return history


def _plot(histories, path):
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for method, h in histories.items():
    epochs = np.arange(1, len(h["accuracy"]) + 1)
    axes[0].plot(epochs, h["accuracy"], label=method)
    axes[1].plot(epochs, h["clip_norm"], label=method)
    axes[2].plot(epochs, h["bias_norm"], label=method)
  axes[0].set_ylabel("test accuracy")
  axes[1].set_ylabel("clip norm")
  axes[2].set_ylabel("‖mean clip(g) − mean g‖ (probe batch)")
  eps = next(iter(histories.values()))["epsilon"]
  axes[0].set_title(f"DP-SGD on digits, ε = {eps[-1]:.2f}, δ = {DELTA:g}")
  for ax in axes:
    ax.set_xlabel("epoch")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("examples", "out"))
  parser.add_argument("--epsilon", type=float, default=3.0)
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--learning-rate", type=float, default=0.01)
  parser.add_argument("--clip-norm", type=float, default=1.0)
  parser.add_argument("--initial-clip-norm", type=float, default=0.1)
  parser.add_argument(
    "--pre-clip-noise", type=float, default=0.5, help="perturbation norm relative to the clip norm"
  )
  parser.add_argument(
    "--hidden", type=int, default=HIDDEN, help="hidden width; 0 gives a linear softmax model"
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true", help="tiny, fast configuration")
  args = parser.parse_args(argv)
  if args.smoke:
    # A linear model: half the leaves, so half the noise draws to compile.
    args.epochs, args.batch_size, args.hidden = 2, 32, 0
  args.sizes = (64, args.hidden, 10) if args.hidden else (64, 10)
  os.makedirs(args.out, exist_ok=True)

  data = load_data(args.smoke)
  n = len(data[0])
  sample_rate = args.batch_size / n
  steps_per_epoch = n // args.batch_size
  steps = args.epochs * steps_per_epoch
  sigma = clipjax.calibrate_noise(args.epsilon, DELTA, sample_rate, steps)
  epsilons = [
    clipjax.dp_epsilon(sigma, sample_rate, (e + 1) * steps_per_epoch, DELTA)
    for e in range(args.epochs)
  ]
  print(
    f"n = {n}, batch {args.batch_size} (q = {sample_rate:.4f}), {steps} steps: "
    f"noise multiplier σ = {sigma:.4f} for ε = {epsilons[-1]:.3f}, δ = {DELTA:g}"
  )

  params = init_params(args.seed, args.sizes)
  probe = (data[0][: args.batch_size], data[1][: args.batch_size])
  flat = "flat"
  if _clipped_grad_available(params, *probe, args.clip_norm):
    flat = "flat_clipped_grad"
    if not args.smoke:
      compare_step_times(params, *probe, args.clip_norm)
  else:
    print("clipjax.clipped_grad not available: the flat run uses vmap per-example gradients")

  histories = {}
  for i, method in enumerate((flat, "bias_corrected", "adaptive")):
    histories[method] = train(method, args, data, sigma, epsilons, jax.random.key(100 + i))

  print(
    f"\n{'method':20s} {'σ':>7s} {'ε':>6s} {'test acc':>9s} {'clip norm':>10s} "
    f"{'clipped':>8s} {'bias':>8s} {'cosine':>7s}"
  )
  for method, h in histories.items():
    print(
      f"{method:20s} {sigma:7.3f} {h['epsilon'][-1]:6.2f} {h['accuracy'][-1]:9.3f} "
      f"{h['clip_norm'][-1]:10.3f} {h['fraction_clipped'][-1]:8.2f} "
      f"{h['bias_norm'][-1]:8.4f} {h['cosine'][-1]:7.3f}"
    )
  path = os.path.join(args.out, "dp_sgd.png")
  _plot(histories, path)
  print(f"wrote {path}")
  return histories


if __name__ == "__main__":
  main()
