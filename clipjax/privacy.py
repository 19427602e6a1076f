"""Placeholder: being written."""


def adaptive_dp_aggregate(*args, **kwargs):
    raise NotImplementedError


def clipping_stats(*args, **kwargs):
    raise NotImplementedError


def dp_aggregate(*args, **kwargs):
    raise NotImplementedError


def dp_noise(*args, **kwargs):
    raise NotImplementedError


def per_example_clip(*args, **kwargs):
    raise NotImplementedError


class AdaptiveDPAggregateState: ...
class ClippingStats: ...
class DPAggregateState: ...
class DPNoiseState: ...
