"""The study's ``"pretrain"`` regime: pretrain on a broad corpus, then fine-tune on the task (APT's own recipe).

Every method of :data:`~apt_studies.study.PRETRAIN_METHODS` gets the same two budgets:

1. **Pretraining**, ``StudyConfig.pretrain_steps`` optimiser steps on the corpus of the run's seed
   (:func:`~apt_studies.pretrain_corpus.make_corpus`; the balanced corpus, or the habit-biased one for the
   ``*_habit`` controls). The baselines train jointly, the VLM as each codebase does. APT methods run Stage 1
   (VLM frozen, language hidden) for ``stage1_share * pretrain_steps`` steps, then Stage 2 (gated fusion from the
   switch), VLM frozen throughout.
2. **Fine-tuning**, ``StudyConfig.steps`` on the task's demonstrations in a fresh ``Trainer``: APT methods in
   Stage 2 only (``APTStageScheduler(stage=2)``, the paper's recipe), the baselines jointly.

The pretrained weights are cached on disk (:func:`~apt_studies.disk_cache.cached_directory`) under a key of
everything that determines them, so methods that share a pretraining (``apt`` and ``apt_ft_vlm``) train it once,
and a rerun of the study reuses it. Fine-tuning starts from a freshly built policy with the method's fine-tuning
:class:`~apt_lightning.APTConfig` into which the cached state dict is loaded strictly; fusion blocks are built
before loading (``model.apt.prepare`` with the Stage-2 plan) so gates and fusion weights are kept. Each run records the
largest difference between the pretrained model's sampled actions and the fine-tuning model's at fine-tuning step
0 (``step0_max_diff``, on a fixed task batch with fixed noise, both in eval mode): ``0.0`` exactly means the
fine-tuning started from exactly the pretrained model.

The pieces are shared with the Meta-World study (:mod:`apt_studies.metaworld.study`): what differs between the
benchmarks is asked of the :class:`~apt_studies.study.StudyConfig` (its corpus as a dataset, the corpus's and model
sizes' part of the cache key, the directory prefix, what a run records of the corpus); the pretraining
:class:`~apt_lightning.APTConfig` and plan, the cache key's other entries, the training loop, the step-0 check and
the fine-tuning are written once, here.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from apt_lightning.callbacks import APTStageScheduler, GateMonitor
from apt_lightning.config import APTConfig
from apt_lightning.data import ResumableDataLoader
from apt_lightning.errors import ConfigError
from apt_lightning.models.base import FlowMatchingPolicy
from apt_lightning.schedule import StagePlan
from apt_studies.data import DemonstrationDataset, collect_demonstrations
from apt_studies.datamodule import policy_batch
from apt_studies.disk_cache import cache_key, cached_directory, default_cache_dir
from apt_studies.pretrain_corpus import make_corpus
from apt_studies.study import METHOD_BY_NAME, StudyConfig
from apt_studies.trainer import quiet_trainer

__all__ = [
    "FORMAT_VERSION",
    "PROBE_SAMPLES",
    "Step0Check",
    "corpus_data",
    "finetune_method",
    "pretrained_policy",
    "pretraining_config",
    "pretraining_plan",
    "probe_batch",
    "sample",
    "structure",
]

FORMAT_VERSION = 1
"""Bumped whenever pretraining changes in a way its key does not see (on either benchmark), so stale caches are
never reused."""
PROBE_SAMPLES = 16
"""Task samples of the step-0 check."""
_FILES = ("policy.pt", "probe_actions.pt", "pretraining.json")
_CORPORA: dict[tuple[Any, ...], DemonstrationDataset] = {}  # demonstrations are collected once per process

Probe = tuple[dict[str, torch.Tensor], torch.Tensor]
"""A fixed task batch and fixed noise (:func:`probe_batch`)."""


def corpus_data(config: StudyConfig, seed: int, corpus: str, chunk_size: int) -> DemonstrationDataset:
    """Expert demonstrations of the tabletop's ``"balanced"`` or ``"habit"`` corpus of ``seed`` (memoised per
    process)."""
    key = (config.corpus_layouts, config.corpus_episodes_per_layout, seed, corpus, config.corpus_habit, chunk_size)
    if key not in _CORPORA:
        episodes = make_corpus(
            config.corpus_layouts,
            config.corpus_episodes_per_layout,
            seed=seed,
            habit=config.corpus_habit if corpus == "habit" else None,
        ).episodes
        _CORPORA[key] = collect_demonstrations(list(episodes), chunk_size=chunk_size)
    return _CORPORA[key]


def probe_batch(data: Any) -> Probe:
    """A fixed task batch (the first :data:`PROBE_SAMPLES` samples of ``data.train_set``) and fixed noise for the
    step-0 check.

    Raises:
        ConfigError: If ``data`` has no training set yet.
    """
    if getattr(data, "train_set", None) is None:
        raise ConfigError(f"{type(data).__name__} has no training set: call `setup('fit')` on it first.")
    batch = policy_batch([data.train_set[i] for i in range(min(PROBE_SAMPLES, len(data.train_set)))])
    noise = torch.randn(batch["actions"].shape, generator=torch.Generator().manual_seed(0))
    return batch, noise


@torch.no_grad()
def sample(policy: FlowMatchingPolicy, probe: Probe) -> torch.Tensor:
    """Sampled actions on the probe in eval mode; every module's mode is put back."""
    modes = {module: module.training for module in policy.modules()}
    policy.eval()
    try:
        return policy.sample_actions(dict(probe[0]), noise=probe[1])
    finally:
        for module, training in modes.items():
            module.training = training


def pretraining_config(config: StudyConfig, arch: str, method: str, seed: int) -> APTConfig:
    """The :class:`APTConfig` of ``method``'s pretraining: APT's VLM stays frozen, the baselines' as on the task."""
    ft = config.apt_config(arch, method, seed)
    if not METHOD_BY_NAME[method].two_stage:
        return ft
    return dataclasses.replace(ft, vlm_mode=config.apt_vlm_mode, vlm_lr=None, language_dropout=0.0)


def pretraining_plan(config: StudyConfig, method: str) -> tuple[APTStageScheduler, int | None]:
    """``(scheduler, switch step)`` of ``method``'s pretraining: joint for the baselines, Stage 1 for
    :meth:`~apt_studies.study.StudyConfig.stage1_share` of the steps then Stage 2 for APT."""
    share = config.stage1_share(method)
    if share is None:
        return APTStageScheduler(stage="joint"), None
    switch = round(share * config.pretrain_steps)
    if switch == 0:
        return APTStageScheduler(stage=2), 0
    return APTStageScheduler(switch_at_step=switch), switch


def structure(config: StudyConfig, arch: str, method: str) -> dict[str, Any]:
    """What of ``method``'s model structure its weights depend on: the head's language path, fusion, per-site."""
    entry = METHOD_BY_NAME[method]
    return {
        "head_language": config.head_language(arch, method),
        "fusion": [list(f) for f in entry.fusion],
        "per_site": entry.per_site,
    }


def pretrained_policy(
    config: StudyConfig,
    arch: str,
    method: str,
    seed: int,
    vocabulary: Mapping[str, int],
    vlm_dir: str | Path | None,
    probe: Probe,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Directory of ``method``'s corpus-pretrained weights for ``(arch, seed)``, pretraining only if not cached.

    The key holds the architecture, the pretraining :class:`APTConfig` and plan, the budget, the structure, the VLM
    it starts from, the thread count, :data:`FORMAT_VERSION` and the benchmark's own part
    (:meth:`~apt_studies.study.StudyConfig.pretraining_payload`: the corpus and model sizes); methods whose
    pretraining is identical (``apt``, ``apt_ft_vlm``) therefore share one directory,
    ``<config.pretrained_prefix>-<arch>-<key>``. It holds ``policy.pt`` (state dict), ``probe_actions.pt`` (the
    pretrained model's actions on ``probe``) and ``pretraining.json``. ``progress`` shows the corpus being built
    where the benchmark has a bar for it.
    """
    apt_config = pretraining_config(config, arch, method, seed)
    scheduler, switch = pretraining_plan(config, method)
    payload = {
        "arch": arch,
        "seed": seed,
        "apt_config": dataclasses.asdict(apt_config),
        "plan": scheduler.plan.name,
        "switch": switch,
        "steps": config.pretrain_steps,
        "batch_size": config.batch_size,
        "structure": structure(config, arch, method),
        "vlm": Path(vlm_dir).name if vlm_dir is not None else None,
        "threads": config.threads,
        "format_version": FORMAT_VERSION,
        **config.pretraining_payload(method),
    }
    key = cache_key(payload)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    directory = root / f"{config.pretrained_prefix}-{arch}-{key}"

    def build(staging: Path) -> None:
        data = config.pretraining_corpus(method, seed, cache_dir, progress)  # before seeding: it may draw
        pl.seed_everything(seed, verbose=False)  # the same expert initialisation as the task regime
        policy = config.method_policy(arch, method, apt_config, vocabulary, vlm_dir)
        loader = ResumableDataLoader(
            data, batch_size=config.batch_size, shuffle=True, seed=seed, collate_fn=policy_batch
        )
        tic = time.perf_counter()
        quiet_trainer(config.pretrain_steps, [scheduler]).fit(policy, loader)
        train_s = time.perf_counter() - tic
        torch.save(policy.state_dict(), staging / "policy.pt")
        torch.save(sample(policy, probe), staging / "probe_actions.pt")
        record = {**payload, "key": key, "train_s": train_s, "samples": len(data), "episodes": len(data.episodes)}
        (staging / "pretraining.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

    cached_directory(directory, _FILES, build)
    return directory, json.loads((directory / "pretraining.json").read_text())


class Step0Check(Callback):
    """Records the largest difference from the pretrained model's probe actions when fine-tuning starts.

    ``max_diff`` is ``0.0`` exactly when the fine-tuning model samples the pretrained model's actions bit for bit.

    Example::

        >>> import torch
        >>> class Doubler(torch.nn.Module):
        ...     def sample_actions(self, batch, noise):
        ...         return 2 * noise
        >>> check = Step0Check(({}, torch.ones(2, 3)), torch.full((2, 3), 2.5))
        >>> check.on_train_start(None, Doubler())
        >>> check.max_diff
        0.5
    """

    def __init__(self, probe: Probe, reference: torch.Tensor) -> None:
        self.probe, self.reference = probe, reference
        self.max_diff: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        actions = sample(pl_module, self.probe)
        self.max_diff = 0.0 if torch.equal(actions, self.reference) else float((actions - self.reference).abs().max())


def finetune_method(
    config: StudyConfig,
    arch: str,
    method: str,
    seed: int,
    vocabulary: Mapping[str, int],
    vlm_dir: str | Path | None,
    data: Any,
    callbacks: list[Callback] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[FlowMatchingPolicy, pl.Trainer, GateMonitor, float, dict[str, Any]]:
    """Pretrain (or load) ``method`` on the corpus, then fine-tune it on the task in a fresh ``Trainer``.

    ``data`` is the task's datamodule, set up for fitting (``train_set``, ``train_dataloader()``).

    Returns:
        ``(policy, trainer, gate monitor, fine-tuning seconds, record)``; the record holds ``pretrain_steps``,
        ``pretrain_s``, ``pretrain_switch_step``, ``stage1_fraction``, what
        :meth:`~apt_studies.study.StudyConfig.corpus_record` gives (``corpus``, ...) and ``step0_max_diff``.
    """
    probe = probe_batch(data)
    directory, record = pretrained_policy(config, arch, method, seed, vocabulary, vlm_dir, probe, cache_dir, progress)
    pl.seed_everything(seed, verbose=False)
    policy = config.method_policy(arch, method, config.apt_config(arch, method, seed), vocabulary, vlm_dir)
    if METHOD_BY_NAME[method].two_stage:
        policy.apt.prepare(StagePlan(first_stage=2))  # fusion blocks must exist before the weights load into them
    policy.load_state_dict(torch.load(directory / "policy.pt", weights_only=True), strict=True)
    policy.train()
    check = Step0Check(probe, torch.load(directory / "probe_actions.pt", weights_only=True))
    monitor = GateMonitor(every_n_steps=10)
    trainer = quiet_trainer(config.steps, [config.scheduler(method), monitor, check, *(callbacks or [])])
    tic = time.perf_counter()
    trainer.fit(policy, data.train_dataloader())
    extra = {
        "regime": "pretrain",
        "pretrain_steps": config.pretrain_steps,
        "pretrain_s": record["train_s"],
        "pretrain_switch_step": record["switch"],
        "stage1_fraction": config.stage1_share(method),
        **config.corpus_record(method, record),
        "step0_max_diff": check.max_diff,
    }
    return policy, trainer, monitor, time.perf_counter() - tic, extra
