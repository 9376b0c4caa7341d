"""Rollouts of several episodes in lockstep, so the policy answers one batch per query instead of one episode.

:func:`~apt_studies.metaworld.rollout.evaluate` runs episodes one by one (batch 1). Here up to ``batch_size``
episodes run side by side, each in an env of its own (:class:`EnvPool` keeps them for reuse), and every query
step the policy gets the frames of all episodes still running as one batch. Episode rules are those of
:func:`~apt_studies.metaworld.rollout.run_episode`: the episode ends at the first step where any task of its group
meets its criterion, or after ``max_steps``; outcome classes as there. Frames are rendered only when the policy is
queried. The result is a :class:`~apt_studies.metaworld.rollout.MetaWorldResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from apt_studies.data import images_to_tensor
from apt_studies.metaworld.camera import DEFAULT_CAMERA, DEFAULT_IMAGE_SIZE, Camera, FrameRenderer
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.groups import get_group
from apt_studies.metaworld.rollout import MAX_STEPS, Encode, MetaWorldResult, PolicyFn, _outcome
from apt_studies.metaworld.sim import ACTION_DIM, make_env, proprioception
from apt_studies.metaworld.splits import MetaWorldEpisode

__all__ = ["EnvPool", "evaluate_lockstep"]


class EnvPool:
    """Envs and renderers per task, several per task, built on first use and reused."""

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, camera: Camera = DEFAULT_CAMERA) -> None:
        self.image_size, self.camera = image_size, camera
        self._envs: dict[str, list[tuple[Any, FrameRenderer]]] = {}

    def get(self, task: str, index: int) -> tuple[Any, FrameRenderer]:
        """The ``index``-th env of ``task`` (building envs up to it)."""
        envs = self._envs.setdefault(task, [])
        while len(envs) <= index:
            env = make_env(task)
            envs.append((env, FrameRenderer(env.model, self.image_size, self.camera)))
        return envs[index]

    def close(self) -> None:
        for envs in self._envs.values():
            for _, renderer in envs:
                renderer.close()
        self._envs.clear()


def _frame(state: dict[str, Any]) -> np.ndarray:
    return state["renderer"].render(state["env"].data, state["group"].markers(state["vec"]))


def _run_batch(
    pool: EnvPool,
    episodes: Sequence[MetaWorldEpisode],
    first_index: int,
    policy_fn: PolicyFn,
    encode: Encode | None,
    execute: int,
    max_steps: int,
) -> list[tuple[str, int]]:
    used: dict[str, int] = {}
    live = []
    for episode in episodes:
        group = get_group(episode.group)
        env, renderer = pool.get(episode.task, used.get(episode.task, 0))
        used[episode.task] = used.get(episode.task, 0) + 1
        vec = np.asarray(episode.rand_vec)
        obs = group.reset(env, vec)
        live.append({"group": group, "env": env, "renderer": renderer, "vec": vec, "obs": obs, "start": obs})
    queues: list[list[np.ndarray]] = [[] for _ in episodes]
    met: list[dict[str, bool]] = [{} for _ in episodes]
    steps = [0] * len(episodes)
    done = [False] * len(episodes)
    while not all(done):
        asking = [i for i in range(len(episodes)) if not done[i] and not queues[i]]
        if asking:
            frames = np.stack([_frame(live[i]) for i in asking])
            words = [episodes[i].instruction for i in asking]
            batch: dict[str, Any] = {
                "image": images_to_tensor(frames),
                "state": torch.from_numpy(np.stack([proprioception(live[i]["obs"]) for i in asking])),
                "instruction": words,
                "episode_index": torch.tensor([first_index + i for i in asking]),
            }
            if encode is not None:
                batch.update(encode(words))
            with torch.inference_mode():
                chunk = policy_fn(batch)
            array = chunk.detach().float().cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
            if array.ndim != 3 or array.shape[0] != len(asking) or array.shape[2] != ACTION_DIM or not array.shape[1]:
                raise MetaWorldConfigError(
                    f"policy must return ({len(asking)}, chunk >= 1, {ACTION_DIM}) actions, got {array.shape}."
                )
            for row, i in enumerate(asking):
                queues[i] = list(np.clip(array[row, :execute].astype(np.float64), -1.0, 1.0))
        for i in range(len(episodes)):
            if done[i]:
                continue
            state = live[i]
            state["obs"], *_ = state["env"].step(queues[i].pop(0))
            steps[i] += 1
            met[i] = state["group"].criteria(state["env"], state["vec"], state["start"])
            done[i] = any(met[i].values()) or steps[i] >= max_steps
    return [(_outcome(met[i], e.task, get_group(e.group).habitual), steps[i]) for i, e in enumerate(episodes)]


def evaluate_lockstep(
    policy_fn: PolicyFn,
    episodes: Sequence[MetaWorldEpisode],
    *,
    batch_size: int = 10,
    execute_steps: int = 8,
    max_steps: int = MAX_STEPS,
    encode: Encode | None = None,
    pool: EnvPool | None = None,
    progress: bool = True,
) -> MetaWorldResult:
    """Roll ``policy_fn`` out on ``episodes``, ``batch_size`` at a time in lockstep.

    Args:
        policy_fn: Observation batch (``image`` ``(B, 3, S, S)``, ``state`` ``(B, 4)``, ``instruction``,
            ``episode_index`` and the ``encode`` tensors) -> ``(B, chunk, 4)`` actions.
        episodes: Episodes to run; ``episode_index`` is the position in this list.
        batch_size: Episodes run side by side (each in an env of its own).
        execute_steps: Actions executed per query.
        max_steps: Step budget per episode.
        encode: Turns instructions into prompt tensors added to the batch.
        pool: Envs to reuse (a fresh :class:`EnvPool` at the default size when None).
        progress: Show a progress bar over batches.

    Raises:
        MetaWorldConfigError: ``batch_size`` or ``execute_steps`` < 1, or the policy returns the wrong shape.
    """
    if batch_size < 1 or execute_steps < 1:
        raise MetaWorldConfigError(f"`batch_size` and `execute_steps` must be >= 1, got {batch_size}, {execute_steps}.")
    own = pool is None
    pool = pool or EnvPool()
    results: list[tuple[str, int]] = []
    try:
        starts = range(0, len(episodes), batch_size)
        for start in tqdm(starts, desc="meta-world rollouts (lockstep)", disable=not progress):
            part = episodes[start : start + batch_size]
            results.extend(_run_batch(pool, part, start, policy_fn, encode, execute_steps, max_steps))
    finally:
        if own:
            pool.close()
    return MetaWorldResult(
        tuple(o for o, _ in results),
        np.array([s for _, s in results], dtype=np.int64),
        tuple(e.split for e in episodes),
        tuple(e.task for e in episodes),
    )
