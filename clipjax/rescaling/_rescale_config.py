"""The tuning of ``rescale``'s solve, as one frozen (hashable) configuration.

:class:`RescaleConfig` holds every threshold the solve reads while it is traced. It is a
static argument of the jitted solve, so a different setting is a different compilation,
never a stale trace. :func:`for_inputs` picks the defaults for the backend (the one place
where they are chosen) and adjusts them to the inputs: whether they may be split over
several devices. The thresholds were measured with ``benchmarks/`` (``rescale``,
``sampling``, ``methods``); rerun those rather than trusting numbers written here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax


@dataclasses.dataclass(frozen=True)
class RescaleConfig:
  """How the solve runs. Every setting gives the same numbers, to float rounding.

  Attributes:
    max_newton_passes: Newton passes before the bounded, exact bisection fallback.
      Random and image-like data need 4 to 8; only contrived inputs come near 40.
    sample_stride: the warm start solves every ``sample_stride``-th coordinate first.
    sample_min_row: rows of at least this many elements get the sampled warm start
      (its own solve has a fixed cost that shorter rows do not earn back).
    sort_max_row: ``method="auto"`` takes the sort for rows of at most this many
      elements (0: never; on CPU the active set wins everywhere).
    row_by_row: whether a batched solve may run on groups of rows in turn (on CPU a
      long row stays in cache through all its passes); else one lockstep solve.
    row_elements: with ``row_by_row``, rows of at least this many elements are
      solved one at a time.
    group_elements: with ``row_by_row``, shorter rows are solved in lockstep groups
      of up to this many elements.
    chunked: whether row reductions run in two stages (chunks fused with the
      elementwise work, then a library reduction); else plain reductions, which
      the partitioner splits into local ones and an all-reduce.
    chunk: elements per first-stage chunk.
    chunked_min_elements: below this many elements in all, reductions stay plain
      (the extra operations cost more than the writes they save).
    sharded: the inputs may be split over several devices: no sampled warm start,
      no row loop, plain reductions and no sort (each would gather rows).
    report: called with the name of each path the solve takes (``"sort"``,
      ``"newton"``, ``"bisect"``, ``"sampled start"``, ``"row groups"``,
      ``"one row at a time"``, ``"lockstep"``, ``"chunked reduction"``) while it is
      traced, and with ``"newton fallback"`` when the fallback runs. For tests and
      benchmarks; None (the default) costs nothing.
  """

  max_newton_passes: int = 40
  sample_stride: int = 256
  sample_min_row: int = 1 << 17
  sort_max_row: int = 0
  row_by_row: bool = False
  row_elements: int = 1 << 17
  group_elements: int = 1 << 22
  chunked: bool = True
  chunk: int = 8
  chunked_min_elements: int = 1 << 15
  sharded: bool = False
  report: Callable[[str], None] | None = None

  def saw(self, path: str) -> None:
    """Reports a path taken at trace time (see ``report``)."""
    if self.report is not None:
      self.report(path)

  def saw_at_run_time(self, path: str) -> None:
    """Reports a path when the program runs it (inside a ``lax.cond`` branch)."""
    if self.report is not None:
      report = self.report
      jax.debug.callback(lambda: report(path))


def default(backend: str | None = None) -> RescaleConfig:
  """The defaults for ``backend`` (the default backend if None).

  On CPU, batched rows are solved in groups or one at a time and the active set is
  used everywhere. On a GPU the sort wins on rows of up to 16384 elements and one
  lockstep solve is kept. TPUs are not measured: they get the GPU's lockstep solve
  without the sort.
  """
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return RescaleConfig(row_by_row=True)
  if backend in ("gpu", "cuda", "rocm"):
    return RescaleConfig(sort_max_row=1 << 14)
  return RescaleConfig()


def may_be_sharded(leaves) -> bool:
  """Whether any of the arrays ``leaves`` may be split over more than one device.

  Concrete arrays say so (``sharding.num_devices``); a traced value typed with mesh
  axes does too. A traced value without them (under ``jit`` with automatic sharding,
  or under ``vmap``) may still be partitioned later, so then the answer is whether
  the process has several devices.
  """
  unknown = False
  for v in leaves:
    if isinstance(v, jax.core.Tracer):
      spec = getattr(getattr(jax.typeof(v), "sharding", None), "spec", ())
      if any(axis is not None for axis in spec):
        return True
      unknown = True
    elif isinstance(v, jax.Array) and v.sharding.num_devices > 1:
      return True
  return unknown and jax.device_count() > 1


def for_inputs(leaves, config: RescaleConfig | None = None) -> RescaleConfig:
  """``config`` (the backend's default if None), marked sharded if ``leaves`` may be."""
  config = default() if config is None else config
  if not config.sharded and may_be_sharded(leaves):
    config = dataclasses.replace(config, sharded=True)
  return config
