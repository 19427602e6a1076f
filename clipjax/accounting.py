"""Placeholder: being written."""


def calibrate_noise(*args, **kwargs):
    raise NotImplementedError


def dp_epsilon(*args, **kwargs):
    raise NotImplementedError
