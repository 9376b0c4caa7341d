"""The tabletop demonstrations as a ``LightningDataModule``, in the batch layout of the reference policies.

Used by the study, the LightningCLI entry point and the example training scripts, so every route trains on
exactly the same data for a given seed.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from apt_lightning.data import ResumableDataLoader
from apt_lightning.errors import ConfigError
from apt_studies.data import DemonstrationDataset, collect_demonstrations
from apt_studies.data import collate as bench_collate
from apt_studies.language import default_tokenizer
from apt_studies.splits import EVAL_SPLITS

__all__ = ["TabletopDataModule", "policy_batch"]


def policy_batch(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate benchmark samples into the reference-policy layout: ``image`` becomes ``pixel_values``, metadata
    (strings, indices) is dropped."""
    batch = bench_collate(samples)
    batch["pixel_values"] = batch.pop("image")
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k in _POLICY_KEYS}


_POLICY_KEYS = ("pixel_values", "state", "input_ids", "attention_mask", "language_mask", "actions", "action_pad_mask")


class TabletopDataModule(pl.LightningDataModule):
    """Expert demonstrations of the imbalanced training distribution (and optionally held-out ones).

    Args:
        episodes: training episodes rolled out by the scripted expert.
        seed: episode seed, and the shuffling seed of the resumable loader.
        chunk_size: actions per sample; must equal the policy's chunk size.
        batch_size: samples per step.
        val_split: evaluation split whose demonstrations form the validation set (``None``: no validation).
        val_episodes: episodes of ``val_split``.

    Example::

        >>> dm = TabletopDataModule(episodes=2, batch_size=4, chunk_size=4)
        >>> dm.setup("fit")
        >>> sorted(next(iter(dm.train_dataloader())))[:3]
        ['action_pad_mask', 'actions', 'attention_mask']
    """

    def __init__(
        self,
        episodes: int = 300,
        seed: int = 0,
        chunk_size: int = 8,
        batch_size: int = 32,
        val_split: str | None = None,
        val_episodes: int = 20,
    ) -> None:
        super().__init__()
        for name, value in (("episodes", episodes), ("batch_size", batch_size), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"`data.{name}` must be a positive integer, got {value!r}. Set e.g. `--data.{name} "
                    f"{ {'episodes': 300, 'batch_size': 32, 'chunk_size': 8}[name] }`."
                )
        if val_split is not None and val_split not in EVAL_SPLITS:
            raise ConfigError(
                f"`data.val_split`={val_split!r} is no benchmark split. Choose one of {list(EVAL_SPLITS)}, or null for "
                "no validation."
            )
        if isinstance(val_episodes, bool) or not isinstance(val_episodes, int) or val_episodes <= 0:
            raise ConfigError(f"`data.val_episodes` must be a positive integer, got {val_episodes!r}.")
        self.save_hyperparameters()
        self.tokenizer = default_tokenizer()
        self.train_set: DemonstrationDataset | None = None
        self.val_set: DemonstrationDataset | None = None

    @property
    def vocab_size(self) -> int:
        """Ids the prompts use, the ``<image>`` placeholder included (the VLM config's ``vocab_size``)."""
        return self.tokenizer.vocab_size

    @property
    def image_token_id(self) -> int:
        """The tokenizer's ``<image>`` id (the VLM config's ``image_token_id``)."""
        return self.tokenizer.image_id

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if self.train_set is None:
            self.train_set = collect_demonstrations(
                "train", n_episodes=hp.episodes, seed=hp.seed, chunk_size=hp.chunk_size, tokenizer=self.tokenizer
            )
        if hp.val_split is not None and self.val_set is None:
            self.val_set = collect_demonstrations(
                hp.val_split,
                n_episodes=hp.val_episodes,
                seed=hp.seed + 10_000,
                chunk_size=hp.chunk_size,
                tokenizer=self.tokenizer,
            )

    def train_dataloader(self) -> ResumableDataLoader:
        assert self.train_set is not None, "call setup('fit') first"
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            seed=self.hparams.seed,
            collate_fn=policy_batch,
        )

    def val_dataloader(self) -> Any:
        if self.val_set is None:
            return []
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.hparams.batch_size, collate_fn=policy_batch)
