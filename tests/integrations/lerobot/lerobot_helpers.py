"""Tiny LeRobot batches, fits and adapters shared by the LeRobot integration tests (imported after the skip)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset

from apt_lightning import APTConfig
from apt_lightning.data import ResumableDataLoader
from apt_lightning.integrations.lerobot import PI0APT, PI05APT, SmolVLAAPT
from apt_lightning.integrations.lerobot.tiny import tiny_pi_policy, tiny_smolvla_policy, write_tiny_smolvlm
from apt_studies.trainer import quiet_trainer

L_TOKENS = 12
# PI05-like prompt layout: [bos, "Task", ":", <instruction>, ",", "State", <state tokens>, pad ...]
INSTRUCTIONS = {"left": [30, 31], "right": [40, 41, 42]}
ADAPTERS = {"pi0": PI0APT, "pi05": PI05APT, "smolvla": SmolVLAAPT}
_SMOLVLM: list[Path] = []


def smolvlm_directory() -> Path:
    """One tiny SmolVLM directory per test session (SmolVLA builds its VLM from a local directory)."""
    if not _SMOLVLM:
        _SMOLVLM.append(write_tiny_smolvlm(Path(tempfile.mkdtemp(prefix="tiny_smolvlm_"))))
    return _SMOLVLM[0]


def tiny_policy(kind: str) -> Any:
    return tiny_smolvla_policy(smolvlm_directory()) if kind == "smolvla" else tiny_pi_policy(kind)


def make_batch(words: str | list[str] = "left", batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A processed LeRobot batch; ``words`` picks each row's instruction (2 or 3 tokens); the rest is seeded."""
    words = [words] * batch_size if isinstance(words, str) else words
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(words), L_TOKENS, dtype=torch.long)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    instruction = torch.zeros_like(valid)
    for i, word in enumerate(words):
        row = [2, 10, 11, *INSTRUCTIONS[word], 12, 13, 50 + i, 60]
        tokens[i, : len(row)] = torch.tensor(row)
        valid[i, : len(row)] = True
        instruction[i, 3 : 3 + len(INSTRUCTIONS[word])] = True
    b = len(words)
    return {
        "observation.images.top": torch.rand(b, 3, 16, 16, generator=g),
        "observation.state": torch.randn(b, 2, generator=g),
        "action": torch.stack([torch.full((4, 2), 0.5 if w == "left" else -0.5) for w in words]),
        "observation.language.tokens": tokens,
        "observation.language.attention_mask": valid,
        "observation.language.instruction_mask": instruction,
        "action_is_pad": torch.arange(4).expand(b, 4) >= 4 - torch.arange(b)[:, None],  # row i: last i steps padded
    }


class Samples(Dataset):
    def __init__(self, size: int = 8) -> None:
        self.items = []
        for i in range(size):
            batch = make_batch("left" if i % 2 == 0 else "right", batch_size=1, seed=i // 2)
            self.items.append({k: v[0] for k, v in batch.items()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def loader(size: int = 8, batch_size: int = 2) -> ResumableDataLoader:
    return ResumableDataLoader(Samples(size), batch_size=batch_size, shuffle=True)


def make_adapter(kind: str, **apt: Any) -> PI0APT:
    policy = tiny_policy(kind)
    return ADAPTERS[kind](policy, apt_config=APTConfig(lr=apt.pop("lr", 3e-3), **apt))


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def trainer(max_steps: int, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    """The studies' quiet CPU ``Trainer`` (``kwargs`` override its arguments)."""
    return quiet_trainer(max_steps, callbacks, **kwargs)


def noise(batch_size: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch_size, 4, 8, generator=torch.Generator().manual_seed(seed))
