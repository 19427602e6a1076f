"""Newton's sampled start against its cold start, on rows around the threshold.

``clipjax.rescale`` starts Newton on rows of at least ``RescaleConfig.sample_min_row``
elements (2^17) from the solution of a strided sample (``_solvers.sample_probe``). For rows on both
sides of that threshold this suite times ``jax.jit(jax.vmap(rescale))`` both
ways, in one process and interleaved, next to ``rescale_bench``'s streaming floor:

* ``sampled``: every row starts from its sample (``sample_min_row`` lowered to the row's
  length);
* ``cold``: no row samples (``sample_min_row`` raised past it).

Each row's ``ratio`` is over the floor; ``sampled`` rows add ``ratio_vs_cold`` and
``max_rel_diff_vs_cold``. Data kinds and eps are ``rescale_bench``'s.

Run ``python -m benchmarks --only sampling [--quick]``, or call ``run(quick)``.
"""

import functools
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

import clipjax
from benchmarks import rescale_bench as rb
from benchmarks._timing import interleaved_medians

_FULL = {
  "points": [(32, 1 << 14), (32, 1 << 16), (32, 150528), (1, 4_000_000)],
  "kinds": rb._KINDS,
  "ps": (1.0, 2.0),
  "repeats": 5,
}
_QUICK = {"points": [(32, 150528)], "kinds": ("heavy",), "ps": (2.0,), "repeats": 3}


def _forced(p, x, d, eps, min_row):
  """The vmapped call compiled with ``sample_min_row = min_row``."""
  patched = rb._patched(p, x, d, eps, sample_min_row=min_row)
  return patched or rb._compiled(rb._vmapped(p, "auto"), x, d, eps)


def run(quick: bool) -> list[dict]:
  """Times the sampled and the cold start at every point; one dict per (point, start).

  Args:
    quick: one point (32 × 150528, Cauchy directions, p = 2) with fewer repeats.

  Returns:
    Dicts like ``rescale_bench.run``'s, named ``sampling/<start>/p<p>/<kind>/<b>x<n>``.
  """
  grid = _QUICK if quick else _FULL
  rows = []
  for (batch, n), kind in itertools.product(grid["points"], grid["kinds"]):
    x, d = (jnp.asarray(v) for v in rb._data(kind, batch, n))
    for p in grid["ps"]:
      print(f"  sampling {batch}x{n} {kind} p={rb._p_name(p)}", file=sys.stderr, flush=True)
      eps = jax.jit(jax.vmap(functools.partial(clipjax.max_norm, p=p)))(x, d) / 2
      thunks = {
        "sampled": _forced(p, x, d, eps, n),
        "cold": _forced(p, x, d, eps, n + 1),
        **rb._floor_thunks(x, d),
      }
      medians, outputs = interleaved_medians(thunks, grid["repeats"])
      point = rb._rows(medians, batch, n, p, kind, grid["repeats"], suite="sampling")
      for row in point:
        if row["method"] == "sampled":
          row["ratio_vs_cold"] = row["median_s"] / medians["cold"]
          cold = np.asarray(outputs["cold"])
          row["max_rel_diff_vs_cold"] = float(
            np.max(np.abs(np.asarray(outputs["sampled"]) - cold) / cold)
          )
      rows += point
    del x, d
  return rows
