"""Checkpoints that resume private training exactly, with every step counted once.

A DP-SGD run is a function of its data and its seeds: the batch of step ``t`` is
drawn from ``fold_in(data_key, t)`` and the noise from the key in the optimizer state,
split once per step. A checkpoint that holds all of that, and the number of steps
taken, resumes the run bit for bit: the steps redone after a crash draw the same
batches and the same noise as the lost ones, so they release nothing new, and the ε
of the run is that of its step count, recomputed by the accountant from the
restored count (``PrivacyConfig.epsilon``). What must never happen is a resume
with new seeds (a second, independent noise draw on steps already released), a step
count that lags the parameters, or a resume under another configuration; these are
refused.

- :class:`PrivateTrainingState`: parameters, optimizer state (noise keys, adaptive
  clip norms, moments), the data key, and the steps taken.
- :class:`PrivacyConfig`: what the ε depends on (clip norm, noise multiplier, the
  sampler and its parameters, δ) and anything else the caller wants checked.
- :func:`save_checkpoint` and :func:`restore_checkpoint`: one call each, through
  `orbax-checkpoint <https://orbax.readthedocs.io>`_ (``pip install -e ".[checkpoint]"``).
  A save is atomic: orbax writes into a temporary directory and renames it once
  everything is written, so a process killed during a save leaves the previous
  checkpoint as the latest. With several processes, every process calls both, with
  global arrays (each writes its own shards).

Restoring refuses, with a ``ValueError`` saying why, a checkpoint written with another
configuration, and a step directory that is not a finished save (files missing or
unreadable); it never falls back silently to an older checkpoint or to step 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import _checks
from clipjax.privacy.accounting import dp_epsilon

_FORMAT = 1


def _orbax():
  try:
    import orbax.checkpoint as ocp  # noqa: PLC0415 - optional, and slow to import
  except ImportError as error:
    raise ImportError(
      'clipjax\'s checkpoints need orbax-checkpoint: pip install -e ".[checkpoint]" '
      "(or pip install orbax-checkpoint)."
    ) from error
  return ocp


class PrivateTrainingState(NamedTuple):
  """Everything a private training run needs to continue exactly where it stopped.

  Attributes:
    params: the model's parameters (a pytree of arrays).
    opt_state: the optimizer's state: the noise transformation's key
      (:class:`clipjax.DPNoiseState`), the adaptive clip norm
      (:class:`clipjax.AdaptiveDPNoiseState`), the optimizer's moments.
    data_key: the sampler's key; step ``t`` draws its batch from
      ``fold_in(data_key, t)`` (``batch_key()``), so the sampler's position is the
      step count and no batch is drawn twice.
    steps: the number of steps taken (released updates), a Python int.
  """

  params: Any
  opt_state: Any
  data_key: jax.Array
  steps: int

  def batch_key(self) -> jax.Array:
    """The key of the next step's batch: ``fold_in(data_key, steps)``."""
    return jax.random.fold_in(self.data_key, self.steps)


def _json(value: Any, name: str) -> Any:
  """``value`` as plain JSON data (floats, ints, strings, lists, dicts), or a ValueError."""
  try:
    return json.loads(json.dumps(value, default=_jsonable))
  except (TypeError, ValueError) as error:
    raise ValueError(f"{name} must be made of numbers, strings, lists and dicts: {error}") from None


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.generic, jax.Array, np.ndarray)):
    return np.asarray(value).tolist()
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f"{type(value).__name__} is not JSON data")


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  """What a run's ε depends on; a checkpoint can only be resumed under the same.

  Attributes:
    clip_norm: the clip norm (the initial one under adaptive clipping), a number or a
      pytree (dict or list) of numbers.
    noise_multiplier: σ of the noise transformation.
    sampler: the sampler that draws the batches (:class:`clipjax.PoissonSampler`,
      :class:`clipjax.WithoutReplacementSampler`, :class:`clipjax.ShardedPoissonSampler`):
      its parameters are compared on restore, and ``sampler.accounting`` is what
      ``epsilon`` accounts for.
    delta: the δ of the guarantee.
    extra: other settings that a resumed run must share with the first (learning
      rate, adaptive clipping's target quantile, ...), as JSON data.

  Example:
    >>> from clipjax import PoissonSampler, PrivacyConfig, dp_epsilon
    >>> sampler = PoissonSampler(1000, 0.01, max_batch_size=40)
    >>> config = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.1, sampler=sampler, delta=1e-5)
    >>> eps = config.epsilon(steps=1000, accountant="rdp")  # the ε of 1000 steps
    >>> eps == dp_epsilon(1.1, steps=1000, delta=1e-5, accountant="rdp", **sampler.accounting)
    True
  """

  clip_norm: Any
  noise_multiplier: float
  sampler: Any
  delta: float
  extra: Any = None

  def __post_init__(self):
    _checks.check_clip_norm(self.clip_norm)
    _checks.check_nonnegative("noise_multiplier", self.noise_multiplier)
    _checks.check_interval("delta", self.delta, 0, 1, open_low=True, open_high=True)
    if not dataclasses.is_dataclass(self.sampler) or not hasattr(self.sampler, "accounting"):
      raise ValueError(
        "sampler must be a clipjax sampler (PoissonSampler, WithoutReplacementSampler, "
        f"ShardedPoissonSampler), got {type(self.sampler).__name__}."
      )
    self.as_json()  # refuses what cannot be stored

  def as_json(self) -> dict[str, Any]:
    """The configuration as JSON data: what a checkpoint stores and compares."""
    return {
      "clip_norm": _json(jax.tree.map(float, self.clip_norm), "clip_norm"),
      "noise_multiplier": float(self.noise_multiplier),
      "sampler": {
        "type": type(self.sampler).__name__,
        **_json(dataclasses.asdict(self.sampler), "sampler"),
      },
      "accounting": _json(self.sampler.accounting, "sampler.accounting"),
      "delta": float(self.delta),
      "extra": _json(self.extra, "extra"),
    }

  def epsilon(self, steps: int, *, accountant: str = "pld") -> float:
    """The ε spent by ``steps`` steps: :func:`clipjax.dp_epsilon` for this sampler."""
    return dp_epsilon(
      float(self.noise_multiplier),
      steps=steps,
      delta=float(self.delta),
      accountant=accountant,
      **self.sampler.accounting,
    )


def _is_key(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
  """Typed PRNG keys as their ``uint32`` data; other leaves as JAX arrays."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else jnp.asarray(x), tree)


def _key_impls(tree: Any) -> list[str | None]:
  return [str(jax.random.key_impl(x)) if _is_key(x) else None for x in jax.tree.leaves(tree)]


def _manager(ocp, directory: str, **options):
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options))


def save_checkpoint(
  directory: str | os.PathLike,
  state: PrivateTrainingState,
  config: PrivacyConfig,
  *,
  max_to_keep: int | None = 2,
) -> str:
  """Saves the whole private-training state atomically, as step ``state.steps``.

  Writes ``directory/<steps>/``: the arrays of ``state.params`` and
  ``state.opt_state`` (keys as their data) with orbax's ``StandardSave``, and the data
  key, the step count and ``config`` as JSON. Returns once the checkpoint is
  finalised (renamed into place). Interrupted saves of earlier runs (orbax's
  temporary directories) are removed, and only the ``max_to_keep`` latest
  checkpoints are kept.

  With several processes, every process calls it with the same state (global arrays
  for params and optimizer state, the same data key); each writes its own shards.

  Args:
    directory: the run's checkpoint directory (created if missing).
    state: a :class:`PrivateTrainingState`.
    config: the run's :class:`PrivacyConfig`.
    max_to_keep: how many checkpoints to keep (``None``: all).

  Returns:
    The path of the checkpoint written.

  Raises:
    ImportError: without orbax-checkpoint.
    ValueError: for a negative step count or a non-key ``data_key``.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, optax
    >>> from clipjax import (PoissonSampler, PrivacyConfig, PrivateTrainingState,
    ...   dp_noise, restore_checkpoint, save_checkpoint)
    >>> sampler = PoissonSampler(100, 0.1, max_batch_size=25)
    >>> config = PrivacyConfig(1.0, noise_multiplier=1.0, sampler=sampler, delta=1e-5)
    >>> tx = optax.chain(dp_noise(1.0, 1.0, 10.0, key=1), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = PrivateTrainingState(params, tx.init(params), jax.random.key(2), steps=7)
    >>> directory = tempfile.mkdtemp()
    >>> path = save_checkpoint(directory, state, config)
    >>> restored = restore_checkpoint(directory, state._replace(steps=0), config)
    >>> restored.steps, bool((restored.opt_state[0].key == state.opt_state[0].key).all())
    (7, True)
  """
  ocp = _orbax()
  steps = _checks.check_count("state.steps", state.steps, minimum=0)
  if not _is_key(state.data_key):
    raise ValueError("state.data_key must be a typed PRNG key (jax.random.key).")
  directory = os.path.abspath(os.fspath(directory))
  arrays = {"params": state.params, "opt_state": state.opt_state}
  meta = {
    "format": _FORMAT,
    "steps": steps,
    "data_key": np.asarray(jax.random.key_data(state.data_key)).tolist(),
    "data_key_impl": str(jax.random.key_impl(state.data_key)),
    "key_impls": _key_impls(arrays),
    "config": config.as_json(),
  }
  with _manager(ocp, directory, max_to_keep=max_to_keep, cleanup_tmp_directories=True) as manager:
    manager.save(
      steps,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_storable(arrays)), privacy=ocp.args.JsonSave(meta)
      ),
    )
    manager.wait_until_finished()
  return os.path.join(directory, str(steps))


def _steps_on_disk(ocp, directory: str) -> tuple[list[int], list[str]]:
  """Step directories (``<int>``) and orbax's temporary ones (interrupted saves)."""
  steps, interrupted = [], []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    path = os.path.join(directory, name)
    if not os.path.isdir(path):
      continue
    if name.isdigit():
      steps.append(int(name))
    elif ocp.step.is_tmp_checkpoint(path):
      interrupted.append(name)
  return sorted(steps), interrupted


def _difference(saved: dict, current: dict, prefix: str = "") -> list[str]:
  lines = []
  for name in sorted(set(saved) | set(current)):
    a, b = saved.get(name), current.get(name)
    if isinstance(a, dict) and isinstance(b, dict):
      lines += _difference(a, b, f"{prefix}{name}.")
    elif a != b:
      lines.append(f"{prefix}{name}: checkpoint {a!r}, this run {b!r}")
  return lines


def _abstract(ocp, like: Any) -> Any:
  def one(x):
    x = jnp.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

  return jax.tree.map(one, _to_storable(like))


def restore_checkpoint(
  directory: str | os.PathLike,
  like: PrivateTrainingState,
  config: PrivacyConfig,
  *,
  missing_ok: bool = False,
) -> PrivateTrainingState:
  """Restores the latest checkpoint in ``directory``, checked against this run's ``config``.

  ``like`` gives the structure, dtypes and shardings of the arrays (typically the
  fresh state of step 0, built from the run's seeds); the restored state has the
  same. The ε spent so far is ``config.epsilon(restored.steps)``.

  Args:
    directory: the run's checkpoint directory.
    like: a :class:`PrivateTrainingState` of the same structure (global arrays with
      the run's shardings when several processes restore).
    config: this run's :class:`PrivacyConfig`; it must equal the checkpoint's.
    missing_ok: when ``directory`` holds no finished checkpoint at all, return
      ``like`` (a run that starts, or restarts, at step 0 with the same seeds and so
      the same draws) instead of raising.

  Returns:
    A :class:`PrivateTrainingState`.

  Raises:
    FileNotFoundError: no finished checkpoint (and ``missing_ok`` is false); the
      message lists interrupted saves found.
    ValueError: the latest step directory is not a finished save, cannot be read,
      does not match ``like``, or was written with another configuration (the
      message lists the differences: clip norm, noise multiplier, sampler, ...).
    ImportError: without orbax-checkpoint.
  """
  ocp = _orbax()
  directory = os.path.abspath(os.fspath(directory))
  steps, interrupted = _steps_on_disk(ocp, directory)
  if not steps:
    if missing_ok:
      return like
    found = f"; interrupted saves (not checkpoints): {interrupted}" if interrupted else ""
    raise FileNotFoundError(f"no finished checkpoint in {directory}{found}.")
  latest = steps[-1]
  path = os.path.join(directory, str(latest))

  def incomplete(why):
    return ValueError(
      f"the checkpoint {path} is incomplete or damaged ({why}); it was not written by a "
      "finished save_checkpoint. Refusing to resume from an older step or from zero: "
      "restore its files, or remove the directory to resume from the previous checkpoint."
    )

  missing = [item for item in ("state", "privacy") if not os.path.isdir(os.path.join(path, item))]
  if missing:
    raise incomplete(f"missing {missing}")
  if not ocp.step.is_path_finalized(path):
    raise incomplete("not finalised by orbax")
  with _manager(ocp, directory, create=False) as manager:
    try:
      meta = manager.restore(latest, args=ocp.args.Composite(privacy=ocp.args.JsonRestore()))
      meta = meta["privacy"]
    except Exception as error:  # noqa: BLE001 - any failure to read means damaged
      raise incomplete(f"its privacy record cannot be read: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("steps") != latest:
      raise incomplete(f"its privacy record is not one of step {latest}: {meta!r}")
    differences = _difference(meta["config"], config.as_json())
    if differences:
      raise ValueError(
        f"the checkpoint {path} was written with another privacy configuration; resuming "
        "it under this one would report an ε for a run that did not happen. Start a new "
        "run in a new directory, or use the checkpoint's configuration:\n  "
        + "\n  ".join(differences)
      )
    arrays = {"params": like.params, "opt_state": like.opt_state}
    if meta["key_impls"] != _key_impls(arrays):
      raise ValueError(
        f"the checkpoint {path} does not have like's structure: PRNG keys at other "
        f"leaves ({meta['key_impls']} against {_key_impls(arrays)})."
      )
    try:
      restored = manager.restore(
        latest,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(ocp, arrays))),
      )["state"]
    except Exception as error:  # noqa: BLE001 - a read error or a structure mismatch
      raise incomplete(f"its arrays cannot be restored into like's structure: {error}") from error
  leaves, treedef = jax.tree.flatten(restored)
  leaves = [
    x if impl is None else jax.random.wrap_key_data(x, impl=impl)
    for x, impl in zip(leaves, meta["key_impls"])
  ]
  restored = jax.tree.unflatten(treedef, leaves)
  data_key = jax.random.wrap_key_data(
    np.asarray(meta["data_key"], np.uint32), impl=meta["data_key_impl"]
  )
  return PrivateTrainingState(restored["params"], restored["opt_state"], data_key, latest)
