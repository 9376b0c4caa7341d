"""Shared Lightning plumbing of the reference policies: batch layout, training/validation steps, sampling API.

Batch layout (what :mod:`apt_lightning.bench` produces and what a user's collate should return):

* ``pixel_values`` (B, 3, H, W) float, ``state`` (B, S) float, ``actions`` (B, T, A) float;
* ``input_ids`` (B, L), ``attention_mask`` (B, L) and ``language_mask`` (B, L) bool for the *text* prompt;
  each policy prepends its image tokens itself, as a VLM processor would.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import abstractmethod
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from apt_lightning.config import APTConfig
from apt_lightning.mixin import APTMixin


def as_apt_config(value: APTConfig | dict[str, Any] | None) -> APTConfig:
    """Accept an :class:`APTConfig`, its fields as a dict (YAML, checkpoints) or ``None`` (defaults)."""
    if value is None:
        return APTConfig()
    return value if isinstance(value, APTConfig) else APTConfig(**value)


def load_policy(path: str | Path, map_location: str | torch.device = "cpu") -> "FlowMatchingPolicy":
    """Load a reference policy saved by a ``Trainer`` checkpoint, whichever class it is, in its saved stage.

    The checkpoint is self-contained: the model config and APT settings are in its hyper-parameters, so no
    hub download or pretraining cache is needed.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    qualname = checkpoint.get("policy_class")
    if qualname is None:
        raise ValueError(
            f"{path} holds no `policy_class`: it was not saved from a reference policy of apt_lightning.models. "
            "Load your own module with `YourModule.load_from_checkpoint(path)`."
        )
    module_name, _, class_name = qualname.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    policy = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    return policy.eval()


def tiny_gemma(hidden_size: int, num_layers: int, **extra: Any) -> dict[str, Any]:
    """Kwargs of a tiny Gemma text config (random weights; tests and examples)."""
    return dict(
        model_type="gemma", hidden_size=hidden_size, num_hidden_layers=num_layers, intermediate_size=2 * hidden_size,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2, **extra,
    )


def tiny_siglip(hidden_size: int, num_layers: int, image_size: int) -> dict[str, Any]:
    """Kwargs of a tiny SigLIP vision config with 8-pixel patches."""
    return dict(
        model_type="siglip_vision_model", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=2, image_size=image_size, patch_size=8, vision_use_head=False,
    )


def pad_last_dim(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x`` to ``size`` (pi0 pads state/actions to ``max_*_dim``)."""
    if x.shape[-1] > size:
        raise ValueError(f"Last dimension {x.shape[-1]} exceeds the model's maximum {size}.")
    return torch.nn.functional.pad(x, (0, size - x.shape[-1]))


class FlowMatchingPolicy(APTMixin, pl.LightningModule):
    """Base of the reference policies: they differ in how they condition, not in how they train."""

    action_dim: int
    chunk_size: int
    image_token_id: int
    num_image_tokens: int

    def apt_language_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.prompt(batch)["language_mask"]

    def prompt(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full VLM prompt: ``input_ids``, ``attention_mask``, ``language_mask`` with image tokens first.

        A batch that already holds image tokens (from a PaliGemma processor) is used as it is.
        """
        ids = batch["input_ids"]
        if (ids == self.image_token_id).any():
            return {k: batch[k] for k in ("input_ids", "attention_mask", "language_mask")}
        image = torch.full((ids.shape[0], self.num_image_tokens), self.image_token_id, dtype=ids.dtype, device=ids.device)
        return {
            "input_ids": torch.cat([image, ids], 1),
            "attention_mask": torch.cat([torch.ones_like(image, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], 1),
            "language_mask": torch.cat([torch.zeros_like(image, dtype=torch.bool), batch["language_mask"]], 1),
        }

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

    def save_policy_hyperparameters(self, **values: Any) -> None:
        """Store constructor arguments as plain data (configs as dicts), so checkpoints load without pickles."""
        values["apt_config"] = dataclasses.asdict(self.apt_cfg)
        self.save_hyperparameters(values)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["policy_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        super().on_save_checkpoint(checkpoint)
