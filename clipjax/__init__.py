"""clipjax: exact clipping-aware rescaling and gradient clipping for JAX and optax."""

from clipjax.accounting import calibrate_noise, dp_epsilon, privacy_statement
from clipjax.accumulation import AccumulateState, accumulate, microbatch
from clipjax.adaptive import (
  AdaptiveDPAggregateState,
  AdaptiveDPNoiseState,
  adaptive_dp_aggregate,
  adaptive_dp_noise,
)
from clipjax.audit import audit_epsilon
from clipjax.checkpoint import (
  PrivacyConfig,
  PrivateTrainingState,
  restore_checkpoint,
  save_checkpoint,
)
from clipjax.correlated import (
  CorrelatedNoiseState,
  MFStrategy,
  banded_strategy,
  blt_strategy,
  calibrate_correlated_noise,
  correlated_epsilon,
  correlated_noise,
)
from clipjax.distributed import ShardedPoissonSampler, assert_same_across_processes
from clipjax.ghost import clipped_grad
from clipjax.perturbation import perturb, random_perturbation
from clipjax.pgd import pgd
from clipjax.privacy import (
  ClippingStats,
  DPAggregateState,
  DPNoiseState,
  clipping_stats,
  dp_aggregate,
  dp_noise,
  per_example_clip,
  sensitivity,
)
from clipjax.projection import project_ball_box
from clipjax.rescale import max_norm, rescale
from clipjax.sampling import (
  CyclicPoissonSampler,
  PoissonSampler,
  UserSampler,
  WithoutReplacementSampler,
  poisson_overflow_probability,
  poisson_sample,
)
from clipjax.transforms import clip_by_norm, clipping_aware_normalize

__version__ = "0.1.0"

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
