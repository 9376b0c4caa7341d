"""APT on LeRobot's own policies and datasets (``pip install "apt_lightning[lerobot]"``, Python >= 3.12).

Adapters (LightningModules around the user's LeRobot ``PreTrainedPolicy``; they train LeRobot's modules in place):
:class:`PI0APT`, :class:`PI05APT`, :class:`SmolVLAAPT`. Data: :class:`LeRobotDataModule` (a local
``LeRobotDataset`` root to the batches the adapters take). Importing this package needs no LeRobot; using it
checks for LeRobot ``LEROBOT_VERSION`` (0.6.1) and names the fix when it is missing.
"""

from __future__ import annotations

from typing import Any

from apt_lightning.integrations.lerobot._compat import LEROBOT_VERSION, LeRobotUnavailableError, require_lerobot

__all__ = [
    "FUSION_FILE",
    "INSTRUCTION_MASK",
    "LEROBOT_VERSION",
    "PI0APT",
    "PI05APT",
    "LeRobotAPTModule",
    "LeRobotDataModule",
    "LeRobotUnavailableError",
    "SmolVLAAPT",
    "require_lerobot",
]

_LAZY = {
    "FUSION_FILE": "base",
    "INSTRUCTION_MASK": "base",
    "LeRobotAPTModule": "base",
    "PI0APT": "pi",
    "SmolVLAAPT": "smolvla",
    "PI05APT": "pi",
    "LeRobotDataModule": "data",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
