"""The benchmark tables of the README and the guides, generated from benchmarks/results.

Every table lives between two marker comments in its page::

  <!-- tables.py: ghost-full -->
  | ... generated ... |
  <!-- /tables.py -->

so that one number, recorded once in a results file, reads the same everywhere. Run from
the repository root after a benchmark run rewrites a results file:

  python docs/_scripts/tables.py          # rewrites the tables in place
  python docs/_scripts/tables.py --check  # exits 1 naming every stale table (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = ["README.md", "docs/guides/fast_clipping.md", "docs/guides/performance.md"]
GHOST = ROOT / "benchmarks" / "results" / "cpu-ghost.json"
GHOST_LARGE = ROOT / "benchmarks" / "results" / "cpu-ghost-large.json"

# The zoo's models (benchmarks/_zoo.py), as a reader knows them: a long and a short name.
_MODELS = {
  "mlp_64_256_256_10": ("MLP 64-256-256-10", "MLP 64-256-256-10"),
  "mlp_3072_512_512_10": ("MLP 3072-512-512-10", "MLP 3072-512-512-10"),
  "cnn": ("CNN, 4 x (conv 3x3, GroupNorm), {params} params", "CNN, GroupNorm"),
  "cnn_small": ("CNN, channels 16/32/64", "small CNN"),
  "transformer": (
    "transformer LM, vocabulary 32000 tied to the output, 64 tokens",
    "transformer, tied embedding",
  ),
  "mobilenet": ("depthwise-separable CNN (MobileNet-like)", "depthwise CNN"),
  "vit_small": ("ViT, 32x32 images, patch 4, width 128, 4 blocks", "small ViT"),
  "lstm_optimized": ("LSTM, flax `OptimizedLSTMCell` (fused gates), 128 units, 32 steps", ""),
  "lstm_cell": ("LSTM, flax `LSTMCell`, 128 units, 32 steps", ""),
  "conv_transpose_decoder": ("decoder of three `ConvTranspose`, stride 2", ""),
  "gpt2_small": ("GPT-2-small shape: 12 blocks by `scan`, width 768, 50257 tied, T 256", ""),
  "vit_b16": ("ViT-B/16 shape: 224x224, 12 blocks by `scan`, width 768", ""),
}
_MARKER = re.compile(
  r"(<!-- tables\.py: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /tables\.py -->)", re.S
)


def _num(value: float) -> str:
  """Three significant figures, as the pages print them: 248, 18.9, 1.11."""
  if value >= 100:
    return f"{value:.0f}"
  if value >= 10:
    return f"{value:.1f}"
  return f"{value:.2f}"


def _ghost_rows(path=GHOST) -> list[dict]:
  """Per model: the non-private step and the private candidates' rows."""
  rows = json.loads(path.read_text())["rows"]
  models = list(dict.fromkeys(r["model"] for r in rows))
  by = {(r["model"], r["candidate"]): r for r in rows}
  return [
    {
      "model": m,
      "grad": by[m, "grad"],
      "vmap": by[m, "vmap_grad_clip"],
      "ghost": by[m, "clipped_grad"],
      "peer": by.get((m, "jax_privacy")),
    }
    for m in models
  ]


def ghost_full() -> str:
  lines = [
    "| model | non-private step | `vmap(grad)` + clip: time | memory "
    "| jax_privacy `clipped_grad`: time | **`clipped_grad`: time** | **memory** | compile |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in _ghost_rows():
    g = r["grad"]
    label = _MODELS[r["model"]][0].format(params=f"{round(g['parameters'], -3) // 1000}k")
    peer = f"{_num(r['peer']['ratio'])}x" if r["peer"] else "-"
    compile_ratio = r["ghost"].get("compile_ratio")
    lines.append(
      f"| {label}, batch {g['batch']} | {_num(g['median_s'] * 1e3)} ms "
      f"| {_num(r['vmap']['ratio'])}x | {_num(r['vmap']['rss_ratio'])}x | {peer} "
      f"| **{_num(r['ghost']['ratio'])}x** | **{_num(r['ghost']['rss_ratio'])}x** "
      f"| {_num(compile_ratio) + 'x' if compile_ratio else '-'} |"
    )
  return "\n".join(lines) + "\n"


def ghost_short() -> str:
  lines = ["| model | time | memory | `vmap(grad)` time |", "|---|---|---|---|"]
  for r in _ghost_rows():
    if not _MODELS[r["model"]][1]:  # the README keeps to the first zoo
      continue
    lines.append(
      f"| {_MODELS[r['model']][1]} | {_num(r['ghost']['ratio'])}x "
      f"| {_num(r['ghost']['rss_ratio'])}x | {_num(r['vmap']['ratio'])}x |"
    )
  return "\n".join(lines) + "\n"


def ghost_large() -> str:
  lines = [
    "| model | non-private step | candidate | time | peak memory | XLA temporaries | compile |",
    "|---|---|---|---|---|---|---|",
  ]
  names = {"vmap": "`vmap(grad)` + clip", "peer": "jax_privacy", "ghost": "**`clipped_grad`**"}
  for r in _ghost_rows(GHOST_LARGE):
    g = r["grad"]
    label, step = f"{_MODELS[r['model']][0]}, batch {g['batch']}", f"{_num(g['median_s'])} s"
    for key, name in names.items():
      c = r[key]
      if c is None:
        continue
      lines.append(
        f"| {label} | {step} | {name} | {_num(c['ratio'])}x "
        f"| {_num(c['rss_ratio'])}x | {_num(c['temp_ratio'])}x | {_num(c['compile_ratio'])}x |"
      )
      label = step = ""
  return "\n".join(lines) + "\n"


TABLES = {"ghost-full": ghost_full, "ghost-short": ghost_short, "ghost-large": ghost_large}


def render(text: str) -> str:
  """The page with every marked table regenerated."""

  def table(match):
    name = match.group("name")
    if name not in TABLES:
      raise SystemExit(f"unknown table {name!r}; known: {sorted(TABLES)}")
    return match.group(1) + TABLES[name]() + match.group(4)

  return _MARKER.sub(table, text)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="report stale tables, change nothing")
  args = parser.parse_args(argv)
  stale = []
  for page in PAGES:
    path = ROOT / page
    text = path.read_text()
    new = render(text)
    if new != text:
      stale.append(page)
      if not args.check:
        path.write_text(new)
  if args.check and stale:
    print(f"stale tables in {stale}: run python docs/_scripts/tables.py", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
