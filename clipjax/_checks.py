"""Argument checking shared by every public function: one rule and one message per argument.

Every public function of clipjax checks its arguments here, so the same argument is
accepted or refused in the same way everywhere, with the same message. Values are
inspected only when they are concrete: under ``jit`` (or ``optax.inject_hyperparams``
inside a jitted step) a traced value cannot be read, and the functions documented as
such return NaN instead of a finite wrong number.

==================  ==========================================  ===========================
argument            accepted                                    refused with ``ValueError``
==================  ==========================================  ===========================
``p``               a static number ``>= 1``; ``inf`` as        ``p < 1``, NaN, a traced
                    ``math.inf``, ``jnp.inf`` or a string        value, booleans, other
                    ``"inf"`` / ``"infinity"`` (any case)        strings
clip norms, noise   Python or NumPy/JAX scalars ``>= 0``          negative or NaN values
multipliers         (``inf`` where the docstring allows it);
                    clip norms also as a pytree of such
                    scalars (group-wise)
probabilities       scalars in the documented interval          outside it, NaN
keys                typed ``jax.random.key``, raw ``uint32``     anything else
                    ``PRNGKey`` data, or an int seed
per-example trees   every leaf has the same leading batch axis   scalars, differing sizes
masks               ``None`` or a boolean ``(batch,)`` array     other shapes or dtypes
bounds              scalars, arrays broadcastable to the         other structures or shapes
                    leaves, or pytrees like them
==================  ==========================================  ===========================
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_INF_NAMES = ("inf", "+inf", "infinity", "+infinity")


def is_concrete(tree: Any) -> bool:
  """Whether every leaf of ``tree`` can be read (no tracer among them)."""
  return not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(tree))


def is_static_zero(value: Any) -> bool:
  """True only for a Python zero: then a noise draw can be skipped at trace time."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0


def canonical_p(p: Any, *, allowed: tuple[float, ...] | None = None) -> float:
  """Returns the norm's ``p`` as a Python float (``math.inf`` for the max-norm).

  Args:
    p: a static number ``>= 1``, or ``inf`` as a float or a string.
    allowed: if given, the only values accepted (e.g. ``(1.0, 2.0, math.inf)``).

  Raises:
    ValueError: naming ``p``, for anything else; a traced ``p`` gets a hint on
      ``optax.inject_hyperparams(..., static_args=("p",))``.
  """
  if isinstance(p, jax.core.Tracer):
    raise ValueError(
      "p must be static, not traced. Under optax.inject_hyperparams pass static_args=('p',)."
    )
  if isinstance(p, str):
    if p.strip().lower() not in _INF_NAMES:
      raise ValueError(f"p must be a number >= 1 or 'inf', got {p!r}.")
    value = math.inf
  elif isinstance(p, bool):
    raise ValueError(f"p must be a number >= 1 or 'inf', got {p!r}.")
  else:
    try:
      value = float(p)
    except (TypeError, ValueError):
      raise ValueError(f"p must be a number >= 1 or 'inf', got {p!r}.") from None
    if not value >= 1:
      raise ValueError(f"p must be >= 1 (or inf), got {p!r}.")
  if allowed is not None and value not in allowed:
    names = ", ".join("inf" if a == math.inf else f"{a:g}" for a in allowed)
    raise ValueError(f"p must be one of {names}, got {p!r}.")
  return value


def _scalar(name: str, value: Any) -> float | None:
  """The value as a Python float when it is concrete, else None; refuses non-scalars."""
  if not is_concrete(value):
    return None
  try:
    array = np.asarray(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a real scalar, got {value!r}.") from None
  if array.ndim:
    raise ValueError(f"{name} must be a scalar, got shape {array.shape}.")
  if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise ValueError(f"{name} must be a real scalar, got {value!r}.")
  return float(array)


def check_nonnegative(name: str, value: Any, *, finite: bool = False) -> None:
  """``value >= 0`` (and finite, if asked) when it is concrete."""
  v = _scalar(name, value)
  if v is None:
    return
  if not v >= 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}.")
  if finite and not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {value!r}.")


def check_positive(name: str, value: Any, *, finite: bool = False) -> None:
  """``value > 0`` (and finite, if asked) when it is concrete."""
  v = _scalar(name, value)
  if v is None:
    return
  if not v > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")
  if finite and not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {value!r}.")


def check_clip_norm(
  clip_norm: Any, name: str = "clip_norm", *, positive: bool = False, finite: bool = False
) -> None:
  """A scalar ``>= 0`` (``> 0`` with ``positive``, finite with ``finite``), or a pytree of
  them (group-wise clipping). Traced leaves are not inspected."""
  leaves = jax.tree.leaves(clip_norm)
  if not leaves:
    raise ValueError(
      f"{name} must be a scalar or a pytree prefix of the gradients with scalar leaves, "
      f"got {clip_norm!r}."
    )
  check = check_positive if positive else check_nonnegative
  for leaf in leaves:
    check(name, leaf, finite=finite)


def check_interval(
  name: str,
  value: Any,
  low: float,
  high: float,
  *,
  open_low: bool = False,
  open_high: bool = False,
) -> None:
  """``low <= value <= high`` (strict where ``open_low`` / ``open_high``) when it is concrete."""
  v = _scalar(name, value)
  if v is None:
    return
  ok = (low < v if open_low else low <= v) and (v < high if open_high else v <= high)
  if not ok:
    left, right = "(" if open_low else "[", ")" if open_high else "]"
    raise ValueError(f"{name} must be in {left}{low:g}, {high:g}{right}, got {value!r}.")


def check_count(name: str, value: Any, *, minimum: int = 1) -> int:
  """A static Python integer ``>= minimum`` (shapes depend on it), returned as ``int``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral | np.integer):
    raise ValueError(f"{name} must be a Python integer >= {minimum}, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
  return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  """One of a few static strings."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
  return value


def canonical_key(key: Any, name: str = "key") -> jax.Array:
  """A typed PRNG key from a typed key, a raw ``uint32`` key (``PRNGKey``) or an int seed."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.ndim:
      raise ValueError(f"{name} must be a single PRNG key, got a batch of shape {key.shape}.")
    return key
  if isinstance(key, bool):
    raise ValueError(f"{name} must be a PRNG key or an int seed, got {key!r}.")
  if isinstance(key, numbers.Integral | np.integer):
    return jax.random.key(int(key))
  try:
    array = jnp.asarray(key)
  except TypeError:
    raise ValueError(f"{name} must be a PRNG key or an int seed, got {key!r}.") from None
  if array.ndim == 0 and jnp.issubdtype(array.dtype, jnp.integer):
    return jax.random.key(array)
  if array.shape == (2,) and array.dtype == jnp.uint32:
    return jax.random.wrap_key_data(array)
  raise ValueError(
    f"{name} must be a jax.random.key, a raw uint32 PRNGKey or an int seed; got an array of "
    f"shape {array.shape} and dtype {array.dtype}."
  )


def batch_size(tree: Any, name: str = "per-example gradients") -> int:
  """The common leading (batch) axis of every leaf of ``tree``."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"{name} must have at least one leaf.")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
      f"{name} need the same leading batch axis on every leaf; got leaf shapes "
      f"{[np.shape(leaf) for leaf in leaves]}."
    )
  return sizes.pop()


def check_mask(mask: Any, size: int, name: str = "mask") -> jax.Array | None:
  """``None``, or a boolean ``(size,)`` array (True marks a real example)."""
  if mask is None:
    return None
  shape = np.shape(mask)
  # A list of booleans has no dtype for jnp.result_type: NumPy reads it.
  dtype = mask.dtype if hasattr(mask, "dtype") else np.asarray(mask).dtype
  if shape != (size,):
    raise ValueError(f"{name} must have shape ({size},), one entry per example; got {shape}.")
  if dtype != jnp.bool_:
    raise ValueError(f"{name} must be boolean (True for a real example), got dtype {dtype}.")
  return jnp.asarray(mask)


def bound_leaves(bound: Any, treedef: Any, shapes: list[tuple], name: str, ref: str = "x") -> list:
  """One bound per leaf: a scalar or array for all of them, or a pytree like ``ref``."""
  structure = jax.tree.structure(bound)
  if structure == treedef:
    leaves = jax.tree.leaves(bound)
  elif jax.tree_util.treedef_is_leaf(structure) and structure.num_leaves == 1:
    leaves = jax.tree.leaves(bound) * len(shapes)
  else:
    raise ValueError(
      f"{name} must be a scalar, an array broadcastable to {ref}, or a pytree with the "
      f"structure of {ref}; got structure {structure} for {ref}'s {treedef}."
    )
  for leaf, shape in zip(leaves, shapes):
    try:
      ok = np.broadcast_shapes(np.shape(leaf), shape) == tuple(shape)
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(
        f"{name} of shape {np.shape(leaf)} does not broadcast to {ref}'s leaf shape {shape}."
      )
  return leaves


def check_scalar_eps(eps: Any, name: str = "eps") -> None:
  """A scalar, finite and ``>= 0`` when concrete (a target norm or radius)."""
  if not is_concrete(eps):
    return
  e = np.asarray(eps)
  if e.ndim:
    raise ValueError(f"{name} must be a scalar, got shape {e.shape}; use jax.vmap for a batch.")
  if not np.isfinite(e):
    raise ValueError(f"{name} must be finite, got {e}.")
  if e < 0:
    raise ValueError(f"{name} must be >= 0, got {e}.")


def check_box(
  point: list, others: list, lowers: list, uppers: list, names: tuple[str, str] = ("x", "delta")
) -> None:
  """With concrete leaves: all finite, ``lower <= upper``, and ``point`` inside the box."""
  if not is_concrete((point, others, lowers, uppers)):
    return
  for name, leaves in zip((*names, "lower", "upper"), (point, others, lowers, uppers)):
    for leaf in leaves:
      if not np.all(np.isfinite(np.asarray(leaf))):
        raise ValueError(f"{name} contains NaN or inf.")
  for x, lo, hi in zip(point, lowers, uppers):
    x, lo, hi = np.asarray(x), np.asarray(lo), np.asarray(hi)
    if np.any(lo > hi):
      raise ValueError("lower must be <= upper everywhere.")
    if np.any(x < lo) or np.any(x > hi):
      raise ValueError(
        f"{names[0]} must lie inside [lower, upper]: its values span "
        f"[{x.min():g}, {x.max():g}], the box is [{lo.min():g}, {hi.max():g}]. Pass the "
        f"data's own range (lower=0, upper=255 for 8-bit images, say) or rescale {names[0]}."
      )


def check_finite_scores(name: str, scores: Any) -> np.ndarray:
  """A 1-D float64 NumPy array with no NaN or inf (audit scores)."""
  array = np.asarray(scores, np.float64)
  if array.ndim != 1 or array.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}.")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} contains NaN or inf.")
  return array


_PARAMS_FIX = (
  "Pass only the trainable floating-point arrays and close over the rest: with flax NNX, "
  "`graphdef, params, rest = nnx.split(model, nnx.Param, ...)` and "
  "`nnx.merge(graphdef, params, rest)` inside the loss; with equinox, "
  "`params, static = eqx.partition(model, eqx.is_inexact_array)` and "
  "`eqx.combine(params, static)` inside the loss."
)


def check_differentiable(tree: Any, name: str = "params") -> None:
  """Every leaf of ``tree`` is a floating-point (or complex) array or a Python float.

  Model containers hold more than their weights: flax NNX keeps RNG counters
  (``uint32``) and keys in a module's state, equinox keeps activation functions and
  static fields as leaves. Differentiating those fails deep inside the tracer with an
  error naming neither the leaf nor the remedy; this names both.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, float | complex):
      continue
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      kind = f"a {type(leaf).__name__}"
    elif jnp.issubdtype(dtype, jax.dtypes.prng_key):
      kind = f"a PRNG key array of dtype {dtype}"
    elif jnp.issubdtype(dtype, jnp.inexact):
      continue
    else:
      kind = f"an array of dtype {dtype}"
    raise ValueError(
      f"{name}{jax.tree_util.keystr(path)} is {kind}, which cannot be differentiated. "
      + _PARAMS_FIX
    )


SCALINGS = ("clip", "automatic", "normalize")


def check_scaling(scaling: str, stability: Any) -> str:
  """The scaling rule's name; ``stability`` must be > 0 and finite for ``"automatic"``."""
  check_choice("scaling", scaling, SCALINGS)
  if scaling == "automatic":
    check_positive("stability", stability, finite=True)
  return scaling
