"""The JSON half of a saved directory: a ``format`` name and a ``format_version`` that a reader checks first.

Adapter files (``apt_config.json``) and reference-policy directories (``policy_config.json``) share it, so a file
of the wrong kind, a newer format or a corrupted file is refused with the same one line everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apt_lightning.errors import AptError


def library_version() -> str:
    """This apt_lightning's version, recorded in every file it writes."""
    from apt_lightning import __version__  # lazy: the package imports the modules that call this

    return __version__


def read_versioned_json(
    path: Path, format_name: str, format_version: int, error: type[AptError], what: str, fix: str
) -> dict[str, Any]:
    """The JSON object at ``path`` whose ``format`` is ``format_name`` and whose ``format_version`` this library
    reads (at most ``format_version``).

    Args:
        path: the file.
        format_name, format_version: what the writer recorded.
        error: the error class raised.
        what: the kind of file for the message, e.g. ``"an APT adapter config"``.
        fix: what to do about an unreadable or foreign file, appended to its message.

    Raises:
        error: the file cannot be read or parsed, is not a JSON object of that format, or is of a newer version.
    """
    try:
        body = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} cannot be read as JSON ({exc}). {fix}") from exc
    if not isinstance(body, dict) or body.get("format") != format_name:
        raise error(f"{path} is not {what} (its `format` is not {format_name!r}). {fix}")
    version = body.get("format_version")
    if not isinstance(version, int) or version > format_version:
        raise error(
            f"{path} has `format_version`={version!r}, written by apt_lightning {body.get('apt_version')!r}; this "
            f"apt_lightning {library_version()} reads up to {format_version}. Upgrade apt_lightning."
        )
    return body
