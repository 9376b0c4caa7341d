"""Baseline against APT on the tabletop benchmark: both reference architectures, several seeds, every split.

The settings below were fixed from the paper's setting before any APT result was seen (see CHANGELOG.md):

* **Same budget.** Both methods train ``steps`` optimiser steps on the same demonstrations, batch size, expert
  learning rate, warm-up and expert initialisation (per arch and seed).
* **Baseline = ordinary single-stage training** (:data:`~apt_lightning.JOINT`): randomly initialised expert,
  language visible from step 0 through the model's own attention, the VLM adapted as each codebase does by
  default: openpi/LeRobot pi0 fine-tune the whole model with one learning rate (``vlm_mode="full"``,
  ``vlm_lr = lr``); GR00T keeps its LLM frozen (``tune_llm=False``).
* **APT**: Stage 1 for ``switch_step`` steps, then Stage 2 with the VLM frozen (the paper's code), gates at
  ``10 * lr``.
* **Same pretrained VLM** for every run: a PaliGemma pretrained once on diverse vision-language data from
  the environment (:mod:`apt_lightning.bench.vlm_pretraining`), cached on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from apt_lightning.bench.datamodule import TabletopDataModule
from apt_lightning.bench.evaluation import evaluate_policy
from apt_lightning.bench.splits import EVAL_SPLITS
from apt_lightning.bench.vlm_pretraining import VLMPretrainingConfig, pretrained_vlm
from apt_lightning.callbacks import APTStageScheduler, GateMonitor
from apt_lightning.config import APTConfig
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_lightning.models.base import FlowMatchingPolicy

__all__ = ["ARCHS", "METHODS", "StudyConfig", "build_policy", "run_study"]

ARCHS = ("pi0", "groot")
METHODS = ("baseline", "apt")


@dataclass
class StudyConfig:
    """What the study trains and evaluates.

    Args:
        archs: reference architectures (``"pi0"``, ``"groot"``).
        methods: ``"baseline"`` (joint single-stage training) and/or ``"apt"``.
        seeds: one run per (arch, method, seed); the seed picks data, initialisation and evaluation episodes.
        steps: optimiser steps per run, equal for both methods.
        switch_step: APT's Stage-1 length.
        episodes: training demonstrations (expert episodes) per seed.
        eval_episodes: rollouts per evaluation split.
        batch_size, lr, warmup_steps: shared optimisation settings (``lr`` is the expert's).
        gate_lr: APT gate learning rate (``10 * lr`` when ``None``).
        apt_vlm_mode: VLM mode of APT's Stage 2.
        baseline_vlm_mode: per arch, how the baseline adapts the VLM (each codebase's default).
        baseline_vlm_lr: VLM learning rate of a trained baseline VLM (``lr`` when ``None``: one optimiser).
        hidden_size, chunk_size: model width and action chunk.
        pretrain_vlm: start every run from the cached pretrained VLM (``False``: random VLM, an ablation).
        pretraining: settings of that VLM pretraining.
        save_checkpoints: write each run's final checkpoint under ``<out>/checkpoints``.
    """

    archs: tuple[str, ...] = ARCHS
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    switch_step: int = 200
    episodes: int = 300
    eval_episodes: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    gate_lr: float | None = None
    apt_vlm_mode: str = "frozen"
    baseline_vlm_mode: dict[str, str] = field(default_factory=lambda: {"pi0": "full", "groot": "frozen"})
    baseline_vlm_lr: float | None = None
    hidden_size: int = 64
    chunk_size: int = 8
    pretrain_vlm: bool = True
    pretraining: VLMPretrainingConfig = field(default_factory=VLMPretrainingConfig)
    save_checkpoints: bool = True

    def __post_init__(self) -> None:
        self.archs, self.methods, self.seeds = tuple(self.archs), tuple(self.methods), tuple(self.seeds)
        unknown = [a for a in self.archs if a not in ARCHS] + [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown arch/method {unknown}: choose archs from {ARCHS} and methods from {METHODS}.")
        if not 0 < self.switch_step < self.steps:
            raise ValueError(f"`switch_step` must be in (0, steps={self.steps}), got {self.switch_step!r}.")
        missing = [a for a in self.archs if a not in self.baseline_vlm_mode]
        if missing:
            raise ValueError(f"`baseline_vlm_mode` has no entry for {missing}; give 'frozen', 'lora' or 'full'.")

    def apt_config(self, arch: str, method: str, seed: int) -> APTConfig:
        """The :class:`APTConfig` of one run (the expert settings are shared by both methods)."""
        common = dict(lr=self.lr, warmup_steps=self.warmup_steps, seed=seed)
        if method == "apt":
            return APTConfig(vlm_mode=self.apt_vlm_mode, gate_lr=self.gate_lr, **common)  # type: ignore[arg-type]
        mode = self.baseline_vlm_mode[arch]
        vlm_lr = None if mode == "frozen" else (self.baseline_vlm_lr or self.lr)
        return APTConfig(vlm_mode=mode, vlm_lr=vlm_lr, **common)  # type: ignore[arg-type]

    def scheduler(self, method: str) -> APTStageScheduler:
        return APTStageScheduler(switch_at_step=self.switch_step) if method == "apt" else APTStageScheduler(stage="joint")


def build_policy(
    arch: str, vocab_size: int, apt_config: APTConfig, vlm_dir: str | Path | None = None, hidden_size: int = 64,
    chunk_size: int = 8,
) -> FlowMatchingPolicy:
    """A reference policy sized for the benchmark, its VLM loaded from ``vlm_dir`` when given."""
    vlm = str(vlm_dir) if vlm_dir is not None else None
    if arch == "pi0":
        config = tiny_pi0_config(chunk_size=chunk_size, vocab_size=vocab_size, hidden_size=hidden_size)
        return PI0Policy(config, apt_config=apt_config, vlm_pretrained=vlm)
    if arch == "groot":
        return GR00TStylePolicy(
            tiny_paligemma_config(vocab_size=vocab_size, hidden_size=hidden_size), vlm_pretrained=vlm,
            chunk_size=chunk_size, head_dim=hidden_size, head_depth=4, apt_config=apt_config,
        )
    raise ValueError(f"Unknown arch {arch!r}; expected one of {ARCHS}.")


class _StepProgress(Callback):
    """Advances one study-wide progress bar per optimiser step and shows the current run and loss."""

    def __init__(self, bar: Any, label: str) -> None:
        self.bar, self.label = bar, label

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"{self.label} loss {float(outputs['loss']):.3f}", refresh=False)


def _runs(config: StudyConfig) -> Iterator[tuple[str, int, str]]:
    for arch in config.archs:
        for seed in config.seeds:
            for method in config.methods:
                yield arch, seed, method


def run_study(
    config: StudyConfig, out: str | Path | None = None, progress: bool = True, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """Train and evaluate every (arch, method, seed) of ``config``.

    Returns:
        ``{"config", "pretraining", "runs", "wall_s"}``; each run as :func:`apt_lightning.bench.report.aggregate`
        expects (``success`` per split, ``instruction_sensitivity``, ``action_error``, ``gates``, ``train_s``).
    """
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # 4 info lines per fit would bury the bar; restored on return
    try:
        return _run_study(config, out, progress, cache_dir)
    finally:
        lightning_log.setLevel(level)


def _run_study(
    config: StudyConfig, out: str | Path | None, progress: bool, cache_dir: str | Path | None
) -> dict[str, Any]:
    started = time.perf_counter()
    out = Path(out) if out is not None else None
    prompts = TabletopDataModule()
    vocab = prompts.vocab_size
    vlm_dir, pretraining = None, None
    if config.pretrain_vlm:
        vlm_config = tiny_paligemma_config(vocab_size=vocab, hidden_size=config.hidden_size)
        vlm_dir, pretraining = pretrained_vlm(
            vlm_config, prompts.tokenizer, config.pretraining, cache_dir=cache_dir, progress=progress
        )
    plan = list(_runs(config))
    bar = tqdm(total=len(plan) * config.steps, desc="training", unit="step", disable=not progress)
    runs: list[dict[str, Any]] = []
    data: dict[int, TabletopDataModule] = {}  # demonstrations of a seed are collected once, shared by every arch
    for index, (arch, seed, method) in enumerate(plan):
        if seed not in data:
            data[seed] = TabletopDataModule(config.episodes, seed, config.chunk_size, config.batch_size)
            data[seed].setup("fit")
        apt_config = config.apt_config(arch, method, seed)
        pl.seed_everything(seed, verbose=False)  # same expert initialisation for both methods
        policy = build_policy(arch, vocab, apt_config, vlm_dir, config.hidden_size, config.chunk_size)
        monitor = GateMonitor(every_n_steps=10)
        label = f"[{index + 1}/{len(plan)}] {arch} {method} seed {seed}"
        trainer = pl.Trainer(
            max_steps=config.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[config.scheduler(method), monitor, _StepProgress(bar, label)],
        )
        tic = time.perf_counter()
        trainer.fit(policy, data[seed].train_dataloader())
        train_s = time.perf_counter() - tic
        if out is not None and config.save_checkpoints:
            trainer.save_checkpoint(out / "checkpoints" / f"{arch}-{method}-seed{seed}.ckpt")
        bar.set_postfix_str(f"{label} evaluating", refresh=True)
        metrics = evaluate_policy(policy, EVAL_SPLITS, config.eval_episodes, seed=seed)
        runs.append({
            "arch": arch, "method": method, "seed": seed, **metrics, "train_s": train_s, "steps": trainer.global_step,
            "switch_step": config.switch_step if method == "apt" else None, "gates": monitor.history,
        })
    bar.close()
    return {
        "config": dataclasses.asdict(config),
        "pretraining": pretraining,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }

