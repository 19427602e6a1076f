r"""Gaussian noise for the privacy mechanisms: a far tail, no low-precision draws.

Every noise path of clipjax (:func:`clipjax.dp_noise`, :func:`clipjax.dp_aggregate`,
the adaptive transformations and the count noise of adaptive clipping, and through them
:func:`clipjax.accumulate`, which hands its float32 logical sum to them) calls
:func:`noisy`: the noise is drawn in float32 (float64 for a float64 value, when x64
is on), added to the value in that precision, divided, and only the result is cast
to the value's dtype. Drawing in bfloat16 would give 128 distinct values and nothing
beyond 2.9σ, so an output past that support would reveal a canary.

**Why not** ``jax.random.normal``. In float32 it maps a 24-bit uniform through
``erfinv``: no draw exceeds :math:`\sqrt2\,\mathrm{erfinv}(1 - 2^{-24}) = 5.42`, and
its tail beyond 4.5σ takes a few dozen values. A canary that moves one coordinate of
the sum by the clip norm :math:`C`, under noise :math:`zC`, puts the output past the
no-canary edge with probability :math:`P(N > 5.42 - 1/z)` (4.9e-6 at :math:`z = 1`)
per sampled step, a δ of the order users target (Mironov 2012; Jin et al. 2022).

**The sampler** is Box–Muller with a 64-bit radius. Each pair of draws takes three
32-bit words (four in float64):

* the radius: a bit :math:`b` and a 63-bit integer :math:`k` give
  :math:`W = (k + \frac12)\,2^{-64} \in (0, \frac12)` and the uniform
  :math:`U = W` (:math:`b = 0`) or :math:`U = 1 - W` (:math:`b = 1`), the midpoint of
  a cell of an exact 64-bit uniform on :math:`(0, 1)`; :math:`R = \sqrt{-2\log U}`.
  :math:`W` is formed as :math:`\mathrm{hi}\cdot 2^{-32} + (\mathrm{lo} + \frac12)
  \,2^{-64}`, so it keeps the dtype's relative precision down to the smallest cell,
  and the tail is ``log`` of that small uniform itself. For :math:`b = 1`,
  :math:`\log(1 - W)` is ``log`` of the rounded :math:`t = 1 - W` plus the exact
  rounding error over :math:`t` (:math:`1 - t` is exact), so small radii are as fine
  as large ones and no draw is rounded to :math:`U = 1` (an atom at 0).
* the angle: 3 bits pick one of the 8 symmetries of the square (swap the pair, negate
  either), which map the octant :math:`[0, \pi/4)` onto the whole circle, and the
  other 29 bits (61 in float64) the angle :math:`\varphi` in the octant, at a cell's
  midpoint. ``cos φ`` and ``sin φ`` are their Taylor polynomials to degree 10 and 9
  (truncation below 2e-9 on the octant, under float32's rounding); float64 uses
  ``cos`` and ``sin``.

The pair is :math:`R(\cos\varphi, \sin\varphi)` under that symmetry. With an exact
uniform radius and angle it would be two independent standard normals; here the
radius has :math:`2^{64}` cells and the angle :math:`2^{32}`, which makes the draws
discrete at float32 resolution but not in the tail: a far draw is a coarse radius
times a fine cosine, not one of a few levels. (Near 0 the angle's cells show instead:
no cosine is below :math:`\sin(\pi/2^{32}) \approx 7\cdot 10^{-10}`, so draws within
about 1e-9σ of 0 are thinned, a mass below 1e-9 that float32 sums rarely resolve.)

**The edge.** The largest output is the largest radius,
:math:`\sqrt{-2\log 2^{-65}} =` ``EDGE`` (about 9.4926). Beyond it, only the
canary's world has outputs: with sensitivity :math:`C` and noise :math:`zC` the
edge adds, per step,

.. math::

  \delta_{\mathrm{edge}}(z) = P\big(N > E - 1/z\big) = \tfrac12\,
    \mathrm{erfc}\big((E - 1/z)/\sqrt2\big),

1.0e-17 at :math:`z = 1` (3.4e-14 at :math:`z = 0.5`), which
:func:`clipjax.dp_epsilon` adds to δ for every step. :func:`edge_delta` computes it
with float64 math from :math:`E` rounded down (a lower edge is the conservative
side). With exact cells, the radius cut at ``EDGE`` makes the sampler's density the
Gaussian's less a part of total mass :math:`2^{-65}`.

References:
  Mironov, `On Significance of the Least Significant Bits for Differential Privacy
  <https://doi.org/10.1145/2382196.2382264>`_, CCS 2012.

  Jin, McMurtry, Rubinstein & Ohrimenko, `Are We There Yet? Timing and Floating-Point
  Attacks on Differential Privacy Systems <https://arxiv.org/abs/2112.05307>`_,
  IEEE S&P 2022.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import _checks

# The largest |X|: the radius of the smallest cell, sqrt(-2 log 2^-65) = 9.4925831, rounded down.
EDGE = 9.4925
_SQUARE_BITS = 3  # the 8 symmetries of the square
_OCTANT = math.pi / 4
# Taylor coefficients of sin (odd, to x^9) and cos (even, to x^10) in powers of x².
_SIN = tuple((-1) ** i / math.factorial(2 * i + 1) for i in range(5))
_COS = tuple((-1) ** i / math.factorial(2 * i) for i in range(6))


def noise_dtype(dtype) -> np.dtype:
  """The dtype noise is drawn and added in: float64 for float64, else float32."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _radius(word0, word1, dtype):
  """``sqrt(-2 log U)`` for the 64-bit uniform cell of two words (see the module doc)."""
  one = dtype.type(1)
  upper = (word0 >> 31) == 1
  hi = (word0 & jnp.uint32(0x7FFFFFFF)).astype(dtype)
  w = hi * dtype.type(2.0**-32) + (word1.astype(dtype) + dtype.type(0.5)) * dtype.type(2.0**-64)
  t = jnp.where(upper, one - w, w)
  # 1 - t is exact (t is in [1/2, 1]), so this is the exact rounding error of t = 1 - W.
  error = jnp.where(upper, w - (one - t), dtype.type(0))
  log_u = jnp.log(t) - error / t
  return jnp.sqrt(dtype.type(-2) * log_u)


def _polynomial(coefficients, x2):
  acc = x2.dtype.type(coefficients[-1])
  for c in coefficients[-2::-1]:
    acc = acc * x2 + x2.dtype.type(c)
  return acc


def _unit_pair(words, dtype):
  """``(cos θ, sin θ)`` for an angle uniform on the circle's cells (see the module doc)."""
  top = words[0]
  square = top >> (32 - _SQUARE_BITS)
  if dtype == jnp.float64:
    rest = (top & jnp.uint32((1 << (32 - _SQUARE_BITS)) - 1)).astype(dtype)
    cells = rest * dtype.type(2.0**32) + words[1].astype(dtype) + dtype.type(0.5)
    phi = cells * dtype.type(_OCTANT * 2.0 ** -(64 - _SQUARE_BITS))
    cos, sin = jnp.cos(phi), jnp.sin(phi)
  else:
    rest = (top & jnp.uint32((1 << (32 - _SQUARE_BITS)) - 1)).astype(dtype)
    phi = (rest + dtype.type(0.5)) * dtype.type(_OCTANT * 2.0 ** -(32 - _SQUARE_BITS))
    phi2 = phi * phi
    cos, sin = _polynomial(_COS, phi2), phi * _polynomial(_SIN, phi2)
  swap = (square & 1) == 1
  a, b = jnp.where(swap, sin, cos), jnp.where(swap, cos, sin)
  a = jnp.where((square & 2) == 2, -a, a)
  b = jnp.where((square & 4) == 4, -b, b)
  return a, b


def normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """Standard normal draws in ``dtype`` (float32 or float64) reaching ``EDGE`` σ.

  Args:
    key: a typed PRNG key.
    shape: the output shape.
    dtype: float32 or float64 (the latter needs x64).

  Returns:
    An array of ``shape`` and ``dtype``.
  """
  dtype = jnp.dtype(dtype)
  size = math.prod(shape)
  pairs = (size + 1) // 2
  angle_words = 2 if dtype == jnp.float64 else 1
  words = jax.random.bits(key, (2 + angle_words, pairs), jnp.uint32)
  radius = _radius(words[0], words[1], dtype)
  a, b = _unit_pair(words[2:], dtype)
  return jnp.concatenate([radius * a, radius * b])[:size].reshape(shape)


def noisy(value: jax.Array, stddev, key: jax.Array | None, divisor=1) -> jax.Array:
  """``(value + stddev·N(0, I)) / divisor`` in the noise dtype, cast to value's at the end.

  The one place where clipjax's privacy noise is drawn and added.

  Args:
    value: the array to noise (a sum, or a count).
    stddev: the noise's standard deviation (a scalar, possibly traced); a Python zero
      draws nothing.
    key: a typed PRNG key (unused for a Python zero ``stddev``).
    divisor: what the noisy value is divided by.

  Returns:
    An array like ``value``.
  """
  value = jnp.asarray(value)
  dtype = noise_dtype(value.dtype)
  out = value.astype(dtype)
  if not _checks.is_static_zero(stddev):
    out = out + jnp.asarray(stddev).astype(dtype) * normal(key, value.shape, dtype)
  return (out / jnp.asarray(divisor).astype(dtype)).astype(value.dtype)


def edge_delta(noise_multiplier: float) -> float:
  """``P(N > EDGE − 1/z)``: the δ that the sampler's edge adds per step, in float64.

  Args:
    noise_multiplier: ``z > 0``, the noise in units of the sensitivity.

  Returns:
    The probability as a Python float; 1 for ``z = 0``.
  """
  z = float(noise_multiplier)
  if not z > 0:
    return 1.0
  return 0.5 * math.erfc((EDGE - 1 / z) / math.sqrt(2))
