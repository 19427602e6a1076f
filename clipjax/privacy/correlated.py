"""Correlated noise (banded MF, BLT) on clipjax's clipped sums, through ``jax_privacy``.

DP-SGD adds independent noise at every step. Matrix-factorization mechanisms (DP-FTRL,
banded MF, buffered linear Toeplitz) add noise ``C⁻¹ z`` correlated across steps, where
the strategy ``C`` is an ``n × n`` lower-triangular matrix for ``n`` steps: an
optimizer whose updates are linear in the gradients (SGD, momentum) then sees much of
the noise cancel, and at the same ε they match or beat DP-SGD, most at small ε and
many steps. ``jax_privacy`` implements the strategies, their sensitivity under
multiple participation, the noise (``noise_addition.matrix_factorization_privatizer``,
an optax transformation over summed gradients) and the accounting; this module is only
the glue to :func:`clipjax.clipped_grad`'s clipped sums and clipjax's samplers:

==========================  ==========================================================
piece                       from ``jax_privacy``
==========================  ==========================================================
:func:`banded_strategy`              ``matrix_factorization.toeplitz.optimize_banded_toeplitz``
                            (coefficients of unit norm: columns of ``C`` have norm 1)
:func:`blt_strategy`                 ``matrix_factorization.buffered_toeplitz.optimize`` for the
                            min-separation participation of the schedule
noise ``C⁻¹ z``             ``noise_addition.matrix_factorization_privatizer`` on
                            ``toeplitz`` / ``BufferedToeplitz.inverse_as_streaming_matrix``
sensitivity                 ``toeplitz.minsep_sensitivity_squared``
ε                           ``experimental.accounting.amplified_bandmf_event`` (banded,
                            cyclic Poisson) or one ``GaussianDpEvent`` (any strategy,
                            no amplification), composed by ``accounting``'s PLD or RDP
                            accountant configurations
==========================  ==========================================================

**The schedule.** Participation must be that of :class:`clipjax.CyclicPoissonSampler`
(``cycle_length`` b, rate q; ``q = 1`` is balls-in-bins): an example takes part at
most once every b steps, at most ``k = ceil(n / b)`` times. Its ``accounting`` property
carries the keywords below, so the noise and the ε are those of the batches that ran:

- **Amplified banded MF** (a :func:`banded_strategy` strategy with ``bands <= b``): columns of
  ``C`` more than ``bands - 1`` apart are orthogonal, so each participation is one
  Poisson-subsampled Gaussian query of sensitivity ``max column norm = 1`` and the run
  composes ``k`` of them (Choquette-Choo et al., 2023, Theorem 4): DP-SGD's accounting
  with ``k`` rounds at rate q. The noise is ``σ · Δ`` per coordinate of ``z``.
- **Any strategy, no amplification** (BLT, or banded with ``bands > b``): the whole run
  is one Gaussian mechanism whose L2 sensitivity is ``Δ · sens(C)``, ``sens(C)`` the
  worst ``‖C u‖`` over 0/1 participation vectors ``u`` with separation ``>= b`` and at
  most ``k`` ones (McKenna, 2024). The noise is ``σ · Δ · sens(C)``, so that σ is the
  mechanism's noise multiplier; subsampling (``q < 1``) is not credited.

``Δ`` = :func:`clipjax.sensitivity` of the clip norm. Both relations are add-or-remove
one unit (an example, or a user with :class:`clipjax.UserSampler`-style per-unit
clipping). The noise and the ε are for the ``steps`` the strategy was built for;
running longer voids the guarantee.

**Precision.** The incoming sum is raised to at least float32 before the privatizer,
so that ``jax_privacy`` draws the noise (``jax.random.normal``) and adds it in float32
or better whatever the parameter dtype; the noisy sum is divided by the expected batch
size and cast back to each leaf's dtype once, at the end.

``jax_privacy`` is an optional dependency: ``pip install "clipjax[correlated]"``; this
module imports it on first use.

References:
  Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta & Xu, `(Amplified) Banded
  Matrix Factorization: A unified approach to private training
  <https://arxiv.org/abs/2306.08153>`_, NeurIPS 2023.

  McKenna, `Scaling up the Banded Matrix Factorization Mechanism for Differentially
  Private ML <https://arxiv.org/abs/2405.15913>`_, 2024.

  Dvijotham, McMahan, Pillutla, Steinke & Thakurta, `Efficient and Near-Optimal Noise
  Generation for Streaming Differential Privacy <https://arxiv.org/abs/2404.16706>`_,
  FOCS 2024.

  McMahan, Pillutla, Steinke et al., `Hassle-free Matrix Factorization with Buffered
  Linear Toeplitz Mechanisms <https://arxiv.org/abs/2408.08868>`_, 2024.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipjax import _checks
from clipjax.privacy.accounting import UNITS

_INSTALL_HINT = (
  'clipjax.correlated needs the jax-privacy package: pip install "clipjax[correlated]"'
)
SAMPLINGS = ("cyclic_poisson",)
ACCOUNTANTS = ("pld", "rdp")
KINDS = ("banded", "blt")


def _jax_privacy():
  try:
    import jax_privacy  # pylint: disable=import-outside-toplevel
    from jax_privacy.experimental import accounting  # noqa: F401
  except ImportError as e:
    raise ImportError(_INSTALL_HINT) from e
  return jax_privacy


@dataclasses.dataclass(frozen=True, eq=False)
class MFStrategy:
  """A lower-triangular Toeplitz strategy ``C`` for ``steps`` steps, from ``jax_privacy``.

  Build one with :func:`banded_strategy` or :func:`blt_strategy` (optimized by
  ``jax_privacy``), or from given parameters with
  ``MFStrategy.from_banded_coefs(steps, coefs)`` and ``MFStrategy.from_blt(steps, blt)``
  (no optimization).

  Attributes:
    kind: ``"banded"`` or ``"blt"``.
    steps: n, the number of steps it is built for.
    coefs: the first column of ``C`` (float64 NumPy): ``bands`` entries of unit norm
      for a banded strategy, ``n`` for a BLT.
    blt: the ``jax_privacy`` ``BufferedToeplitz`` (float64) for a BLT, else ``None``.
  """

  kind: str
  steps: int
  coefs: np.ndarray
  blt: Any = None

  @classmethod
  def from_banded_coefs(cls, steps: int, coefs: Any) -> MFStrategy:
    """A banded Toeplitz strategy with these first-column entries, scaled to unit norm.

    Example:
      >>> from clipjax import MFStrategy
      >>> MFStrategy.from_banded_coefs(10, [2.0, 1.0, 1.0, 1.0]).coefs.round(4).tolist()
      [0.7559, 0.378, 0.378, 0.378]
    """
    n = _checks.check_count("steps", steps)
    coefs = np.asarray(coefs, np.float64).reshape(-1)
    if not 1 <= coefs.size <= n or not np.all(np.isfinite(coefs)) or not np.any(coefs):
      raise ValueError(f"coefs must be 1 to steps = {n} finite numbers, not all 0; got {coefs}.")
    return cls("banded", n, coefs / np.linalg.norm(coefs))

  @classmethod
  def from_blt(cls, steps: int, blt: Any) -> MFStrategy:
    """A strategy from a ``jax_privacy`` ``BufferedToeplitz`` (e.g. one optimized before).

    Example:
      >>> import jax
      >>> from jax_privacy.matrix_factorization.buffered_toeplitz import BufferedToeplitz
      >>> from clipjax import MFStrategy
      >>> with jax.enable_x64(True):
      ...   blt = BufferedToeplitz.build(buf_decay=[0.9], output_scale=[0.5])
      >>> MFStrategy.from_blt(4, blt).coefs.round(4).tolist()
      [1.0, 0.5, 0.45, 0.405]
    """
    _jax_privacy()
    n = _checks.check_count("steps", steps)
    with jax.enable_x64(True):
      coefs = np.asarray(blt.toeplitz_coefs(n), np.float64)
    return cls("blt", n, coefs, blt)

  @property
  def bands(self) -> int | None:
    """The number of nonzero bands of a banded strategy (``None`` for a BLT)."""
    return int(self.coefs.size) if self.kind == "banded" else None

  def materialize(self) -> np.ndarray:
    """``C`` as a float64 ``(steps, steps)`` NumPy array."""
    n = self.steps
    full = np.zeros(n)
    full[: min(n, self.coefs.size)] = self.coefs[:n]
    index = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.where(index >= 0, full[np.clip(index, 0, n - 1)], 0.0)

  def noising_matrix(self):
    """``C⁻¹`` as a ``jax_privacy`` ``StreamingMatrix`` (one row per step, streamed)."""
    jp = _jax_privacy()
    dtype = jnp.result_type(float)  # float64 where x64 is on, else float32
    if self.kind == "banded":
      return jp.matrix_factorization.toeplitz.inverse_as_streaming_matrix(
        jnp.asarray(self.coefs, dtype)
      )
    # The streaming recursion is stable (decays below 1): its parameters may be float32.
    cast = jp.matrix_factorization.buffered_toeplitz.BufferedToeplitz(
      buf_decay=np.asarray(self.blt.buf_decay, dtype),
      output_scale=np.asarray(self.blt.output_scale, dtype),
    )
    return cast.inverse_as_streaming_matrix()

  def sensitivity(self, cycle_length: int) -> float:
    """``sens(C)``: the worst ``‖C u‖`` over participations at least ``cycle_length`` apart
    (at most ``ceil(steps / cycle_length)`` of them), from ``jax_privacy``."""
    jp = _jax_privacy()
    b = _checks.check_count("cycle_length", cycle_length)
    # Concrete even where the noise transformation is built inside a traced function.
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):
      squared = jp.matrix_factorization.toeplitz.minsep_sensitivity_squared(
        jnp.asarray(self.coefs, jnp.float64), min_sep=b, n=self.steps
      )
    return math.sqrt(float(squared))


def banded_strategy(steps: int, bands: int, *, optimizer_steps: int = 250) -> MFStrategy:
  """A banded Toeplitz strategy optimized for the prefix-sum workload (banded MF).

  ``jax_privacy.matrix_factorization.toeplitz.optimize_banded_toeplitz``: ``bands``
  coefficients of unit L2 norm (every column of ``C`` has norm at most 1), optimized
  for the mean squared error of the running sums of the noisy gradients over ``steps``
  steps (seconds on a CPU). With :class:`clipjax.CyclicPoissonSampler` of
  ``cycle_length >= bands`` its ε is amplified by sampling (see the module docstring).
  ``bands=1`` is DP-SGD.

  Args:
    steps: n, the number of training steps.
    bands: the number of bands, ``1 <= bands <= steps``.
    optimizer_steps: L-BFGS steps of the optimization.

  Returns:
    A :class:`MFStrategy`.

  Example:
    >>> from clipjax import banded_strategy
    >>> strategy = banded_strategy(steps=40, bands=4)
    >>> strategy.bands, round(float((strategy.coefs**2).sum()), 6)
    (4, 1.0)
  """
  jp = _jax_privacy()
  n = _checks.check_count("steps", steps)
  b = _checks.check_count("bands", bands)
  if b > n:
    raise ValueError(f"bands must be <= steps = {n}, got {b}.")
  if b == 1:
    return MFStrategy("banded", n, np.ones(1))
  coefs = jp.matrix_factorization.toeplitz.optimize_banded_toeplitz(
    n=n, bands=b, max_optimizer_steps=_checks.check_count("optimizer_steps", optimizer_steps)
  )
  return MFStrategy("banded", n, np.asarray(coefs, np.float64))


def blt_strategy(
  steps: int, cycle_length: int, *, max_buffers: int = 5, **optimize_kwargs
) -> MFStrategy:
  """A buffered linear Toeplitz strategy optimized for participation every ``cycle_length`` steps.

  ``jax_privacy.matrix_factorization.buffered_toeplitz.optimize`` with ``min_sep =
  cycle_length`` and ``max_participations = ceil(steps / cycle_length)`` (mean error
  over the prefix sums), in float64. The noise ``C⁻¹ z`` is generated with a few
  buffers per parameter, whatever the number of steps. Its ε is not amplified by
  sampling (see the module docstring). Optimization takes about a minute on a CPU,
  mostly compilation: reuse the strategy (or its ``blt``, ``MFStrategy.from_blt``).

  Args:
    steps: n, the number of training steps.
    cycle_length: b, the minimum separation of an example's participations (that of
      the :class:`clipjax.CyclicPoissonSampler` to be used).
    max_buffers: the largest number of buffers tried.
    **optimize_kwargs: passed on to ``buffered_toeplitz.optimize``.

  Returns:
    A :class:`MFStrategy`.

  Example::

    strategy = clipjax.blt_strategy(steps=840, cycle_length=21)  # about a minute
    strategy.blt  # BufferedToeplitz(buf_decay=[0.938...], output_scale=[0.521...])
  """
  jp = _jax_privacy()
  n = _checks.check_count("steps", steps)
  b = _checks.check_count("cycle_length", cycle_length)
  if b > n:
    raise ValueError(f"cycle_length must be <= steps = {n}, got {b}.")
  with jax.enable_x64(True):
    strategy = jp.matrix_factorization.buffered_toeplitz.optimize(
      n=n,
      min_sep=b,
      max_participations=-(-n // b),
      error="mean",
      max_buffers=max_buffers,
      **optimize_kwargs,
    )
  return MFStrategy.from_blt(n, strategy)


class _Mechanism(NamedTuple):
  """What the schedule makes of the strategy: the noise scale and the DP event."""

  amplified: bool
  noise_scale: float  # sens(C) per participation (amplified) or over the run
  rate: float
  cycle_length: int
  steps: int


def _mechanism(strategy: MFStrategy, sampling, sample_rate, cycle_length, num_examples, unit):
  if not isinstance(strategy, MFStrategy):
    raise ValueError(f"strategy must be a clipjax.MFStrategy, got {strategy!r}.")
  _checks.check_choice("sampling", sampling, SAMPLINGS)
  _checks.check_choice("unit", unit, UNITS)
  _checks.check_interval("sample_rate", sample_rate, 0, 1, open_low=True)
  b = _checks.check_count("cycle_length", cycle_length)
  if num_examples is not None:
    _checks.check_count("num_examples", num_examples)
  amplified = strategy.kind == "banded" and strategy.bands <= b
  scale = float(np.linalg.norm(strategy.coefs)) if amplified else strategy.sensitivity(b)
  return _Mechanism(amplified, scale, float(sample_rate), b, strategy.steps)


def _event(mech: _Mechanism, noise_multiplier: float):
  """The ``dp_accounting`` event of the run, built by ``jax_privacy`` where it has one."""
  jp = _jax_privacy()
  if mech.amplified:
    return jp.experimental.accounting.amplified_bandmf_event(
      noise_multiplier, mech.steps, num_bands=mech.cycle_length, sampling_prob=mech.rate
    )
  import dp_accounting  # pylint: disable=import-outside-toplevel

  return dp_accounting.GaussianDpEvent(noise_multiplier)


def _accountant(accountant: str):
  jp = _jax_privacy()
  accountant = _checks.check_choice("accountant", accountant, ACCOUNTANTS)
  config = (
    jp.accounting.PldAccountantConfig()
    if accountant == "pld"
    else jp.accounting.RdpAccountantConfig()
  )
  return config.create_accountant()


def correlated_epsilon(
  strategy: MFStrategy,
  noise_multiplier: float,
  delta: float,
  *,
  sampling: str,
  sample_rate: float = 1.0,
  cycle_length: int,
  num_examples: int | None = None,
  unit: str = "example",
  accountant: str = "pld",
) -> float:
  """The ε of a correlated-noise run, by ``jax_privacy``'s accountants, for its schedule.

  ``noise_multiplier`` is the σ given to :func:`correlated_noise` (the same keywords,
  ``**sampler.accounting``). Amplified banded MF composes ``jax_privacy``'s
  ``amplified_bandmf_event`` (``ceil(n / b)`` Poisson-subsampled Gaussians at rate q);
  any other strategy is one ``GaussianDpEvent(σ)``, the noise having been scaled by its
  multi-participation sensitivity. The accountant is ``jax_privacy.accounting``'s
  ``PldAccountantConfig()`` (discretization 1e-4) or ``RdpAccountantConfig()``, for
  the add-or-remove-one relation over the ``unit``.

  Args:
    strategy: the :class:`MFStrategy` that ran.
    noise_multiplier: σ > 0.
    delta: δ in (0, 1).
    sampling: ``"cyclic_poisson"`` (:class:`clipjax.CyclicPoissonSampler`).
    sample_rate: q in (0, 1] within the eligible group.
    cycle_length: b, the number of groups.
    num_examples: the number of units (recorded, not needed).
    unit: ``"example"`` or ``"user"``: what one unit of the relation is.
    accountant: ``"pld"`` or ``"rdp"``.

  Returns:
    ε as a Python float.

  Example:
    >>> from clipjax import CyclicPoissonSampler, banded_strategy, correlated_epsilon
    >>> sampler = CyclicPoissonSampler(num_examples=1000, cycle_length=4, sample_rate=0.25)
    >>> strategy = banded_strategy(steps=40, bands=4)  # optimized by jax_privacy
    >>> round(correlated_epsilon(strategy, 1.0, 1e-5, **sampler.accounting), 2)
    5.97
  """
  _checks.check_positive("noise_multiplier", noise_multiplier, finite=True)
  _checks.check_interval("delta", delta, 0, 1, open_low=True, open_high=True)
  mech = _mechanism(strategy, sampling, sample_rate, cycle_length, num_examples, unit)
  acc = _accountant(accountant)
  acc.compose(_event(mech, float(noise_multiplier)))
  return float(acc.get_epsilon(float(delta)))


def calibrate_correlated_noise(
  strategy: MFStrategy,
  target_epsilon: float,
  delta: float,
  *,
  sampling: str,
  sample_rate: float = 1.0,
  cycle_length: int,
  num_examples: int | None = None,
  unit: str = "example",
  accountant: str = "pld",
) -> float:
  """The noise multiplier that meets ``target_epsilon`` for this strategy and schedule.

  ``dp_accounting.calibrate_dp_mechanism`` over the events of :func:`correlated_epsilon` (as
  ``jax_privacy``'s execution plans calibrate), so ``epsilon(strategy, σ, ...) <=
  target_epsilon``. Keywords as in :func:`correlated_epsilon`.

  Returns:
    σ as a Python float.

  Example:
    >>> from clipjax import CyclicPoissonSampler, MFStrategy
    >>> from clipjax import calibrate_correlated_noise, correlated_epsilon
    >>> sampler = CyclicPoissonSampler(num_examples=1000, cycle_length=4, sample_rate=0.25)
    >>> strategy = MFStrategy.from_banded_coefs(40, [1.0, 0.5, 0.4, 0.3])
    >>> sigma = calibrate_correlated_noise(strategy, 2.0, 1e-5, **sampler.accounting)
    >>> correlated_epsilon(strategy, sigma, 1e-5, **sampler.accounting) <= 2.0
    True
  """
  _checks.check_positive("target_epsilon", target_epsilon, finite=True)
  _checks.check_interval("delta", delta, 0, 1, open_low=True, open_high=True)
  mech = _mechanism(strategy, sampling, sample_rate, cycle_length, num_examples, unit)
  _checks.check_choice("accountant", accountant, ACCOUNTANTS)
  import dp_accounting  # pylint: disable=import-outside-toplevel

  return float(
    dp_accounting.calibrate_dp_mechanism(
      make_fresh_accountant=functools.partial(_accountant, accountant),
      make_event_from_param=functools.partial(_event, mech),
      target_epsilon=float(target_epsilon),
      target_delta=float(delta),
    )
  )


class CorrelatedNoiseState(NamedTuple):
  """State of :func:`correlated_noise`.

  Attributes:
    privatizer: the state of ``jax_privacy``'s privatizer (its key and the buffers of
      ``C⁻¹``'s streaming product, in float32 or better).
  """

  privatizer: Any


def _full_precision(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32)), tree)


def correlated_noise(
  strategy: MFStrategy,
  clip_norm: Any,
  noise_multiplier: float,
  batch_size: float,
  key: jax.Array | int,
  *,
  sampling: str,
  sample_rate: float = 1.0,
  cycle_length: int,
  num_examples: int | None = None,
  unit: str = "example",
) -> optax.GradientTransformationExtraArgs:
  r"""Turns clipped sums into correlated-noise means: :func:`clipjax.dp_noise` for MF.

  Step ``t``'s update is :math:`(s_t + \sigma \Delta\, \kappa\, (C^{-1} Z)_t) / B`, with
  :math:`s_t` the incoming sum of clipped gradients (:func:`clipjax.clipped_grad`),
  :math:`Z` i.i.d. standard normal (one row per step, one column per coordinate),
  :math:`\Delta` = :func:`clipjax.sensitivity` of ``clip_norm`` and :math:`\kappa` the
  strategy's scale for the schedule (1 for amplified banded MF, ``sens(C)`` otherwise;
  see the module docstring). The noise is ``jax_privacy``'s
  ``matrix_factorization_privatizer``, drawn and added in float32 or better; the result
  is cast to each leaf's dtype. Chain it before the optimizer, as ``dp_noise``:
  ``optax.chain(correlated_noise(...), optax.sgd(...))``.

  Args:
    strategy: a :class:`MFStrategy` (:func:`banded_strategy` or :func:`blt_strategy`).
    clip_norm: the clip norm of the sums (a pytree prefix for group-wise clipping).
    noise_multiplier: σ > 0 (:func:`calibrate_correlated_noise` gives it for a target ε);
      it may be traced.
    batch_size: B > 0, the EXPECTED batch size (``sampler.expected_batch_size``).
    key: a typed PRNG key, a raw ``uint32`` key or an int seed.
    sampling: ``"cyclic_poisson"``; with ``sample_rate``, ``cycle_length``,
      ``num_examples`` and ``unit``, as ``**sampler.accounting`` gives them.
    sample_rate: q within the eligible group.
    cycle_length: b.
    num_examples: the number of units (recorded, not needed).
    unit: ``"example"`` or ``"user"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`CorrelatedNoiseState`; extra arguments to ``update`` are ignored.

  Example:
    >>> import jax.numpy as jnp
    >>> from clipjax import CyclicPoissonSampler, MFStrategy, correlated_noise
    >>> sampler = CyclicPoissonSampler(num_examples=100, cycle_length=2, sample_rate=0.5)
    >>> strategy = MFStrategy.from_banded_coefs(10, [1.0, 0.5])
    >>> tx = correlated_noise(
    ...   strategy, 1.0, 1.0, sampler.expected_batch_size, 0, **sampler.accounting
    ... )
    >>> state = tx.init(jnp.zeros(3, jnp.bfloat16))
    >>> update, state = tx.update(jnp.ones(3, jnp.bfloat16), state)
    >>> update.dtype
    dtype(bfloat16)

  References:
    Choquette-Choo et al., `(Amplified) Banded Matrix Factorization
    <https://arxiv.org/abs/2306.08153>`_, NeurIPS 2023.
  """
  jp = _jax_privacy()
  _checks.check_clip_norm(clip_norm)
  _checks.check_positive("noise_multiplier", noise_multiplier, finite=True)
  _checks.check_positive("batch_size", batch_size, finite=True)
  mech = _mechanism(strategy, sampling, sample_rate, cycle_length, num_examples, unit)
  leaves = [float(c) for c in jax.tree.leaves(clip_norm)]
  delta_clip = math.sqrt(sum(c * c for c in leaves))
  # σ may be traced (one compilation for several noise levels); the rest is concrete.
  stddev = noise_multiplier * (delta_clip * mech.noise_scale)
  privatizer = jp.noise_addition.matrix_factorization_privatizer(
    strategy.noising_matrix(), stddev=stddev, prng_key=_checks.canonical_key(key)
  )

  def init_fn(params):
    return CorrelatedNoiseState(privatizer.init(_full_precision(params)))

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    noisy, inner = privatizer.update(_full_precision(updates), state.privatizer)
    out = jax.tree.map(lambda n, u: (n / batch_size).astype(u.dtype), noisy, updates)
    return out, CorrelatedNoiseState(inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
