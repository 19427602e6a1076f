"""An independent float64 NumPy oracle for clipping-aware rescaling.

It works directly in eta (no scaling, no active set): it evaluates the norm at every
distinct breakpoint, finds the bracketing piece, and solves it in closed form.
"""

import numpy as np


def flat(tree_leaves):
  return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in tree_leaves])


def room(x, d, lower, upper):
  x, d = np.asarray(x, np.float64), np.asarray(d, np.float64)
  lower = np.broadcast_to(np.asarray(lower, np.float64), x.shape)
  upper = np.broadcast_to(np.asarray(upper, np.float64), x.shape)
  return np.where(d >= 0, upper - x, x - lower)


def norm_after_clip(x, d, eta, p, lower=0.0, upper=1.0):
  x, d = np.asarray(x, np.float64), np.asarray(d, np.float64)
  moved = np.clip(x + eta * d, lower, upper) - x
  return (
    np.max(np.abs(moved), initial=0.0) if p == np.inf else np.sum(np.abs(moved) ** p) ** (1 / p)
  )


def max_norm(x, d, p, lower=0.0, upper=1.0):
  s = room(x, d, lower, upper)[np.asarray(d) != 0]
  return np.max(s, initial=0.0) if p == np.inf else np.sum(s**p) ** (1 / p)


def rescale(x, d, eps, p, lower=0.0, upper=1.0):
  """The smallest eta >= 0 with ‖clip(x + eta·d) − x‖_p == min(eps, max_norm)."""
  s = room(x, d, lower, upper).ravel()
  ad = np.abs(np.asarray(d, np.float64)).ravel()
  moving = ad > 0
  if not moving.any() or eps == 0:
    return 0.0
  r = np.full(s.shape, np.inf)
  r[moving] = s[moving] / ad[moving]
  if p == np.inf:
    e = min(eps, s[moving].max())
    return e / ad[moving & (s >= e)].max()
  if eps**p >= np.sum(s[moving] ** p):
    return r[moving].max()
  breaks = np.unique(r[moving])
  values = np.array([np.sum(np.minimum(t * ad, s) ** p) for t in breaks])
  k = np.searchsorted(values, eps**p)  # first breakpoint whose norm reaches eps
  saturated = moving & (r <= (breaks[k - 1] if k > 0 else -1.0))
  return ((eps**p - np.sum(s[saturated] ** p)) / np.sum(ad[~saturated] ** p)) ** (1 / p)


def rescale_sorted(x, d, eps, p, lower=0.0, upper=1.0):
  """``rescale`` in O(n log n) for long vectors (finite p, eps below the maximum).

  Sorts the breakpoints and gets the norm at all of them from cumulative float64
  sums, instead of evaluating it at each one.
  """
  s = room(x, d, lower, upper).ravel()
  ad = np.abs(np.asarray(d, np.float64)).ravel()
  moving = ad > 0
  s, ad = s[moving], ad[moving]
  order = np.argsort(s / ad)
  r, s, ad = (s / ad)[order], s[order], ad[order]
  saturated = np.cumsum(s**p)  # through breakpoint k
  free = np.append(np.cumsum((ad**p)[::-1])[::-1][1:], 0.0)  # after breakpoint k
  k = np.searchsorted(saturated + r**p * free, eps**p)
  before = saturated[k - 1] if k > 0 else 0.0
  return ((eps**p - before) / (free[k] + ad[k] ** p)) ** (1 / p)


def condition(x, d, eta, p, lower=0.0, upper=1.0, h=1e-7):
  """Relative condition number of eta as a function of eps: (eps/eta) / (dN/deta)."""
  if eta == 0:
    return 1.0
  norm = lambda t: norm_after_clip(x, d, t, p, lower, upper)
  slope = (norm(eta * (1 + h)) - norm(eta * (1 - h))) / (2 * h * eta)
  return np.inf if slope <= 0 else norm(eta) / (eta * slope)


def finite_difference(f, v, h=1e-6):
  """Central differences of a scalar function ``f`` at ``v`` (any shape), in float64."""
  v = np.asarray(v, np.float64)
  out = np.zeros(v.shape)
  for i in np.ndindex(v.shape):
    e = np.zeros(v.shape)
    e[i] = h
    out[i] = (f(v + e) - f(v - e)) / (2 * h)
  return out
