"""Exceptions raised by the LOCO engine."""


class LocoError(ValueError):
    """Invalid input to the engine: the message names the value and the fix."""


class JacobianError(RuntimeError):
    """A Jacobian product failed or returned a zero or non-finite result."""
