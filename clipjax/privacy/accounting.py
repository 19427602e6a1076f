"""Privacy accounting for DP-SGD, for the sampler that ran, via ``dp_accounting``.

One DP-SGD step samples a batch, clips every example's gradient to norm C, sums, and
adds ``N(0, (σC)²)`` noise; a run composes ``steps`` such steps. The ε reported
depends on three choices, all explicit here:

==========================  =============================  ==================================
``sampling=``               neighbouring datasets          ``dp_accounting`` event per step
==========================  =============================  ==================================
``"poisson"``               add or remove one example      ``PoissonSampledDpEvent(q,
                                                           GaussianDpEvent(σ))``
``"poisson"`` with          add or remove one example,     ``TruncatedSubsampledGaussianDpEvent``
``max_batch_size``          datasets of up to n + 1        (PLD), or the untruncated event and
                            examples                       a δ for overflow (RDP), see below
``"without_replacement"``   substitute one example         ``SampledWithoutReplacementDpEvent(
                            (same public size n)           n, b, GaussianDpEvent(σ / 2))``
==========================  =============================  ==================================

- **Poisson** (:func:`clipjax.poisson_sample`): every example joins each batch
  independently with probability ``q`` = ``sample_rate``.
- **Truncated Poisson**: batches padded to a static ``max_batch_size`` and cut down to
  a uniformly random subset when a draw overflows. With ``accountant="pld"``, the
  ``dp_accounting`` event for exactly this sampler. With ``accountant="rdp"`` a
  coupling bound: the truncated and the untruncated runs differ only when some step
  overflows, which has probability at most ``β = steps · P[Binomial(n + 1, q) >
  max_batch_size]`` on a dataset of at most n + 1 examples; if the untruncated run is
  (ε, δ')-DP, the truncated one is (ε, δ' + (1 + e^ε) β)-DP. The ε returned is the
  smallest (to 1e-6 relative) for which the RDP ``δ'(ε)`` plus that term fits in
  ``delta``; it is ``inf`` when β is too large for that. ``num_examples`` is the
  dataset's size; the accounting covers it and every neighbour (one example more or
  fewer).
- **Without replacement** (:class:`clipjax.WithoutReplacementSampler`): each step a
  fresh uniformly random subset of exactly ``b = q·n`` examples. Under substitution one
  example moves the clipped sum by up to 2C, so the Gaussian event's multiplier is
  ``σ / 2`` (at q = 1 this is exactly the Gaussian mechanism with sensitivity 2C).
  Only the RDP accountant has an event for it (Wang, Balle & Kasiviswanathan's bound):
  ``dp_accounting``'s PLD accountant does not support sampling without replacement,
  and the common shortcut of a Poisson PLD at ``σ / 2`` is not used here, because
  under substitution each step may present the worst case in either direction, which
  a PLD composed one direction at a time does not cover.

``accountant="rdp"`` is Rényi DP (``dp_accounting.rdp.RdpAccountant``, default orders):
milliseconds per call, a valid but loose bound. ``accountant="pld"`` is the privacy
loss distribution (``dp_accounting.pld.PLDAccountant``, pessimistic estimate, values
discretized every ``PLD_DISCRETIZATION`` = 1e-3): a tighter valid bound (10-30%
smaller ε for DP-SGD runs), at a tenth of a second to a second per call. The grid
makes it pessimistic by well under 1% for ε of 1 or more, but by 5-20% for ε below
0.5 over 10^4 steps and more (see the privacy accounting guide).

**The noise sampler's edge.** clipjax's Gaussian noise never exceeds ``EDGE`` = 9.4925
standard deviations (``clipjax._gaussian``); past that edge an output can only come
from the neighbour whose sum is shifted by the clip norm, which happens with
probability ``P(N > EDGE − 1/z)`` per step (``z = σ``, or ``σ/2`` under substitution):
1e-17 at z = 1, 3.4e-14 at z = 0.5. Both functions include it in δ: the ε reported is
the accountant's at ``δ − steps · P(N > EDGE − 1/z)`` (``inf`` if that is not
positive), counted for every step whether or not an example was sampled.

``sampling`` defaults to ``"poisson"`` for backward compatibility; pass it (or a
sampler's ``accounting``) explicitly, so that the ε is that of the batches that ran.

``dp_accounting`` is an optional dependency: ``pip install -e ".[privacy]"`` in the
clipjax checkout.

References:
  Mironov, Talwar & Zhang, `Rényi Differential Privacy of the Sampled Gaussian
  Mechanism <https://arxiv.org/abs/1908.10530>`_, 2019.

  Wang, Balle & Kasiviswanathan, `Subsampled Rényi Differential Privacy and Analytical
  Moments Accountant <https://arxiv.org/abs/1808.00087>`_, AISTATS 2019.

  Doroshenko, Ghazi, Kamath, Kumar & Manurangsi, `Connect the Dots: Tighter Discrete
  Approximations of Privacy Loss Distributions <https://arxiv.org/abs/2207.04380>`_,
  PETS 2022.

  Chua et al., `How Private are DP-SGD Implementations?
  <https://arxiv.org/abs/2403.17673>`_, ICML 2024.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

from clipjax import _checks
from clipjax.privacy import _binomial, _gaussian

_INSTALL_HINT = (
  "clipjax.accounting needs the dp_accounting package: from the clipjax checkout, "
  'pip install -e ".[privacy]" (or pip install dp-accounting)'
)

SAMPLINGS = ("poisson", "without_replacement")
ACCOUNTANTS = ("rdp", "pld")
# The privacy unit: what one "example" of the accounting is (a user's examples move together).
UNITS = ("example", "user")

# calibrate_noise stops when its bracket is this narrow relative to its upper end, so
# the returned σ is within 0.01% of the smallest valid one.
CALIBRATION_RTOL = 1e-4
# The PLD accountant's grid for privacy-loss values. The estimate is pessimistic (an
# upper bound) at any spacing. Measured against a 1e-4 grid at σ = 1, δ = 1e-5: ε is
# 0.04% high at q = 0.01, T = 1e3 (ε 1.83), but 4.9% at q = 1e-3, T = 1e4 (ε 0.48) and
# 19% at q = 5e-4, T = 2e4 (ε 0.32): small ε over many steps needs a finer grid, at
# ten times the time (the privacy accounting guide has the table).
PLD_DISCRETIZATION = 1e-3
_MAX_NOISE_MULTIPLIER = 1e6
# The truncated RDP bound is solved to this relative precision in ε.
_FIXED_POINT_RTOL = 1e-6


class _Scheme(NamedTuple):
  """What ran: the sampler, its parameters, and the accountant asked."""

  sampling: str
  accountant: str
  sample_rate: float
  steps: int
  num_examples: int | None
  batch_size: int | None  # the fixed size, without replacement
  max_batch_size: int | None  # the Poisson truncation, if any


def _dp_accounting():
  try:
    import dp_accounting  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(_INSTALL_HINT) from e
  return dp_accounting


def _scheme(
  sample_rate, steps, delta, sampling, accountant, num_examples, max_batch_size
) -> _Scheme:
  _checks.check_interval("sample_rate", sample_rate, 0, 1, open_low=True)
  steps = _checks.check_count("steps", steps)
  _checks.check_interval("delta", delta, 0, 1, open_low=True, open_high=True)
  sampling = _checks.check_choice("sampling", sampling, SAMPLINGS)
  accountant = _checks.check_choice("accountant", accountant, ACCOUNTANTS)
  q = float(sample_rate)
  if num_examples is not None:
    num_examples = _checks.check_count("num_examples", num_examples)
  if max_batch_size is not None:
    max_batch_size = _checks.check_count("max_batch_size", max_batch_size)
    if sampling != "poisson":
      raise ValueError(
        "max_batch_size is for truncated Poisson sampling; fixed-size batches are not "
        f"truncated (sampling={sampling!r})."
      )
    if num_examples is None:
      raise ValueError("num_examples is needed with max_batch_size: it sets the overflow rate.")
  batch_size = None
  if sampling == "without_replacement":
    if accountant == "pld":
      raise ValueError(
        "accountant='pld' has no sound event for sampling='without_replacement' "
        "(dp_accounting's PLD accountant does not support it); use accountant='rdp'."
      )
    if num_examples is None:
      raise ValueError("num_examples is needed with sampling='without_replacement'.")
    batch_size = round(q * num_examples)
    if abs(batch_size - q * num_examples) > 1e-9 * num_examples:
      raise ValueError(
        "sample_rate must be batch_size / num_examples for sampling='without_replacement'; "
        f"got {sample_rate!r} · {num_examples} = {q * num_examples!r}, not a whole batch."
      )
  return _Scheme(sampling, accountant, q, steps, num_examples, batch_size, max_batch_size)


def _overflow(scheme: _Scheme) -> float:
  """β: the chance that any step overflows, on a dataset of up to ``num_examples + 1``."""
  if scheme.max_batch_size is None:
    return 0.0
  per_step = _binomial.sf(scheme.num_examples + 1, scheme.sample_rate, scheme.max_batch_size)
  return min(1.0, scheme.steps * per_step)


def _event(dpa, scheme: _Scheme, sigma: float):
  """The ``dp_accounting`` event of the whole run (truncation aside for RDP)."""
  if scheme.sampling == "without_replacement":
    step = dpa.SampledWithoutReplacementDpEvent(
      scheme.num_examples, scheme.batch_size, dpa.GaussianDpEvent(sigma / 2)
    )
  elif scheme.accountant == "pld" and _overflow(scheme) > 0:
    step = dpa.TruncatedSubsampledGaussianDpEvent(
      dataset_size=scheme.num_examples + 1,
      sampling_probability=scheme.sample_rate,
      truncated_batch_size=scheme.max_batch_size,
      noise_multiplier=sigma,
    )
  else:
    step = dpa.PoissonSampledDpEvent(scheme.sample_rate, dpa.GaussianDpEvent(sigma))
  return dpa.SelfComposedDpEvent(step, scheme.steps)


def _accountant(dpa, scheme: _Scheme):
  if scheme.accountant == "pld":
    return dpa.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
  if scheme.sampling == "without_replacement":
    return dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
  return dpa.rdp.RdpAccountant()


@contextlib.contextmanager
def _quiet_absl():
  """Silences dp_accounting's warnings for RDP orders whose series does not converge.

  It leaves those orders out of the minimum over orders, which can only raise ε: the
  bound stays sound, and a warning per order and per call would bury the output.
  """
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _edge_delta(scheme: _Scheme, sigma: float) -> float:
  """The δ that the noise sampler's edge adds over the run (``clipjax._gaussian``).

  Per step ``P(N > EDGE − 1/z)`` with ``z`` the multiplier of the step's Gaussian
  event (``σ/2`` under substitution), counted for every step whether or not the
  example was sampled.
  """
  z = sigma / 2 if scheme.sampling == "without_replacement" else sigma
  return min(1.0, scheme.steps * _gaussian.edge_delta(z))


def _epsilon(dpa, scheme: _Scheme, sigma: float, delta: float) -> float:
  if sigma == 0:
    return math.inf
  delta = delta - _edge_delta(scheme, sigma)
  if not delta > 0:
    return math.inf
  accountant = _accountant(dpa, scheme)
  with _quiet_absl():
    accountant.compose(_event(dpa, scheme, sigma))
    beta = _overflow(scheme) if scheme.accountant == "rdp" else 0.0
    if beta == 0:
      return float(accountant.get_epsilon(delta))
    return _truncated_epsilon(accountant, delta, beta)


def _truncated_epsilon(accountant, delta: float, beta: float) -> float:
  """The least ε with ``ε >= ε_untruncated(δ − (1 + e^ε)·β)``, or ``inf``.

  The right side, ``g(ε)``, increases with ε; iterating ``ε ← g(ε)`` from 0 climbs
  toward its least fixed point, and the first iterate (raised by 1e-6) at which ``g``
  no longer exceeds it is returned: the untruncated run is then (ε, δ')-DP with
  ``δ' + (1 + e^ε)·β <= δ``.
  """

  def g(eps):
    slack = delta - (1 + math.exp(eps)) * beta if eps < 700 else -1.0
    return float(accountant.get_epsilon(slack)) if slack > 0 else math.inf

  eps = g(0.0)
  for _ in range(100):
    if not math.isfinite(eps):
      return math.inf
    trial = eps * (1 + _FIXED_POINT_RTOL)
    next_eps = g(trial)
    if next_eps <= trial:
      return trial
    eps = next_eps
  return math.inf


def dp_epsilon(
  noise_multiplier: float,
  sample_rate: float,
  steps: int,
  delta: float,
  *,
  sampling: str = "poisson",
  accountant: str = "rdp",
  num_examples: int | None = None,
  max_batch_size: int | None = None,
  unit: str = "example",
) -> float:
  """Returns the ε that DP-SGD spends, for the sampler that ran.

  The guarantee is (ε, ``delta``)-DP for the whole run of ``steps`` steps, with the
  neighbouring relation of the sampler: add or remove one example for
  ``sampling="poisson"``, substitute one example for ``"without_replacement"``. See
  the module docstring for the events and the truncation bound. A sampler's
  ``accounting`` property (:class:`clipjax.PoissonSampler`,
  :class:`clipjax.WithoutReplacementSampler`) supplies ``sample_rate``, ``sampling``,
  ``num_examples`` and ``max_batch_size`` for the batches it drew.

  Args:
    noise_multiplier: σ >= 0, finite: the noise standard deviation in units of the
      clip norm (for :func:`clipjax.adaptive_dp_aggregate`, its ``noise_multiplier``,
      which already accounts for the count query).
    sample_rate: q in (0, 1]: the Poisson rate (expected batch size / n), or
      batch_size / n without replacement.
    steps: the number of steps, a positive integer.
    delta: δ in (0, 1).
    sampling: ``"poisson"`` or ``"without_replacement"``.
    accountant: ``"rdp"`` or ``"pld"`` (tighter, slower; Poisson only).
    num_examples: the dataset size n; needed without replacement and with
      ``max_batch_size``.
    max_batch_size: Poisson batches truncated to this many examples (as
      :func:`clipjax.poisson_sample` does); ``None`` for untruncated batches.
    unit: the privacy unit, ``"example"`` or ``"user"`` (:class:`clipjax.UserSampler`'s
      ``accounting`` passes ``"user"``). It does not change the number: with users as
      the unit, ``sample_rate`` is the rate of users, ``num_examples`` and
      ``max_batch_size`` count users, each user's gradient is clipped as one, and the
      neighbouring datasets differ by one user with all of their examples.
      :func:`privacy_statement` writes the guarantee out with its unit.

  Returns:
    ε as a Python float (``inf`` for σ = 0, when truncation is too frequent, or when
    the noise sampler's edge alone spends ``delta``). The ε is the accountant's at
    ``delta − steps · P(N > EDGE − 1/σ)`` (``σ/2`` under substitution), the δ that the
    largest noise draw, ``EDGE`` = 9.4925σ, leaves (module docstring): 1e-17 per step
    at σ = 1, and ``inf`` below about σ = 0.3 for 10^4 steps at δ = 1e-5.

  Raises:
    ValueError: an argument is out of range or the combination is not supported (the
      message names the argument).
    ImportError: ``dp_accounting`` is not installed.

  Example:
    >>> from clipjax import dp_epsilon
    >>> round(dp_epsilon(1.0, 0.01, 1000, 1e-5, sampling="poisson"), 2)
    2.1
    >>> round(dp_epsilon(1.0, 0.01, 1000, 1e-5, sampling="poisson", accountant="pld"), 2)
    1.83

  References:
    Mironov, Talwar & Zhang, `Rényi Differential Privacy of the Sampled Gaussian
    Mechanism <https://arxiv.org/abs/1908.10530>`_, 2019.
  """
  _checks.check_nonnegative("noise_multiplier", noise_multiplier, finite=True)
  _checks.check_choice("unit", unit, UNITS)
  scheme = _scheme(sample_rate, steps, delta, sampling, accountant, num_examples, max_batch_size)
  return _epsilon(_dp_accounting(), scheme, float(noise_multiplier), float(delta))


def calibrate_noise(
  target_epsilon: float,
  delta: float,
  sample_rate: float,
  steps: int,
  *,
  sampling: str = "poisson",
  accountant: str = "rdp",
  num_examples: int | None = None,
  max_batch_size: int | None = None,
  unit: str = "example",
) -> float:
  """Returns the smallest noise multiplier whose ε meets the target, for the sampler that ran.

  ε decreases with σ. The search keeps a bracket whose upper end meets the target and
  whose lower end does not, and narrows it by probing either side of the secant
  estimate of ``log ε`` against ``log σ`` (the geometric midpoint where ε is
  infinite) until its width is at most ``CALIBRATION_RTOL`` (1e-4) times its upper
  end, which is returned. So ``dp_epsilon(σ, ...) <= target_epsilon`` holds, and
  ``σ · (1 − 1e-4)`` misses it. The arguments after ``steps`` are those of
  :func:`dp_epsilon`, whose ε includes the noise sampler's edge in δ. Every scheme's
  search starts from the untruncated Poisson RDP
  answer (milliseconds), so PLD and sampling without replacement take a handful of
  their slower evaluations (seconds in all).

  Args:
    target_epsilon: ε > 0 to meet, finite.
    delta: δ in (0, 1).
    sample_rate: q in (0, 1], as in :func:`dp_epsilon`.
    steps: the number of steps, a positive integer.
    sampling: ``"poisson"`` or ``"without_replacement"``.
    accountant: ``"rdp"`` or ``"pld"``.
    num_examples: the dataset size, as in :func:`dp_epsilon`.
    max_batch_size: the Poisson truncation, as in :func:`dp_epsilon`.
    unit: the privacy unit, ``"example"`` or ``"user"``, as in :func:`dp_epsilon`.

  Returns:
    σ as a Python float.

  Raises:
    ValueError: an argument is out of range (the message names it), or no σ up to
      1e6 meets the target.
    ImportError: ``dp_accounting`` is not installed.

  Example:
    >>> from clipjax import calibrate_noise, dp_epsilon
    >>> sigma = calibrate_noise(2.0, 1e-5, 0.01, 1000, sampling="poisson")
    >>> dp_epsilon(sigma, 0.01, 1000, 1e-5, sampling="poisson") <= 2.0
    True
  """
  _checks.check_positive("target_epsilon", target_epsilon, finite=True)
  _checks.check_choice("unit", unit, UNITS)
  scheme = _scheme(sample_rate, steps, delta, sampling, accountant, num_examples, max_batch_size)
  if scheme.accountant == "rdp" and _overflow(scheme) >= delta / 2:
    raise ValueError(
      f"max_batch_size={max_batch_size} overflows too often for the RDP truncation bound "
      f"(steps · overflow probability = {_overflow(scheme):.3g} >= delta / 2, so ε is "
      "infinite at any noise): raise max_batch_size, or use accountant='pld'."
    )
  dpa = _dp_accounting()
  target, delta = float(target_epsilon), float(delta)

  excess = lambda sigma: _excess(dpa, scheme, sigma, delta, target)
  # Untruncated Poisson RDP costs milliseconds per ε; its σ starts the other searches
  # close to their answers (PLD's is a few percent lower; without replacement, the
  # sensitivity doubles, and so roughly does σ).
  cheap = scheme._replace(
    sampling="poisson", accountant="rdp", batch_size=None, max_batch_size=None
  )
  start = _smallest_root(lambda sigma: _excess(dpa, cheap, sigma, delta, target), 1.0, 2.0)
  if scheme == cheap:
    return start
  if scheme.sampling == "without_replacement":
    start *= 2
  return _smallest_root(excess, start, 1.1)


def _excess(dpa, scheme: _Scheme, sigma: float, delta: float, target: float) -> float:
  """``log(ε(σ) / target)``, decreasing in σ; ``inf`` where ε is."""
  eps = _epsilon(dpa, scheme, sigma, delta)
  return math.log(eps / target) if eps > 0 else -math.inf


def _smallest_root(excess: Callable[[float], float], start: float, factor: float) -> float:
  """The upper end of a bracket ``excess(low) > 0 >= excess(high)`` at relative width 1e-4.

  ``excess`` decreases in σ (``log ε − log target``); it may be ``inf`` for small σ.
  The bracket is found by steps of ``factor`` from ``start``, then narrowed around
  secant estimates.
  """
  high, f_high = start, excess(start)
  low, f_low = 0.0, math.inf  # σ = 0 never meets a finite target.
  while f_high > 0:
    if high >= _MAX_NOISE_MULTIPLIER:
      raise ValueError(f"no noise_multiplier up to {_MAX_NOISE_MULTIPLIER:g} meets target_epsilon.")
    low, f_low = high, f_high
    high *= factor
    f_high = excess(high)
  if low == 0.0:
    low = high / factor
    f_low = excess(low)
    while f_low <= 0:
      high, f_high = low, f_low
      low /= factor
      f_low = excess(low)
  while high - low > CALIBRATION_RTOL * high:
    if math.isfinite(f_low) and math.isfinite(f_high):  # secant of log ε against log σ
      x_low, x_high = math.log(low), math.log(high)
      guess = math.exp(x_high - f_high * (x_high - x_low) / (f_high - f_low))
    else:
      guess = math.sqrt(low * high)
    guess = min(max(guess, low + 1e-3 * (high - low)), high - 1e-3 * (high - low))
    # Probe just below and just above the guess: an accurate guess closes the bracket,
    # and an inaccurate one still moves an end next to the root, which makes the next
    # secant accurate. A probe outside the bracket is not needed to close it.
    for probe in (guess * (1 - CALIBRATION_RTOL / 3), guess * (1 + CALIBRATION_RTOL / 3)):
      if not low < probe < high:
        continue
      f = excess(probe)
      if f <= 0:
        high, f_high = probe, f
        break
      low, f_low = probe, f
  return high


_NEIGHBOURS = {
  ("poisson", "example"): "adding or removing one training example",
  ("poisson", "user"): "adding or removing one user together with all of their examples",
  ("without_replacement", "example"): "substituting one training example",
  ("without_replacement", "user"): "substituting one user's examples for another's",
}


def privacy_statement(
  epsilon: float,
  delta: float,
  *,
  sample_rate: float | None = None,
  sampling: str = "poisson",
  num_examples: int | None = None,
  max_batch_size: int | None = None,
  unit: str = "example",
) -> str:
  """The guarantee that an ε from :func:`dp_epsilon` states, in words, with its unit.

  Takes the same sampler keywords (``**sampler.accounting``) so that the statement
  names the privacy unit and the neighbouring relation of the batches that ran, as
  TensorFlow Privacy's ``compute_dp_sgd_privacy_statement`` does. For ``unit="user"``
  it adds what the user-level guarantee assumes: every example belongs to exactly one
  user, and a step uses at most ``K`` examples of a user, whose gradient is clipped as
  one.

  Args:
    epsilon: the ε spent.
    delta: δ in (0, 1).
    sample_rate: the sampling rate (of users for ``unit="user"``), if to be stated.
    sampling: ``"poisson"`` or ``"without_replacement"``.
    num_examples: the number of units (examples or users), if to be stated.
    max_batch_size: the Poisson truncation (in units), if any.
    unit: ``"example"`` or ``"user"``.

  Returns:
    A one-paragraph string.

  Example:
    >>> from clipjax import privacy_statement
    >>> print(privacy_statement(2.0, 1e-5, sample_rate=0.01, num_examples=5000, unit="user"))
    (ε = 2, δ = 1e-05)-DP at the user level: the output distributions of any two datasets
    that differ by adding or removing one user together with all of their examples are
    (ε, δ)-close. Sampling: Poisson over 5000 users at rate 0.01. Assumes every example
    belongs to exactly one user and each step uses at most K examples of a user, clipped
    together as one gradient.
  """
  _checks.check_interval("delta", delta, 0, 1, open_low=True, open_high=True)
  sampling = _checks.check_choice("sampling", sampling, SAMPLINGS)
  unit = _checks.check_choice("unit", unit, UNITS)
  units = "users" if unit == "user" else "examples"
  parts = [
    f"(ε = {epsilon:.4g}, δ = {delta:.4g})-DP at the {unit} level: the output distributions "
    f"of any two datasets that differ by {_NEIGHBOURS[sampling, unit]} are (ε, δ)-close."
  ]
  if sample_rate is not None:
    scheme = "Poisson" if sampling == "poisson" else "fixed-size batches without replacement"
    over = f" over {num_examples} {units}" if num_examples is not None else ""
    parts.append(f"Sampling: {scheme}{over} at rate {sample_rate:.4g}")
    if max_batch_size is not None:
      parts[-1] += f", truncated to {max_batch_size} {units} per step"
    parts[-1] += "."
  if unit == "user":
    parts.append(
      "Assumes every example belongs to exactly one user and each step uses at most K "
      "examples of a user, clipped together as one gradient."
    )
  return " ".join(parts)
