"""Private training on several processes: sharded Poisson batches, one noise draw, checks.

JAX's multi-process runtime (``jax.distributed.initialize``) is the engine: every process
runs the same program on the global arrays, ``jit`` partitions each step, and the sum of
the clipped gradients over the batch becomes one all-reduce of a parameter-sized
vector. What DP-SGD adds to an ordinary data-parallel loop is three requirements, met
here by construction:

1. **The batch is a function of a shared key.** Every process holds the same data key;
   step ``t``'s batch is drawn from ``fold_in(data_key, t)``. The dataset is laid out in
   ``num_shards`` shards of equal size, each held whole by one process;
   :class:`ShardedPoissonSampler` draws each shard's part of the batch from
   ``fold_in(key, shard)``, so a process draws only its own shards' examples and reads
   them from its own rows (``ShardedPoissonSampler.global_batch``, through
   ``jax.make_array_from_process_local_data``). No example is sent to another process,
   and the batch does not depend on how many processes there are.
2. **One Gaussian draw for the whole sum.** The noise transformation
   (:func:`clipjax.dp_noise`, :func:`clipjax.adaptive_dp_noise`) runs inside the jitted
   step on the replicated, all-reduced sum, with its key in the replicated optimizer
   state: one logical draw per step, the same values on every device of every process
   (not one draw per host, which would add ``sqrt(processes)`` times the noise if the
   keys agreed and leak if they did not).
3. **A cheap check that the keys agree.** :func:`assert_same_across_processes` hashes
   its argument (a key, an optimizer state) to 8 bytes on every process and compares the
   hashes across processes: the debug mode of a training loop, or a check every few
   hundred steps.

The guarantee assumes: every process starts from the same seeds (data key, noise key,
initial parameters); process ``p`` holds exactly the shards that the batch sharding
assigns to it (``local_shards``), in their global order; and
the shards partition the dataset into parts of exactly ``shard_size`` examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from clipjax import _checks
from clipjax.privacy.sampling import PoissonSampler


def _host_bytes(leaf: Any) -> bytes:
  """A leaf's value as bytes on this process, with its dtype and shape (keys as their data)."""
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  value = np.asarray(leaf)
  return f"{value.dtype.str}{value.shape}".encode() + value.tobytes()


def _fingerprint(tree: Any) -> np.ndarray:
  """An 8-byte hash of a pytree's values on this process, as two ``uint32`` words.

  Typed PRNG keys are hashed through their key data; arrays must be readable on this
  process (local, or fully replicated global arrays).
  """
  digest = hashlib.blake2b(digest_size=8)
  leaves, treedef = jax.tree.flatten(tree)
  digest.update(str(treedef).encode())
  for leaf in leaves:
    digest.update(_host_bytes(leaf))
  return np.frombuffer(digest.digest(), np.uint32).copy()


def assert_same_across_processes(tree: Any, name: str = "key") -> None:
  """Raises unless ``tree`` has the same values on every process (a debug check).

  Every process hashes its own copy (an 8-byte hash) and the 8-byte hashes are
  gathered; no array is sent. A collective: call it on every process at the same point
  of the program. With one process it only hashes.

  Use it on the data key and the optimizer state (whose noise key decides the noise):
  if the data keys differ, processes draw different batches; if the noise keys
  differ, the replicated noisy update is no longer one draw.

  Args:
    tree: a pytree of local or fully replicated arrays (typed PRNG keys allowed).
    name: what ``tree`` is, for the error message.

  Raises:
    ValueError: naming ``name`` and the processes whose copy differs from process 0's.

  Example:
    >>> import jax
    >>> from clipjax import assert_same_across_processes
    >>> assert_same_across_processes(jax.random.key(0), "data key")  # one process: passes
  """
  local = _fingerprint(tree)
  if jax.process_count() == 1:
    return
  gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, local.size)
  differ = [p for p in range(gathered.shape[0]) if not np.array_equal(gathered[p], gathered[0])]
  if differ:
    raise ValueError(
      f"{name} differs across processes: processes {differ} do not hold process 0's value "
      f"(fingerprints {gathered.tolist()}). Every process must start from the same seeds; "
      "otherwise batches or noise are no longer one draw per step."
    )


@dataclasses.dataclass(frozen=True)
class ShardedPoissonSampler:
  """Poisson batches of a dataset stored in equal shards, each shard's part drawn on its own.

  The dataset has ``num_shards · shard_size`` examples; shard ``s`` holds examples
  ``s · shard_size`` to ``(s + 1) · shard_size - 1``. At every step each example joins
  the batch independently with probability ``sample_rate``, as in
  :class:`clipjax.PoissonSampler`; each shard's examples fill ``shard_batch_size``
  slots of their own (padded, with a mask), drawn by
  ``PoissonSampler(shard_size, sample_rate, shard_batch_size)`` from
  ``fold_in(key, s)``. The global batch is the shards' slots one after the other:
  ``max_batch_size = num_shards · shard_batch_size`` slots, of which about
  ``sample_rate · num_examples`` are real.

  **Accounting.** A shard whose draw overflows its slots is cut down to a uniformly
  random subset, independently of the other shards. Adding or removing one example
  changes one shard only; the other shards' clipped sums are independent of it and are
  added to that shard's noisy sum, which is post-processing. So each step is as
  private as the truncated Poisson Gaussian mechanism on ONE shard, and
  ``sampler.accounting`` passes that to :func:`clipjax.dp_epsilon`:
  ``num_examples=shard_size``, ``max_batch_size=shard_batch_size``, the same
  ``sample_rate``. The noise still divides the whole sum by the EXPECTED batch size
  ``sampler.expected_batch_size``. The ε depends on the number of shards, not on the
  number of processes or devices that hold them.

  **Several processes.** Each process holds whole shards: those whose slots the batch
  sharding puts on its devices (``local_shards``). It draws only their batches and
  gathers their rows from its own data (``global_batch``).

  Attributes:
    num_shards: the number of shards S.
    shard_size: the examples per shard, the same for every shard.
    sample_rate: q in (0, 1], the inclusion probability of every example.
    shard_batch_size: the slots per shard; choose it with
      :func:`clipjax.poisson_overflow_probability` ``(shard_size, sample_rate, ·)``.

  Example:
    >>> import jax
    >>> from clipjax import ShardedPoissonSampler
    >>> sampler = ShardedPoissonSampler(4, 250, sample_rate=0.02, shard_batch_size=16)
    >>> indices, mask = sampler(jax.random.key(0))  # the global batch, on one process
    >>> indices.shape, sampler.num_examples, sampler.expected_batch_size
    ((64,), 1000, 20.0)
    >>> first, second = indices[:16][mask[:16]], indices[16:32][mask[16:32]]
    >>> bool((first < 250).all() and (second >= 250).all() and (second < 500).all())
    True
    >>> sampler.accounting["num_examples"], sampler.accounting["max_batch_size"]  # one shard's
    (250, 16)
  """

  num_shards: int
  shard_size: int
  sample_rate: float
  shard_batch_size: int

  def __post_init__(self):
    for name in ("num_shards", "shard_size", "shard_batch_size"):
      object.__setattr__(self, name, _checks.check_count(name, getattr(self, name)))
    # PoissonSampler checks the rate, with the same message as everywhere.
    shard = PoissonSampler(self.shard_size, self.sample_rate, self.shard_batch_size)
    object.__setattr__(self, "sample_rate", shard.sample_rate)

  @property
  def shard_sampler(self) -> PoissonSampler:
    """The sampler of one shard: ``PoissonSampler(shard_size, sample_rate, shard_batch_size)``."""
    return PoissonSampler(self.shard_size, self.sample_rate, self.shard_batch_size)

  @property
  def num_examples(self) -> int:
    """The dataset size ``num_shards · shard_size``."""
    return self.num_shards * self.shard_size

  @property
  def max_batch_size(self) -> int:
    """The global batch's slots, ``num_shards · shard_batch_size``."""
    return self.num_shards * self.shard_batch_size

  @property
  def expected_batch_size(self) -> float:
    """``sample_rate · num_examples``: what :func:`clipjax.dp_noise` divides the sum by."""
    return self.sample_rate * self.num_examples

  @property
  def overflow_probability(self) -> float:
    """The chance that some shard's draw is truncated at one step."""
    per_shard = self.shard_sampler.overflow_probability
    return -math.expm1(self.num_shards * math.log1p(-per_shard)) if per_shard < 1 else 1.0

  @property
  def accounting(self) -> dict[str, Any]:
    """Keyword arguments for :func:`clipjax.dp_epsilon` and :func:`clipjax.calibrate_noise`:
    one shard's truncated Poisson sampler (see the class docstring)."""
    return self.shard_sampler.accounting

  def shard(self, key: jax.Array | int, shard: int) -> tuple[jax.Array, jax.Array]:
    """Shard ``shard``'s part of the batch: ``(indices within the shard, mask)``, each of
    shape ``(shard_batch_size,)``."""
    if not 0 <= shard < self.num_shards:
      raise ValueError(f"shard must be in [0, {self.num_shards}), got {shard!r}.")
    return self.shard_sampler(jax.random.fold_in(_checks.canonical_key(key), shard))

  def __call__(self, key: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """The global batch on one process: ``(indices into the dataset, mask)``, each of
    shape ``(max_batch_size,)``, shard after shard."""
    parts = [self.shard(key, s) for s in range(self.num_shards)]
    indices = np.concatenate(
      [np.asarray(i) + s * self.shard_size for s, (i, _) in enumerate(parts)]
    )
    mask = np.concatenate([np.asarray(m) for _, m in parts])
    return jax.numpy.asarray(indices), jax.numpy.asarray(mask)

  def local_shards(self, sharding: Any) -> range:
    """The shards this process holds: those whose batch slots ``sharding`` puts on its devices.

    Args:
      sharding: the sharding of the batch's leading axis (e.g.
        ``NamedSharding(mesh, P("batch"))``), for a global batch of ``max_batch_size``.

    Raises:
      ValueError: when this process's slots are not one block of whole shards (then
        a shard's examples would have to be read by two processes); reorder the mesh's
        devices by process, or change ``num_shards``.
    """
    rows = set()
    for index in sharding.addressable_devices_indices_map((self.max_batch_size,)).values():
      rows.update(range(self.max_batch_size)[index[0] if index else slice(None)])
    start, stop = min(rows), max(rows) + 1
    size = self.shard_batch_size
    if len(rows) != stop - start or start % size or stop % size:
      raise ValueError(
        f"sharding puts batch slots {sorted(rows)[:4]}... on process {jax.process_index()}: "
        f"not one block of whole shards of {size} slots. Each process must hold whole "
        "shards; order the mesh's devices by process, or change num_shards."
      )
    return range(start // size, stop // size)

  def global_batch(
    self,
    key: jax.Array | int,
    local_data: Any,
    sharding: Any,
    *,
    debug: bool = False,
  ) -> tuple[Any, jax.Array]:
    """This step's batch as global arrays, built from this process's shards only.

    Every process calls it with the same ``key``; each draws its own shards' batches
    (``shard``), gathers those rows from ``local_data`` on the host, and
    contributes them with ``jax.make_array_from_process_local_data``. The result is
    the batch of ``__call__`` (the same examples in the same slots), sharded
    along its leading axis, without any example leaving the process that holds it.

    Args:
      key: the step's sampling key, the same on every process (e.g.
        ``jax.random.fold_in(data_key, step)``).
      local_data: a pytree of host arrays: this process's shards
        (``local_shards``) one after the other, ``len(local_shards) · shard_size``
        rows on every leaf's leading axis.
      sharding: the batch's sharding, as for ``local_shards``.
      debug: also check that every process holds the same ``key``
        (:func:`assert_same_across_processes`; a collective).

    Returns:
      ``(batch, mask)``: ``local_data``'s structure with ``max_batch_size`` rows per
      leaf, and the boolean mask, all global arrays sharded like ``sharding``.
    """
    key = _checks.canonical_key(key)
    if debug:
      assert_same_across_processes(key, "sampling key")
    shards = self.local_shards(sharding)
    rows = len(shards) * self.shard_size
    for leaf in jax.tree.leaves(local_data):
      if np.shape(leaf)[:1] != (rows,):
        raise ValueError(
          f"local_data must hold this process's {len(shards)} shard(s) of {self.shard_size} "
          f"examples ({rows} rows on the leading axis), got shape {np.shape(leaf)}."
        )
    parts = [self.shard(key, s) for s in shards]
    indices = np.concatenate(
      [np.asarray(i) + j * self.shard_size for j, (i, _) in enumerate(parts)]
    )
    mask = np.concatenate([np.asarray(m) for _, m in parts])

    def place(rows):
      return jax.make_array_from_process_local_data(
        sharding, rows, (self.max_batch_size, *rows.shape[1:])
      )

    batch = jax.tree.map(lambda leaf: place(np.asarray(leaf)[indices]), local_data)
    return batch, place(mask)
