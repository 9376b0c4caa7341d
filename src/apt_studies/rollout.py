"""Batched closed-loop evaluation: all episodes step in lockstep through one vectorised physics call.

A policy is any callable ``policy_fn(batch) -> actions`` where ``batch`` holds tensors for the still-running
episodes (``image`` ``(B, 3, H, W)`` float in [0, 1], ``state``, ``input_ids``, ``attention_mask``,
``language_mask`` as in :mod:`apt_studies.data`, plus ``episode_index`` ``(B,)`` into the episode
list, which only privileged reference policies may use) and ``actions`` is ``(B, chunk, 2)`` (tensor or
array). Each chunk is executed for ``execute_steps`` steps (receding horizon) before the policy is queried
again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from apt_studies.data import images_to_tensor
from apt_studies.physics import ACTION_DIM
from apt_studies.render import render
from apt_studies.scene import Episode
from apt_studies.stepping import MAX_EPISODE_STEPS, LockstepEpisodes
from apt_studies.tokenizer import WordTokenizer, build_prompt

PolicyFn = Callable[[dict[str, torch.Tensor]], "torch.Tensor | np.ndarray"]


@dataclass(frozen=True)
class RolloutResult:
    """Per-episode outcome of :func:`rollout`.

    Attributes:
        success: ``(N,)`` bool, touched the target.
        contact: ``(N,)`` int, touched object index or -1 (time-out).
        steps: ``(N,)`` int, steps used.
        splits: Split name of each episode.
        final_state: ``(N, 2)`` gripper position when the episode ended (``None`` from older callers).
    """

    success: np.ndarray
    contact: np.ndarray
    steps: np.ndarray
    splits: tuple[str, ...]
    final_state: np.ndarray | None = None

    def summary(self) -> dict[str, float]:
        """``success_rate``, ``success_rate/<split>`` per split present, ``timeout_rate``, ``mean_steps``."""
        out = {
            "success_rate": float(self.success.mean()) if len(self.success) else float("nan"),
            "timeout_rate": float((self.contact < 0).mean()) if len(self.contact) else float("nan"),
            "mean_steps": float(self.steps.mean()) if len(self.steps) else float("nan"),
            "episodes": float(len(self.success)),
        }
        names = np.array(self.splits)
        for split in dict.fromkeys(self.splits):
            out[f"success_rate/{split}"] = float(self.success[names == split].mean())
        return out


def _as_numpy_actions(actions: Any, batch: int) -> np.ndarray:
    array = (
        actions.detach().float().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions, np.float64)
    )
    if array.ndim != 3 or array.shape[0] != batch or array.shape[2] != ACTION_DIM:
        raise ValueError(f"policy must return (B={batch}, chunk, {ACTION_DIM}) actions, got {array.shape}")
    return array


def rollout(
    policy_fn: PolicyFn,
    episodes: Sequence[Episode],
    chunk_size: int,
    max_steps: int = MAX_EPISODE_STEPS,
    *,
    execute_steps: int | None = None,
    tokenizer: WordTokenizer | None = None,
    image_size: int = 32,
    num_image_tokens: int = 0,
    max_len: int | None = None,
    device: torch.device | str | None = None,
) -> RolloutResult:
    """Evaluate a policy closed-loop on episodes, all stepped in lockstep.

    Args:
        policy_fn: Maps an observation batch to ``(B, chunk, 2)`` actions (called under ``inference_mode``).
        episodes: Episodes to run (e.g. ``make_episodes("counterfactual", 200, seed)``).
        chunk_size: Expected chunk length; at most this many actions of each chunk are executed.
        max_steps: Step budget per episode.
        execute_steps: Actions executed per query (defaults to ``chunk_size``).
        tokenizer: Word tokenizer (default vocabulary when None).
        image_size: Observation image size.
        num_image_tokens: ``<image>`` placeholders at the front of each prompt.
        max_len: Prompt length; longest when None.
        device: Where observation tensors are moved before calling the policy.

    Returns:
        Per-episode results; ``result.summary()`` aggregates them.
    """
    n = len(episodes)
    execute = min(execute_steps or chunk_size, chunk_size)
    if n == 0:
        return RolloutResult(np.zeros(0, bool), np.zeros(0, int), np.zeros(0, int), (), np.zeros((0, ACTION_DIM)))
    prompts = build_prompt(tokenizer or WordTokenizer(), [e.instruction for e in episodes], num_image_tokens, max_len)
    state = LockstepEpisodes(episodes, max_steps)
    while not state.done.all():
        active = state.running()
        images = np.stack([render(episodes[int(i)].scene, state.ee[i], size=image_size) for i in active])
        index = torch.from_numpy(active)
        batch = {
            "image": images_to_tensor(images),
            "state": torch.from_numpy(state.ee[active].astype(np.float32)),
            "input_ids": prompts.input_ids[index],
            "attention_mask": prompts.attention_mask[index],
            "language_mask": prompts.language_mask[index],
            "episode_index": index,
        }
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode():
            chunk = _as_numpy_actions(policy_fn(batch), len(active))
        for k in range(min(execute, chunk.shape[1])):
            running = ~state.done[active]
            if not running.any():
                break
            state.step(chunk[running, k], active[running])
    return RolloutResult(
        success=state.success,
        contact=state.contact,
        steps=state.steps,
        splits=tuple(e.split for e in episodes),
        final_state=state.ee,
    )
