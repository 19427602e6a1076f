"""Independent float64 oracles for privacy accounting tests."""

import math


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
