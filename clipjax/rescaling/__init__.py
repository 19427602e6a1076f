"""Exact clipping-aware rescaling, the first of clipjax's two products.

Data flows one way: ``_reductions`` (row sums and maxima) and ``_breakpoints`` (the
piecewise-linear norm of the clipped step) under ``_solvers`` (sort, Newton, bisection)
and ``_batching`` (rows, groups, lockstep), all tuned by one frozen configuration
(``_rescale_config``); ``rescale`` is the public solve, ``_eta`` its shared entry for
``perturbation`` and ``projection``; ``pgd`` and ``transforms`` (the two rescaling optax
transformations) sit on top. Nothing here imports the privacy product; both meet only
in the core (``clipjax._checks``, ``clipjax._norms``).
"""
