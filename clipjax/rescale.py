"""Placeholder: being written."""


def max_norm(*args, **kwargs):
    raise NotImplementedError


def rescale(*args, **kwargs):
    raise NotImplementedError
