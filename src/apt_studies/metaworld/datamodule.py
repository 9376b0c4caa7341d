"""Meta-World demonstrations as the reference policies' batches: a ``Dataset`` and a ``LightningDataModule``.

Samples carry the keys of the tabletop's (:mod:`apt_studies.data`), so :func:`~apt_studies.datamodule.policy_batch`
collates them into the layout of :class:`~apt_lightning.models.PI0Policy` and
:class:`~apt_lightning.models.GR00TStylePolicy` (``pixel_values`` ``(B, 3, S, S)`` float in [0, 1] at the
benchmark's size, ``state`` ``(B, 4)``, ``actions`` ``(B, chunk, 4)``, ``action_pad_mask``, and the prompt
``input_ids``/``attention_mask``/``language_mask`` of :func:`~apt_studies.tokenizer.build_prompt`, text only: the
model puts its image tokens in front). Prompts use :func:`~apt_studies.metaworld.language.metaworld_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from apt_lightning.data import ResumableDataLoader
from apt_studies.data import images_to_tensor
from apt_studies.datamodule import policy_batch
from apt_studies.metaworld.camera import DEFAULT_IMAGE_SIZE
from apt_studies.metaworld.demos import Demonstrations, cached_demonstrations
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.language import metaworld_tokenizer
from apt_studies.metaworld.splits import DEFAULT_HABIT
from apt_studies.tokenizer import WordTokenizer, build_prompt

__all__ = ["MetaWorldDataModule", "MetaWorldDataset", "prompt_encoder"]


def prompt_encoder(tokenizer: WordTokenizer | None = None) -> Any:
    """``encode(instructions) -> {input_ids, attention_mask, language_mask}`` for the rollout evaluator."""
    tokenizer = tokenizer or metaworld_tokenizer()

    def encode(instructions: list[str]) -> dict[str, torch.Tensor]:
        prompt = build_prompt(tokenizer, instructions)
        return {
            "input_ids": prompt.input_ids,
            "attention_mask": prompt.attention_mask,
            "language_mask": prompt.language_mask,
        }

    return encode


class MetaWorldDataset(Dataset):
    """Samples of :class:`~apt_studies.metaworld.demos.Demonstrations` (or a corpus), with their prompts.

    Args:
        demos: Stacked expert samples and the episodes they index.
        tokenizer: Word tokenizer (:func:`metaworld_tokenizer` by default).

    Raises:
        MetaWorldConfigError: an instruction holds a word the tokenizer does not know (it would read ``<unk>``).
    """

    def __init__(self, demos: Demonstrations, tokenizer: WordTokenizer | None = None) -> None:
        self.tokenizer = tokenizer or metaworld_tokenizer()
        self.episodes = list(demos.episodes)
        instructions = [e.instruction for e in self.episodes]
        unknown = [s for s in instructions if self.tokenizer.unk_id in self.tokenizer.tokenize(s)]
        if unknown:
            raise MetaWorldConfigError(
                f"instructions with words the tokenizer lacks (they would read <unk>): {unknown[:3]}; build the "
                "tokenizer with metaworld_tokenizer()."
            )
        self.prompts = build_prompt(self.tokenizer, instructions)
        self.images = demos.images
        self.states = torch.from_numpy(np.asarray(demos.states, np.float32))
        self.actions = torch.from_numpy(np.asarray(demos.actions, np.float32))
        self.action_pad = torch.from_numpy(np.asarray(demos.action_pad, bool))
        self.episode_index = torch.from_numpy(np.asarray(demos.episode_index, np.int64))
        self.step = torch.from_numpy(np.asarray(demos.step, np.int64))

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: int) -> dict[str, Any]:
        e = int(self.episode_index[index])
        episode = self.episodes[e]
        return {
            "image": images_to_tensor(self.images[index : index + 1])[0],
            "state": self.states[index],
            "input_ids": self.prompts.input_ids[e],
            "attention_mask": self.prompts.attention_mask[e],
            "language_mask": self.prompts.language_mask[e],
            "actions": self.actions[index],
            "action_pad_mask": self.action_pad[index],
            "episode_index": self.episode_index[index],
            "step": self.step[index],
            "instruction": episode.instruction,
            "task": episode.task,
            "split": episode.split,
        }


class MetaWorldDataModule(pl.LightningDataModule):
    """Habit-biased fine-tuning demonstrations of the language-critical groups (cached on disk).

    Args:
        episodes: Expert episodes of the ``train`` split (cycling over the groups).
        seed: Episode seed, and the shuffling seed of the resumable loader.
        chunk_size: Actions per sample; must equal the policy's chunk size.
        batch_size: Samples per step.
        habit: Share of habitual-task episodes per group.
        image_size: Frame side (the benchmark's 96 px by default).
        cache_dir: Cache root of the demonstrations.
        progress: Progress bar while generating.
    """

    def __init__(
        self,
        episodes: int = 100,
        seed: int = 0,
        chunk_size: int = 8,
        batch_size: int = 32,
        habit: float = DEFAULT_HABIT,
        image_size: int = DEFAULT_IMAGE_SIZE,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if episodes <= 0 or batch_size <= 0 or chunk_size <= 0:
            raise MetaWorldConfigError(
                f"`episodes`, `batch_size` and `chunk_size` must be positive, got {episodes}, {batch_size}, "
                f"{chunk_size}."
            )
        self.episodes, self.seed, self.chunk_size, self.batch_size = episodes, seed, chunk_size, batch_size
        self.habit, self.image_size, self.cache_dir, self.progress = habit, image_size, cache_dir, progress
        self.tokenizer = metaworld_tokenizer()
        self.train_set: MetaWorldDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            demos = cached_demonstrations(
                "train",
                self.episodes,
                self.seed,
                self.chunk_size,
                habit=self.habit,
                image_size=self.image_size,
                cache_dir=self.cache_dir,
                progress=self.progress,
            )
            self.train_set = MetaWorldDataset(demos, self.tokenizer)

    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_set is None:
            raise MetaWorldConfigError("call setup('fit') before train_dataloader().")
        return ResumableDataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed, collate_fn=policy_batch
        )
