"""``|v|^p`` and its inverse with the common exponents special-cased (exact for p = 1, a
product or a square root for p = 2): the norms of the core and the rescaling engine
share them."""

import jax.numpy as jnp


def power(v, p):
  if p == 1:
    return v
  if p == 2:
    return v * v
  return v**p


def root(v, p):
  if p == 1:
    return v
  if p == 2:
    return jnp.sqrt(v)
  return v ** (1.0 / p)
