"""Placeholder: being written."""


def project_ball_box(*args, **kwargs):
    raise NotImplementedError
