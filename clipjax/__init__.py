"""clipjax: exact clipping-aware rescaling and gradient clipping for JAX and optax."""

import sys as _sys

from clipjax.privacy import ghost
from clipjax.privacy.accounting import calibrate_noise, dp_epsilon, privacy_statement
from clipjax.privacy.accumulation import AccumulateState, accumulate, microbatch
from clipjax.privacy.adaptive import (
  AdaptiveDPAggregateState,
  AdaptiveDPNoiseState,
  adaptive_dp_aggregate,
  adaptive_dp_noise,
)
from clipjax.privacy.audit import audit_epsilon
from clipjax.privacy.checkpoint import (
  PrivacyConfig,
  PrivateTrainingState,
  restore_checkpoint,
  save_checkpoint,
)
from clipjax.privacy.clipping import (
  ClippingStats,
  DPAggregateState,
  DPNoiseState,
  clipping_stats,
  dp_aggregate,
  dp_noise,
  per_example_clip,
  sensitivity,
)
from clipjax.privacy.correlated import (
  CorrelatedNoiseState,
  MFStrategy,
  banded_strategy,
  blt_strategy,
  calibrate_correlated_noise,
  correlated_epsilon,
  correlated_noise,
)
from clipjax.privacy.distributed import ShardedPoissonSampler, assert_same_across_processes
from clipjax.privacy.ghost import clipped_grad
from clipjax.privacy.sampling import (
  CyclicPoissonSampler,
  PoissonSampler,
  UserSampler,
  WithoutReplacementSampler,
  poisson_overflow_probability,
  poisson_sample,
)
from clipjax.rescaling.perturbation import perturb, random_perturbation
from clipjax.rescaling.pgd import pgd
from clipjax.rescaling.projection import project_ball_box
from clipjax.rescaling.rescale import max_norm, rescale
from clipjax.rescaling.transforms import clip_by_norm, clipping_aware_normalize

__version__ = "0.1.0"

# ``clipjax.ghost`` (register_rule, plan, Rule) is documented and imported under that
# name; it is the privacy product's ghost package itself, not a copy.
_sys.modules[__name__ + ".ghost"] = ghost

__all__ = [
  "AccumulateState",
  "AdaptiveDPAggregateState",
  "AdaptiveDPNoiseState",
  "ClippingStats",
  "CorrelatedNoiseState",
  "CyclicPoissonSampler",
  "DPAggregateState",
  "DPNoiseState",
  "MFStrategy",
  "PoissonSampler",
  "PrivacyConfig",
  "PrivateTrainingState",
  "ShardedPoissonSampler",
  "UserSampler",
  "WithoutReplacementSampler",
  "accumulate",
  "adaptive_dp_aggregate",
  "adaptive_dp_noise",
  "assert_same_across_processes",
  "audit_epsilon",
  "banded_strategy",
  "blt_strategy",
  "calibrate_correlated_noise",
  "calibrate_noise",
  "clip_by_norm",
  "clipped_grad",
  "clipping_aware_normalize",
  "clipping_stats",
  "correlated_epsilon",
  "correlated_noise",
  "dp_aggregate",
  "dp_epsilon",
  "dp_noise",
  "max_norm",
  "microbatch",
  "per_example_clip",
  "perturb",
  "pgd",
  "poisson_overflow_probability",
  "poisson_sample",
  "privacy_statement",
  "project_ball_box",
  "random_perturbation",
  "rescale",
  "restore_checkpoint",
  "save_checkpoint",
  "sensitivity",
]
