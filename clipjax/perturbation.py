"""Placeholder: being written."""


def perturb(*args, **kwargs):
    raise NotImplementedError


def random_perturbation(*args, **kwargs):
    raise NotImplementedError
