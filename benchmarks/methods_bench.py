"""Which exact solver is fastest where: the data behind ``method="auto"``.

For rows of 1024 to 150528 elements (batch 1 and 32; uniform and Cauchy data;
p = 2) this suite times ``jax.jit(jax.vmap(rescale))`` with ``method="newton"``
and ``method="sort"``, interleaved, next to ``rescale_bench``'s streaming floor.
``sort`` rows add ``ratio_vs_newton``. On CPU the active set wins everywhere; on a
GPU the sort wins on short rows, and ``auto`` switches at
``RescaleConfig.sort_max_row`` (``clipjax/rescaling/_rescale_config.py``).

Run ``python -m benchmarks --only methods [--quick]``, or call ``run(quick)``.
"""

import functools
import itertools
import sys

import jax
import jax.numpy as jnp

import clipjax
from benchmarks import rescale_bench as rb
from benchmarks._timing import interleaved_medians

_FULL = {"rows": (1024, 3072, 8192, 16384, 32768, 65536, 150528), "batches": (1, 32), "repeats": 5}
_QUICK = {"rows": (3072, 16384, 65536), "batches": (32,), "repeats": 3}


def run(quick: bool) -> list[dict]:
  """Times newton and sort at every point; one dict per (point, method).

  Args:
    quick: rows of 3072, 16384 and 65536 elements, batch 32, fewer repeats.

  Returns:
    Dicts like ``rescale_bench.run``'s, named ``methods/<method>/p2/<kind>/<b>x<n>``.
  """
  grid = _QUICK if quick else _FULL
  rows = []
  for batch, n, kind in itertools.product(grid["batches"], grid["rows"], ("uniform", "heavy")):
    print(f"  methods {batch}x{n} {kind}", file=sys.stderr, flush=True)
    x, d = (jnp.asarray(v) for v in rb._data(kind, batch, n))
    eps = jax.jit(jax.vmap(functools.partial(clipjax.max_norm, p=2.0)))(x, d) / 2
    thunks = {m: rb._compiled(rb._vmapped(2.0, m), x, d, eps) for m in ("newton", "sort")}
    medians, _ = interleaved_medians({**thunks, **rb._floor_thunks(x, d)}, grid["repeats"])
    point = rb._rows(medians, batch, n, 2.0, kind, grid["repeats"], suite="methods")
    for row in point:
      if row["method"] == "sort":
        row["ratio_vs_newton"] = row["median_s"] / medians["newton"]
    rows += point
  return rows
