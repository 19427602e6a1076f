"""Privacy accounting for DP-SGD with Poisson sampling, via ``dp_accounting``.

One DP-SGD step samples each example independently with probability
``sample_rate`` and releases a Gaussian sum with noise multiplier ``σ``; a run
is that step self-composed ``steps`` times::

    SelfComposedDpEvent(PoissonSampledDpEvent(sample_rate, GaussianDpEvent(σ)), steps)

The ε comes from the Rényi DP accountant (``dp_accounting.rdp.RdpAccountant``
with its default orders, add-or-remove-one neighbours). RDP is the standard
choice in DP-SGD libraries and is fast (milliseconds per call, so calibration
by bisection stays cheap); its ε is a valid upper bound, slightly looser than
the privacy-loss-distribution accountant's.

``dp_accounting`` is an optional dependency: ``pip install "clipjax[privacy]"``.
"""

import math
import numbers

_INSTALL_HINT = 'clipjax.accounting needs the dp_accounting package: pip install "clipjax[privacy]"'

# calibrate_noise stops bisecting when the bracket is this narrow relative to
# its upper end, so the returned σ is within 0.01% of the smallest valid one.
CALIBRATION_RTOL = 1e-4
_MAX_NOISE_MULTIPLIER = 1e6


def _dp_accounting():
  try:
    import dp_accounting  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(_INSTALL_HINT) from e
  return dp_accounting


def _check_args(sample_rate, steps, delta) -> None:
  if not 0 < sample_rate <= 1:
    raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
    raise ValueError(f"steps must be a positive integer, got {steps!r}.")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta!r}.")


def _epsilon(dp_accounting, noise_multiplier, sample_rate, steps, delta):
  event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(
      sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    ),
    int(steps),
  )
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(event)
  return float(accountant.get_epsilon(delta))


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
  """Returns the ε that DP-SGD spends, by the RDP accountant.

  Args:
    noise_multiplier: σ >= 0, the noise standard deviation in units of the
      clip norm (for :func:`clipjax.adaptive_dp_aggregate`, its
      ``noise_multiplier``, which already accounts for the count query).
    sample_rate: q in (0, 1], the Poisson sampling probability (expected
      batch size / dataset size).
    steps: the number of steps, a positive integer.
    delta: δ in (0, 1).

  Returns:
    ε as a Python float (``inf`` for σ = 0).

  Raises:
    ValueError: an argument is out of range (the message names it).
    ImportError: ``dp_accounting`` is not installed.

  Example:
    >>> from clipjax import dp_epsilon
    >>> eps = dp_epsilon(1.0, sample_rate=0.01, steps=1000, delta=1e-5)
    >>> round(eps, 2)
    2.1

  References:
    Mironov, Talwar & Zhang, `Rényi Differential Privacy of the Sampled
    Gaussian Mechanism <https://arxiv.org/abs/1908.10530>`_, 2019.
  """
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}.")
  _check_args(sample_rate, steps, delta)
  dp_accounting = _dp_accounting()
  return _epsilon(dp_accounting, noise_multiplier, sample_rate, steps, delta)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
  """Returns the smallest noise multiplier whose ε (RDP) meets the target.

  ε is decreasing in σ, so σ is found by bisection: double an upper bound
  until it meets the target, then halve the bracket until its width is at
  most ``CALIBRATION_RTOL`` (1e-4) times its upper end. The upper end is
  returned, so ``dp_epsilon(σ, ...) <= target_epsilon`` always holds, and
  ``σ · (1 − 1e-4)`` no longer meets the target.

  Args:
    target_epsilon: ε > 0 to meet.
    delta: δ in (0, 1).
    sample_rate: q in (0, 1], the Poisson sampling probability.
    steps: the number of steps, a positive integer.

  Returns:
    σ as a Python float.

  Raises:
    ValueError: an argument is out of range (the message names it), or no σ
      up to 1e6 meets the target.
    ImportError: ``dp_accounting`` is not installed.

  Example:
    >>> from clipjax import calibrate_noise, dp_epsilon
    >>> sigma = calibrate_noise(2.0, delta=1e-5, sample_rate=0.01, steps=1000)
    >>> dp_epsilon(sigma, 0.01, 1000, 1e-5) <= 2.0
    True
  """
  if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
    raise ValueError(f"target_epsilon must be > 0 and finite, got {target_epsilon!r}.")
  _check_args(sample_rate, steps, delta)
  dp_accounting = _dp_accounting()

  def meets(sigma):
    return _epsilon(dp_accounting, sigma, sample_rate, steps, delta) <= (target_epsilon)

  low, high = 0.0, 1.0  # σ = 0 never meets a finite target.
  while not meets(high):
    if high >= _MAX_NOISE_MULTIPLIER:
      raise ValueError(
        f"no noise_multiplier up to {_MAX_NOISE_MULTIPLIER:g} meets "
        f"target_epsilon={target_epsilon!r}."
      )
    low, high = high, 2 * high
  while high - low > CALIBRATION_RTOL * high:
    middle = (low + high) / 2
    if meets(middle):
      high = middle
    else:
      low = middle
  return high
