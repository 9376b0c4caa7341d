"""``apt_tabletop``: the APT benchmark's tabletop environment as a LeRobot env type (``--env.type=apt_tabletop``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import gymnasium as gym
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import ACTION, OBS_STATE

from apt_lightning.errors import ConfigError
from apt_studies.env import MAX_EPISODE_STEPS
from apt_studies.lerobot_format import FPS, IMAGE_KEY
from apt_studies.physics import ACTION_DIM, STATE_DIM
from lerobot_env_apt.tabletop import TabletopGymEnv, check_split

__all__ = ["AptTabletopEnvConfig"]

PIXELS = "pixels/top"
"""The env's camera ``top``: LeRobot's ``preprocess_observation`` names it ``observation.images.top``, the dataset's
image key."""


@EnvConfig.register_subclass("apt_tabletop")
@dataclass
class AptTabletopEnvConfig(EnvConfig):
    """The tabletop benchmark for ``lerobot-eval``: its features are those of the tabletop ``LeRobotDataset``
    (``apt_studies.lerobot_format.write_lerobot_dataset``), so a policy trained on that dataset evaluates unchanged.

    Args:
        task: one benchmark split, or several separated by commas (``"seen,counterfactual"``); each becomes its own
            task group in ``eval_info.json`` (``per_group``), with ``pc_success`` per split.
        fps: the dataset's frame rate (metadata and video speed).
        episode_length: step budget per episode (the benchmark's is 40).
        image_size: side of the observed image (the dataset's is 32).
        render_size: side of the frames in the videos ``lerobot-eval`` writes.

    Example::

        lerobot-eval --policy.path=<checkpoint>/pretrained_model --env.type=apt_tabletop \\
            --env.task=seen,counterfactual --eval.n_episodes=50 --eval.batch_size=10 --policy.device=cpu
    """

    task: str | None = "seen"
    fps: int = FPS
    episode_length: int = MAX_EPISODE_STEPS
    image_size: int = 32
    render_size: int = 128
    features: dict[str, PolicyFeature] = field(
        default_factory=lambda: {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
        }
    )
    features_map: dict[str, str] = field(
        default_factory=lambda: {ACTION: ACTION, "agent_pos": OBS_STATE, PIXELS: IMAGE_KEY}
    )

    def __post_init__(self) -> None:
        for split in self.splits:
            check_split(split, self.task)
        for name in ("episode_length", "image_size", "render_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be a positive int, got {value!r}.")
        self.features[PIXELS] = PolicyFeature(type=FeatureType.VISUAL, shape=(self.image_size, self.image_size, 3))

    @property
    def splits(self) -> list[str]:
        """The benchmark splits ``task`` names, in order."""
        names = [s.strip() for s in (self.task or "").split(",") if s.strip()]
        if not names:
            raise ConfigError(f"`task`={self.task!r} names no split of the tabletop benchmark.")
        return names

    @property
    def gym_kwargs(self) -> dict:
        return {
            "image_size": self.image_size,
            "max_episode_steps": self.episode_length,
            "render_size": self.render_size,
        }

    def create_envs(self, n_envs: int, use_async_envs: bool = False) -> dict[str, dict[int, gym.vector.VectorEnv]]:
        """``{split: {0: VectorEnv of n_envs tabletop envs}}``, one task group per split."""
        async_ = use_async_envs and n_envs > 1
        envs = {}
        for split in self.splits:
            make = functools.partial(TabletopGymEnv, split, **self.gym_kwargs)
            options = {"context": "forkserver"} if async_ else {}
            vector = gym.vector.AsyncVectorEnv if async_ else gym.vector.SyncVectorEnv
            envs[split] = {0: vector([make] * n_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, **options)}
        return envs
