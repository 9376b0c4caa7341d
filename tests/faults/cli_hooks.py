"""Test-only callbacks that the command-line fault tests load by ``class_path`` in a subprocess.

They are picked up with ``PYTHONPATH=tests/faults`` and ``class_path: cli_hooks.<Name>``.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class KillAfterCheckpoint(Callback):
    """SIGKILL the process in the middle of the step after ``at_step`` (its checkpoint already written).

    The kill lands after that step's forward and backward, just before its optimizer step: the work of the
    step is lost, as in a crash or a pre-empted job, and no teardown runs.
    """

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)


class StepLossLog(Callback):
    """Append ``{"step": global_step, "loss": loss}`` to a JSON-lines file after every optimizer step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"step": trainer.global_step, "loss": float(loss)}) + "\n")
