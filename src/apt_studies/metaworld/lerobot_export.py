"""Meta-World demonstrations written as a ``LeRobotDataset``, from the study's cached files (no metaworld needed).

LeRobot lives in its own Python 3.12 venv, which has no metaworld; the demonstrations the study trains on are plain
arrays in its cache (:func:`~apt_studies.metaworld.demos.cached_demonstrations`), so they are exported from
there, bit for bit: build them once where metaworld is installed (``examples/metaworld_study.py --prepare``), then
run the export with LeRobot's Python (``examples/metaworld_study.py --export-lerobot DIR``).

Dataset layout (LeRobot v3.0, images stored as PNG, no video): one frame per expert step, ``fps`` :data:`FPS`
(Meta-World's control rate); ``observation.images.top`` (S, S, 3) uint8 RGB, the study's camera;
``observation.state`` (4,) hand ``(x, y, z)`` and gripper opening; ``action`` (4,) the expert's action at that step
(``dx, dy, dz`` and gripper effort, in [-1, 1]); the episode's instruction, as the study's policies read it, as the
frame's ``task``. LeRobot rebuilds the study's action chunks from ``delta_timestamps`` (``k / fps`` for ``k`` in
``range(chunk)``), ``action_is_pad`` past an episode's end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from apt_lightning.integrations.lerobot import require_lerobot
from apt_studies.lerobot_format import IMAGE_KEY
from apt_studies.metaworld.camera import DEFAULT_IMAGE_SIZE
from apt_studies.metaworld.demos import Demonstrations, demonstration_settings, find_demonstrations, read_demonstrations
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.splits import DEFAULT_HABIT, MetaWorldEpisode

__all__ = [
    "ACTION_NAMES",
    "FPS",
    "STATE_NAMES",
    "episode_frames",
    "export_demonstrations",
    "lerobot_features",
    "write_lerobot_dataset",
]

FPS = 80
"""Meta-World's control rate: an env step is 5 MuJoCo steps of 2.5 ms (``env.dt`` = 0.0125 s)."""
STATE_NAMES = ("hand_x", "hand_y", "hand_z", "gripper")
ACTION_NAMES = ("dx", "dy", "dz", "grip")


def lerobot_features(image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, dict[str, Any]]:
    """The dataset's feature spec, as ``LeRobotDataset.create`` takes it."""
    return {
        IMAGE_KEY: {"dtype": "image", "shape": (image_size, image_size, 3), "names": ["height", "width", "channel"]},
        "observation.state": {"dtype": "float32", "shape": (len(STATE_NAMES),), "names": list(STATE_NAMES)},
        "action": {"dtype": "float32", "shape": (len(ACTION_NAMES),), "names": list(ACTION_NAMES)},
    }


def episode_frames(demos: Demonstrations) -> Iterator[tuple[MetaWorldEpisode, list[dict[str, Any]]]]:
    """``(episode, frames)`` per kept episode, frames in step order as ``add_frame`` takes them.

    A frame's ``action`` is the first action of its sample's chunk (the expert's action at that step).

    Raises:
        MetaWorldConfigError: an episode's samples are not its steps ``0, 1, ...`` (a corpus kept with a stride
            > 1 has no action per frame).
    """
    for index, episode in enumerate(demos.episodes):
        rows = np.flatnonzero(demos.episode_index == index)
        rows = rows[np.argsort(demos.step[rows], kind="stable")]
        if not np.array_equal(demos.step[rows], np.arange(len(rows))) or demos.action_pad[rows, 0].any():
            raise MetaWorldConfigError(
                f"episode {index} ({episode.task!r}) holds steps {demos.step[rows].tolist()[:8]}..., not every step "
                "from 0: only demonstrations kept at every step (stride 1) can be written frame by frame."
            )
        frames = [
            {
                IMAGE_KEY: demos.images[row],
                "observation.state": demos.states[row].astype(np.float32),
                "action": demos.actions[row, 0].astype(np.float32),
                "task": episode.instruction,
            }
            for row in rows
        ]
        yield episode, frames


def write_lerobot_dataset(
    demos: Demonstrations, root: str | Path, *, repo_id: str = "apt_lightning/metaworld", fps: int = FPS
) -> Any:
    """Write every episode of ``demos`` to a new ``LeRobotDataset`` at ``root`` (needs the ``lerobot`` extra).

    Args:
        demos: stacked expert samples at every step (:func:`~apt_studies.metaworld.demos.read_demonstrations`).
        root: directory of the new dataset (must not exist yet: LeRobot refuses to overwrite).
        repo_id: the dataset's LeRobot ``repo_id`` (local only; nothing is uploaded).
        fps: frames per second recorded in the dataset (:data:`FPS`, Meta-World's control rate).

    Returns:
        The finalised ``LeRobotDataset`` (read it back with ``LeRobotDataset(repo_id, root=root, ...)``).

    Raises:
        LeRobotUnavailableError: LeRobot (Python >= 3.12) is not installed here.
    """
    require_lerobot()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    image_size = demos.images.shape[1]
    dataset = LeRobotDataset.create(
        repo_id, fps=fps, features=lerobot_features(image_size), root=root, use_videos=False, robot_type="sawyer"
    )
    for _, frames in episode_frames(demos):
        for frame in frames:
            dataset.add_frame(frame)
        dataset.save_episode()
    dataset.finalize()
    return dataset


def export_demonstrations(
    root: str | Path,
    split: str = "train",
    n_episodes: int = 100,
    seed: int = 0,
    chunk_size: int = 8,
    *,
    habit: float = DEFAULT_HABIT,
    image_size: int = DEFAULT_IMAGE_SIZE,
    cache_dir: str | Path | None = None,
    repo_id: str = "apt_lightning/metaworld",
) -> Any:
    """Write the cached demonstrations of these settings (as :func:`~apt_studies.metaworld.demos.
    cached_demonstrations` takes them) to a new ``LeRobotDataset`` at ``root``; nothing is rolled out.

    Raises:
        LeRobotUnavailableError: LeRobot (Python >= 3.12) is not installed here (checked before anything is read).
        MetaWorldCacheError: they are not cached under ``cache_dir`` (the message says how to build them).
    """
    require_lerobot()
    settings = demonstration_settings(split, n_episodes, seed, chunk_size, habit=habit, image_size=image_size)
    demos = read_demonstrations(find_demonstrations(settings, cache_dir))
    return write_lerobot_dataset(demos, root, repo_id=repo_id)
