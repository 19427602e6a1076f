"""Batches of a static shape for private training: Poisson batches with masks, fixed-size batches.

DP-SGD's accounting assumes a sampler, and the ε it reports holds only for the batches
that sampler draws. Two are provided, each drawing a fresh batch at every step:

- **Poisson** (:func:`poisson_sample`, :class:`PoissonSampler`): every example joins
  the batch independently with probability ``sample_rate``. The ε is for the
  add-or-remove-one relation (the guarantee compares datasets with and without one
  example). The batch size is random, and JAX needs static shapes, so the batch is
  padded to ``max_batch_size`` slots with a boolean mask (True marks a real example).
  A draw larger than ``max_batch_size`` is cut down to a uniformly random subset of
  that size; :func:`poisson_overflow_probability` gives the chance of that, and
  :func:`clipjax.dp_epsilon` accounts for it when told ``max_batch_size``.
- **Fixed size without replacement** (:class:`WithoutReplacementSampler`): every step
  is a uniformly random subset of exactly ``batch_size`` examples, drawn afresh (not an
  epoch of a shuffled order, which is a different sampler that this accounting does not
  cover). The ε is for the substitution relation (datasets of the same public size that
  differ in one example), for which one example can move the clipped sum by twice the
  clip norm.

**The sampler carries its scheme.** A training loop that draws batches one way and
reports the ε of another reports a false guarantee (Chua et al., 2024, measured how far
off this can be). So each sampler object also returns the accounting arguments for what
it drew, ``sampler.accounting``, to be passed on as
``dp_epsilon(noise_multiplier, steps=steps, delta=delta, **sampler.accounting)``: the
sampling scheme, the rate, the dataset size and the padding are then those of the
batches that ran, and reporting anything else requires writing it out.

**Exact sampling.** Inclusion is decided on 32 random bits: an example joins when its
bits are below ``floor(sample_rate · 2^32)``, so the inclusion probability is that
over ``2^32``, at most ``sample_rate`` and within ``2.4e-10`` of it (accounting with
``sample_rate`` is an upper bound). Random subsets (truncation, fixed-size batches) are
chosen without sorting: every candidate draws 32 random bits, a radix selection
(32 counting passes, O(n) each) finds the ``k``-th smallest value, and candidates tied
at that value draw again among themselves, so the subset is exactly uniform.

Indices come in increasing order, padded with 0, so gathering with them is always in
bounds; only the mask tells padding from example 0.

References:
  Abadi et al., `Deep Learning with Differential Privacy
  <https://arxiv.org/abs/1607.00133>`_, CCS 2016.

  Chua, Ghazi, Kamath, Kumar, Manurangsi, Sinha & Zhang, `How Private are DP-SGD
  Implementations? <https://arxiv.org/abs/2403.17673>`_, ICML 2024.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax import _checks
from clipjax.privacy import _binomial

_BITS = 32


def _static_rate(sample_rate: Any) -> float:
  """``sample_rate`` as a Python float in (0, 1]; it must be concrete (it sets a threshold)."""
  if not _checks.is_concrete(sample_rate):
    raise ValueError(
      "sample_rate must be a concrete number, not traced: it fixes the sampling threshold "
      "and the accounting."
    )
  _checks.check_interval("sample_rate", sample_rate, 0, 1, open_low=True)
  return float(sample_rate)


def _bernoulli(key: jax.Array, rate: float, n: int) -> jax.Array:
  """``n`` independent draws, True with probability ``floor(rate · 2^32) / 2^32``."""
  threshold = math.floor(rate * 2.0**_BITS)  # exact: scaling by a power of two
  if threshold >= 2**_BITS:
    return jnp.ones(n, jnp.bool_)
  return jax.random.bits(key, (n,), jnp.uint32) < jnp.uint32(threshold)


def _rank_value(keys: jax.Array, pool: jax.Array, rank: jax.Array):
  """The ``rank``-th smallest (from 1) of ``keys[pool]``, and ``rank`` among keys equal to it.

  Radix selection, most significant bit first: one counting pass per bit.
  """
  one = jnp.uint32(1)

  def step(i, carry):
    prefix, rank = carry
    bit = jnp.left_shift(one, jnp.uint32(_BITS - 1) - i.astype(jnp.uint32))
    decided = ~(jnp.left_shift(bit, one) - one)  # the bits above `bit` (none for the top bit)
    zeros = pool & ((keys & decided) == prefix) & ((keys & bit) == 0)
    below = jnp.sum(zeros, dtype=jnp.int32)
    higher = rank > below
    return jnp.where(higher, prefix | bit, prefix), jnp.where(higher, rank - below, rank)

  return lax.fori_loop(0, _BITS, step, (jnp.uint32(0), rank))


def _choose(key: jax.Array, candidates: jax.Array, count: int, key_bits: int = _BITS):
  """A uniformly random subset of ``count`` of the candidates (all of them if fewer).

  Every remaining candidate draws ``key_bits`` random bits; those below the
  ``count``-th smallest value are taken, and those tied at it draw again among
  themselves for the places left. ``key_bits`` below 32 only serves the tests (ties).
  """

  def unresolved(state):
    _, _, pool, need = state
    return need < jnp.sum(pool, dtype=jnp.int32)

  def draw(state):
    key, chosen, pool, need = state
    key, subkey = jax.random.split(key)
    keys = jax.random.bits(subkey, pool.shape, jnp.uint32) >> (_BITS - key_bits)
    value, need = _rank_value(keys, pool, need)
    return key, chosen | (pool & (keys < value)), pool & (keys == value), need

  state = (key, jnp.zeros_like(candidates), candidates, jnp.int32(count))
  _, chosen, pool, _ = lax.while_loop(unresolved, draw, state)
  return chosen | pool


def _padded(chosen: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  indices = jnp.nonzero(chosen, size=size, fill_value=0)[0].astype(jnp.int32)
  mask = jnp.arange(size) < jnp.sum(chosen, dtype=jnp.int32)
  return indices, mask


# Compiled once per static configuration, so that calls outside jit do not dispatch op by op.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _poisson_batch(key: jax.Array, n: int, rate: float, size: int):
  include_key, truncate_key = jax.random.split(key)
  return _padded(_choose(truncate_key, _bernoulli(include_key, rate, n), size), size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fixed_batch(key: jax.Array, n: int, size: int):
  return _padded(_choose(key, jnp.ones(n, jnp.bool_), size), size)


def poisson_sample(
  key: jax.Array | int, num_examples: int, sample_rate: float, max_batch_size: int
) -> tuple[jax.Array, jax.Array]:
  """Draws a Poisson batch, padded to a static size: ``(indices, mask)``.

  Every example joins the batch independently with probability ``sample_rate``
  (exactly ``floor(sample_rate · 2^32) / 2^32``, which is at most ``sample_rate``).
  If more than ``max_batch_size`` examples join, the batch keeps a uniformly random
  subset of ``max_batch_size`` of them; this happens with probability
  ``poisson_overflow_probability(num_examples, sample_rate, max_batch_size)``, and
  the accountant must be told (``dp_epsilon(..., num_examples=...,
  max_batch_size=...)``, or ``PoissonSampler.accounting``), which bounds ε for the
  truncated sampler. The guarantee is for the add-or-remove-one relation.

  Jit-able with a traced key (``num_examples``, ``sample_rate`` and
  ``max_batch_size`` are static); O(``num_examples``) work, no sort.

  Args:
    key: a typed PRNG key, a raw ``uint32`` key or an int seed.
    num_examples: the dataset size n, a Python int ``>= 1``.
    sample_rate: q in (0, 1], a concrete number.
    max_batch_size: the number of slots, a Python int ``>= 1``.

  Returns:
    ``indices``: int32 ``(max_batch_size,)``, the batch's examples in increasing
    order, then zeros; ``mask``: bool ``(max_batch_size,)``, True for the real
    examples (a prefix).

  Raises:
    ValueError: naming the argument, for a rate outside (0, 1] or a traced one,
      sizes below 1, or a bad key.

  Example:
    >>> import jax
    >>> from clipjax import poisson_sample
    >>> indices, mask = poisson_sample(jax.random.key(0), 1000, 0.01, max_batch_size=40)
    >>> indices.shape, mask.shape
    ((40,), (40,))
    >>> bool((indices[~mask] == 0).all())
    True

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, CCS 2016.
  """
  n = _checks.check_count("num_examples", num_examples)
  size = _checks.check_count("max_batch_size", max_batch_size)
  rate = _static_rate(sample_rate)
  return _poisson_batch(_checks.canonical_key(key), n, rate, size)


def poisson_overflow_probability(
  num_examples: int, sample_rate: float, max_batch_size: int
) -> float:
  """The chance that a Poisson draw has more than ``max_batch_size`` examples.

  ``P[Binomial(num_examples, sample_rate) > max_batch_size]`` in float64, summed in
  log space from the tail inward (accurate far below 1e-16; relative error about
  ``num_examples · 1e-15``). Use it to choose ``max_batch_size``: the expected batch
  size is ``n·q`` with standard deviation ``sqrt(n·q·(1 − q))``, and a few standard
  deviations of padding make overflow negligible.

  Args:
    num_examples: the dataset size n, a Python int ``>= 1``.
    sample_rate: q in (0, 1].
    max_batch_size: the number of slots, a Python int ``>= 1``.

  Returns:
    The probability, a Python float.

  Example:
    >>> from clipjax import poisson_overflow_probability
    >>> n, q = 60_000, 256 / 60_000  # expected batch 256, standard deviation 16
    >>> p = poisson_overflow_probability(n, q, max_batch_size=256 + 6 * 16)
    >>> 1e-10 < p < 1e-8
    True
  """
  n = _checks.check_count("num_examples", num_examples)
  size = _checks.check_count("max_batch_size", max_batch_size)
  return _binomial.sf(n, _static_rate(sample_rate), size)


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
  """Poisson batches padded to ``max_batch_size``, and the accounting for them.

  ``sampler(key)`` is :func:`poisson_sample` with these arguments;
  ``sampler.accounting`` the keyword arguments that make :func:`clipjax.dp_epsilon`
  and :func:`clipjax.calibrate_noise` account for exactly this sampler (Poisson, the
  add-or-remove-one relation, truncation to ``max_batch_size`` included).

  Attributes:
    num_examples: the dataset size n.
    sample_rate: q in (0, 1]; the expected batch size is ``n·q``.
    max_batch_size: the static number of slots.

  Example:
    >>> import jax
    >>> from clipjax import PoissonSampler, dp_epsilon
    >>> sampler = PoissonSampler(num_examples=1000, sample_rate=0.01, max_batch_size=40)
    >>> indices, mask = sampler(jax.random.key(0))  # also under jax.jit, key traced
    >>> sampler.accounting["sampling"], sampler.overflow_probability < 1e-12
    ('poisson', True)
    >>> eps = dp_epsilon(1.0, steps=1000, delta=1e-5, **sampler.accounting)
  """

  num_examples: int
  sample_rate: float
  max_batch_size: int

  def __post_init__(self):
    object.__setattr__(self, "num_examples", _checks.check_count("num_examples", self.num_examples))
    object.__setattr__(self, "sample_rate", _static_rate(self.sample_rate))
    size = _checks.check_count("max_batch_size", self.max_batch_size)
    object.__setattr__(self, "max_batch_size", size)

  def __call__(self, key: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """``(indices, mask)`` of shape ``(max_batch_size,)``: see :func:`poisson_sample`."""
    return poisson_sample(key, self.num_examples, self.sample_rate, self.max_batch_size)

  @property
  def overflow_probability(self) -> float:
    """The chance that one draw is truncated: :func:`poisson_overflow_probability`."""
    return poisson_overflow_probability(self.num_examples, self.sample_rate, self.max_batch_size)

  @property
  def accounting(self) -> dict[str, Any]:
    """Keyword arguments for :func:`clipjax.dp_epsilon` and :func:`clipjax.calibrate_noise`."""
    return {
      "sample_rate": self.sample_rate,
      "sampling": "poisson",
      "num_examples": self.num_examples,
      "max_batch_size": self.max_batch_size,
    }


@dataclasses.dataclass(frozen=True)
class WithoutReplacementSampler:
  """Fixed-size batches, a fresh uniformly random subset at every step, and their accounting.

  ``sampler(key)`` returns ``(indices, mask)`` of shape ``(batch_size,)``: distinct
  indices in increasing order, and a mask that is all True (the same form as a
  Poisson batch, so a training step takes either). ``sampler.accounting`` makes
  :func:`clipjax.dp_epsilon` account for sampling without replacement under the
  substitution relation, with ``sample_rate = batch_size / num_examples``.

  Every call draws a new subset independently of the previous ones; iterating over
  a shuffled order (epochs) is a different sampler that this accounting does not
  cover.

  Attributes:
    num_examples: the dataset size n.
    batch_size: the batch size b, ``1 <= b <= n``.

  Example:
    >>> import jax
    >>> from clipjax import WithoutReplacementSampler
    >>> sampler = WithoutReplacementSampler(num_examples=100, batch_size=8)
    >>> indices, mask = sampler(jax.random.key(0))
    >>> indices.shape, bool(mask.all()), len(set(indices.tolist()))
    ((8,), True, 8)
    >>> sampler.accounting["sampling"], sampler.accounting["sample_rate"]
    ('without_replacement', 0.08)
  """

  num_examples: int
  batch_size: int

  def __post_init__(self):
    n = _checks.check_count("num_examples", self.num_examples)
    b = _checks.check_count("batch_size", self.batch_size)
    if b > n:
      raise ValueError(f"batch_size must be <= num_examples = {n}, got {b}.")
    object.__setattr__(self, "num_examples", n)
    object.__setattr__(self, "batch_size", b)

  def __call__(self, key: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """``(indices, mask)``: a uniformly random ``batch_size``-subset, mask all True."""
    return _fixed_batch(_checks.canonical_key(key), self.num_examples, self.batch_size)

  @property
  def accounting(self) -> dict[str, Any]:
    """Keyword arguments for :func:`clipjax.dp_epsilon` and :func:`clipjax.calibrate_noise`."""
    return {
      "sample_rate": self.batch_size / self.num_examples,
      "sampling": "without_replacement",
      "num_examples": self.num_examples,
    }


def _group_table(labels: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows of a ``(num_groups, largest)`` int32 table: each group's indices in increasing
  order, padded with 0; and the groups' sizes. Built once, eagerly, in NumPy."""
  counts = np.bincount(labels, minlength=num_groups)
  order = np.argsort(labels, kind="stable")  # within a group, increasing index
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  position = np.arange(labels.size) - starts[labels[order]]
  table = np.zeros((num_groups, max(1, int(counts.max(initial=0)))), np.int32)
  table[labels[order], position] = order
  return table, counts.astype(np.int32)


def _take(row: jax.Array, chosen: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """The entries of ``row`` at the chosen slots, in slot order, padded with 0 to ``size``."""
  slots, mask = _padded(chosen, size)
  return jnp.where(mask, row[slots], 0), mask


# ``order`` holds the example indices grouped by user, user ``u``'s at ``starts[u]`` onward:
# O(n + users) memory, where a dense (users, largest count) table could be far larger.
@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _user_batch(key, order, starts, counts, largest: int, rate: float, max_users: int, k: int):
  user_key, truncate_key, example_key = jax.random.split(key, 3)
  drawn = _choose(truncate_key, _bernoulli(user_key, rate, counts.shape[0]), max_users)
  users, user_mask = _padded(drawn, max_users)
  available = jnp.where(user_mask, counts[users], 0)
  slots = jnp.arange(largest)

  def examples(key, start, count):
    positions, mask = _padded(_choose(key, slots < count, k), k)
    return jnp.where(mask, order[start + positions], 0), mask

  keys = jax.random.split(example_key, max_users)
  indices, example_mask = jax.vmap(examples)(keys, starts[users], available)
  return indices, user_mask, example_mask


@dataclasses.dataclass(frozen=True, eq=False)
class UserSampler:
  """User-level Poisson batches: users at rate ``q``, up to ``K`` examples of each.

  For user-level DP the privacy unit is a user, who may own many examples. Every step,
  each user joins independently with probability ``sample_rate`` (exactly
  ``floor(q · 2^32) / 2^32``, as in :func:`poisson_sample`); a draw of more than
  ``max_users`` users keeps a uniformly random subset of ``max_users``. Each drawn
  user brings ``min(K, c_u)`` of its ``c_u`` examples, a uniformly random subset drawn
  afresh at every step (``K`` = ``examples_per_user``). The examples are grouped by
  user once, eagerly (memory O(n + users)); a draw costs O(``max_users`` × the largest
  user's count) per radix pass, with no sort.

  ``sampler(key)`` returns ``(indices, user_mask, example_mask)`` of static shapes
  ``(max_users, K)``, ``(max_users,)`` and ``(max_users, K)``: row ``j`` holds the
  example indices of the ``j``-th drawn user (padded with 0), ``user_mask[j]`` says
  whether the row is a real user, ``example_mask[j, i]`` whether slot ``i`` is a real
  example of that user (False on padding rows). Gather the data with the indices
  (``x[indices]`` has shape ``(max_users, K, ...)``) and pass a loss written for ONE
  user's ``K`` examples, which uses the example mask, to
  ``clipjax.clipped_grad(user_loss, C)(params, x[indices], y[indices], example_mask,
  mask=user_mask)``: the result is the sum over drawn users of each user's gradient
  clipped to ``C``. Whether a user's gradient is the sum or the mean of its examples'
  gradients is the loss's choice (both have sensitivity ``C`` once clipped).

  ``sampler.accounting`` makes :func:`clipjax.dp_epsilon` and
  :func:`clipjax.calibrate_noise` account for exactly this sampler with the USER as the
  unit: Poisson sampling of users at ``q``, ``num_examples`` = the number of users,
  truncation to ``max_users``, and ``unit="user"``. The guarantee then covers adding or
  removing one user with all of their examples, provided each example belongs to
  exactly one user and no step uses more than ``K`` of a user's examples (both hold by
  construction here).

  Attributes:
    user_ids: the user of each example, shape ``(num_examples,)``, any integers.
    sample_rate: q in (0, 1], the rate at which users are drawn.
    max_users: the static number of user rows per batch.
    examples_per_user: K, the static number of example slots per user.

  Example:
    >>> import jax, numpy as np
    >>> from clipjax import UserSampler, dp_epsilon
    >>> user_ids = np.array([0, 0, 0, 1, 2, 2, 7, 7, 7, 7])
    >>> sampler = UserSampler(user_ids, sample_rate=0.5, max_users=4, examples_per_user=2)
    >>> indices, user_mask, example_mask = sampler(jax.random.key(0))
    >>> indices.shape, user_mask.shape, example_mask.shape
    ((4, 2), (4,), (4, 2))
    >>> sampler.num_users, sampler.accounting["unit"]
    (4, 'user')
    >>> eps = dp_epsilon(1.0, steps=100, delta=1e-5, **sampler.accounting)

  References:
    Chua et al., `Mind the Privacy Unit! User-Level Differential Privacy for Language
    Model Fine-Tuning <https://arxiv.org/abs/2406.14322>`_, COLM 2024.
  """

  user_ids: Any
  sample_rate: float
  max_users: int
  examples_per_user: int

  def __post_init__(self):
    ids = np.asarray(self.user_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
        f"user_ids must be a non-empty 1-D array of integers, got shape {ids.shape} and "
        f"dtype {ids.dtype}."
      )
    users, labels = np.unique(ids, return_inverse=True)
    labels = labels.reshape(-1)
    counts = np.bincount(labels, minlength=users.size)
    object.__setattr__(self, "_order", jnp.asarray(np.argsort(labels, kind="stable"), jnp.int32))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    object.__setattr__(self, "_starts", jnp.asarray(starts, jnp.int32))
    object.__setattr__(self, "_counts", jnp.asarray(counts, jnp.int32))
    object.__setattr__(self, "_largest", int(counts.max()))
    object.__setattr__(self, "user_ids", ids)
    object.__setattr__(self, "sample_rate", _static_rate(self.sample_rate))
    object.__setattr__(self, "max_users", _checks.check_count("max_users", self.max_users))
    k = _checks.check_count("examples_per_user", self.examples_per_user)
    object.__setattr__(self, "examples_per_user", k)

  @property
  def num_users(self) -> int:
    """The number of distinct users."""
    return int(self._counts.shape[0])

  @property
  def examples_per_user_counts(self) -> np.ndarray:
    """Each user's number of examples, in the order of ``np.unique(user_ids)``."""
    return np.asarray(self._counts)

  def __call__(self, key: jax.Array | int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(indices, user_mask, example_mask)``; jit-able with a traced key."""
    return _user_batch(
      _checks.canonical_key(key),
      self._order,
      self._starts,
      self._counts,
      self._largest,
      self.sample_rate,
      self.max_users,
      self.examples_per_user,
    )

  @property
  def overflow_probability(self) -> float:
    """The chance that one draw has more than ``max_users`` users."""
    return poisson_overflow_probability(self.num_users, self.sample_rate, self.max_users)

  @property
  def accounting(self) -> dict[str, Any]:
    """Keyword arguments for :func:`clipjax.dp_epsilon` and :func:`clipjax.calibrate_noise`,
    the user being the unit."""
    return {
      "sample_rate": self.sample_rate,
      "sampling": "poisson",
      "num_examples": self.num_users,
      "max_batch_size": self.max_users,
      "unit": "user",
    }


@functools.partial(jax.jit, static_argnums=(4,))
def _cyclic_batch(key, step, table, counts, rate: float):
  group = jnp.asarray(step, jnp.int32) % table.shape[0]
  slots = jnp.arange(table.shape[1])
  chosen = _bernoulli(key, rate, table.shape[1]) & (slots < counts[group])
  return _take(table[group], chosen, table.shape[1])


@dataclasses.dataclass(frozen=True, eq=False)
class CyclicPoissonSampler:
  """Cyclic Poisson batches (balls-in-bins at rate 1), the participation of correlated noise.

  Once, at construction, every example is assigned a group among ``cycle_length`` = b,
  independently and uniformly at random (from ``seed``). At step ``t`` only group
  ``t mod b`` is eligible, and each of its examples joins independently with probability
  ``sample_rate`` (exactly ``floor(q · 2^32) / 2^32``). An example therefore takes part
  at most once every b steps, the participation that banded matrix factorization needs
  for amplification (Choquette-Choo et al., 2023) and that the min-separation
  sensitivity of any strategy assumes. With ``sample_rate=1`` this is balls-in-bins
  sampling (Chua et al., 2024): every example in every b-th step of its bin. The
  independent assignment is what the add-or-remove-one relation needs (an added
  example lands in a random group).

  ``sampler(key, step)`` returns ``(indices, mask)`` of static shape ``(largest group,)``
  (batches never need truncation), indices in increasing order and padded with 0;
  ``step`` may be traced. ``sampler.accounting`` holds the keyword arguments of
  :func:`clipjax.correlated_noise` and :func:`clipjax.correlated_epsilon`
  for this schedule. The expected batch size, to divide the noisy sum by, is
  ``sampler.expected_batch_size`` = ``q · n / b``.

  Attributes:
    num_examples: the dataset size n.
    cycle_length: b, the number of groups (and the minimum separation of an example's
      participations).
    sample_rate: q in (0, 1], the rate within the eligible group.
    seed: the seed of the assignment to groups.

  Example:
    >>> import jax
    >>> from clipjax import CyclicPoissonSampler
    >>> sampler = CyclicPoissonSampler(num_examples=100, cycle_length=4, sample_rate=0.5)
    >>> indices, mask = sampler(jax.random.key(0), step=3)
    >>> indices.shape == mask.shape == (sampler.max_batch_size,)
    True
    >>> sampler.accounting["sampling"], sampler.expected_batch_size
    ('cyclic_poisson', 12.5)

  References:
    Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta & Xu, `(Amplified) Banded
    Matrix Factorization: A unified approach to private training
    <https://arxiv.org/abs/2306.08153>`_, NeurIPS 2023.

    Chua, Ghazi, Kamath, Kumar, Manurangsi, Sinha & Zhang, `Balls-and-Bins Sampling for
    DP-SGD <https://arxiv.org/abs/2412.16802>`_, AISTATS 2025.
  """

  num_examples: int
  cycle_length: int
  sample_rate: float = 1.0
  seed: int = 0

  def __post_init__(self):
    n = _checks.check_count("num_examples", self.num_examples)
    b = _checks.check_count("cycle_length", self.cycle_length)
    if b > n:
      raise ValueError(f"cycle_length must be <= num_examples = {n}, got {b}.")
    groups = np.random.default_rng(self.seed).integers(0, b, size=n)
    table, counts = _group_table(groups, b)
    object.__setattr__(self, "num_examples", n)
    object.__setattr__(self, "cycle_length", b)
    object.__setattr__(self, "sample_rate", _static_rate(self.sample_rate))
    object.__setattr__(self, "_table", jnp.asarray(table))
    object.__setattr__(self, "_counts", jnp.asarray(counts))

  @property
  def max_batch_size(self) -> int:
    """The static number of slots: the largest group's size."""
    return int(self._table.shape[1])

  @property
  def expected_batch_size(self) -> float:
    """``q · n / b``: the average batch size over a cycle."""
    return self.sample_rate * self.num_examples / self.cycle_length

  def __call__(self, key: jax.Array | int, step: Any) -> tuple[jax.Array, jax.Array]:
    """``(indices, mask)`` of step ``step``'s batch; jit-able with traced key and step."""
    return _cyclic_batch(
      _checks.canonical_key(key), step, self._table, self._counts, self.sample_rate
    )

  @property
  def accounting(self) -> dict[str, Any]:
    """Keyword arguments for :func:`clipjax.correlated_noise`,
    :func:`clipjax.correlated_epsilon` and :func:`clipjax.calibrate_correlated_noise`."""
    return {
      "sampling": "cyclic_poisson",
      "sample_rate": self.sample_rate,
      "cycle_length": self.cycle_length,
      "num_examples": self.num_examples,
    }
