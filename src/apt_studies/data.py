"""Expert demonstrations as a torch ``Dataset``, plus the batch format shared with evaluation.

A *sample* is one step of an expert trajectory: the observation at that step, the instruction prompt, and
the next ``chunk_size`` expert actions. Chunks running past the end of the episode are padded with zeros
and flagged in ``action_pad_mask``; the reference policies' losses ignore them
(:func:`~apt_lightning.models.base.chunk_mse`).

Sample keys (batched by :func:`collate` with a leading ``B``):

=====================  ====================  ===================================================
key                    shape / dtype         meaning
=====================  ====================  ===================================================
``image``              (3, H, W) float32     RGB in [0, 1] (uint8 0-255 with ``image_dtype=uint8``)
``state``              (STATE_DIM,) float32  gripper ``(x, y)``
``input_ids``          (L,) int64            prompt, see :func:`~apt_studies.tokenizer.build_prompt`
``attention_mask``     (L,) int64            1 on non-padding tokens
``language_mask``      (L,) bool             True on instruction words only
``actions``            (chunk, 2) float32    expert actions in [-1, 1]
``action_pad_mask``    (chunk,) bool         True where the episode had already ended
``episode_index``,     () int64              which episode / step the sample comes from,
``step``, ``target``,                        target index, training layout (-1 if fresh) and its
``layout``,                                  canonical target (-1 if none)
``canonical_target``
``instruction``,       str                   task metadata
``split``
=====================  ====================  ===================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from apt_studies.expert import scripted_actions
from apt_studies.physics import ACTION_DIM
from apt_studies.render import render
from apt_studies.scene import Episode
from apt_studies.splits import DEFAULT_CANONICAL_PROB, make_episodes
from apt_studies.stepping import MAX_EPISODE_STEPS, LockstepEpisodes
from apt_studies.tokenizer import PromptTokens, WordTokenizer, build_prompt

_TEXT_KEYS = ("input_ids", "attention_mask", "language_mask")


def images_to_tensor(images: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 images to ``(B, 3, H, W)``: float in [0, 1], or uint8 when asked."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return tensor.contiguous() if dtype == torch.uint8 else tensor.to(dtype) / 255.0


def expert_trajectory(episode: Episode, max_steps: int = MAX_EPISODE_STEPS) -> tuple[np.ndarray, np.ndarray, bool]:
    """Run the expert closed-loop (re-planning every step) until it touches an object.

    Returns:
        ``(positions, actions, success)``: gripper position before each step ``(T, 2)``, the action taken
        ``(T, 2)``, and whether the touched object was the target.
    """
    state = LockstepEpisodes([episode], max_steps)
    positions, actions = [], []
    while not state.done[0]:
        ee = state.ee[0].copy()
        action = scripted_actions(episode.scene, ee, 1)[0]
        positions.append(ee)
        actions.append(action)
        state.step(action[None])
    return np.array(positions), np.array(actions, dtype=np.float32), bool(state.success[0])


class DemonstrationDataset(Dataset):
    """Stacked expert samples; text is stored once per episode and images as uint8 to save memory.

    Build it with :func:`collect_demonstrations`.
    """

    def __init__(
        self,
        episodes: list[Episode],
        prompts: PromptTokens,
        images: np.ndarray,
        states: np.ndarray,
        actions: np.ndarray,
        action_pad: np.ndarray,
        episode_index: np.ndarray,
        step: np.ndarray,
        image_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.episodes = episodes
        self.prompts = prompts
        self.images = images
        self.states = torch.from_numpy(states.astype(np.float32))
        self.actions = torch.from_numpy(actions.astype(np.float32))
        self.action_pad = torch.from_numpy(action_pad)
        self.episode_index = torch.from_numpy(episode_index.astype(np.int64))
        self.step = torch.from_numpy(step.astype(np.int64))
        self.image_dtype = image_dtype

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: int) -> dict[str, Any]:
        e = int(self.episode_index[index])
        episode = self.episodes[e]
        return {
            "image": images_to_tensor(self.images[index : index + 1], self.image_dtype)[0],
            "state": self.states[index],
            "input_ids": self.prompts.input_ids[e],
            "attention_mask": self.prompts.attention_mask[e],
            "language_mask": self.prompts.language_mask[e],
            "actions": self.actions[index],
            "action_pad_mask": self.action_pad[index],
            "episode_index": self.episode_index[index],
            "step": self.step[index],
            "target": torch.tensor(episode.scene.target),
            "layout": torch.tensor(episode.layout),
            "canonical_target": torch.tensor(episode.canonical_target),
            "instruction": episode.instruction,
            "split": episode.split,
        }


def collect_demonstrations(
    source: str | Sequence[Episode] = "train",
    n_episodes: int = 100,
    seed: int = 0,
    chunk_size: int = 8,
    *,
    tokenizer: WordTokenizer | None = None,
    image_size: int = 32,
    num_image_tokens: int = 0,
    max_len: int | None = None,
    max_steps: int = MAX_EPISODE_STEPS,
    canonical_prob: float = DEFAULT_CANONICAL_PROB,
    image_dtype: torch.dtype = torch.float32,
) -> DemonstrationDataset:
    """Roll out the expert and keep every step of every successful episode as a sample.

    Args:
        source: A split name (``"train"`` for the imbalanced training distribution, or an evaluation split
            for held-out demonstrations), or explicit episodes.
        n_episodes: Episodes to draw when ``source`` is a split name (ignored for explicit episodes).
        seed: Episode seed when ``source`` is a split name.
        chunk_size: Actions per sample (the policy's chunk length).
        tokenizer: Word tokenizer; the default closed-vocabulary one when None.
        image_size: Observation image size.
        num_image_tokens: ``<image>`` placeholders at the front of each prompt (0: text only).
        max_len: Prompt length including placeholders; longest prompt when None.
        max_steps: Step budget of an expert episode.
        canonical_prob: Fraction of canonical targets for ``"train"``.
        image_dtype: ``torch.float32`` (scaled to [0, 1]) or ``torch.uint8`` for returned images.

    Returns:
        The dataset; ``dataset.episodes`` lists the episodes, indexed by each sample's ``episode_index``.
        The expert succeeds on essentially every episode; the rare failure is dropped so no sample teaches
        touching a distractor.
    """
    episodes = list(source) if not isinstance(source, str) else make_episodes(source, n_episodes, seed, canonical_prob)
    kept: list[Episode] = []
    images, states, actions, pads, owners, steps = [], [], [], [], [], []
    for episode in episodes:
        positions, taken, success = expert_trajectory(episode, max_steps)
        if not success:
            continue
        owner = len(kept)
        kept.append(episode)
        padded = np.concatenate([taken, np.zeros((chunk_size, ACTION_DIM), dtype=np.float32)])
        length = len(taken)
        for t, ee in enumerate(positions):
            images.append(render(episode.scene, ee, size=image_size))
            states.append(ee)
            actions.append(padded[t : t + chunk_size])
            pads.append(np.arange(t, t + chunk_size) >= length)
            owners.append(owner)
            steps.append(t)
    prompts = build_prompt(tokenizer or WordTokenizer(), [e.instruction for e in kept], num_image_tokens, max_len)
    empty = len(images) == 0
    return DemonstrationDataset(
        episodes=kept,
        prompts=prompts,
        images=np.zeros((0, image_size, image_size, 3), np.uint8) if empty else np.stack(images),
        states=np.zeros((0, 2)) if empty else np.stack(states),
        actions=np.zeros((0, chunk_size, ACTION_DIM)) if empty else np.stack(actions),
        action_pad=np.zeros((0, chunk_size), bool) if empty else np.stack(pads),
        episode_index=np.array(owners, dtype=np.int64),
        step=np.array(steps, dtype=np.int64),
        image_dtype=image_dtype,
    )


def _pad_right(tensors: list[torch.Tensor], value: int | bool) -> torch.Tensor:
    length = max(t.shape[0] for t in tensors)
    out = torch.full((len(tensors), length), value, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples: stack tensors (right-padding prompts of unequal length), list everything else."""
    batch: dict[str, Any] = {}
    for key, value in samples[0].items():
        values = [s[key] for s in samples]
        if key in _TEXT_KEYS:
            batch[key] = _pad_right(values, 0 if key != "language_mask" else False)
        elif isinstance(value, torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
