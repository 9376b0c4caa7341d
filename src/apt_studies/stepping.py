"""The one episode-stepping rule, shared by the environment, batched rollouts and expert demonstrations.

An episode ends at the first contact with any object (success iff it is the target) or when its step budget is
spent. :class:`LockstepEpisodes` holds that state for any number of episodes and advances the running ones
through one vectorised physics call, so :class:`~apt_studies.env.TabletopEnv` (one episode),
:func:`~apt_studies.rollout.rollout` (hundreds in lockstep) and
:func:`~apt_studies.data.expert_trajectory` (the expert re-planning every step) cannot disagree on
when an episode ends or where the gripper stops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from apt_studies.physics import advance
from apt_studies.scene import Episode

__all__ = ["MAX_EPISODE_STEPS", "LockstepEpisodes"]

MAX_EPISODE_STEPS = 40
"""Default step budget; the expert needs at most about half of it."""


class LockstepEpisodes:
    """Gripper positions, steps, contacts and termination of ``episodes``, stepped together.

    Args:
        episodes: The episodes; scenes with fewer objects are padded (padding is never touched).
        max_steps: Step budget per episode.

    Attributes:
        ee: ``(N, 2)`` float64 gripper positions.
        steps: ``(N,)`` steps taken.
        contact: ``(N,)`` touched object index, -1 while none.
        done: ``(N,)`` whether the episode has ended.
    """

    def __init__(self, episodes: Sequence[Episode], max_steps: int = MAX_EPISODE_STEPS) -> None:
        if max_steps <= 0:
            raise ValueError(f"`max_steps` must be positive, got {max_steps}.")
        n = len(episodes)
        m = max((len(e.scene.objects) for e in episodes), default=0)
        self.centres = np.zeros((n, m, 2))
        self.radii = np.zeros((n, m))
        self.valid = np.zeros((n, m), dtype=bool)
        for i, e in enumerate(episodes):
            k = len(e.scene.objects)
            self.centres[i, :k], self.radii[i, :k], self.valid[i, :k] = e.scene.centres(), e.scene.radii(), True
        self.targets = np.array([e.scene.target for e in episodes], dtype=np.int64)
        self.max_steps = max_steps
        self.ee = np.array([e.ee_start for e in episodes], dtype=np.float64).reshape(n, 2)
        self.steps = np.zeros(n, dtype=np.int64)
        self.contact = np.full(n, -1, dtype=np.int64)
        self.done = np.zeros(n, dtype=bool)

    @property
    def success(self) -> np.ndarray:
        """``(N,)`` bool: touched the target."""
        return self.contact == self.targets

    def running(self) -> np.ndarray:
        """Indices of the episodes that have not ended."""
        return np.flatnonzero(~self.done)

    def step(self, actions: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Advance episodes ``ids`` (all by default) by one action each (``(len(ids), 2)``).

        Raises:
            RuntimeError: If one of them has already ended.
        """
        ids = np.arange(len(self.done)) if ids is None else np.asarray(ids)
        if self.done[ids].any():
            raise RuntimeError("an episode that has ended was stepped; step only `running()` episodes")
        new_ee, hit = advance(self.ee[ids], actions, self.centres[ids], self.radii[ids], self.valid[ids])
        self.ee[ids] = new_ee
        self.steps[ids] += 1
        self.contact[ids] = hit
        self.done[ids] = (hit >= 0) | (self.steps[ids] >= self.max_steps)
