"""The command line every example shares: ``--out``, ``--smoke``, ``--seed`` and a timer.

An example builds its parser with :func:`parser`, adds its own options, and calls
:func:`parse`, which applies the example's smoke configuration and creates the output
folder; :func:`done` prints where the plot went and how long the run took.
"""

import argparse
import os
import time


def parser(doc: str, *, seed: bool = True) -> argparse.ArgumentParser:
  """A parser described by the first paragraph of ``doc``, with the shared options."""
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join("examples", "out"), help="output folder")
  parser.add_argument("--smoke", action="store_true", help="tiny, fast configuration")
  if seed:
    parser.add_argument("--seed", type=int, default=0)
  return parser


def parse(parser: argparse.ArgumentParser, argv, **smoke) -> argparse.Namespace:
  """Parses ``argv``; with ``--smoke`` the options in ``smoke`` take those values.

  Creates the output folder, and records the start of the run in ``args.start``.
  """
  args = parser.parse_args(argv)
  if args.smoke:
    vars(args).update(smoke)
  os.makedirs(args.out, exist_ok=True)
  args.start = time.perf_counter()
  return args


def done(args: argparse.Namespace, path: str) -> None:
  """Prints where the plot is and the run's time since :func:`parse`."""
  print(f"plot: {path}  ({time.perf_counter() - args.start:.1f} s)")
