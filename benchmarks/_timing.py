"""Interleaved timing shared by the rescale and transforms suites.

Every candidate is a zero-argument thunk that returns something
``jax.block_until_ready`` accepts (JAX or NumPy arrays). Candidates are compiled
by their builders before they get here, so every sample is a warm run.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

# Each sample repeats a fast call until it lasts about this long: single calls of
# tens of microseconds are dominated by timer and dispatch jitter.
_TARGET_SAMPLE_S = 0.02


def warm_up(seconds: float = 3.0) -> None:
  """Keeps the CPU busy with XLA work for ``seconds`` before anything is timed.

  The first grid point of a fresh process measured up to 3x slower than the same
  point again (clock ramp-up, thread-pool start, first-touch page faults), which
  distorted whichever point came first.
  """
  x = jnp.ones((512, 512))
  step = jax.jit(lambda x: jnp.tanh(x @ x / 512.0).sum(axis=0) + x)
  end = time.perf_counter() + seconds
  while time.perf_counter() < end:
    x = jax.block_until_ready(step(x))


def _per_call(thunk, number):
  start = time.perf_counter()
  for _ in range(number):
    jax.block_until_ready(thunk())
  return (time.perf_counter() - start) / number


def _first_call(thunk):
  start = time.perf_counter()
  out = jax.block_until_ready(thunk())
  return out, time.perf_counter() - start


def interleaved_medians(thunks: dict, repeats: int) -> tuple[dict[str, float], dict]:
  """Median seconds per call of each thunk, alternating candidates every repeat.

  One untimed call each first (it sizes the samples; its outputs are returned so
  that callers can check them without paying for another call); then each repeat
  calls every candidate once, in an order that reverses on alternate repeats, so
  drift in the load of this shared machine hits every candidate alike.
  """
  firsts = {name: _first_call(thunk) for name, thunk in thunks.items()}
  numbers = {
    name: max(1, min(50, int(_TARGET_SAMPLE_S / seconds))) for name, (_, seconds) in firsts.items()
  }
  samples = {name: [] for name in thunks}
  names = list(thunks)
  for r in range(repeats):
    for name in names if r % 2 == 0 else names[::-1]:
      samples[name].append(_per_call(thunks[name], numbers[name]))
  medians = {name: float(np.median(s)) for name, s in samples.items()}
  return medians, {name: out for name, (out, _) in firsts.items()}
