"""The two halves of a saved directory, read and checked the same way everywhere: a JSON file naming its ``format``
and ``format_version``, and a safetensors file whose content hash that JSON records.

Adapter files (``apt_config.json``, ``apt_model.safetensors``) and reference-policy directories
(``policy_config.json``, ``policy_model.safetensors``) share them, so a file of the wrong kind, a newer format, a
truncated or modified file, or non-finite weights are refused with the same one line everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

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


def read_verified_tensors(
    path: Path, expected_hash: Any, recorded_in: str, error: type[AptError], fix: str
) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``path``, whose :func:`~apt_lightning.export.content_hash` must be
    ``expected_hash`` (recorded in the file named ``recorded_in``) and which must all be finite.

    Raises:
        error: the file cannot be read, fails its content check, or holds NaN or Inf; ``fix`` says what to do.
    """
    from apt_lightning.export import content_hash, non_finite_keys  # lazy: export imports this module

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 -- not a dict
    except (SafetensorError, OSError) as exc:
        raise error(f"Cannot read {path} ({exc}): missing, truncated or not safetensors. {fix}") from exc
    if content_hash(tensors) != expected_hash:
        raise error(
            f"{path} failed its content check against {recorded_in}: the weights were modified, corrupted, or belong "
            f"to another save. {fix}"
        )
    bad = non_finite_keys(tensors)
    if bad:
        raise error(f"{path} holds NaN or Inf in {bad[:4]}: save again from a healthy model.")
    return tensors
