"""Cost of one DP-SGD gradient relative to a non-private gradient, on the model zoo.

For every model of ``benchmarks/_zoo.py`` (two MLPs, the CNN of issue 14 and its small
variant, the tied-embedding transformer, a depthwise-separable CNN), four candidates:

* ``grad``: non-private ``jax.grad`` of the summed loss (the baseline);
* ``vmap_grad_clip``: ``jax.vmap(jax.grad)``, ``clipjax.per_example_clip``, sum;
* ``clipped_grad``: ``clipjax.clipped_grad``;
* ``jax_privacy``: jax_privacy 2.0's ``jax_privacy.clipped_grad`` (``l2_clip_norm=1.0``,
  ``keep_batch_dim=False``: the loss of one example, vmapped; each gradient clipped to
  L2 norm 1, summed; no noise), the same sum. Only where ``jax_privacy`` imports (the
  ``bench`` extra); elsewhere its rows are left out and ``table`` shows ``-``.

Time: all candidates compiled in one process; each private candidate timed interleaved
with the baseline (medians over repeats), the per-example ones (``vmap_grad_clip``,
``jax_privacy``) each in a pair of its own, with half the repeats (they take 130 to 250
times the baseline on the MLPs), so that their traffic does not slow the fast candidates.
A row's ``baseline_median_s`` is the baseline's median in its candidate's pair, and
``repeats`` its candidate's count. Memory: each (model, candidate)
in a fresh process, which compiles and runs the step once, hands the memory the
compiler freed back to the system (``malloc_trim``: glibc keeps it otherwise, and a
larger program would look larger forever), resets the peak resident set size
(``/proc/self/clear_refs``) and runs the step again: ``peak_rss_mb`` is the process's
peak during that step (runtime, executable, parameters and data included),
``temp_mb`` XLA's temporary buffers for the step. Ratios are against ``grad`` of the
same model.

Compile time: each candidate's trace, lowering and compilation, in seconds and over
``grad``'s (``compile_ratio``).

``python -m benchmarks --only ghost [--quick] [--large]`` records the rows in
``benchmarks/results/<backend>-ghost[-large][-quick].json`` and draws them next to it
(``.png``; ``--large``: the GPT-2-small- and ViT-B/16-shaped models of ``_zoo.LARGE``
instead of the zoo, tens of minutes on a 2-core CPU, in files of their own, their figure
with compile time too); ``python -m benchmarks.ghost_bench [--quick] [--large]
[--models a,b] [--json]`` prints the table (as Markdown with ``--markdown``; ``--models``
picks models by name, the ``_zoo.EXTRA`` shapes included); ``python -m
benchmarks.ghost_bench --plot RESULTS.json OUT.png`` draws time and peak memory,
``--plot-large [RESULTS.json [OUT.png]]`` time, peak memory and compile time (by
default ``benchmarks/results/cpu-ghost-large.json`` into ``.png`` beside it).
"""

import ctypes
import functools
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import clipjax
from benchmarks import _zoo
from benchmarks._timing import interleaved_medians

_CLIP_NORM = 1.0
_CANDIDATES = ("grad", "vmap_grad_clip", "clipped_grad", "jax_privacy")
# The per-example (vmap) paths: each timed in a pair with the baseline, fewer repeats.
_PER_EXAMPLE = ("vmap_grad_clip", "jax_privacy")
# The figures' candidates, in order, with their labels and colours (clipped_grad's the
# same with or without jax_privacy).
_LABELS = {
  "vmap_grad_clip": ("vmap(grad) + per_example_clip", "C0"),
  "jax_privacy": ("jax_privacy.clipped_grad", "C2"),
  "clipped_grad": ("clipjax.clipped_grad", "C1"),
}
# Quick mode: the small models, fewer repeats.
_QUICK = ("mlp_64_256_256_10", "cnn_small")


def _jax_privacy():
  """The ``jax_privacy`` module, or None where it (or its dp_accounting) is not installed."""
  try:
    import jax_privacy
  except ImportError:
    return None
  return jax_privacy


def candidates() -> tuple[str, ...]:
  """The candidates this environment runs: ``jax_privacy`` only where it imports."""
  return tuple(c for c in _CANDIDATES if c != "jax_privacy" or _jax_privacy() is not None)


def _candidates(loss_fn, n_batch):
  """Every candidate of ``candidates()``, jitted: ``fn(params, *batch)``."""
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
  jp = _jax_privacy()
  if jp is not None:
    # jax_privacy 2.0: vmap over the batch arguments (``keep_batch_dim=False``: each gets
    # one example, as loss_fn takes it), clip_pytree of each gradient to L2 norm
    # l2_clip_norm, sum; no noise, no normalisation. It returns the sum alone.
    clipped = jp.clipped_grad(
      loss_fn,
      l2_clip_norm=_CLIP_NORM,
      batch_argnums=tuple(range(1, n_batch + 1)),
      keep_batch_dim=False,
    )

    def jax_privacy(params, *batch):
      return clipped(params, *batch)

    fns["jax_privacy"] = jax_privacy
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


def _compile(fn, args):
  """The compiled step and the seconds tracing, lowering and compiling it took."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _bench_model(model, repeats):
  loss_fn, params, batch = _zoo.build(model)
  fns = _candidates(loss_fn, len(batch))
  compile_s = {}
  for name, fn in fns.items():
    fns[name], compile_s[name] = _compile(fn, (params, *batch))
    jax.block_until_ready(fns[name](params, *batch))
  thunks = {name: (lambda fn=fn: fn(params, *batch)) for name, fn in fns.items()}
  # Each private candidate is timed against its own interleaved baseline: the
  # per-example paths move gigabytes on the larger models, and interleaved with the
  # fast candidates they would slow whichever ran next. They run with half the repeats
  # (130-250x the baseline on the MLPs).
  counts = {c: max(1, repeats // 2) if c in _PER_EXAMPLE else repeats for c in fns}
  medians, baselines = {}, {}
  for c in ("clipped_grad", *(c for c in _PER_EXAMPLE if c in fns)):
    pair, _ = interleaved_medians({"grad": thunks["grad"], c: thunks[c]}, counts[c])
    medians[c], baselines[c] = pair[c], pair["grad"]
    if c == "clipped_grad":
      medians["grad"] = baselines["grad"] = pair["grad"]
  ratios = {c: medians[c] / baselines[c] for c in fns}
  memory = {c: _memory(model, c) for c in fns}
  rows = []
  for c in fns:
    rows.append(
      {
        "name": f"{model}/{c}",
        "model": model,
        "candidate": c,
        "batch": int(jax.tree.leaves(batch)[0].shape[0]),
        "parameters": int(sum(np.size(p) for p in jax.tree.leaves(params))),
        "repeats": counts[c],
        "baseline": f"{model}/grad",
        "median_s": medians[c],
        "baseline_median_s": baselines[c],
        "ratio": ratios[c],
        "ratio_vs_per_example": ratios[c] / ratios["vmap_grad_clip"],
        **memory[c],
        "rss_ratio": memory[c]["peak_rss_mb"] / memory["grad"]["peak_rss_mb"],
        "temp_ratio": memory[c]["temp_mb"] / max(memory["grad"]["temp_mb"], 1e-9),
        "compile_s": compile_s[c],
        "compile_ratio": compile_s[c] / compile_s["grad"],
      }
    )
  return rows


def run(quick: bool, large: bool = False, models=None) -> list[dict]:
  """Times and measures every candidate on the zoo; one dict per (model, candidate).

  Args:
    quick: the two small models only, fewer repeats.
    large: the large models instead (``_zoo.LARGE``: GPT-2 small and ViT-B/16 shapes;
      tens of minutes on a 2-core CPU), 3 repeats.
    models: these named models (``_zoo.build``'s names) instead.

  Returns:
    Dicts with ``name``, ``model``, ``candidate`` (``candidates()``: ``jax_privacy``
    only where it imports), ``baseline``, ``median_s``, ``baseline_median_s``, ``ratio``
    (time over the non-private baseline's), ``ratio_vs_per_example``, ``peak_rss_mb``,
    ``rss_ratio``, ``temp_mb``, ``temp_ratio``, ``compile_s`` (trace, lower and
    compile), ``compile_ratio`` and the setup.
  """
  if models is None:
    models = tuple(_zoo.LARGE) if large else _QUICK if quick else tuple(_zoo.MODELS)
  repeats = 3 if large else 5 if quick else 15
  rows = []
  for model in models:
    print(f"  ghost: {model}", file=sys.stderr, flush=True)
    rows += _bench_model(model, repeats=repeats)
  return rows


def table(rows, markdown=False) -> str:
  """One line per model: time and peak-memory ratios of the private candidates.

  ``jax_privacy time`` is ``-`` where its rows are missing (not installed, or results
  recorded before it was a candidate), ``compile`` (``clipped_grad``'s) where the
  results hold no compile times.
  """
  by_model = {}
  for r in rows:
    by_model.setdefault(r["model"], {})[r["candidate"]] = r
  head = (
    "model",
    "grad ms",
    "vmap time",
    "vmap RSS",
    "jax_privacy time",
    "clipped_grad time",
    "clipped_grad RSS",
    "clipped_grad temp",
    "vs vmap",
    "compile",
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
        f"{c['jax_privacy']['ratio']:.2f}x" if "jax_privacy" in c else "-",
        f"{g['ratio']:.2f}x",
        f"{g['rss_ratio']:.2f}x",
        f"{g['temp_ratio']:.2f}x",
        f"{g['ratio_vs_per_example']:.2f}x",
        f"{g['compile_ratio']:.2f}x" if "compile_ratio" in g else "-",
      )
    )
  if markdown:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
  widths = [max(len(x) for x in col) for col in zip(head, *lines)]
  return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def plot(rows, path, compile_time=False) -> None:
  """Each private candidate over the non-private step, per model, on a log scale.

  Panels: time and peak memory, and with ``compile_time`` trace-and-compile time (the
  figure of the large models). A candidate without rows (``jax_privacy`` where it was
  not installed) gets no bars, a model without a value no bar.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = list(dict.fromkeys(r["model"] for r in rows))
  by = {(r["model"], r["candidate"]): r for r in rows}
  shown = [c for c in _LABELS if any(r["candidate"] == c for r in rows)]
  panels = [("ratio", "time"), ("rss_ratio", "peak memory")]
  if compile_time:
    panels.append(("compile_ratio", "compile time"))
  width = 0.8 / len(shown)
  height = max(3.0, 1.3 + 0.25 * len(models) * len(shown))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), height), sharey=True)
  for ax, (key, title) in zip(axes, panels):
    for k, c in enumerate(shown):
      at = [(i, by[m, c][key]) for i, m in enumerate(models) if key in by.get((m, c), {})]
      label, color = _LABELS[c]
      ax.barh([i + width * k for i, _ in at], [v for _, v in at], width, label=label, color=color)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.3, color="k", lw=0.8, ls="--")
    ax.set(xscale="log", title=f"{title}, relative to non-private jax.grad")
    ax.grid(True, axis="x", which="both", alpha=0.3)
  axes[0].set_yticks([i + width * (len(shown) - 1) / 2 for i in range(len(models))], models)
  axes[0].invert_yaxis()
  handles, names = axes[0].get_legend_handles_labels()
  fig.legend(handles, names, loc="lower center", ncol=len(shown), fontsize=9)
  fig.tight_layout(rect=(0, 0.1, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


LARGE_RESULTS = os.path.join("benchmarks", "results", "cpu-ghost-large.json")


# Shapes the zoo's layers take: (batch, blocks, positions, L, R).
_CALIBRATION_SHAPES = (
  (32, 1, 64, 128, 512),
  (32, 1, 16, 256, 256),
  (32, 4, 64, 32, 128),
  (32, 1, 64, 128, 2048),
  (32, 1, 256, 64, 64),
  (64, 8, 16, 72, 8),
  (32, 1, 32, 128, 512),
  (32, 1, 128, 64, 256),
  (32, 12, 64, 64, 64),
  (32, 1, 8, 512, 512),
  (64, 1, 256, 27, 16),
  (8, 1, 196, 768, 64),
)


def calibrate(repeats: int = 7) -> dict:
  """The weights of ``clipjax.privacy.ghost._cost`` on the default backend.

  Per shape, each form's whole share of a step is timed, interleaved: the Gram form's
  two ``P x P`` products, their elementwise product and sum, and its clipped-sum
  contraction over examples and positions; the explicit form's per-example gradient,
  its squared norm and its clip-weighted sum over examples. Each is fitted, by
  non-negative least squares on relative errors, as a sum of its multiply-adds (the
  Gram products' and the contraction's apart), its output entries and the factor
  entries it reads, each with its own weight, reported over the explicit form's weight
  per multiply-add.
  """
  from scipy.optimize import nnls

  rows = []
  rng = np.random.default_rng(0)
  hi = jax.lax.Precision.HIGHEST

  @jax.jit
  def gram(a, g, w):
    left = jnp.einsum("bhpl,bhql->bhpq", a, a, precision=hi)
    right = jnp.einsum("bhpr,bhqr->bhpq", g, g, precision=hi)
    norms = jnp.sum(left * right, axis=(1, 2, 3))
    return norms, jnp.einsum("bhpl,bhpr->hlr", a, g * w[:, None, None, None], precision=hi)

  @jax.jit
  def explicit(a, g, w):
    grads = jnp.einsum("bhpl,bhpr->bhlr", a, g, precision=hi)
    norms = jnp.sum(grads * grads, axis=(1, 2, 3))
    return norms, jnp.einsum("b,bhlr->hlr", w, grads, precision=hi)

  for shape in _CALIBRATION_SHAPES:
    a = jnp.asarray(rng.standard_normal(shape[:4]), jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape[:3] + shape[4:]), jnp.float32)
    w = jnp.asarray(rng.uniform(size=shape[0]), jnp.float32)
    thunks = {
      "gram": functools.partial(gram, a, g, w),
      "explicit": functools.partial(explicit, a, g, w),
    }
    for thunk in thunks.values():
      jax.block_until_ready(thunk())
    med, _ = interleaved_medians(thunks, repeats)
    rows.append({"shape": list(shape), **med})
  batch, blocks, p, size_l, size_r = np.array([x["shape"] for x in rows], float).T
  units = batch * blocks
  inputs = units * p * (size_l + size_r)
  t_g = np.array([x["gram"] for x in rows])
  t_e = np.array([x["explicit"] for x in rows])
  contraction = units * p * size_l * size_r
  gram_terms = np.stack([units * p**2 * (size_l + size_r), units * p**2, contraction, inputs], 1)
  explicit_terms = np.stack([contraction, units * size_l * size_r, inputs], 1)
  c_g, _ = nnls(gram_terms / t_g[:, None], np.ones(len(rows)))
  c_e, _ = nnls(explicit_terms / t_e[:, None], np.ones(len(rows)))
  unit = c_e[0]
  weights = {
    "gram": c_g[0] / unit,
    "gram_out": c_g[1] / unit,
    "gram_sum": c_g[2] / unit,
    "gram_in": c_g[3] / unit,
    "explicit": 1.0,
    "explicit_out": c_e[1] / unit,
    "explicit_in": c_e[2] / unit,
  }
  for x, fg, fe in zip(rows, gram_terms @ c_g, explicit_terms @ c_e):
    x["fitted_gram"], x["fitted_explicit"] = fg, fe
  return {"backend": jax.default_backend(), "weights": weights, "rows": rows}


def _main(argv):
  if argv[:1] == ["--calibrate"]:  # --calibrate [OUT.json]
    result = calibrate()
    print(json.dumps(result["weights"]))
    if len(argv) > 1:
      with open(argv[1], "w") as f:
        json.dump(result, f, indent=1)
    return
  if argv[:1] == ["--memory"]:
    print(json.dumps(_measure_memory(*argv[1:3])))
    return
  if argv[:1] == ["--plot"]:  # --plot RESULTS.json OUT.png
    with open(argv[1]) as f:
      plot(json.load(f)["rows"], argv[2])
    return
  if argv[:1] == ["--plot-large"]:  # --plot-large [RESULTS.json [OUT.png]]
    results = argv[1] if len(argv) > 1 else LARGE_RESULTS
    with open(results) as f:
      plot(json.load(f)["rows"], argv[2] if len(argv) > 2 else results[:-5] + ".png", True)
    return
  models = argv[argv.index("--models") + 1].split(",") if "--models" in argv else None
  rows = run("--quick" in argv, large="--large" in argv, models=models)
  if "--json" in argv:
    print(json.dumps(rows))
  print(table(rows, markdown="--markdown" in argv))


if __name__ == "__main__":
  _main(sys.argv[1:])
