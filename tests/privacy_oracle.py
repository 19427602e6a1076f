"""Independent float64 oracles for the privacy tests: clip weights and accounting."""

import math

import numpy as np


def clip_weights(norms, clip_norm, scaling, stability=0.01):
  """Each example's factor under a scaling rule, from its norm (a float64 array)."""
  if scaling == "clip":
    return np.where(norms > clip_norm, clip_norm / np.maximum(norms, 1e-300), 1.0)
  if scaling == "automatic":
    return clip_norm / (norms + stability)
  return np.where(norms > 0, clip_norm / np.maximum(norms, 1e-300), 0.0)


def gaussian_epsilon(mu: float, delta: float) -> float:
  """The exact ε of the Gaussian mechanism with sensitivity / σ = mu, at δ.

  Balle & Wang (ICML 2018): δ(ε) = Φ(mu/2 − ε/mu) − e^ε Φ(−mu/2 − ε/mu), decreasing in
  ε; bisected to the float64 resolution and rounded up.
  """
  phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
  low, high = 0.0, 100.0
  for _ in range(200):
    middle = (low + high) / 2
    if phi(mu / 2 - middle / mu) - math.exp(middle) * phi(-mu / 2 - middle / mu) > delta:
      low = middle
    else:
      high = middle
  return high
