"""Draws docs/_static/naive_vs_exact.png: why naive rescaling falls short, from clipjax itself.

Left, the picture of Rauber & Bethge (2020, Fig. 1) in two dimensions: a step of length
``eps`` from ``x`` along ``delta``, clipped to the box, lands inside the ``eps``-circle;
the clipped path ``clip(x + t·delta)`` bends along the box's edge, and the scale that
``clipjax.rescale`` finds puts the clipped point on the circle. Right, the same on
28x28 images in [0, 1] with Gaussian directions: the L2 size of the clipped step
against the requested ``eps``.

Run from the repository root (needs matplotlib, the ``examples`` extra):
``python docs/_scripts/naive_vs_exact.py``.
"""

import pathlib

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import clipjax  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "_static" / "naive_vs_exact.png"
COLORS = {"naive": "#d62728", "exact": "#1f77b4", "path": "#7f7f7f"}
LABELS = {"naive": "naive: clip(x + ε·δ/‖δ‖)", "exact": "clipjax.perturb"}


def geometry(ax):
  x = jnp.array([0.55, 0.35])
  delta = jnp.array([1.0, 0.35])
  eps = 0.6
  naive_step = x + eps * delta / jnp.linalg.norm(delta)
  naive = jnp.clip(naive_step, 0.0, 1.0)
  eta = clipjax.rescale(x, delta, eps)
  exact = clipjax.perturb(x, delta, eps)
  t = jnp.linspace(0.0, 1.5 * float(eta), 200)
  path = jnp.clip(x + t[:, None] * delta, 0.0, 1.0)

  ax.add_patch(plt.Rectangle((0, 0), 1, 1, fill=False, lw=1.5, color="black"))
  ax.add_patch(plt.Circle(x, eps, fill=False, ls="--", color="black", lw=1))
  ax.plot(*path.T, color=COLORS["path"], lw=2, label="clip(x + t·δ), t ≥ 0")
  ax.annotate("", naive_step, x, arrowprops=dict(arrowstyle="->", color=COLORS["naive"], lw=1.5))
  ax.plot(*naive_step, "o", mfc="none", color=COLORS["naive"])
  ax.plot(*jnp.stack([naive_step, naive]).T, ":", color=COLORS["naive"])
  for name, point in (("naive", naive), ("exact", exact)):
    size = jnp.linalg.norm(point - x)
    ax.plot(*point, "o", color=COLORS[name], label=f"{LABELS[name]}: ‖step‖ = {size:.3f}")
  ax.plot(*x, "ko")
  ax.annotate("x", x, textcoords="offset points", xytext=(-12, -4))
  ax.annotate("x + ε·δ/‖δ‖", naive_step, textcoords="offset points", xytext=(-20, 10))
  ax.set(xlim=(-0.1, 1.3), ylim=(-0.3, 1.1), aspect="equal")
  ax.set_title(f"A step of size ε = {eps} in [0, 1]²")
  ax.legend(loc="lower left", fontsize=8)


def images(ax):
  n, batch = 28 * 28, 256
  x = jax.random.uniform(jax.random.key(0), (batch, n))
  delta = jax.random.normal(jax.random.key(1), (batch, n))
  eps = jnp.linspace(0.25, 8.0, 32)

  def naive_size(e):
    step = jnp.clip(x + e * delta / jnp.linalg.norm(delta, axis=1, keepdims=True), 0.0, 1.0)
    return jnp.linalg.norm(step - x, axis=1)

  def exact_size(e):
    y = jax.vmap(clipjax.perturb, in_axes=(0, 0, None))(x, delta, e)
    return jnp.linalg.norm(y - x, axis=1)

  for name, size in (("naive", naive_size), ("exact", exact_size)):
    sizes = jax.lax.map(size, eps)  # (len(eps), batch)
    low, high = jnp.min(sizes, axis=1), jnp.max(sizes, axis=1)
    ax.fill_between(eps, low, high, color=COLORS[name], alpha=0.3, lw=0)
    ax.plot(eps, jnp.median(sizes, axis=1), color=COLORS[name], label=LABELS[name])
  ax.plot(eps, eps, ":", color="black", lw=1, label="requested")
  ax.set(
    xlabel="requested L2 size ε",
    ylabel="L2 size of the clipped step",
    title=f"{batch} inputs of 28×28 in [0, 1], Gaussian δ",
  )
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)


def main():
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4))
  geometry(left)
  images(right)
  fig.tight_layout()
  fig.savefig(OUT, dpi=100)
  print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
  main()
