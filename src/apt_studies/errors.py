"""Exception types of the benchmark package; each one is an :class:`~apt_lightning.errors.AptError`."""

from __future__ import annotations

from apt_lightning.errors import AptError

__all__ = ["OutputPathError", "StudyFileError"]


class StudyFileError(AptError, ValueError):
    """A ``results.json`` given to ``combine_studies`` is empty, truncated, malformed or lacks a field."""


class OutputPathError(AptError, OSError):
    """An output file or directory of a command cannot be written (missing directory, permissions, full disk)."""
