"""Single-episode tabletop environment with chunked actions.

Task and success criterion
--------------------------
The gripper must reach the object the instruction names. The episode ends as soon as the gripper touches
any object's contact disc (continuous contact test, so it cannot pass through objects); it is a **success
iff the touched object is the target**. Touching a distractor is a failure, and so is touching nothing
within ``max_steps`` steps. "Touching" therefore means committing to one object: a policy that ignores the
instruction and heads for the habitual object of a familiar layout is scored as wrong whenever the
instruction names another one. The scripted expert plans around distractors and succeeds on every split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from apt_studies.language import training_instruction
from apt_studies.physics import ACTION_DIM, MAX_STEP, STATE_DIM
from apt_studies.render import render
from apt_studies.scene import Episode, Scene, sample_ee_start
from apt_studies.splits import TRAIN_SPLIT, sample_episode
from apt_studies.stepping import MAX_EPISODE_STEPS, LockstepEpisodes

__all__ = ["ACTION_DIM", "MAX_EPISODE_STEPS", "MAX_STEP", "STATE_DIM", "TabletopEnv"]

Observation = dict[str, np.ndarray]


class TabletopEnv:
    """Language-conditioned reaching on a 2-D tabletop.

    Args:
        seed: Seeds the episodes drawn by :meth:`reset` without an explicit episode.
        split: Split that :meth:`reset` draws from when no episode is given.
        image_size: Height and width of observation images.
        max_steps: Step budget per episode.

    Observations are ``{"image": (H, W, 3) uint8, "state": (STATE_DIM,) float32}``; the instruction of the
    current episode is :attr:`instruction`.
    """

    def __init__(
        self, seed: int = 0, split: str = TRAIN_SPLIT, image_size: int = 32, max_steps: int = MAX_EPISODE_STEPS
    ) -> None:
        self._rng = np.random.default_rng(seed)
        self.split = split
        self.image_size = image_size
        self.max_steps = max_steps
        self._episode: Episode | None = None
        self._state: LockstepEpisodes | None = None

    @property
    def episode(self) -> Episode:
        """The current episode (raises before the first :meth:`reset`)."""
        if self._episode is None:
            raise RuntimeError("call reset() first")
        return self._episode

    @property
    def instruction(self) -> str:
        """Instruction of the current episode."""
        return self.episode.instruction

    @property
    def ee_pos(self) -> np.ndarray:
        """Current gripper position (a copy)."""
        return self._stepping.ee[0].copy()

    @property
    def _stepping(self) -> LockstepEpisodes:
        if self._state is None:
            raise RuntimeError("call reset() first")
        return self._state

    def reset(self, episode: Episode | Scene | None = None) -> Observation:
        """Start an episode and observe it.

        Args:
            episode: The episode to run; a bare :class:`Scene` gets a training-template instruction for its
                target and a random gripper start; None draws a fresh episode of :attr:`split`.
        """
        if episode is None:
            episode = sample_episode(self.split, self._rng)
        elif isinstance(episode, Scene):
            instruction = training_instruction(self._rng, episode.target_object)
            episode = Episode(scene=episode, instruction=instruction, ee_start=sample_ee_start(self._rng, episode))
        self._episode = episode
        self._state = LockstepEpisodes([episode], self.max_steps)
        return self.observation()

    def observation(self) -> Observation:
        """Image and proprioceptive state at the current gripper position."""
        return {
            "image": render(self.episode.scene, self._stepping.ee[0], size=self.image_size),
            "state": self._stepping.ee[0].astype(np.float32),
        }

    def step_chunk(self, actions: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        """Execute a chunk of actions, stopping early when the episode ends.

        Args:
            actions: ``(k, ACTION_DIM)`` normalised actions (or ``(ACTION_DIM,)`` for one step).

        Returns:
            ``(obs, reward, done, info)``: reward is 1.0 on success, else 0.0. ``info`` holds ``success``,
            ``done``, ``contact`` (touched object index or -1), ``steps`` (total so far) and
            ``executed`` (steps of this chunk actually run).
        """
        state = self._state
        if state is None or state.done[0]:
            raise RuntimeError("episode is over; call reset()")
        chunk = np.asarray(actions, dtype=np.float64).reshape(-1, ACTION_DIM)
        executed = 0
        for action in chunk:
            state.step(action[None])
            executed += 1
            if state.done[0]:
                break
        success = bool(state.success[0])
        done = bool(state.done[0])
        info = {
            "success": success,
            "done": done,
            "contact": int(state.contact[0]),
            "steps": int(state.steps[0]),
            "executed": executed,
        }
        return self.observation(), float(success), done, info
