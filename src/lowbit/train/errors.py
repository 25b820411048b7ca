"""Typed errors of the trainer (subclasses of :class:`lowbit.errors.LowbitError`)."""

from __future__ import annotations

from lowbit.errors import LowbitError


class DataError(LowbitError, ValueError):
    """Training data cannot be used: missing file, bad JSON, a record without the named field, no examples.

    The message names the file, and where it applies the line number and the field.
    """


class DataNotFoundError(DataError, FileNotFoundError):
    """The training/eval data path does not exist."""


class NonFiniteLossError(LowbitError, FloatingPointError):
    """The loss or a gradient became NaN/Inf; names the step and the first parameter with a bad gradient.

    Raised before the optimizer step, so the parameters and the last checkpoint stay as they were.
    """

    def __init__(self, message: str, *, step: int, parameter: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.parameter = parameter


class CheckpointMismatchError(LowbitError, ValueError):
    """A checkpoint does not fit the model or config being resumed (parameter names/shapes, optimizer)."""
