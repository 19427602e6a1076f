"""Cost of ``jax.jit(jax.vmap(clipjax.rescale))`` against a streaming floor and baselines.

For every grid point (batch size, vector size, p, data kind) the candidates below
are compiled first, then timed interleaved in one process (``block_until_ready``,
medians over repeats):

* ``auto``: ``clipjax.rescale`` with its default solver (the active set), vmapped
  with per-example eps;
* ``sort``, ``bisect``: the same call with ``method="sort"`` / ``"bisect"``;
* ``floor``: one fused streaming pass over the same ``(x, delta)``, the least any
  exact solver must spend, timed in five forms that XLA:CPU compiles differently:
  a ``jnp.sum`` per row, a plain ``lax.reduce`` per row, one ``jnp.sum`` over
  the whole batch (per-row reductions of a few long rows run on one core), chunks
  of eight summed by a variadic ``lax.reduce`` fused with the elementwise work,
  then summed whole (the form ``clipjax.rescale``'s passes use), and those chunks
  one row at a time. Every row's ``ratio`` is against the fastest, named in
  ``floor_impl``;
* ``bisect40``: 40 halvings of eta on ``[0, largest breakpoint]``, the iterative
  baseline the paper replaces (written here, vmapped);
* ``numpy``: the paper's algorithm in float32 NumPy (sort the breakpoints,
  cumulative sums), vectorized over the batch (written here);
* ``unbatched``: ``jax.jit(clipjax.rescale)`` called on each row in turn, to check
  that vmap costs no more per element (batch 32, every kind);
* ``lockstep``: the vmapped call with the batched solver forced to run the whole
  batch in lockstep, where the CPU default solves one row at a time (batch 32,
  rows of at least ``RescaleConfig.row_elements``; shorter rows already run in
  lockstep).

Data kinds: ``uniform`` (x in [0, 1], Gaussian delta), ``sparse`` (x = 0 on ~80%
of coordinates, like mostly-black images), ``sign`` (delta = ±1) and ``heavy``
(Cauchy delta). eps is half of each example's largest reachable norm, so clipping
matters. For p = inf every method is the same closed form, so only ``auto``,
``floor`` and ``bisect40`` run. ``sort``, ``bisect``, ``bisect40`` and ``numpy``
take seconds per call past ``_COMPARE_MAX_ELEMENTS`` elements per batch and are
skipped there; batch 128 × 4M (2 GB per operand) is skipped entirely. Each row
records ``max_rel_diff_vs_auto``: the float32 NumPy reference's cumulative sums
lose heavy-tailed data, and 40 value halvings cannot resolve eta when the largest
breakpoint is far above it (heavy tails again).

Run ``python -m benchmarks --only rescale [--quick]``, or call ``run(quick)``.
"""

import dataclasses
import functools
import itertools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import clipjax
from benchmarks._timing import interleaved_medians
from clipjax.rescaling import _eta, _rescale_config

_KINDS = ("uniform", "sparse", "sign", "heavy")
# (batch, n, data kinds) points of the grid.
_FULL = {
  "points": [
    (b, n, _KINDS)
    for b, n in itertools.product((1, 32, 128), (3072, 150528, 4_000_000))
    if (b, n) != (128, 4_000_000)
  ],
  "ps": (1.0, 2.0, math.inf),
  "repeats": 5,
}
# The sort alone takes ~10 s at 32 × 150528, so quick mode runs one kind there.
_QUICK = {
  "points": [(1, 3072, ("uniform", "sparse")), (32, 150528, ("uniform",))],
  "ps": (2.0, math.inf),
  "repeats": 3,
}
# The full grid's sizes on an accelerator, with two kinds and p = 2 only, so that it
# fits the few minutes a lent GPU gives (compiling dominates there).
_ACCELERATOR = {
  "points": [(b, n, ("uniform", "heavy")) for b, n, _ in _FULL["points"]],
  "ps": (2.0,),
  "repeats": 5,
}
# 32 × 150528 (ImageNet-sized rows): the sort takes ~2 s a call here on CPU.
_COMPARE_MAX_ELEMENTS = 32 * 150528
_BISECT_STEPS = 40


def _p_name(p):
  return "inf" if p == math.inf else f"{p:g}"


def _data(kind, batch, n, seed=0):
  """Float32 (x, delta) of shape (batch, n), generated without float64 temporaries."""
  rng = np.random.default_rng(seed)
  shape = (batch, n)
  x = rng.random(shape, dtype=np.float32)
  if kind == "sparse":
    x[rng.random(shape, dtype=np.float32) < 0.8] = 0
  if kind == "sign":
    d = np.where(rng.random(shape, dtype=np.float32) < 0.5, -1, 1).astype(np.float32)
  elif kind == "heavy":
    denom = rng.standard_normal(shape, dtype=np.float32)
    d = rng.standard_normal(shape, dtype=np.float32) / np.where(denom == 0, 1, denom)
  else:
    d = rng.standard_normal(shape, dtype=np.float32)
  return x, d


def _floor_sum(x, d):
  return jnp.sum(jnp.where(d >= 0, 1 - x, x) * jnp.abs(d), axis=-1)


def _floor_reduce(x, d):
  """The same pass as one plain ``lax.reduce``, which XLA:CPU emits as its own loop."""
  return lax.reduce(jnp.where(d >= 0, 1 - x, x) * jnp.abs(d), 0.0, lax.add, (x.ndim - 1,))


def _floor_total(x, d):
  """The same pass summed over the whole batch at once."""
  return jnp.sum(jnp.where(d >= 0, 1 - x, x) * jnp.abs(d))


def _floor_chunked(x, d):
  """The same pass in chunks of eight, as a variadic ``lax.reduce`` (of the terms twice).

  XLA:CPU fuses that with the elementwise work, where it hands a plain sum to a
  library that reads its operand from memory; the sum of the chunks is small.
  """
  t = jnp.where(d >= 0, 1 - x, x) * jnp.abs(d)
  n = t.shape[-1] // 8 * 8
  chunks = t[..., :n].reshape(t.shape[:-1] + (-1, 8))
  part, _ = lax.reduce(
    (chunks, chunks), (0.0, 0.0), lambda u, v: (u[0] + v[0], u[1] + v[1]), (t.ndim,)
  )
  return jnp.sum(part) + jnp.sum(t[..., n:])  # whole, as in _floor_total


def _floor_rows(x, d):
  """``_floor_chunked`` on one row at a time (``lax.map``): batches too large for the
  cache stream faster this way (clipjax solves rows of 2^17 and more so), and so
  do many short rows, whose loop runs without the thread pool."""
  return lax.map(lambda row: _floor_chunked(*row), (x, d))


_FLOORS = {
  "sum": _floor_sum,
  "reduce": _floor_reduce,
  "total": _floor_total,
  "chunked": _floor_chunked,
  "rows": _floor_rows,
}


def _floor_thunks(x, d):
  return {f"floor_{name}": _compiled(fn, x, d) for name, fn in _FLOORS.items()}


def _bisect40(x, d, eps, p):
  """Value bisection on eta: the iterative baseline, one pass over the row per halving."""
  room = jnp.where(d >= 0, 1 - x, x)
  ad = jnp.abs(d)
  hi = jnp.max(jnp.where(ad > 0, room / jnp.where(ad > 0, ad, 1), 0))

  def norm(eta):
    moved = jnp.minimum(eta * ad, room)
    return jnp.max(moved) if p == math.inf else jnp.sum(moved**p) ** (1 / p)

  def halve(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) / 2
    short = norm(mid) < eps
    return jnp.where(short, mid, lo), jnp.where(short, hi, mid)

  return lax.fori_loop(0, _BISECT_STEPS, halve, (jnp.zeros_like(hi), hi))[1]


def _numpy_sort(x, d, eps, p):
  """The paper's algorithm in NumPy: F(eta^p) at every sorted breakpoint, then one piece."""
  room = np.where(d >= 0, 1 - x, x)
  ad = np.abs(d)
  moving = ad > 0
  r = np.where(moving, room / np.where(moving, ad, 1), np.inf)
  order = np.argsort(r, axis=-1)
  r = np.take_along_axis(r, order, axis=-1)
  a = np.take_along_axis(ad, order, axis=-1) ** p
  b = np.take_along_axis(np.where(moving, room, 0), order, axis=-1) ** p
  saturated = np.cumsum(b, axis=-1)
  free_after = a.sum(axis=-1, keepdims=True) - np.cumsum(a, axis=-1)
  # Past the last moving coordinate r is inf and nothing is free: F is flat there.
  at_break = saturated + np.where(np.isfinite(r), r**p * free_after, 0)
  target = (eps**p)[:, None]
  k = np.argmax(at_break >= target, axis=-1)[:, None]
  before = np.where(k > 0, np.take_along_axis(saturated, np.maximum(k - 1, 0), axis=-1), 0)
  free = np.take_along_axis(free_after + a, k, axis=-1)
  return (((target - before) / free) ** (1 / p))[:, 0]


def _compiled(fn, *args):
  """A thunk running ``jax.jit(fn)`` compiled ahead of time for ``args``."""
  compiled = jax.jit(fn).lower(*args).compile()
  return lambda: compiled(*args)


def _vmapped(p, method):
  return jax.vmap(functools.partial(clipjax.rescale, p=p, method=method))


def _patched(p, x, d, eps, **changes):
  """The vmapped default with the backend's ``RescaleConfig`` changed by ``changes``, or
  None where that lowers to the default's program."""
  default = jax.jit(_vmapped(p, "auto")).lower(x, d, eps).as_text()
  config = dataclasses.replace(_rescale_config.default(), **changes)
  solve = lambda x, d, e: _eta.solve_eta(
    x, d, e, p=p, lower=0.0, upper=1.0, method="auto", config=config
  )[0]
  lowered = jax.jit(jax.vmap(solve)).lower(x, d, eps)
  if lowered.as_text() == default:
    return None
  compiled = lowered.compile()
  return lambda: compiled(x, d, eps)


def _unbatched(p, x, d, eps):
  """``jax.jit(rescale)`` over every row in turn (dispatch is part of its cost)."""
  rows = [(x[i], d[i], eps[i]) for i in range(x.shape[0])]
  compiled = jax.jit(functools.partial(clipjax.rescale, p=p)).lower(*rows[0]).compile()
  return lambda: [compiled(*row) for row in rows]


def _candidates(p, x, d, eps, host, extras):
  """Thunks to time for one grid point, keyed by method name."""
  finite = p != math.inf
  compare = x.size <= _COMPARE_MAX_ELEMENTS
  thunks = {
    "auto": _compiled(_vmapped(p, "auto"), x, d, eps),
    **_floor_thunks(x, d),
  }
  if compare and finite:
    thunks["sort"] = _compiled(_vmapped(p, "sort"), x, d, eps)
    thunks["bisect"] = _compiled(_vmapped(p, "bisect"), x, d, eps)
    thunks["numpy"] = lambda: _numpy_sort(*host, p)
  if compare:
    thunks["bisect40"] = _compiled(jax.vmap(functools.partial(_bisect40, p=p)), x, d, eps)
  if extras:
    thunks["unbatched"] = _unbatched(p, x, d, eps)
    lockstep = _patched(p, x, d, eps, row_by_row=False) if finite else None
    if lockstep is not None:
      thunks["lockstep"] = lockstep
  return thunks


def _rows(medians, batch, n, p, kind, repeats, suite="rescale"):
  """One row per candidate, named ``<suite>/<method>/...``; ratios are medians over
  the floor's (and sort's, NumPy's)."""
  floors = {m: medians.pop(f"floor_{m}") for m in _FLOORS}
  floor_impl = min(floors, key=floors.get)
  medians["floor"] = floors[floor_impl]
  rows = []
  for method, median in medians.items():
    if method == "floor":
      continue
    row = {
      "name": f"{suite}/{method}/p{_p_name(p)}/{kind}/{batch}x{n}",
      "method": method,
      "p": _p_name(p),
      "kind": kind,
      "batch": batch,
      "n": n,
      "repeats": repeats,
      "median_s": median,
      "baseline": "floor",
      "baseline_median_s": medians["floor"],
      "floor_impl": floor_impl,
      **{f"floor_{m}_s": t for m, t in floors.items()},
      "ratio": median / medians["floor"],
    }
    for other in ("sort", "numpy", "bisect40"):
      if other in medians and other != method:
        row[f"ratio_vs_{other}"] = median / medians[other]
    if method == "unbatched":  # both time the whole batch: the ratio is per element
      row["ratio_vs_vmap_per_element"] = median / medians["auto"]
    if method == "lockstep":
      row["ratio_vs_auto"] = median / medians["auto"]
    rows.append(row)
  return rows


def _grid_point(x, d, eps_host, host, batch, n, p, kind, repeats, extras):
  eps = jnp.asarray(eps_host)
  thunks = _candidates(p, x, d, eps, (*host, eps_host), extras)
  medians, outputs = interleaved_medians(thunks, repeats)
  rows = _rows(medians, batch, n, p, kind, repeats)
  # Sanity: every exact solver agrees with auto (bisect40 to its 40 halvings).
  reference = np.asarray(outputs["auto"])
  for row in rows:
    out = np.asarray([np.asarray(v) for v in outputs[row["method"]]]).reshape(reference.shape)
    row["max_rel_diff_vs_auto"] = float(
      np.max(np.abs(out - reference) / np.maximum(reference, 1e-30))
    )
  return rows


def run(quick: bool) -> list[dict]:
  """Times every candidate on every grid point; returns one dict per (point, method).

  Args:
    quick: a reduced grid (1 × 3072 with uniform and sparse data, 32 × 150528
      with uniform data; p = 2 and inf) with fewer repeats, in about a minute.
      Otherwise the full grid on CPU, and on an accelerator its sizes with
      uniform and Cauchy data at p = 2.

  Returns:
    Dicts with ``name``, ``method``, ``p``, ``kind``, ``batch``, ``n``,
    ``median_s``, ``baseline`` (``"floor"``), ``baseline_median_s``, ``ratio``,
    ``ratio_vs_sort`` / ``ratio_vs_numpy`` / ``ratio_vs_bisect40`` where those
    ran, ``ratio_vs_vmap_per_element`` (unbatched rows, per element),
    ``ratio_vs_auto`` (lockstep rows) and ``max_rel_diff_vs_auto``.
  """
  grid = _QUICK if quick else _FULL if jax.default_backend() == "cpu" else _ACCELERATOR
  rows = []
  for batch, n, kind in [(b, n, k) for b, n, kinds in grid["points"] for k in kinds]:
    host = _data(kind, batch, n)
    x, d = jnp.asarray(host[0]), jnp.asarray(host[1])
    extras = batch == 32 and (not quick or kind == "uniform")
    for p in grid["ps"]:
      print(f"  rescale {batch}x{n} {kind} p={_p_name(p)}", file=sys.stderr, flush=True)
      reach = jax.jit(jax.vmap(functools.partial(clipjax.max_norm, p=p)))(x, d)
      eps_host = np.asarray(reach) / 2
      rows += _grid_point(x, d, eps_host, host, batch, n, p, kind, grid["repeats"], extras)
    del x, d, host
  return rows


_PLOT_METHODS = ("floor", "auto", "unbatched", "bisect", "bisect40", "numpy", "sort")


def plot(rows: list[dict], path: str) -> None:
  """Log-log time against vector size per method: one panel per p, batch 32, uniform data."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  picked = [r for r in rows if r["batch"] == 32 and r["kind"] == "uniform"]
  for r in [r for r in picked if r["method"] == "auto"]:  # the floor is every row's baseline
    picked.append(dict(r, method="floor", median_s=r["baseline_median_s"]))
  ps = sorted({r["p"] for r in picked}, key=float)
  fig, axes = plt.subplots(1, len(ps), figsize=(4.5 * len(ps), 4), squeeze=False, sharey=True)
  # One colour per method across panels, so a single legend serves them all.
  colours = dict(zip(_PLOT_METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  labels = {"unbatched": "unbatched (32 calls)", "floor": "floor (1 pass)"}
  for ax, p in zip(axes[0], ps):
    for method in _PLOT_METHODS:
      pts = sorted((r["n"], r["median_s"]) for r in picked if r["p"] == p and r["method"] == method)
      if pts:
        style = "--" if method == "floor" else "-"
        ax.plot(
          *zip(*pts), style, marker="o", color=colours[method], label=labels.get(method, method)
        )
    ax.set(xscale="log", yscale="log", xlabel="vector size n", title=f"p = {p}")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("median seconds per call, batch 32")
  handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
  fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), fontsize=8)
  fig.suptitle("jit(vmap(rescale)), uniform x, Gaussian delta", y=0.02, va="bottom", fontsize=9)
  fig.tight_layout(rect=(0, 0.04, 1, 0.92))
  # A one-panel figure (p = 2 only) is narrower than the legend: keep all of it.
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
