"""Clipping bias and its correction on Chen, Wu & Hong's one-dimensional example.

Two examples with losses ½(x − a_i)², a = (−3, 3), have per-example gradients
x − a_i; their mean x points to the optimum 0. Clipped at C = 1 the mean
clipped gradient is (clamp(x + 3) + clamp(x − 3)) / 2, which vanishes on all
of [−2, 2]: every such x looks stationary. Adding symmetric noise k·ζ before
clipping (``clipjax.dp_aggregate(..., pre_clip_noise=k)``) makes the expected
clipped gradient point back to 0 again (about 0.0413 at x = 1, k = 1).

The script estimates E[mean clipped gradient] with the library (Monte Carlo:
many independent copies of the two examples in one batch, each with its own
ζ), compares it with the closed form, prints a table and writes
``clipping_bias.png``.

    python examples/clipping_bias.py [--out examples/out] [--smoke]

Reference: Chen, Wu & Hong, "Understanding Gradient Clipping in Private SGD: A
Geometric Perspective", NeurIPS 2020.
"""

import math
import os

import _cli  # examples/ is on sys.path when run as a script
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import clipjax

A = (-3.0, 3.0)
CLIP_NORM = 1.0
KS = (0.0, 0.5, 1.0, 2.0)
TABLE_XS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def _cdf(t):
  return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def _pdf(t):
  return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def expected_clipped(g, k):
  """E[clamp(g + k·ζ, −1, 1)] for ζ ~ N(0, 1): C = 1 clipping of a scalar."""
  if k == 0:
    return min(max(g, -1.0), 1.0)
  lo, hi = (-1 - g) / k, (1 - g) / k
  inside = g * (_cdf(hi) - _cdf(lo)) + k * (_pdf(lo) - _pdf(hi))
  return -_cdf(lo) + (1 - _cdf(hi)) + inside


def closed_form(x, k):
  """The expected mean clipped gradient of the two losses at x."""
  return sum(expected_clipped(x - a, k) for a in A) / len(A)


def make_estimator(draws):
  """Returns ``estimate(x, k, key) -> (mean clipped gradient, standard error)``.

  The mean comes from ``dp_aggregate`` on a batch of ``draws`` copies of the
  two examples, each copy with its own ζ_i. ``k`` is traced, so one
  compilation serves every k (k = 0 draws ζ and adds zero times it).
  """
  a = jnp.tile(jnp.asarray(A, jnp.float32), draws)[:, None]

  @jax.jit
  def estimate(x, k, key):
    tx = clipjax.dp_aggregate(CLIP_NORM, 0.0, key, pre_clip_noise=k)
    grads = x - a
    mean, _ = tx.update(grads, tx.init(None))
    # The pairs are i.i.d., so the spread of pair means (over an independent
    # draw of the same distribution) gives the standard error.
    noisy = grads + k * jax.random.normal(jax.random.fold_in(key, 1), grads.shape)
    pairs = jnp.clip(noisy, -CLIP_NORM, CLIP_NORM).reshape(draws, 2).mean(axis=1)
    return mean[0], jnp.std(pairs) / math.sqrt(draws)

  return estimate


def main(argv=None):
  parser = _cli.parser(__doc__, seed=False)
  parser.add_argument(
    "--draws", type=int, default=400_000, help="Monte Carlo copies of the pair of examples per x"
  )
  parser.add_argument("--points", type=int, default=161, help="grid size on [-4, 4]")
  args = _cli.parse(parser, argv, draws=20_000, points=17)

  xs = np.unique(np.concatenate([np.linspace(-4, 4, args.points), TABLE_XS]))
  estimate = make_estimator(args.draws)
  key = jax.random.key(0)
  results = {}
  with tqdm(total=len(KS) * len(xs), desc="Monte Carlo") as bar:
    for i, k in enumerate(KS):
      mc, err = [], []
      for j, x in enumerate(xs):
        mean, error = estimate(
          jnp.float32(x), jnp.float32(k), jax.random.fold_in(key, i * len(xs) + j)
        )
        mc.append(float(mean))
        err.append(float(error))
        bar.update()
      exact = np.array([closed_form(x, k) for x in xs])
      results[k] = (np.array(mc), np.array(err), exact)

  print(
    f"\nMean clipped gradient (C = {CLIP_NORM:g}, a = {A}); true gradient = x."
    f" Monte Carlo ({args.draws} draws) / closed form:"
  )
  print("     x " + "".join(f"{f'k = {k:g}':>22s}" for k in KS))
  for x in TABLE_XS:
    j = int(np.argmin(np.abs(xs - x)))
    cells = "".join(f"{results[k][0][j]:10.4f} / {results[k][2][j]:8.4f}  " for k in KS)
    print(f"{x:6.2f} {cells}")
  gap = max(float(np.max(np.abs(mc - exact))) for mc, _, exact in results.values())
  error = max(float(np.max(err)) for _, err, _ in results.values())
  print(
    f"largest |Monte Carlo − closed form| over the grid: {gap:.4f} "
    f"(largest standard error {error:.4f})"
  )
  at_one = int(np.argmin(np.abs(xs - 1.0)))
  print(
    f"at x = 1: k = 0 gives {results[0.0][0][at_one]:.4f} (false stationary "
    f"point), k = 1 gives {results[1.0][0][at_one]:.4f} "
    f"(closed form {closed_form(1.0, 1.0):.4f})"
  )

  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for k, (mc, _, exact) in results.items():
    (line,) = ax.plot(xs, exact, label=f"k = {k:g} (closed form)")
    ax.plot(xs[::4], mc[::4], "o", ms=3, color=line.get_color())
  ax.axhline(0, color="gray", lw=0.5)
  ax.set_xlabel("x")
  ax.set_ylabel("mean clipped gradient")
  ax.set_title(
    "Chen et al. 1-D example: clipping bias, corrected by pre-clip noise\n"
    "(dots: clipjax.dp_aggregate Monte Carlo)"
  )
  ax.legend()
  fig.tight_layout()
  path = os.path.join(args.out, "clipping_bias.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  _cli.done(args, path)
  return results


if __name__ == "__main__":
  main()
