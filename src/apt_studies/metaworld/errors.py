"""Errors of the Meta-World benchmark; each is an :class:`~apt_lightning.errors.AptError`."""

from __future__ import annotations

from apt_lightning.errors import AptError

__all__ = ["MetaWorldCacheError", "MetaWorldConfigError", "MetaWorldUnavailableError"]


class MetaWorldUnavailableError(AptError, ImportError):
    """``metaworld`` (or MuJoCo's headless renderer) is not installed or cannot start."""


class MetaWorldConfigError(AptError, ValueError):
    """A task, group, split, camera or episode setting the benchmark does not know or cannot honour."""


class MetaWorldCacheError(AptError, FileNotFoundError):
    """Cached demonstrations asked for by their settings (or by directory) are not there, or not complete."""
