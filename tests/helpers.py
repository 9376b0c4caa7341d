"""Tiny data and models shared by the tests: language decides the action, vision alone does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import Dataset

from apt_lightning import APTConfig, APTStageScheduler
from apt_lightning.data import ResumableDataLoader
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_studies.trainer import quiet_trainer

BOS, EOS = 1, 2
WORDS = {"left": [10, 11], "right": [20, 21, 22]}  # instructions of different lengths


def make_batch(
    words: str | list[str] = "left", batch_size: int = 2, seed: int = 0, pad: int = 0
) -> dict[str, torch.Tensor]:
    """One batch; ``words`` picks each row's instruction; ``pad`` adds padding tokens at the end."""
    words = [words] * batch_size if isinstance(words, str) else words
    g = torch.Generator().manual_seed(seed)
    rows = [[BOS, *WORDS[w], EOS] for w in words]
    length = max(len(r) for r in rows) + pad
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    language = torch.zeros_like(ids, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        language[i, 1 : len(r) - 1] = True
    b = len(rows)
    return {
        "pixel_values": torch.randn(b, 3, 32, 32, generator=g),
        "state": torch.randn(b, 2, generator=g),
        "input_ids": ids,
        "attention_mask": attention,
        "language_mask": language,
        "actions": torch.stack([torch.full((4, 2), 1.0 if w == "left" else -1.0) for w in words]),
    }


class LanguageDecidesDataset(Dataset):
    """Same few images and states for both instructions; only the instruction decides the action sign."""

    def __init__(self, size: int = 16, seed: int = 0) -> None:
        self.items = []
        for i in range(size):
            word = "left" if i % 2 == 0 else "right"
            batch = make_batch(word, batch_size=1, seed=seed + i // 2)
            self.items.append({k: v[0] for k, v in batch.items()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.items[i], "sample_id": torch.tensor(i)}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    length = max(int(x["input_ids"].shape[0]) for x in items)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in items[0]}
    for x in items:
        for k, v in x.items():
            if k in ("input_ids", "attention_mask", "language_mask"):
                v = torch.nn.functional.pad(v, (0, length - v.shape[0]))
            out[k].append(v)
    return {k: torch.stack(v) for k, v in out.items()}


def loader(size: int = 16, batch_size: int = 4) -> ResumableDataLoader:
    return ResumableDataLoader(LanguageDecidesDataset(size), batch_size=batch_size, shuffle=True, collate_fn=collate)


def make_policy(arch: str, **apt: Any) -> PI0Policy | GR00TStylePolicy:
    torch.manual_seed(0)
    config = APTConfig(lr=apt.pop("lr", 3e-3), **apt)
    if arch == "pi0":
        return PI0Policy(tiny_pi0_config(), apt_config=config)
    return GR00TStylePolicy(tiny_paligemma_config(), select_layer=1, head_width=32, head_depth=2, apt_config=config)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def trainer(max_steps: int, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    """The studies' quiet CPU ``Trainer`` (``kwargs`` override its arguments)."""
    return quiet_trainer(max_steps, callbacks, **kwargs)


def pretrain_checkpoints(path: Path) -> Path:
    """``path/apt.ckpt`` (pi0, APT: Stage 1 for 2 steps, then Stage 2 for 2) and ``path/joint.ckpt`` (4 joint steps)."""
    for name, scheduler in [("apt", APTStageScheduler(switch_at_step=2)), ("joint", APTStageScheduler(stage="joint"))]:
        checkpoint = ModelCheckpoint(dirpath=path, filename=name, every_n_train_steps=4)
        trainer(4, [scheduler, checkpoint], enable_checkpointing=True).fit(make_policy("pi0"), loader())
    return path


def run_script(script: str, *args: str) -> None:
    """Run ``tests/<script>`` (a multi-process launcher) in a fresh interpreter that imports these helpers."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(here / script), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
