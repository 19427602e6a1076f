r"""Empirical privacy auditing: the ε that a canary experiment certifies.

An (ε, δ)-DP mechanism limits every test that tries to tell, from its output, whether
a canary example was in its input. For any decision rule with false positive rate FPR
(saying "in" when the canary was out) and false negative rate FNR (Kairouz, Oh &
Viswanath, 2015):

.. math::

  \mathrm{FPR} + e^{\varepsilon}\,\mathrm{FNR} \ge 1 - \delta, \qquad
  \mathrm{FNR} + e^{\varepsilon}\,\mathrm{FPR} \ge 1 - \delta.

Run the mechanism many times with the canary and many times without, score each output
(higher meaning "in", e.g. the update's projection on the canary's gradient), and
threshold the scores: upper confidence bounds on the two error rates turn these
inequalities into a lower bound on ε that holds with the stated confidence. A bound
above the accountant's ε proves the implementation leaks more than it claims (a bug,
or an accounting that does not match the sampler); a bound well below it is expected,
since one canary and finitely many trials see only part of the worst case.

References:
  Kairouz, Oh & Viswanath, `The Composition Theorem for Differential Privacy
  <https://arxiv.org/abs/1311.0776>`_, ICML 2015.

  Jagielski, Ullman & Oprea, `Auditing Differentially Private Machine Learning: How
  Private is Private SGD? <https://arxiv.org/abs/2006.07709>`_, NeurIPS 2020.

  Nasr, Song, Thakurta, Papernot & Carlini, `Adversary Instantiation: Lower Bounds
  for Differentially Private Machine Learning <https://arxiv.org/abs/2101.04535>`_,
  IEEE S&P 2021.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from clipjax import _checks
from clipjax.privacy import _binomial

_BISECTION_STEPS = 64


def _clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
  """The one-sided Clopper-Pearson upper bound on a binomial rate, at level ``1 − alpha``.

  The largest p with ``P[Binomial(trials, p) <= successes] >= alpha``, found by
  bisection on the float64 binomial distribution function and rounded up: the upper
  end of the final bracket is returned, and the bracket is kept against ``alpha``
  lowered by more than that function's rounding error (about ``trials · 1e-15``
  relative), so the bound is never below the exact one.
  """
  if successes >= trials:
    return 1.0
  level = alpha * (1 - 1e-12 - 1e-14 * trials)
  low, high = successes / trials, 1.0
  for _ in range(_BISECTION_STEPS):
    middle = (low + high) / 2
    if _binomial.cdf(trials, middle, successes) > level:
      low = middle
    else:
      high = middle
    if high - low <= 1e-15 * high:
      break
  return high


def _chernoff_upper(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
  """Closed-form upper bounds on binomial rates, at level ``1 − alpha``, for many counts.

  The multiplicative Chernoff bound ``P[X <= k] <= exp(−m (p − k/m)² / (2p))`` for
  ``p >= k/m`` is at most ``alpha`` above ``k/m + c + sqrt(c² + 2c·k/m)``,
  ``c = log(1 / alpha) / m``. Valid, a little looser than Clopper-Pearson's, and free
  of iteration: it only ranks thresholds.
  """
  rate = successes / trials
  c = math.log(1 / alpha) / trials
  return np.minimum(1.0, rate + c + np.sqrt(c * c + 2 * c * rate))


def _epsilon_bound(fpr, fnr, delta: float):
  """``max(0, log((1 − δ − FNR) / FPR), log((1 − δ − FPR) / FNR))`` elementwise."""
  with np.errstate(divide="ignore", invalid="ignore"):
    one = np.where(1 - delta - fnr > 0, np.log(1 - delta - fnr) - np.log(fpr), -np.inf)
    two = np.where(1 - delta - fpr > 0, np.log(1 - delta - fpr) - np.log(fnr), -np.inf)
  return np.maximum(np.maximum(one, two), 0.0)


def _errors(scores_in: np.ndarray, scores_out: np.ndarray, thresholds):
  """Counts of false negatives (in-scores below t) and false positives (out-scores >= t)."""
  false_negatives = np.searchsorted(np.sort(scores_in), thresholds, side="left")
  false_positives = scores_out.size - np.searchsorted(np.sort(scores_out), thresholds, side="left")
  return false_negatives, false_positives


def audit_epsilon(
  scores_in: jax.typing.ArrayLike,
  scores_out: jax.typing.ArrayLike,
  delta: float,
  *,
  confidence: float = 0.95,
) -> float:
  r"""Returns the lower bound on ε that a threshold test on canary scores certifies.

  ``scores_in`` come from independent runs of the mechanism with the canary,
  ``scores_out`` from independent runs without it, each a function of the
  mechanism's output alone, higher meaning "in". The test says "in" when a score is at
  least a threshold t; at t, Clopper-Pearson upper bounds on its false positive and
  false negative rates, each at level ``1 − (1 − confidence) / 2`` (Bonferroni), give

  .. math::

    \varepsilon \ge \max\Big(0,\;
      \log\frac{1 - \delta - \overline{\mathrm{FNR}}}{\overline{\mathrm{FPR}}},\;
      \log\frac{1 - \delta - \overline{\mathrm{FPR}}}{\overline{\mathrm{FNR}}}\Big).

  Args:
    scores_in: 1-D, at least 2 finite scores from runs with the canary.
    scores_out: 1-D, at least 2 finite scores from runs without it.
    delta: δ in [0, 1), that of the guarantee being audited.
    confidence: in (0, 1).

  Returns:
    The certified lower bound on ε, a Python float ``>= 0``.

  Raises:
    ValueError: naming the argument, for scores that are not 1-D, too few, NaN or
      inf, or ``delta`` / ``confidence`` out of range.

  **The threshold is chosen on held-out trials.** The best of many thresholds,
  judged on the same trials that bound its error rates, would be a selection that
  the confidence level does not cover. So the trials at even positions (0, 2, ...)
  of each array choose t (the one with the best bound there, ranked with closed-form
  Chernoff bounds at the same levels), and only the trials at odd positions certify
  it. If the mechanism is (ε, ``delta``)-DP, the returned value exceeds ε with
  probability at most ``1 − confidence``, provided the trials are independent and
  the arrays are in the order the trials ran (not sorted or filtered by score).

  A bound above the accountant's ε proves that the mechanism is less private than
  claimed; a bound below it proves nothing either way (it is expected to be below,
  and can be far below with few trials: it cannot exceed about
  ``log(n / log(2 / (1 − confidence)))`` for n certifying trials per side).

  Example:
    >>> import numpy as np
    >>> from clipjax import audit_epsilon
    >>> rng = np.random.default_rng(0)
    >>> scores_out = rng.normal(0.0, 1.0, 20_000)  # Gaussian mechanism, multiplier 1/4
    >>> scores_in = rng.normal(4.0, 1.0, 20_000)
    >>> eps = audit_epsilon(scores_in, scores_out, delta=1e-5)
    >>> 5.0 < eps < 24.4  # 24.4: that mechanism's exact ε at δ = 1e-5
    True

  References:
    Nasr, Song, Thakurta, Papernot & Carlini, `Adversary Instantiation: Lower Bounds
    for Differentially Private Machine Learning <https://arxiv.org/abs/2101.04535>`_,
    IEEE S&P 2021.
  """
  scores_in = _checks.check_finite_scores("scores_in", scores_in)
  scores_out = _checks.check_finite_scores("scores_out", scores_out)
  for name, scores in (("scores_in", scores_in), ("scores_out", scores_out)):
    if scores.size < 2:
      raise ValueError(f"{name} needs at least 2 scores (one to choose, one to certify).")
  _checks.check_interval("delta", delta, 0, 1, open_high=True)
  _checks.check_interval("confidence", confidence, 0, 1, open_low=True, open_high=True)
  alpha = (1 - float(confidence)) / 2
  delta = float(delta)

  choose_in, choose_out = scores_in[0::2], scores_out[0::2]
  thresholds = np.unique(np.concatenate([choose_in, choose_out]))
  fn, fp = _errors(choose_in, choose_out, thresholds)
  ranking = _epsilon_bound(
    _chernoff_upper(fp, choose_out.size, alpha), _chernoff_upper(fn, choose_in.size, alpha), delta
  )
  threshold = thresholds[np.argmax(ranking)]

  certify_in, certify_out = scores_in[1::2], scores_out[1::2]
  fn, fp = _errors(certify_in, certify_out, threshold)
  fpr = _clopper_pearson_upper(int(fp), certify_out.size, alpha)
  fnr = _clopper_pearson_upper(int(fn), certify_in.size, alpha)
  return float(_epsilon_bound(fpr, fnr, delta))
