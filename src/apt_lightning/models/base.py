"""Shared Lightning plumbing of the reference policies: batch layout, training/validation steps, sampling API.

Batch layout (what :mod:`apt_lightning.bench` produces and what a user's collate should return):

* ``pixel_values`` (B, 3, H, W) float, ``state`` (B, S) float, ``actions`` (B, T, A) float;
* ``input_ids`` (B, L), ``attention_mask`` (B, L) and ``language_mask`` (B, L) bool for the *text* prompt;
  each policy prepends its image tokens itself, as a VLM processor would.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import lightning.pytorch as pl
import torch

from apt_lightning.mixin import APTMixin


def pad_last_dim(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x`` to ``size`` (pi0 pads state/actions to ``max_*_dim``)."""
    if x.shape[-1] > size:
        raise ValueError(f"Last dimension {x.shape[-1]} exceeds the model's maximum {size}.")
    return torch.nn.functional.pad(x, (0, size - x.shape[-1]))


class FlowMatchingPolicy(APTMixin, pl.LightningModule):
    """Base of the reference policies: they differ in how they condition, not in how they train."""

    action_dim: int
    chunk_size: int

    def apt_language_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.prompt(batch)["language_mask"]

    @abstractmethod
    def prompt(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full VLM prompt (image tokens + text): ``input_ids``, ``attention_mask``, ``language_mask``."""

    @abstractmethod
    def flow_loss(self, batch: dict[str, torch.Tensor], noise: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """Flow-matching loss for given noise (B, T, A_model) and time (B,)."""

    @abstractmethod
    def sample_time(self, batch_size: int) -> torch.Tensor:
        """Flow-matching time (B,) in the model's own convention."""

    @abstractmethod
    def sample_actions(
        self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None = None, num_steps: int | None = None
    ) -> torch.Tensor:
        """Action chunk (B, T, action_dim) by Euler integration from ``noise``."""

    @property
    def noise_dim(self) -> int:
        return self.action_dim

    def draw_noise_time(self, batch_size: int, *keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and time from the per-step stream (:meth:`apt_rng`): exact on resume and across ranks."""
        with self.apt_rng(*keys):
            noise = torch.randn(batch_size, self.chunk_size, self.noise_dim, device=self.device)
            time = self.sample_time(batch_size).to(self.device)
        return noise, time

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        noise, time = self.draw_noise_time(batch["state"].shape[0], batch_idx)
        loss = self.flow_loss(batch, noise, time)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["state"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        noise, time = self.draw_noise_time(batch["state"].shape[0], batch_idx, 7)
        loss = self.flow_loss(batch, noise, time)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["state"].shape[0])
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        return self.sample_actions(batch)
