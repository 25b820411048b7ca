"""Typed errors. Every user-facing failure is a :class:`LowbitError` naming the file, field or layer."""

from __future__ import annotations


MAX_MESSAGE = 2000  # characters; a message quoting a huge value (a 1 MB string in a hand-edited file) is cut


class LowbitError(Exception):
    """Base class of every error lowbit raises for bad input (the CLI prints these without a traceback).

    Messages quote the offending value; one longer than ``MAX_MESSAGE`` characters keeps its start (which names
    the file and field) and its end, and says how much it left out."""

    def __str__(self) -> str:
        text = super().__str__()
        if len(text) <= MAX_MESSAGE:
            return text
        head, tail = MAX_MESSAGE * 3 // 4, MAX_MESSAGE // 8
        return f"{text[:head]} … [{len(text) - head - tail:,} characters left out] … {text[-tail:]}"


class InvalidSpecError(LowbitError, ValueError):
    """A quantization spec, recipe or option is invalid (unknown format/method, bits out of range, …)."""


class ShapeError(LowbitError, ValueError):
    """A tensor's shape does not fit the requested quantization (e.g. group size not dividing in_features)."""


class InvalidWeightError(LowbitError, ValueError):
    """A weight holds NaN/Inf values, or has an unsupported dtype."""


class ModelNotFoundError(LowbitError, FileNotFoundError):
    """A model path (directory, file or ``builtin:`` name) does not exist."""


class CorruptFileError(LowbitError):
    """A file exists but cannot be read: truncated/corrupt safetensors, invalid JSON, missing tensors."""


class UnsupportedModelError(LowbitError):
    """The model's architecture or layout is not supported by the requested operation."""


class OutputExistsError(LowbitError, FileExistsError):
    """The output path already exists and overwriting was not requested."""


class MemoryBudgetError(LowbitError, MemoryError):
    """The work would exceed (or has exceeded) the memory cap the user set (``--max-memory``)."""


class GGUFError(CorruptFileError):
    """A GGUF file is malformed, truncated, hostile or uses something lowbit cannot read (names what and where)."""


class ExportError(LowbitError):
    """A model cannot be written in the requested external format (names the layer/field and why)."""


class NumericalError(LowbitError, ArithmeticError):
    """A computation produced NaN/Inf from finite inputs; the message names the layer (and its kernel)."""
