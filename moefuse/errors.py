"""Errors raised by moefuse. Each names the problem and the fix."""
from __future__ import annotations


class MoefuseError(Exception):
    """Base class of every error moefuse raises on purpose."""


class OptionsError(MoefuseError, ValueError):
    """An option passed to the backend (or read from its environment variable) is unknown or has a bad value."""


class InputError(MoefuseError, ValueError):
    """A tensor passed to the fused op does not fit its MoESpec (shape, dtype, device, a bias the spec does not
    have): the message names the tensor, what the spec expects and what was given."""
