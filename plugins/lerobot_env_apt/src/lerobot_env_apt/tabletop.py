"""The tabletop benchmark (:class:`apt_studies.env.TabletopEnv`) as a Gymnasium env in LeRobot's observation layout.

One step is one action; an episode ends when the gripper touches an object (``terminated``; a success iff it is the
target the instruction names) or when ``max_episode_steps`` are spent (``truncated``). Observations are what
LeRobot's ``preprocess_observation`` turns into the tabletop dataset's features (``write_lerobot_dataset``):

* ``pixels`` -> ``{"top": (S, S, 3) uint8}``: ``observation.images.top``;
* ``agent_pos`` -> ``(2,) float32`` gripper ``(x, y)``: ``observation.state``;

and the instruction is ``task_description`` (also ``task``), in the words the dataset's ``task`` holds (lower case,
no punctuation). ``info["is_success"]`` carries the benchmark's success, which ``lerobot-eval`` reports as
``pc_success``.

Seeding: ``reset(seed=s)`` starts the episode ``apt_studies.splits.make_episodes(split, 1, seed=s)[0]`` (a pure
function of split and seed, so ``lerobot-eval --seed`` reproduces its episodes); a reset without a seed draws the
next episode from the stream the last seed started.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from apt_lightning.errors import ConfigError
from apt_studies.env import MAX_EPISODE_STEPS, TabletopEnv
from apt_studies.lerobot_format import FPS
from apt_studies.physics import ACTION_DIM, STATE_DIM
from apt_studies.render import render
from apt_studies.scene import Episode
from apt_studies.splits import sample_episode, split_names, split_rng
from apt_studies.tokenizer import normalise

__all__ = ["TabletopGymEnv", "check_split"]


def check_split(split: str, task: str | None = None) -> str:
    """``split`` if it names one of the benchmark's episode generators (``task``: the option it came from).

    Raises:
        ConfigError: naming the splits that exist.
    """
    if split not in split_names():
        raise ConfigError(
            f"`task`={task or split!r}: {split!r} is not a split of the tabletop benchmark; use one of "
            f"{split_names()}, or several separated by commas."
        )
    return split


class TabletopGymEnv(gym.Env):
    """Language-conditioned reaching (:class:`~apt_studies.env.TabletopEnv`) behind Gymnasium's API.

    Args:
        split: the benchmark split whose episodes ``reset`` draws (``"train"``, ``"seen"``, ``"counterfactual"``, ...).
        image_size: side of the observed image (the tabletop dataset's is 32).
        max_episode_steps: step budget per episode (the benchmark's is 40).
        render_size: side of the frames :meth:`render` returns (the videos ``lerobot-eval`` writes).

    Example::

        >>> env = TabletopGymEnv("seen")
        >>> obs, info = env.reset(seed=0)
        >>> obs["pixels"]["top"].shape, obs["agent_pos"].shape, info["is_success"]
        ((32, 32, 3), (2,), False)
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": FPS}

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        max_episode_steps: int = MAX_EPISODE_STEPS,
        render_size: int = 128,
        render_mode: str = "rgb_array",
    ) -> None:
        super().__init__()
        self.split = check_split(split)
        self.render_mode = render_mode
        self.render_size = render_size
        self._max_episode_steps = max_episode_steps  # LeRobot's rollout reads it through `env.call`
        self._env = TabletopEnv(split=split, image_size=image_size, max_steps=max_episode_steps)
        self._episodes = split_rng(split, 0)
        self.observation_space = spaces.Dict(
            {
                "pixels": spaces.Dict({"top": spaces.Box(0, 255, (image_size, image_size, 3), dtype=np.uint8)}),
                "agent_pos": spaces.Box(-np.inf, np.inf, (STATE_DIM,), dtype=np.float32),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), dtype=np.float32)

    @property
    def episode(self) -> Episode:
        """The current episode (scene, target, instruction, gripper start)."""
        return self._env.episode

    @property
    def task_description(self) -> str:
        """The current episode's instruction, normalised as the tabletop dataset's ``task`` strings are."""
        return " ".join(normalise(self._env.instruction))

    @property
    def task(self) -> str:
        return self.task_description

    def _observation(self, raw: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"pixels": {"top": raw["image"]}, "agent_pos": raw["state"].astype(np.float32)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._episodes = split_rng(self.split, seed)
        raw = self._env.reset(sample_episode(self.split, self._episodes))
        return self._observation(raw), {"is_success": False}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        raw, reward, done, info = self._env.step_chunk(np.asarray(action, dtype=np.float64)[None])
        terminated = done and info["contact"] >= 0  # touched an object: the episode's outcome is decided
        truncated = done and not terminated  # step budget spent without touching anything
        return self._observation(raw), reward, terminated, truncated, {"is_success": info["success"], **info}

    def render(self) -> np.ndarray:
        """(render_size, render_size, 3) uint8 frame of the current state."""
        return render(self._env.episode.scene, self._env.ee_pos, size=self.render_size)
