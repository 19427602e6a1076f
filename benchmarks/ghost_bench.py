"""Cost of one DP-SGD gradient relative to a non-private gradient, on the model zoo.

For every model of ``benchmarks/_zoo.py`` (two MLPs, the CNN of issue 14 and its small
variant, the tied-embedding transformer, a depthwise-separable CNN), three candidates:

* ``grad``: non-private ``jax.grad`` of the summed loss (the baseline);
* ``vmap_grad_clip``: ``jax.vmap(jax.grad)``, ``clipjax.per_example_clip``, sum;
* ``clipped_grad``: ``clipjax.clipped_grad``.

Time: all three compiled in one process; each private candidate timed interleaved
with the baseline (medians over repeats), ``vmap_grad_clip`` in a pair of its own so
that its traffic does not slow the fast candidates. Memory: each (model, candidate)
in a fresh process, which compiles and runs the step once, hands the memory the
compiler freed back to the system (``malloc_trim``: glibc keeps it otherwise, and a
larger program would look larger forever), resets the peak resident set size
(``/proc/self/clear_refs``) and runs the step again: ``peak_rss_mb`` is the process's
peak during that step (runtime, executable, parameters and data included),
``temp_mb`` XLA's temporary buffers for the step. Ratios are against ``grad`` of the
same model.

``python -m benchmarks --only ghost [--quick]`` records the rows; ``python -m
benchmarks.ghost_bench [--quick]`` prints the table (as Markdown with ``--markdown``);
``python -m benchmarks.ghost_bench --plot RESULTS.json OUT.png`` draws them.
"""

import ctypes
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import clipjax
from benchmarks import _zoo
from benchmarks._timing import interleaved_medians

_CLIP_NORM = 1.0
_CANDIDATES = ("grad", "vmap_grad_clip", "clipped_grad")
# Quick mode: the small models, fewer repeats.
_QUICK = ("mlp_64_256_256_10", "cnn_small")


def _candidates(loss_fn, n_batch):
  axes = (None,) + (0,) * n_batch

  def grad(params, *batch):
    return jax.grad(lambda p: jnp.sum(jax.vmap(loss_fn, axes)(p, *batch)))(params)

  def vmap_grad_clip(params, *batch):
    grads = jax.vmap(jax.grad(loss_fn), axes)(params, *batch)
    clipped = clipjax.per_example_clip(grads, _CLIP_NORM)[0]
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), clipped)

  fns = {
    "grad": grad,
    "vmap_grad_clip": vmap_grad_clip,
    "clipped_grad": clipjax.clipped_grad(loss_fn, _CLIP_NORM),
  }
  return {name: jax.jit(fn) for name, fn in fns.items()}


def _peak_rss_mb():
  with open("/proc/self/status") as f:
    status = f.read()
  return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def _measure_memory(model, candidate):
  """In this (fresh) process: the step's peak RSS and XLA temporary buffers, in MB."""
  loss_fn, params, batch = _zoo.build(model)
  fn = _candidates(loss_fn, len(batch))[candidate]
  compiled = fn.lower(params, *batch).compile()
  jax.block_until_ready(compiled(params, *batch))
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
  jax.block_until_ready(compiled(params, *batch))
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  return {"peak_rss_mb": _peak_rss_mb(), "temp_mb": temp}


def _memory(model, candidate):
  env = dict(os.environ, JAX_ENABLE_X64="0")
  out = subprocess.run(
    [sys.executable, "-m", "benchmarks.ghost_bench", "--memory", model, candidate],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def _bench_model(model, repeats):
  loss_fn, params, batch = _zoo.build(model)
  fns = _candidates(loss_fn, len(batch))
  for fn in fns.values():
    jax.block_until_ready(fn(params, *batch))
  thunks = {name: (lambda fn=fn: fn(params, *batch)) for name, fn in fns.items()}
  # Each private candidate is timed against its own interleaved baseline: the
  # per-example path moves gigabytes on the larger models, and interleaved with the
  # fast candidates it would slow whichever ran next.
  fast, _ = interleaved_medians({c: thunks[c] for c in ("grad", "clipped_grad")}, repeats)
  slow, _ = interleaved_medians({c: thunks[c] for c in ("grad", "vmap_grad_clip")}, repeats // 2)
  ratios = {
    "grad": 1.0,
    "clipped_grad": fast["clipped_grad"] / fast["grad"],
    "vmap_grad_clip": slow["vmap_grad_clip"] / slow["grad"],
  }
  medians = {**slow, **fast}
  memory = {c: _memory(model, c) for c in _CANDIDATES}
  rows = []
  for c in _CANDIDATES:
    rows.append(
      {
        "name": f"{model}/{c}",
        "model": model,
        "candidate": c,
        "batch": int(jax.tree.leaves(batch)[0].shape[0]),
        "parameters": int(sum(np.size(p) for p in jax.tree.leaves(params))),
        "repeats": repeats,
        "baseline": f"{model}/grad",
        "median_s": medians[c],
        "baseline_median_s": medians["grad"],
        "ratio": ratios[c],
        "ratio_vs_per_example": ratios[c] / ratios["vmap_grad_clip"],
        **memory[c],
        "rss_ratio": memory[c]["peak_rss_mb"] / memory["grad"]["peak_rss_mb"],
        "temp_ratio": memory[c]["temp_mb"] / max(memory["grad"]["temp_mb"], 1e-9),
      }
    )
  return rows


def run(quick: bool) -> list[dict]:
  """Times and measures every candidate on the zoo; one dict per (model, candidate).

  Args:
    quick: the two small models only, fewer repeats.

  Returns:
    Dicts with ``name``, ``baseline``, ``median_s``, ``baseline_median_s``, ``ratio``
    (time over the non-private baseline's), ``ratio_vs_per_example``, ``peak_rss_mb``,
    ``rss_ratio``, ``temp_mb``, ``temp_ratio`` and the setup.
  """
  models = _QUICK if quick else tuple(_zoo.MODELS)
  rows = []
  for model in models:
    print(f"  ghost: {model}", file=sys.stderr, flush=True)
    rows += _bench_model(model, repeats=5 if quick else 15)
  return rows


def table(rows, markdown=False) -> str:
  """One line per model: time and peak-memory ratios of both private candidates."""
  by_model = {}
  for r in rows:
    by_model.setdefault(r["model"], {})[r["candidate"]] = r
  head = (
    "model",
    "grad ms",
    "vmap time",
    "vmap RSS",
    "clipped_grad time",
    "clipped_grad RSS",
    "clipped_grad temp",
    "vs vmap",
  )
  lines = []
  for model, c in by_model.items():
    v, g = c["vmap_grad_clip"], c["clipped_grad"]
    lines.append(
      (
        model,
        f"{1e3 * c['grad']['median_s']:.1f}",
        f"{v['ratio']:.2f}x",
        f"{v['rss_ratio']:.2f}x",
        f"{g['ratio']:.2f}x",
        f"{g['rss_ratio']:.2f}x",
        f"{g['temp_ratio']:.2f}x",
        f"{g['ratio_vs_per_example']:.2f}x",
      )
    )
  if markdown:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
  widths = [max(len(x) for x in col) for col in zip(head, *lines)]
  return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def plot(rows, path) -> None:
  """Time and peak memory of both private candidates over the non-private step, per model."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = list(dict.fromkeys(r["model"] for r in rows))
  by = {(r["model"], r["candidate"]): r for r in rows}
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  labels = {"vmap_grad_clip": "vmap(grad) + per_example_clip", "clipped_grad": "clipped_grad"}
  for ax, key, title in zip(axes, ("ratio", "rss_ratio"), ("time", "peak memory")):
    for k, c in enumerate(labels):
      values = [by[m, c][key] for m in models]
      ax.barh([i + 0.4 * k for i in range(len(models))], values, 0.4, label=labels[c])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.3, color="k", lw=0.8, ls="--")
    ax.set(xscale="log", title=f"{title}, relative to non-private jax.grad")
    ax.grid(True, axis="x", which="both", alpha=0.3)
  axes[0].set_yticks([i + 0.2 for i in range(len(models))], models)
  axes[0].invert_yaxis()
  handles, names = axes[0].get_legend_handles_labels()
  fig.legend(handles, names, loc="lower center", ncol=2, fontsize=9)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _main(argv):
  if argv[:1] == ["--memory"]:
    print(json.dumps(_measure_memory(*argv[1:3])))
    return
  if argv[:1] == ["--plot"]:  # --plot RESULTS.json OUT.png
    with open(argv[1]) as f:
      plot(json.load(f)["rows"], argv[2])
    return
  print(table(run("--quick" in argv), markdown="--markdown" in argv))


if __name__ == "__main__":
  _main(sys.argv[1:])
