"""The ghost benchmark's candidates, models and table (benchmarks/ghost_bench.py, _zoo.py).

Nothing here times anything: the candidates agree on a tiny MLP, the zoo's newer models
build, and the table and figure take results with and without the optional candidate.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `pytest` (not `python -m pytest`) leaves the root off the path
  sys.path.insert(0, ROOT)

from benchmarks import _zoo, ghost_bench  # noqa: E402


def _tiny_mlp():
  """A 8-16-4 MLP, batch 8, each loss weighted so that some examples clip and some do not
  (three batch arguments)."""
  mlp_loss, params, (x, y) = _zoo._mlp((8, 16, 4), 8, np.random.default_rng(0))

  def loss_fn(params, x, y, weight):
    return weight * mlp_loss(params, x, y)

  return loss_fn, params, (x, y, jnp.logspace(-2, 1, 8, dtype=jnp.float32))


def _rel(a, b):
  diff = sum(float(jnp.sum((u - v) ** 2)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return np.sqrt(diff / sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(b)))


# jax_privacy 2.0 calls optax.global_norm, which optax 0.2.6+ deprecates.
@pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning")
def test_jax_privacy_sums_the_same_clipped_gradients():
  pytest.importorskip("jax_privacy")
  loss_fn, params, batch = _tiny_mlp()
  fns = ghost_bench._candidates(loss_fn, len(batch))
  assert set(fns) == set(ghost_bench._CANDIDATES)
  ours, norms = fns["clipped_grad"](params, *batch)
  assert np.any(norms > 1.0) and np.any(norms < 1.0)  # clipping acts on some examples only
  theirs = fns["jax_privacy"](params, *batch)
  assert jax.tree.structure(theirs) == jax.tree.structure(params)
  assert _rel(theirs, ours) < 1e-5
  assert _rel(theirs, fns["vmap_grad_clip"](params, *batch)) < 1e-5


def test_jax_privacy_is_skipped_where_it_does_not_import(monkeypatch):
  monkeypatch.setattr(ghost_bench, "_jax_privacy", lambda: None)
  assert ghost_bench.candidates() == ("grad", "vmap_grad_clip", "clipped_grad")
  loss_fn, _, batch = _tiny_mlp()
  assert "jax_privacy" not in ghost_bench._candidates(loss_fn, len(batch))


@pytest.mark.parametrize(
  "name", ["vit_small", "lstm_optimized", "lstm_cell", "conv_transpose_decoder"]
)
def test_issue_models_build(name):
  loss_fn, params, batch = _zoo.build(name)
  assert all(a.shape[0] == 32 for a in batch)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out = jax.eval_shape(loss_fn, params, *(a[0] for a in batch))
  assert out.shape == () and out.dtype == jnp.float32


def _rows(with_jax_privacy):
  """Results of one model, as run() returns them (made up)."""
  ratios = {"grad": 1.0, "vmap_grad_clip": 100.0, "clipped_grad": 1.1, "jax_privacy": 120.0}
  if not with_jax_privacy:
    del ratios["jax_privacy"]
  return [
    {
      "model": "m",
      "candidate": c,
      "median_s": 0.002 * r,
      "ratio": r,
      "rss_ratio": 1.5,
      "temp_ratio": 2.0,
      "ratio_vs_per_example": r / 100.0,
      "compile_ratio": 2.5,
    }
    for c, r in ratios.items()
  ]


def test_table_shows_jax_privacy_or_a_dash():
  head, line = ghost_bench.table(_rows(True)).splitlines()
  assert "jax_privacy time" in head
  assert line.split() == [
    *("m", "2.0", "100.00x", "1.50x", "120.00x", "1.10x", "1.50x", "2.00x", "0.01x", "2.50x")
  ]
  assert ghost_bench.table(_rows(False)).splitlines()[1].split()[4] == "-"
  markdown = ghost_bench.table(_rows(False), markdown=True).splitlines()
  assert markdown[0].count("|") == markdown[2].count("|") == 11


def test_plot_with_compile_time(tmp_path):
  pytest.importorskip("matplotlib")
  rows = _rows(True) + [dict(r, model="n") for r in _rows(False)]
  ghost_bench.plot(rows, tmp_path / "large.png", compile_time=True)
  assert (tmp_path / "large.png").stat().st_size > 0
