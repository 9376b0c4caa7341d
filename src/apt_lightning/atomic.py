"""One way to write a file so a crash, a full disk or a failed write never leaves a truncated file under its name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """``write(temporary_path)`` in ``path``'s directory, fsync, then rename over ``path``: ``path`` is either the
    complete new file or untouched. The temporary file is removed when anything fails; the error propagates."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
