"""Closed-loop episodes on Meta-World: a policy or the scripted expert, with outcome classes per episode.

A policy is the tabletop's ``policy_fn(batch) -> actions`` (:mod:`apt_studies.rollout`): ``batch`` holds
``image`` ``(B, 3, H, W)`` float in [0, 1], ``state`` ``(B, 4)`` (hand ``x, y, z``, gripper opening),
``instruction`` (list of B strings; tokenise with ``encode``, which adds its tensors to the batch) and
``episode_index`` ``(B,)``; it returns ``(B, chunk, 4)`` actions in [-1, 1] (tensor or array), executed
``execute_steps`` at a time. Episodes run one after another (one env and renderer per task, reused), so B = 1.

An episode ends at the first step where any task of its group meets its criterion
(:meth:`~apt_studies.metaworld.groups.TaskGroup.criteria`) or when ``max_steps`` run out, and falls in one of
:data:`~apt_studies.outcomes.OUTCOMES`: ``success`` (the instructed task's criterion), ``habitual`` (the group's
habitual task's instead), ``other`` (another task of the group), ``none`` (time-out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from apt_studies.data import images_to_tensor
from apt_studies.metaworld.camera import DEFAULT_CAMERA, DEFAULT_IMAGE_SIZE, Camera, FrameRenderer
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.groups import get_group
from apt_studies.metaworld.sim import ACTION_DIM, make_env, proprioception
from apt_studies.metaworld.splits import MetaWorldEpisode
from apt_studies.outcomes import OUTCOMES

__all__ = ["MAX_STEPS", "EpisodeTrace", "MetaWorldResult", "Simulator", "evaluate", "run_episode"]

MAX_STEPS = 200
"""Step budget: the experts need 50-110 steps on the groups' tasks."""
PolicyFn = Callable[[dict[str, Any]], "torch.Tensor | np.ndarray"]
Encode = Callable[[list[str]], dict[str, torch.Tensor]]


class Simulator:
    """One env and one renderer per task, built on first use and reused across episodes."""

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, camera: Camera = DEFAULT_CAMERA) -> None:
        self.image_size = image_size
        self.camera = camera
        self._envs: dict[str, tuple[Any, FrameRenderer]] = {}

    def get(self, task: str) -> tuple[Any, FrameRenderer]:
        if task not in self._envs:
            env = make_env(task)
            self._envs[task] = (env, FrameRenderer(env.model, self.image_size, self.camera))
        return self._envs[task]

    def close(self) -> None:
        for _, renderer in self._envs.values():
            renderer.close()
        self._envs.clear()


@dataclass
class EpisodeTrace:
    """What happened in one episode: per step the frame, state and action taken, and how it ended."""

    frames: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    outcome: str
    steps: int


def run_episode(
    sim: Simulator,
    episode: MetaWorldEpisode,
    act: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    max_steps: int = MAX_STEPS,
    record: bool = False,
) -> EpisodeTrace:
    """Run one episode; ``act(frame, state, full_obs)`` returns the next ``(k, 4)`` actions (k >= 1).

    Only privileged code (the scripted expert) may read ``full_obs``; policies get ``frame`` and ``state``.
    """
    group = get_group(episode.group)
    env, renderer = sim.get(episode.task)
    vec = np.asarray(episode.rand_vec)
    obs = start = group.reset(env, vec)
    markers = group.markers(vec)
    frames, states, actions = [], [], []
    queue: list[np.ndarray] = []
    met: dict[str, bool] = {}
    steps = 0
    while steps < max_steps:
        frame = renderer.render(env.data, markers) if record or not queue else None  # frames cost ~10 ms
        state = proprioception(obs)
        if not queue:
            chunk = np.asarray(act(frame, state, obs), dtype=np.float64).reshape(-1, ACTION_DIM)
            if len(chunk) == 0:
                raise MetaWorldConfigError("the policy returned an empty chunk; return at least one action.")
            queue = list(np.clip(chunk, -1.0, 1.0))
        action = queue.pop(0)
        if record:
            frames.append(frame)
            states.append(state)
            actions.append(action.astype(np.float32))
        obs, *_ = env.step(action)
        steps += 1
        met = group.criteria(env, vec, start)
        if any(met.values()):
            break
    return EpisodeTrace(
        frames=np.stack(frames) if frames else np.zeros((0, sim.image_size, sim.image_size, 3), np.uint8),
        states=np.stack(states) if states else np.zeros((0, ACTION_DIM), np.float32),
        actions=np.stack(actions) if actions else np.zeros((0, ACTION_DIM), np.float32),
        outcome=_outcome(met, episode.task, group.habitual),
        steps=steps,
    )


def _outcome(met: dict[str, bool], task: str, habitual: str) -> str:
    if met.get(task):
        return "success"
    if met.get(habitual):
        return "habitual"
    return "other" if any(met.values()) else "none"


@dataclass(frozen=True)
class MetaWorldResult:
    """Per-episode outcomes of :func:`evaluate`."""

    outcomes: tuple[str, ...]
    steps: np.ndarray
    splits: tuple[str, ...]
    tasks: tuple[str, ...]

    def summary(self) -> dict[str, float]:
        """``success_rate``, the rate of every outcome class, and ``success_rate/<split>`` per split present."""
        n = len(self.outcomes)
        out = {"success_rate": self.outcomes.count("success") / n if n else float("nan"), "episodes": float(n)}
        out.update({f"outcome/{k}": (self.outcomes.count(k) / n if n else float("nan")) for k in OUTCOMES})
        for split in dict.fromkeys(self.splits):
            mine = [o for o, s in zip(self.outcomes, self.splits, strict=True) if s == split]
            out[f"success_rate/{split}"] = mine.count("success") / len(mine)
        return out


def _policy_act(policy_fn: PolicyFn, episode_index: int, instruction: str, encode: Encode | None, execute: int):
    def act(frame: np.ndarray, state: np.ndarray, full_obs: np.ndarray) -> np.ndarray:
        batch: dict[str, Any] = {
            "image": images_to_tensor(frame[None]),
            "state": torch.from_numpy(state[None]),
            "instruction": [instruction],
            "episode_index": torch.tensor([episode_index]),
        }
        if encode is not None:
            batch.update(encode([instruction]))
        with torch.inference_mode():
            chunk = policy_fn(batch)
        array = chunk.detach().float().cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
        if array.ndim != 3 or array.shape[0] != 1 or array.shape[2] != ACTION_DIM:
            raise MetaWorldConfigError(f"policy must return (B=1, chunk, {ACTION_DIM}) actions, got {array.shape}.")
        return array[0, :execute]

    return act


def evaluate(
    policy_fn: PolicyFn,
    episodes: Sequence[MetaWorldEpisode],
    *,
    execute_steps: int = 8,
    max_steps: int = MAX_STEPS,
    encode: Encode | None = None,
    sim: Simulator | None = None,
    progress: bool = True,
) -> MetaWorldResult:
    """Roll ``policy_fn`` out on ``episodes`` (e.g. ``make_episodes("counterfactual", 20, seed=1)``).

    Args:
        policy_fn: Observation batch -> ``(1, chunk, 4)`` actions.
        episodes: Episodes to run.
        execute_steps: Actions executed per query (receding horizon).
        max_steps: Step budget per episode.
        encode: Turns instructions into prompt tensors added to the batch (the study's tokenizer).
        sim: Envs and renderers to reuse (a fresh :class:`Simulator` at the default size when None).
        progress: Show a progress bar.
    """
    if execute_steps < 1:
        raise MetaWorldConfigError(f"`execute_steps` must be >= 1, got {execute_steps}.")
    own = sim is None
    sim = sim or Simulator()
    outcomes, steps = [], []
    try:
        for i, episode in enumerate(tqdm(episodes, desc="meta-world rollouts", disable=not progress)):
            trace = run_episode(
                sim, episode, _policy_act(policy_fn, i, episode.instruction, encode, execute_steps), max_steps
            )
            outcomes.append(trace.outcome)
            steps.append(trace.steps)
    finally:
        if own:
            sim.close()
    return MetaWorldResult(
        tuple(outcomes),
        np.array(steps, dtype=np.int64),
        tuple(e.split for e in episodes),
        tuple(e.task for e in episodes),
    )
