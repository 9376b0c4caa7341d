"""A directory cache for expensive, deterministic artefacts (a pretrained model, a generated dataset).

An artefact lives in ``<root>/<name>/``, where ``name`` encodes everything that determines it, and counts as
present only when every file it must hold is there. Building writes into a temporary sibling that is renamed
into place, so an interrupted build never leaves a directory a later call would accept, and two processes
building the same artefact at once both end with the one that finished first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["cache_key", "cached_directory", "default_cache_dir", "is_complete"]

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$APT_LIGHTNING_CACHE`` if set, else ``~/.cache/apt_lightning``."""
    env = os.environ.get("APT_LIGHTNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "apt_lightning"


def cache_key(payload: Any) -> str:
    """12 hex digits of the SHA-256 of ``payload`` as sorted JSON (it must hold everything the artefact depends on)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def is_complete(directory: Path, files: Sequence[str]) -> bool:
    """Whether ``directory`` holds every one of ``files``."""
    return all((directory / name).is_file() for name in files)


def cached_directory(directory: str | os.PathLike[str], files: Sequence[str], build: Callable[[Path], None]) -> bool:
    """Make sure ``directory`` holds ``files``, calling ``build(staging)`` to write them if it does not.

    Args:
        directory: Where the artefact lives (its parent is created if needed).
        files: The file names a complete artefact holds.
        build: Writes the artefact's files into the empty directory it is given.

    Returns:
        True if this call built the artefact, False if a complete one was already there (or another process
        finished the same build first).

    Raises:
        RuntimeError: If ``build`` did not write every one of ``files``.
    """
    directory = Path(directory)
    if is_complete(directory, files):
        log.info("reusing %s", directory)
        return False
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        build(staging)
        if not is_complete(staging, files):
            missing = [name for name in files if not (staging / name).is_file()]
            raise RuntimeError(f"building {directory.name} wrote no {missing}; nothing was cached")
        staging.chmod(0o755)  # mkdtemp makes it private; a cache is meant to be shared like any other directory
        for path in staging.iterdir():
            path.chmod(0o644)
        if directory.exists() and not is_complete(directory, files):
            log.warning("replacing incomplete cache at %s", directory)
            shutil.rmtree(directory)
        try:
            os.replace(staging, directory)
        except OSError:
            if not is_complete(directory, files):  # not a concurrent build that finished first
                raise
            log.info("another process cached %s first; using it", directory)
            return False
        log.info("cached %s", directory)
        return True
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
