"""Output files of the benchmark's commands: checked writable before long work, written atomically.

A result file is either complete or absent: :func:`atomic_write_text` writes a temporary file beside the target and
renames it over the target, so a full disk or a kill leaves the previous file (or none), never a 0-byte or
truncated one. :func:`check_writable_file` and :func:`check_writable_dir` run before the work whose result they
will hold, so an unwritable path fails in a second, not after an evaluation.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from apt_studies.errors import OutputPathError

__all__ = ["atomic_write_text", "check_writable_dir", "check_writable_file"]


def check_writable_dir(directory: str | Path, what: str = "output directory") -> Path:
    """Create ``directory`` if needed and prove a file can be written in it (a probe file, removed again).

    Raises:
        OutputPathError: naming the directory, why, and the fix.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".apt-write-probe-", dir=directory)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OutputPathError(
            f"The {what} {directory} cannot be written ({type(error).__name__}: {error.strerror or error}). "
            "Choose a writable directory, or fix its permissions."
        ) from error
    return directory


def check_writable_file(path: str | Path, what: str = "output file") -> Path:
    """Check that ``path`` can be written (its directory exists and is writable; it is not a directory).

    Raises:
        OutputPathError: naming the path, why, and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"The {what} {path} is a directory: pass a file name inside it.")
    if not path.parent.is_dir():
        raise OutputPathError(
            f"The {what} {path} cannot be written: its directory {path.parent} does not exist. Create it first."
        )
    check_writable_dir(path.parent, f"directory of the {what}")
    return path


def atomic_write_text(path: str | Path, text: str, what: str = "output file") -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: complete or untouched, never partial.

    Raises:
        OutputPathError: the write failed (full disk, permissions); no partial file is left.
    """
    path = Path(path)
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        raise OutputPathError(
            f"Could not write the {what} {path} ({type(error).__name__}: {error.strerror or error}); no partial file "
            "was left. Free disk space or choose another path."
        ) from error
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
