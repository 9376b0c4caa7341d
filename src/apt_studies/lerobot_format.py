"""The tabletop benchmark in LeRobot's formats: demonstrations written as a ``LeRobotDataset``, and a LeRobot
policy (through its APT adapter and LeRobot's pre/post-processors) evaluated on the benchmark's splits.

Needs the ``lerobot`` extra (Python >= 3.12); LeRobot is imported inside the functions, so the benchmark itself
imports without it.

Dataset layout (LeRobot v3.0, images stored as PNG, no video): one frame per expert step, ``fps`` 10;
``observation.images.top`` (32, 32, 3) uint8 RGB, ``observation.state`` (2,) gripper ``(x, y)``, ``action`` (2,)
the expert's action at that step, and the episode's instruction (normalised words: lower case, no
punctuation, as :class:`LeRobotBenchPolicy` decodes it at evaluation) as the frame's ``task``. LeRobot builds action
chunks from ``delta_timestamps`` (``action_is_pad`` past an episode's end).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from apt_studies.data import expert_trajectory
from apt_studies.language import default_tokenizer
from apt_studies.render import render
from apt_studies.scene import Episode
from apt_studies.splits import make_episodes
from apt_studies.tokenizer import WordTokenizer, normalise

__all__ = ["FPS", "IMAGE_KEY", "LeRobotBenchPolicy", "lerobot_features", "write_lerobot_dataset"]

FPS = 10
IMAGE_KEY = "observation.images.top"


def lerobot_features(image_size: int = 32) -> dict[str, dict[str, Any]]:
    """The dataset's feature spec, as ``LeRobotDataset.create`` takes it."""
    return {
        IMAGE_KEY: {"dtype": "image", "shape": (image_size, image_size, 3), "names": ["height", "width", "channel"]},
        "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["dx", "dy"]},
    }


def write_lerobot_dataset(
    root: str | Path,
    source: str | Sequence[Episode] = "train",
    n_episodes: int = 20,
    seed: int = 0,
    *,
    repo_id: str = "apt_lightning/tabletop",
    image_size: int = 32,
) -> Any:
    """Roll out the scripted expert and write every successful episode to a new ``LeRobotDataset`` at ``root``.

    Args:
        root: directory of the new dataset (must not exist yet: LeRobot refuses to overwrite).
        source: a split name (``"train"``: the habit-biased training distribution) or explicit episodes.
        n_episodes: episodes drawn when ``source`` is a split name.
        seed: episode seed when ``source`` is a split name (the benchmark's seed conventions apply).
        repo_id: the dataset's LeRobot ``repo_id`` (local only; nothing is uploaded).
        image_size: rendered image side.

    Returns:
        The finalised ``LeRobotDataset`` (read it back with ``LeRobotDataset(repo_id, root=root, ...)``).
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    episodes = list(source) if not isinstance(source, str) else make_episodes(source, n_episodes, seed)
    dataset = LeRobotDataset.create(
        repo_id, fps=FPS, features=lerobot_features(image_size), root=root, use_videos=False, robot_type="tabletop"
    )
    for episode in episodes:
        positions, actions, success = expert_trajectory(episode)
        if not success:  # as collect_demonstrations: no sample teaches touching a distractor
            continue
        for ee, action in zip(positions, actions, strict=True):
            dataset.add_frame(
                {
                    IMAGE_KEY: render(episode.scene, ee, size=image_size),
                    "observation.state": np.asarray(ee, dtype=np.float32),
                    "action": np.asarray(action, dtype=np.float32),
                    "task": " ".join(normalise(episode.instruction)),  # as the evaluation decodes it
                }
            )
        dataset.save_episode()
    dataset.finalize()
    return dataset


class LeRobotBenchPolicy(nn.Module):
    """A LeRobot policy's APT adapter behind the benchmark's ``sample_actions`` contract.

    Benchmark observations (``pixel_values`` (B, 3, H, W) in [0, 1], ``state``, ``input_ids`` of the benchmark's
    word tokenizer) become LeRobot observations (``observation.images.top``, ``observation.state``, the
    instruction text as ``task``), go through the data module's pre-processing (LeRobot's pre-processor with the
    training statistics and tokenizer, plus the instruction mask), the adapter's ``sample_actions``, and
    LeRobot's post-processor (un-normalised actions).

    Args:
        adapter: a :class:`~apt_lightning.integrations.lerobot.LeRobotAPTModule`.
        data: the :class:`~apt_lightning.integrations.lerobot.LeRobotDataModule` the adapter trained on.
        tokenizer: the benchmark's word tokenizer (decodes the instruction).
    """

    def __init__(self, adapter: nn.Module, data: Any, tokenizer: WordTokenizer | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.data = data
        self.tokenizer = tokenizer or default_tokenizer()
        self.chunk_size = adapter.chunk_size

    @torch.no_grad()
    def sample_actions(self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        ids, language = batch["input_ids"], batch["language_mask"].bool()
        tasks = [self.tokenizer.decode(row[mask]) for row, mask in zip(ids, language, strict=True)]
        raw = {IMAGE_KEY: batch["pixel_values"], "observation.state": batch["state"], "task": tasks}
        actions = self.adapter.sample_actions(self.data.preprocess(raw), noise=noise)
        return self.data.postprocessor(actions)
