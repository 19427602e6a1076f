"""The benchmark suite: ``python -m benchmarks [--quick] [--large] [--only SUITES] [--out DIR]``.

Runs the suites (``rescale``, ``sampling``, ``methods``, ``transforms``, ``privacy``,
``ghost``; all by default, or a comma-separated ``--only`` list), prints one table of medians and
ratios (each row's median over its own baseline, measured in the same process,
interleaved), and writes ``DIR/<backend>[-<suites>][-quick].json`` (the suites named
when ``--only`` picks some of them; jax version, backend,
device kind, date, all rows) and, with the rescale suite,
``DIR/<backend>[-quick]-rescale.png`` (time against vector size per method), with the
ghost suite ``DIR/<backend>-ghost[-large][-quick].png`` (time and peak memory per
candidate over the non-private step; compile time too with ``--large``).
``--quick`` runs reduced grids in under two minutes on a 2-core CPU; ``--large`` runs the
ghost suite on GPT-2-small- and ViT-B/16-shaped models instead of its zoo (files
``...-large...``, so that the zoo's ``<backend>-ghost.json`` stays).
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import sys

import jax

from benchmarks._timing import warm_up

_SUITES = {
  "rescale": "benchmarks.rescale_bench",
  "sampling": "benchmarks.sampling_bench",
  "methods": "benchmarks.methods_bench",
  "transforms": "benchmarks.transforms_bench",
  "privacy": "benchmarks.privacy_bench",
  "ghost": "benchmarks.ghost_bench",
}


def _parse(argv):
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="reduced grids, few repeats")
  parser.add_argument("--only", default=",".join(_SUITES), help="comma-separated suites")
  parser.add_argument(
    "--large", action="store_true", help="ghost suite: GPT-2-small and ViT-B/16 shapes instead"
  )
  parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
  args = parser.parse_args(argv)
  args.only = [s.strip() for s in args.only.split(",") if s.strip()]
  unknown = set(args.only) - set(_SUITES)
  if unknown:
    parser.error(f"unknown suites {sorted(unknown)}; choose from {list(_SUITES)}")
  return args


def _print_table(rows):
  print(f"{'name':52s} {'median ms':>10s} {'baseline':>30s} {'base ms':>9s} {'ratio':>7s}")
  for r in rows:
    print(
      f"{r['name']:52s} {1e3 * r['median_s']:10.3f} {r['baseline'][-30:]:>30s} "
      f"{1e3 * r['baseline_median_s']:9.3f} {r['ratio']:7.2f}"
    )


def main(argv):
  args = _parse(argv)
  warm_up()
  rows = []
  for suite in args.only:
    print(f"running {suite} ...", file=sys.stderr, flush=True)
    options = {"large": True} if args.large and suite == "ghost" else {}
    module = importlib.import_module(_SUITES[suite])
    rows += [dict(r, suite=suite) for r in module.run(args.quick, **options)]
  _print_table(rows)
  backend = jax.default_backend()
  quick = ("-large" if args.large else "") + ("-quick" if args.quick else "")
  subset = "" if set(args.only) == set(_SUITES) else "-" + "-".join(args.only)
  stem = os.path.join(args.out, backend + subset + quick)
  os.makedirs(args.out, exist_ok=True)
  record = {
    "jax_version": jax.__version__,
    "backend": backend,
    "device_kind": jax.devices()[0].device_kind,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    "quick": args.quick,
    "large": args.large,
    "suites": args.only,
    "rows": rows,
  }
  with open(stem + ".json", "w") as f:
    json.dump(record, f, indent=1, allow_nan=False)
  if "rescale" in args.only:
    importlib.import_module(_SUITES["rescale"]).plot(
      [r for r in rows if r["suite"] == "rescale"],
      os.path.join(args.out, backend + quick + "-rescale.png"),
    )
  if "ghost" in args.only:
    importlib.import_module(_SUITES["ghost"]).plot(
      [r for r in rows if r["suite"] == "ghost"],
      os.path.join(args.out, backend + "-ghost" + quick + ".png"),
      compile_time=args.large,
    )
  print(f"wrote {stem}.json", file=sys.stderr)


if __name__ == "__main__":
  main(sys.argv[1:])
