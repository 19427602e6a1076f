"""Private and clipped training, the second of clipjax's two products.

``clipping`` (per-example clipping, ``dp_aggregate``, ``dp_noise``, clipping statistics,
sensitivity) over the core's norms and clip weights; ``_gaussian`` draws every noise;
``adaptive`` and ``accumulation`` build on ``clipping``; ``ghost/`` is ``clipped_grad``
(per-example clipping without per-example gradients); ``sampling`` (Poisson, user-level,
without replacement, cyclic), ``accounting`` and ``audit`` say what a run spent;
``correlated`` bridges to jax_privacy's matrix mechanisms; ``distributed`` and
``checkpoint`` carry a run across hosts and restarts. Nothing here imports the
rescaling product; both meet only in the core (``clipjax._checks``, ``clipjax._norms``).
"""
