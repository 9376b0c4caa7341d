"""The one Trainer the benchmark's studies (and the tests) train with: CPU, no logger, checkpoints, progress bars
or sanity checks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def quiet_trainer(max_steps: int, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
    """A single-device CPU ``Trainer`` for ``max_steps`` that writes and prints nothing of its own, so a study's
    output is its tables (the studies show their own progress bar across runs). ``overrides`` replace any of
    these ``Trainer`` arguments (a test's ``devices``, ``strategy``, ``enable_checkpointing`` ...)."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(overrides)
    return pl.Trainer(callbacks=callbacks, **options)
