"""What each form of a use costs, per backend: the constants behind ``_leaves``' choices.

A use's per-example norm takes the Gram form, ``H P² (L + R)`` multiply-adds into
``P x P`` products, and its clipped sum one more contraction over examples and
positions; or the explicit form, ``H P L R`` multiply-adds into the gradient itself,
whose ``H L R`` entries are stored, read back for the norm and summed with the clip
weights (Bu, Mao & Xu, 2022). The parts run at different rates: the Gram products are
thin matrix products with a small output, the contraction one large matrix product,
the explicit form a batched contraction whose output is as large as the layer.

The weights below are seconds per multiply-add (or per entry) relative to the explicit
contraction's, fitted by ``python -m benchmarks.ghost_bench --calibrate`` to both
forms' measured times at the zoo's layer shapes (recorded in
``benchmarks/results/<backend>-ghost-costs.json``; a test checks that this table
matches that file). A backend without a recorded calibration (no GPU or TPU was at
hand) uses multiply-add counts alone: the Gram products against the explicit
contraction plus its stored entries.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class Weights(NamedTuple):
  """Relative cost per unit of each part of a use's per-example norm, over a
  multiply-add of the explicit contraction.

  Attributes:
    gram: per multiply-add of the Gram products, ``H P² (L + R)``.
    gram_out: per entry of the ``P x P`` products, ``H P²`` (written, multiplied, summed).
    gram_sum: per multiply-add of the Gram form's clipped-sum contraction over
      examples and positions, ``H P L R`` (the explicit form sums its gradients).
    gram_in: per factor entry the Gram form reads, ``H P (L + R)``.
    explicit: per multiply-add of the explicit contraction, ``H P L R`` (1 by definition).
    explicit_out: per entry of the explicit gradient, ``H L R`` (written, squared, summed).
    explicit_in: per factor entry the explicit form reads, ``H P (L + R)``.
    source: where the numbers come from.
  """

  gram: float
  gram_out: float
  gram_sum: float
  gram_in: float
  explicit: float
  explicit_out: float
  explicit_in: float
  source: str


# The explicit form keeps every example's gradient until the clip weights are known
# (every explicit leaf's at once); the Gram form keeps nothing beyond its factors,
# which the step holds anyway. A use takes the explicit form only where its gradients,
# over the batch, hold at most HELD entries per entry of its factors, or FLOOR
# entries in all (64 MiB in float32): clipping then adds memory in proportion to the
# activations, never batch x parameters (a GPT-2 MLP kernel at batch 4, T 256: 113M
# entries against 47M in its factors; a tied 32k vocabulary at batch 32: 131M
# against 66M).
HELD = 1.0
FLOOR = 2**24


def held(entries: int, factor_entries: int) -> bool:
  """Whether an explicit form of ``entries`` (over the batch) fits the memory budget,
  for factors of ``factor_entries``."""
  return entries <= max(HELD * factor_entries, FLOOR)


UNIT = Weights(1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, "multiply-add counts (not calibrated)")

# Fitted on this project's 2-core CPU: benchmarks/results/cpu-ghost-costs.json.
CALIBRATED = {
  "cpu": Weights(0.363, 238, 2.46, 56, 1.0, 74, 39.7, "benchmarks/results/cpu-ghost-costs.json"),
}


def weights(backend: str | None = None) -> Weights:
  """The weights for ``backend`` (the default backend if None)."""
  return CALIBRATED.get(backend or jax.default_backend(), UNIT)


def gram(blocks: int, positions: int, size_l: int, size_r: int, w: Weights) -> float:
  """Relative cost of the Gram-form squared norm of one example."""
  square = blocks * positions**2
  return (
    w.gram * square * (size_l + size_r)
    + w.gram_out * square
    + w.gram_sum * blocks * positions * size_l * size_r
    + w.gram_in * blocks * positions * (size_l + size_r)
  )


def explicit(blocks: int, positions: int, size_l: int, size_r: int, w: Weights) -> float:
  """Relative cost of the explicit gradient of one example and its norm."""
  entries = blocks * size_l * size_r
  return (
    w.explicit * positions * entries
    + w.explicit_out * entries
    + w.explicit_in * blocks * positions * (size_l + size_r)
  )
