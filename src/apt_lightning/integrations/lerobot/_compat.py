"""The one place that checks the installed LeRobot: the adapters reach into modules of one exact release."""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

from apt_lightning.errors import AptError, LanguageMaskError

LEROBOT_VERSION = "0.6.1"
"""The LeRobot release the adapters are written and tested against (``pip install "apt_lightning[lerobot]"``)."""


class LeRobotUnavailableError(AptError, ImportError):
    """LeRobot is missing, or is not the release the adapters were written for."""


class LeRobotBatchError(AptError, ValueError):
    """A LeRobot batch does not fit the policy: an action dimension or chunk length other than the policy's."""


class PromptTruncationError(LanguageMaskError):
    """The tokenizer's ``max_length`` cuts a prompt inside the part Stage 1 sees (PI05's state, ``Action:``)."""


class APTPolicyLoadError(AptError, TypeError):
    """A saved APT policy is being loaded by a class that would drop APT's structure (a plain ``SmolVLAPolicy``
    on a ``smolvla_apt`` directory), or its files disagree with the APT record in its config."""


def require_lerobot() -> None:
    """Raise :class:`LeRobotUnavailableError` naming the fix unless LeRobot ``LEROBOT_VERSION`` is importable.

    The adapters call private helpers of LeRobot's PI0/PI05/SmolVLA modules, which change between releases,
    hence the exact pin.
    """
    if sys.version_info < (3, 12):
        raise LeRobotUnavailableError(
            f"apt_lightning.integrations.lerobot needs Python >= 3.12 (LeRobot {LEROBOT_VERSION} does), this is "
            f'{sys.version.split()[0]}. Create a Python 3.12 venv and `pip install "apt_lightning[lerobot]"` there.'
        )
    try:
        found = metadata.version("lerobot")
    except metadata.PackageNotFoundError:
        found = None
    if found != LEROBOT_VERSION:
        what = "is not installed" if found is None else f"is version {found}"
        raise LeRobotUnavailableError(
            f"apt_lightning.integrations.lerobot is written against LeRobot {LEROBOT_VERSION}, which {what}. "
            f'Install it with `pip install "apt_lightning[lerobot]"` (pins lerobot=={LEROBOT_VERSION}).'
        )


def lerobot_module(name: str) -> Any:
    """Import ``lerobot.<name>`` after :func:`require_lerobot` (modules stay importable without LeRobot)."""
    import importlib

    require_lerobot()
    return importlib.import_module(f"lerobot.{name}")
