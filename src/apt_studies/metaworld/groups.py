"""Language-critical groups: tasks that share one scene, so only the instruction tells them apart.

A group fixes, for all of its tasks, (1) one distribution of starting positions (a Meta-World *rand vec*),
(2) what is drawn in the first frame (Meta-World's coloured goal sites are hidden by the renderer; a group that needs
a visible goal draws one neutral :class:`~apt_studies.metaworld.camera.Marker`), and (3) every task's success
criterion as a function of the state, so an evaluation can say which task an episode *ended up doing* (its own, the
group's habitual one, another one of the group, or none).

=======================  =========================================  ================================================
group                    scene                                      tasks (habitual first)
=======================  =========================================  ================================================
``puck``                 a puck; a yellow ball on a post (the goal)  ``push-v3`` (puck to the post's foot),
                                                                    ``reach-v3`` (hand to the ball, puck untouched),
                                                                    ``pick-place-v3`` (puck up to the ball)
``faucet``               a faucet                                   ``faucet-open-v3``, ``faucet-close-v3``
=======================  =========================================  ================================================

``stick-push-v3``/``stick-pull-v3`` share a model file but not a scene: the thermos starts 9 cm apart (954 of
9,216 pixels differ at 96 px) and the two goal regions lie within each other's 0.12 m success radius, so success
could not tell the tasks apart; they stay in the pretraining corpus.

Positions: training scenes draw the free coordinates from ``train_low``/``train_high``; the ``novel_position``
split draws the coordinates listed in ``novel_dims`` from the band between the training box and ``novel_limit``
(outside training on both sides), the others as in training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apt_studies.metaworld.camera import Marker
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.sim import reset_to

__all__ = ["GROUPS", "FaucetGroup", "PuckGroup", "TaskGroup", "get_group", "group_of"]


@dataclass(frozen=True)
class TaskGroup(ABC):
    """Tasks of one shared scene. Subclasses say how to draw the goal and how each task succeeds.

    Attributes:
        name: Group name.
        tasks: Meta-World task names; ``tasks[0]`` is the habitual task (most fine-tuning demonstrations).
        train_low, train_high: Box of the shared rand vec in training scenes.
        novel_dims: Indices of the rand vec moved outside the training box in the ``novel_position`` split.
        novel_limit: Per index in ``novel_dims``, the half-width ``|v - centre|`` the novel band reaches.
    """

    name: str
    tasks: tuple[str, ...]
    train_low: tuple[float, ...]
    train_high: tuple[float, ...]
    novel_dims: tuple[int, ...] = ()
    novel_limit: tuple[float, ...] = ()
    _centre: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise MetaWorldConfigError(f"group {self.name!r} needs at least two tasks, got {self.tasks}.")
        low, high = np.asarray(self.train_low), np.asarray(self.train_high)
        if low.shape != high.shape or np.any(low > high):
            raise MetaWorldConfigError(f"group {self.name!r}: `train_low` must be <= `train_high` elementwise.")
        half = (high - low) / 2
        for d, limit in zip(self.novel_dims, self.novel_limit, strict=True):
            if limit <= half[d]:
                raise MetaWorldConfigError(f"group {self.name!r}: novel limit of dim {d} lies inside the training box.")
        object.__setattr__(self, "_centre", (low + high) / 2)

    @property
    def habitual(self) -> str:
        """The task that takes most fine-tuning demonstrations (its success is the ``habitual`` outcome)."""
        return self.tasks[0]

    def sample(self, rng: np.random.Generator, novel: bool = False) -> np.ndarray:
        """A shared rand vec, valid for every task of the group."""
        low, high = np.asarray(self.train_low, float), np.asarray(self.train_high, float)
        while True:
            vec = rng.uniform(low, high)
            if novel:
                for d, limit in zip(self.novel_dims, self.novel_limit, strict=True):
                    inner = (high[d] - low[d]) / 2
                    vec[d] = self._centre[d] + rng.choice((-1.0, 1.0)) * rng.uniform(inner, limit)
            if self.valid(vec):
                return vec

    def valid(self, vec: np.ndarray) -> bool:
        """Whether every task of the group accepts ``vec`` (some Meta-World resets loop forever otherwise)."""
        return True

    def in_training_box(self, vec: np.ndarray) -> bool:
        """Whether ``vec`` lies in the training box (``novel_position`` scenes never do)."""
        return bool(
            np.all(vec >= np.asarray(self.train_low) - 1e-12) and np.all(vec <= np.asarray(self.train_high) + 1e-12)
        )

    def check(self, vec: np.ndarray) -> np.ndarray:
        """``vec`` as a float array, or :class:`MetaWorldConfigError` if it has the wrong length for the group."""
        array = np.asarray(vec, dtype=np.float64)
        if array.shape != (len(self.train_low),):
            raise MetaWorldConfigError(
                f"group {self.name!r} takes a rand vec of shape ({len(self.train_low)},), got {array.shape}: draw "
                "scenes with the group's `sample`."
            )
        return array

    def reset(self, env: Any, vec: np.ndarray) -> np.ndarray:
        """Reset ``env`` (a task of this group) to ``vec``; returns the observation."""
        return reset_to(env, self.check(vec))

    @abstractmethod
    def markers(self, vec: np.ndarray) -> tuple[Marker, ...]:
        """What the renderer draws for the goal: the same for every task of the group."""

    @abstractmethod
    def criteria(self, env: Any, vec: np.ndarray, start: np.ndarray) -> dict[str, bool]:
        """For each task of the group, whether its success criterion holds in ``env``'s current state.

        Args:
            env: The running env (of any task of the group).
            vec: The episode's rand vec.
            start: The observation at reset.
        """


@dataclass(frozen=True)
class PuckGroup(TaskGroup):
    """``push-v3``/``reach-v3``/``pick-place-v3``: a puck on the table, a ball on a post marks the goal.

    The rand vec is ``(puck x, y, z, goal x, y, z)``; the ball is at the goal, the post's foot below it. Meta-World's
    own resets give the three tasks that meaning (push aims at the goal's ``(x, y)`` at puck height). Goal heights
    start at 0.15 m so that a puck pushed to the foot is >= 0.13 m from the ball, and reach also requires the
    puck untouched (moved <= 2 cm), so no state satisfies two tasks.
    """

    PUCK_Z = 0.02
    REACH_RADIUS, PUSH_RADIUS, PLACE_RADIUS, UNTOUCHED = 0.05, 0.05, 0.07, 0.02
    MIN_PUCK_GOAL_XY = 0.15  # Meta-World's puck resets resample below this: with a frozen vec they would loop forever

    def valid(self, vec: np.ndarray) -> bool:
        return bool(np.linalg.norm(vec[:2] - vec[3:5]) >= self.MIN_PUCK_GOAL_XY)

    def reset(self, env: Any, vec: np.ndarray) -> np.ndarray:
        vec = self.check(vec)
        if not self.valid(vec):
            raise MetaWorldConfigError(
                f"puck and goal are {np.linalg.norm(vec[:2] - vec[3:5]):.3f} m apart in (x, y); Meta-World needs >= "
                f"{self.MIN_PUCK_GOAL_XY}: draw scenes with `PuckGroup.sample`."
            )
        reset_to(env, vec)
        # push-v3 leaves the puck 0.6 mm lower than reach/pick-place (8 pixels differ by one grey level at 96 px):
        # put it at the same height in every task, then rebuild the frame-stacked observation from that state
        env._set_obj_xyz(np.array([vec[0], vec[1], self.PUCK_Z]))
        if getattr(env, "apt_task", None) == "push-v3":  # its goal height was taken from the lower puck
            env._target_pos = np.array([vec[3], vec[4], self.PUCK_Z])
        obs = env._get_obs()
        obs = env._get_obs()  # second call: the stacked previous frame is the corrected state too
        return np.asarray(obs, dtype=np.float64)

    def markers(self, vec: np.ndarray) -> tuple[Marker, ...]:
        return (Marker(position=(float(vec[3]), float(vec[4]), float(vec[5]))),)

    def criteria(self, env: Any, vec: np.ndarray, start: np.ndarray) -> dict[str, bool]:
        puck, puck0 = np.asarray(env._get_pos_objects())[:3], start[4:7]
        ball = np.asarray(vec[3:6], dtype=np.float64)
        foot = np.array([ball[0], ball[1], puck0[2]])
        untouched = np.linalg.norm(puck - puck0) <= self.UNTOUCHED
        return {
            "push-v3": bool(np.linalg.norm(puck - foot) <= self.PUSH_RADIUS),
            "reach-v3": bool(np.linalg.norm(env.tcp_center - ball) <= self.REACH_RADIUS and untouched),
            "pick-place-v3": bool(np.linalg.norm(puck - ball) <= self.PLACE_RADIUS),
        }


@dataclass(frozen=True)
class FaucetGroup(TaskGroup):
    """``faucet-open-v3``/``faucet-close-v3``: the same faucet; open turns the handle one way, close the other.

    The rand vec is the faucet base ``(x, y, z)``; the goal follows from it, so no marker is drawn. Criteria as
    Meta-World's: the handle's open (close) point within 0.07 m of the base plus ``(+L, 0, 0.125)`` (``(-L, ...)``).
    """

    RADIUS = 0.07
    OPEN_OFFSET = np.array([-0.04, 0.0, 0.02])  # where Meta-World measures each handle from its site
    CLOSE_OFFSET = np.array([0.0, 0.0, -0.01])

    def markers(self, vec: np.ndarray) -> tuple[Marker, ...]:
        return ()

    def criteria(self, env: Any, vec: np.ndarray, start: np.ndarray) -> dict[str, bool]:
        base = np.asarray(vec, dtype=np.float64)
        length = float(env._handle_length)
        open_goal, close_goal = base + np.array([length, 0.0, 0.125]), base + np.array([-length, 0.0, 0.125])
        opened = env._get_site_pos("handleStartOpen") + self.OPEN_OFFSET
        closed = env._get_site_pos("handleStartClose") + self.CLOSE_OFFSET
        return {
            "faucet-open-v3": bool(np.linalg.norm(opened - open_goal) <= self.RADIUS),
            "faucet-close-v3": bool(np.linalg.norm(closed - close_goal) <= self.RADIUS),
        }


GROUPS: dict[str, TaskGroup] = {
    "puck": PuckGroup(
        name="puck",
        tasks=("push-v3", "reach-v3", "pick-place-v3"),
        train_low=(-0.1, 0.6, 0.02, -0.1, 0.8, 0.15),
        train_high=(0.1, 0.7, 0.02, 0.1, 0.9, 0.3),
        novel_dims=(0, 3),
        novel_limit=(0.18, 0.18),
    ),
    "faucet": FaucetGroup(
        name="faucet",
        tasks=("faucet-open-v3", "faucet-close-v3"),
        train_low=(-0.05, 0.8, 0.0),
        train_high=(0.05, 0.85, 0.0),
        novel_dims=(0,),
        novel_limit=(0.12,),
    ),
}
"""The language-critical groups, by name."""


def get_group(name: str) -> TaskGroup:
    """The group called ``name``; :class:`MetaWorldConfigError` listing the groups otherwise."""
    if name not in GROUPS:
        raise MetaWorldConfigError(f"unknown group {name!r}; expected one of {sorted(GROUPS)}.")
    return GROUPS[name]


def group_of(task: str) -> TaskGroup | None:
    """The group ``task`` belongs to, or None for a pretraining-corpus task."""
    return next((g for g in GROUPS.values() if task in g.tasks), None)
