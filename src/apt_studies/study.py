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

The methods are a catalogue (:data:`METHODS`, one frozen :class:`Method` per name): which stage plan, VLM
mode, language dropout and guidance scale a run uses is derived from its entry. Methods whose training is
identical share one trained policy per (arch, seed): ``apt_dropout_guided`` evaluates the ``apt_dropout``
checkpoint with guidance, and GR00T's ``baseline_frozen`` is its ``baseline`` (GR00T keeps its LLM frozen by
default).
* **Same pretrained VLM** for every run: a PaliGemma pretrained once on diverse vision-language data from
  the environment (:mod:`apt_studies.vlm_pretraining`), cached on disk.

Two regimes (:attr:`StudyConfig.regime`): ``"task"`` trains every method on the task's demonstrations only (the
paper's "w/o pretraining" setting); ``"pretrain"`` is APT's own recipe: every method first pretrains
``pretrain_steps`` on a broad corpus of other layouts (:mod:`apt_studies.pretrain_corpus`; APT: Stage 1
for ``stage1_fraction`` of them, Stage 2 after), then fine-tunes ``steps`` on the task (APT: Stage 2 only; the
baselines: joint), see :mod:`apt_studies.pretrain_study`. Every run executes under a fixed thread count
and deterministic algorithms (:func:`~apt_studies.determinism.fixed_threads`), so its numbers are a
function of the command alone.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from apt_lightning.callbacks import APTStageScheduler, GateMonitor
from apt_lightning.config import APTConfig
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_lightning.models.base import FlowMatchingPolicy
from apt_studies.datamodule import TabletopDataModule
from apt_studies.determinism import STUDY_THREADS, fixed_threads
from apt_studies.evaluation import evaluate_policy, evaluate_validation
from apt_studies.splits import EVAL_SPLITS
from apt_studies.trainer import quiet_trainer
from apt_studies.vlm_pretraining import VLMPretrainingConfig, pretrained_vlm

__all__ = [
    "ARCHS",
    "CURVE_SPLITS",
    "DEFAULT_METHODS",
    "METHODS",
    "METHOD_BY_NAME",
    "METHOD_NAMES",
    "LearningCurve",
    "Method",
    "StudyConfig",
    "build_policy",
    "prepare_vlm",
    "run_study",
    "study_data",
    "train_method",
    "training_runs",
]

ARCHS = ("pi0", "groot")
CURVE_SPLITS: tuple[str, ...] = ("seen", "counterfactual")
"""Splits of the learning curves (:attr:`StudyConfig.curve_every`)."""


@dataclass(frozen=True)
class Method:
    """One method of the study: how it trains and how it is evaluated.

    Args:
        name: the name in tables, ``--methods`` and checkpoint file names.
        summary: one line for the README and ``--help``.
        two_stage: APT's Stage 1 then Stage 2 (``False``: single-stage joint training, the baseline).
        vlm_mode: ``"default"`` (the codebase default: ``StudyConfig.baseline_vlm_mode[arch]`` for the
            baseline, ``StudyConfig.apt_vlm_mode`` for APT) or an explicit ``"frozen"``/``"lora"``/``"full"``.
        language_dropout: use ``StudyConfig.language_dropout`` in Stage 2.
        guided: evaluate with ``StudyConfig.guidance_scale`` (training is unchanged).
        head_language: GR00T-style only: the head's own cross-attention also reads the instruction in Stage 2,
            behind zero-initialised gates (``GR00TStylePolicy(head_reads_language=True)``); pi0 trains as ``apt``.
        fusion: :class:`~apt_lightning.FusionConfig` fields that differ from the default, as ``(name, value)`` pairs
            (the fusion-variant ablations).
        per_site: each fusion site reads the VLM layer at its own depth (``per_site_language=True``).
        joint_prefix: single-stage only: ``"blind"`` runs the baseline's VLM prefix language-blind
            (``APTConfig.joint_prefix``), so image tokens never see the instruction.
        stage1: two-stage only: ``False`` skips Stage 1 (``APTStageScheduler(stage=2)``: the gated fusion path
            from step 0, no language-free prior phase), which separates what Stage 1 does from what the path does.
        vlm_lr_factor: with ``vlm_mode="full"`` or ``"lora"`` on a two-stage method, the VLM learning rate as a
            fraction of the expert's (``apt_ft_vlm``: 0.1, APT's released code's 1e-5 against 1e-4).
        corpus: ``"pretrain"`` regime only: pretrain on the ``"balanced"`` corpus or the ``"habit"``-biased one.
        stage1_fraction: ``"pretrain"`` regime only, two-stage: share of pretraining spent in Stage 1 (``None``:
            :attr:`StudyConfig.stage1_fraction`).
    """

    name: str
    summary: str
    two_stage: bool
    vlm_mode: str = "default"
    language_dropout: bool = False
    guided: bool = False
    head_language: bool = False
    fusion: tuple[tuple[str, Any], ...] = ()
    per_site: bool = False
    joint_prefix: str = "full"
    stage1: bool = True
    vlm_lr_factor: float | None = None
    corpus: str = "balanced"
    stage1_fraction: float | None = None

    @property
    def pretrain_only(self) -> bool:
        """Whether the method only exists in the ``"pretrain"`` regime (a corpus or Stage-1 share of its own)."""
        return self.corpus != "balanced" or self.stage1_fraction is not None

    def __post_init__(self) -> None:
        if self.vlm_mode not in ("default", "frozen", "lora", "full"):
            raise ValueError(f"`vlm_mode` must be 'default', 'frozen', 'lora' or 'full', got {self.vlm_mode!r}.")
        if (self.language_dropout or self.guided) and not self.two_stage:
            raise ValueError(f"Method {self.name!r}: language dropout and guidance need the two-stage (APT) plan.")
        if self.joint_prefix != "full" and self.two_stage:
            raise ValueError(f"Method {self.name!r}: `joint_prefix` applies to single-stage (joint) training only.")
        if not (self.stage1 or self.two_stage):
            raise ValueError(f"Method {self.name!r}: `stage1=False` applies to APT (two-stage) methods only.")
        if self.corpus not in ("balanced", "habit"):
            raise ValueError(f"Method {self.name!r}: `corpus` must be 'balanced' or 'habit', got {self.corpus!r}.")
        if self.stage1_fraction is not None and not (self.two_stage and 0.0 <= self.stage1_fraction < 1.0):
            raise ValueError(f"Method {self.name!r}: `stage1_fraction` needs a two-stage method and a value in [0, 1).")


METHODS: tuple[Method, ...] = (
    Method("baseline", "single-stage joint training, VLM as each codebase does (pi0: full, GR00T: frozen)", False),
    Method("baseline_frozen", "single-stage joint training with the VLM frozen (both archs)", False, "frozen"),
    Method(
        "baseline_blind",
        "the baseline with APT's language-blind prefix: image tokens never see the instruction, the head reads it",
        False,
        joint_prefix="blind",
    ),
    Method("apt", "APT: Stage 1 language-blind, Stage 2 gated cross-attention, VLM frozen", True),
    Method(
        "apt_dropout", "APT with language dropout p in Stage 2 (trains the prior path)", True, language_dropout=True
    ),
    Method(
        "apt_dropout_guided",
        "the apt_dropout checkpoint sampled with prior-contrast guidance w",
        True,
        language_dropout=True,
        guided=True,
    ),
    Method(
        "apt_sigmoid",
        "APT with sigmoid gates initialised at 0.5 (APT's released code; the switch is not an identity)",
        True,
        fusion=(("gate", "sigmoid"),),
    ),
    Method(
        "apt_channel",
        "APT with one tanh gate per channel instead of per block",
        True,
        fusion=(("gate_shape", "channel"),),
    ),
    Method(
        "apt_per_site",
        "APT with per-site contexts: fusion site i reads the VLM layer at its depth",
        True,
        per_site=True,
    ),
    Method(
        "apt_stage2_only",
        "APT's Stage 2 from step 0 (gated fusion, VLM frozen, no Stage 1): what the path does without the prior",
        True,
        stage1=False,
    ),
    Method(
        "apt_head",
        "APT whose GR00T head also reads language through its own cross-attention, behind zero gates",
        True,
        head_language=True,
    ),
    Method(
        "apt_ft_vlm",
        "APT with the VLM fully fine-tuned in Stage 2 at 0.1 x the expert's learning rate (the paper's Ft VLM)",
        True,
        vlm_mode="full",
        vlm_lr_factor=0.1,
    ),
    Method(
        "apt_ft_vlm_no_ff",
        "apt_ft_vlm with gated cross-attention only (FusionConfig(ff_mult=0)): the batch-1 deployment option",
        True,
        vlm_mode="full",
        vlm_lr_factor=0.1,
        fusion=(("ff_mult", 0),),
    ),
    Method(
        "apt_s1_0",
        "pretrain regime: APT pretraining with no Stage 1 (Stage 2 on the whole corpus), then Stage-2 fine-tuning",
        True,
        stage1_fraction=0.0,
    ),
    Method(
        "apt_s1_quarter",
        "pretrain regime: APT pretraining with Stage 1 on the first quarter of the steps",
        True,
        stage1_fraction=0.25,
    ),
    Method(
        "baseline_habit",
        "pretrain regime: the baseline pretrained on the habit-biased corpus (control)",
        False,
        corpus="habit",
    ),
    Method(
        "apt_habit",
        "pretrain regime: APT pretrained on the habit-biased corpus (control)",
        True,
        corpus="habit",
    ),
)
"""The study's methods, in table order."""
METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
DEFAULT_METHODS: tuple[str, ...] = ("baseline", "apt", "apt_dropout")
"""What ``python examples/apt_study.py`` runs (``--methods`` selects any of :data:`METHOD_NAMES`)."""
PRETRAIN_METHODS: tuple[str, ...] = (
    "baseline",
    "apt",
    "apt_ft_vlm",
    "apt_s1_0",
    "apt_s1_quarter",
    "baseline_habit",
    "apt_habit",
)
"""The methods of the ``"pretrain"`` regime's study (``examples/pretrain_finetune.py``)."""
REGIMES: tuple[str, ...] = ("task", "pretrain")
METHOD_BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
"""Every catalogue entry by name."""


@dataclass
class StudyConfig:
    """What the study trains and evaluates.

    Args:
        archs: reference architectures (``"pi0"``, ``"groot"``).
        methods: names from :data:`METHOD_NAMES` (see :data:`METHODS`).
        seeds: one run per (arch, method, seed); the seed picks data, initialisation and evaluation episodes.
        steps: optimiser steps per run, equal for both methods.
        switch_step: APT's Stage-1 length.
        episodes: training demonstrations (expert episodes) per seed.
        eval_episodes: rollouts per evaluation split.
        batch_size, lr, warmup_steps: shared optimisation settings (``lr`` is the expert's).
        gate_lr: APT gate learning rate (``10 * lr`` when ``None``).
        apt_vlm_mode: VLM mode of APT's Stage 2.
        language_dropout: ``p`` of the ``apt_dropout`` methods, chosen on validation episodes
            (``examples/choose_settings.py``), never on the reported splits.
        guidance_scale: ``w`` of ``apt_dropout_guided``, chosen the same way.
        baseline_vlm_mode: per arch, how the baseline adapts the VLM (each codebase's default).
        baseline_vlm_lr: VLM learning rate of a trained baseline VLM (``lr`` when ``None``: one optimiser).
        hidden_size, chunk_size: model width and action chunk.
        pretrain_vlm: start every run from the cached pretrained VLM (``False``: random VLM, an ablation).
        pretraining: settings of that VLM pretraining.
        save_checkpoints: write each run's final checkpoint under ``<out>/checkpoints``.
        curve_every: record a learning curve (opt-in): every ``curve_every`` optimiser steps (and at the last
            step), success on :data:`CURVE_SPLITS` with ``curve_episodes`` rollouts each, on the run's evaluation
            episodes (:func:`~apt_studies.evaluation.evaluate_policy`, seed = the run's seed). Recording
            does not change training (the RNG state and module modes are restored). ``None``: no curve.
        curve_episodes: rollouts per split and curve point.
        regime: ``"task"`` (train on the task only) or ``"pretrain"`` (pretrain on a corpus, then fine-tune on the
            task for ``steps``; see the module docstring).
        pretrain_steps: ``"pretrain"`` regime: optimiser steps on the corpus, equal for every method.
        stage1_fraction: ``"pretrain"`` regime: APT's share of ``pretrain_steps`` in Stage 1 (the paper's 1/2).
        corpus_layouts, corpus_episodes_per_layout: the corpus (:func:`~apt_studies.pretrain_corpus.
            make_corpus`; its episodes are drawn with the study seed, its layouts are fixed).
        corpus_habit: habit fraction of the ``"habit"`` corpus (the task's own 0.9).
        threads: torch intra-op threads of the whole run (:func:`~apt_studies.determinism.fixed_threads`):
            results depend on it, so it is fixed instead of taken from the machine.
    """

    archs: tuple[str, ...] = ARCHS
    methods: tuple[str, ...] = DEFAULT_METHODS
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
    language_dropout: float = 0.1  # chosen on validation episodes (examples/choose_settings.py, CHANGELOG.md)
    guidance_scale: float = 1.0  # likewise: no scale beat w = 1 on validation (apt_dropout_guided = apt_dropout)
    baseline_vlm_mode: dict[str, str] = field(default_factory=lambda: {"pi0": "full", "groot": "frozen"})
    baseline_vlm_lr: float | None = None
    hidden_size: int = 64
    chunk_size: int = 8
    pretrain_vlm: bool = True
    pretraining: VLMPretrainingConfig = field(default_factory=VLMPretrainingConfig)
    save_checkpoints: bool = True
    curve_every: int | None = None
    curve_episodes: int = 50
    regime: str = "task"
    pretrain_steps: int = 800
    stage1_fraction: float = 0.5
    corpus_layouts: int = 64
    corpus_episodes_per_layout: int = 10
    corpus_habit: float = 0.9
    threads: int = STUDY_THREADS

    pretrained_prefix: ClassVar[str] = "pretrained"
    """``"pretrain"`` regime: cached pretrained policies live in ``<cache>/<pretrained_prefix>-<arch>-<key>/``."""

    def __post_init__(self) -> None:
        self.archs, self.methods, self.seeds = tuple(self.archs), tuple(self.methods), tuple(self.seeds)
        unknown = [a for a in self.archs if a not in ARCHS] + [m for m in self.methods if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(
                f"Unknown arch/method {unknown}: choose archs from {ARCHS} and methods from {METHOD_NAMES}."
            )
        if not 0.0 < self.language_dropout < 1.0:
            raise ValueError(f"`language_dropout` must be in (0, 1), got {self.language_dropout!r}.")
        if not self.guidance_scale > 0:
            raise ValueError(f"`guidance_scale` must be > 0, got {self.guidance_scale!r}.")
        if self.regime != "pretrain" and not 0 < self.switch_step < self.steps:  # unused when fine-tuning
            raise ValueError(f"`switch_step` must be in (0, steps={self.steps}), got {self.switch_step!r}.")
        if self.curve_every is not None and (isinstance(self.curve_every, bool) or self.curve_every < 1):
            raise ValueError(f"`curve_every` must be None or an int >= 1, got {self.curve_every!r}.")
        if self.curve_episodes < 1:
            raise ValueError(f"`curve_episodes` must be >= 1, got {self.curve_episodes!r}.")
        if self.regime not in REGIMES:
            raise ValueError(f"`regime` must be one of {REGIMES}, got {self.regime!r}.")
        only = [m for m in self.methods if METHOD_BY_NAME[m].pretrain_only]
        if self.regime == "task" and only:
            raise ValueError(f"Methods {only} exist in the 'pretrain' regime only; pass regime='pretrain'.")
        if self.regime == "pretrain" and (self.pretrain_steps < 1 or not 0.0 <= self.stage1_fraction < 1.0):
            raise ValueError(
                f"`pretrain_steps` must be >= 1 and `stage1_fraction` in [0, 1), got {self.pretrain_steps!r} and "
                f"{self.stage1_fraction!r}."
            )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"`threads` must be a positive integer, got {self.threads!r}.")
        missing = [a for a in self.archs if a not in self.baseline_vlm_mode]
        if missing:
            raise ValueError(f"`baseline_vlm_mode` has no entry for {missing}; give 'frozen', 'lora' or 'full'.")

    def apt_config(self, arch: str, method: str, seed: int) -> APTConfig:
        """The :class:`APTConfig` of one run (the expert settings are shared by every method)."""
        entry = METHOD_BY_NAME[method]
        common = dict(lr=self.lr, warmup_steps=self.warmup_steps, seed=seed)
        if entry.two_stage:
            mode = self.apt_vlm_mode if entry.vlm_mode == "default" else entry.vlm_mode
            dropout = self.language_dropout if entry.language_dropout else 0.0
            vlm_lr = None if mode == "frozen" or entry.vlm_lr_factor is None else entry.vlm_lr_factor * self.lr
            return APTConfig(
                vlm_mode=mode,  # type: ignore[arg-type]
                vlm_lr=vlm_lr,
                gate_lr=self.gate_lr,
                language_dropout=dropout,
                **common,  # type: ignore[arg-type]
            )
        mode = self.baseline_vlm_mode[arch] if entry.vlm_mode == "default" else entry.vlm_mode
        vlm_lr = None if mode == "frozen" else (self.baseline_vlm_lr or self.lr)
        return APTConfig(vlm_mode=mode, vlm_lr=vlm_lr, joint_prefix=entry.joint_prefix, **common)  # type: ignore[arg-type]

    def scheduler(self, method: str) -> APTStageScheduler:
        """The stage plan of ``method``'s training on the task (``"pretrain"`` regime: its fine-tuning)."""
        entry = METHOD_BY_NAME[method]
        if self.regime == "pretrain":  # APT fine-tunes in Stage 2 only (the paper's recipe), baselines jointly
            return APTStageScheduler(stage=2 if entry.two_stage else "joint", finetune=True)
        if entry.two_stage and not entry.stage1:
            return APTStageScheduler(stage=2)
        if entry.two_stage:
            return APTStageScheduler(switch_at_step=self.switch_step)
        return APTStageScheduler(stage="joint")

    def eval_guidance(self, method: str) -> float:
        """Guidance scale ``method`` is evaluated with (1: the plain model)."""
        return self.guidance_scale if METHOD_BY_NAME[method].guided else 1.0

    def trained_as(self, arch: str, method: str) -> str:
        """The first selected method (catalogue order) whose training is identical to ``method``'s on ``arch``.

        Training depends on the stage plan and the :class:`APTConfig` only, so ``apt_dropout_guided`` trains as
        ``apt_dropout`` and GR00T's ``baseline_frozen`` as its ``baseline``; each such group trains once.
        """
        key = self._training_key(arch, method)
        selected = [m.name for m in METHODS if m.name in self.methods or m.name == method]
        return next(m for m in selected if self._training_key(arch, m) == key)

    def _training_key(self, arch: str, method: str) -> tuple[Any, ...]:
        config = self.apt_config(arch, method, 0)
        entry = METHOD_BY_NAME[method]
        head = self.head_language(arch, method)
        key = (entry.two_stage, config.vlm_mode, config.resolved_vlm_lr, config.language_dropout, head, entry.fusion)
        return (*key, entry.per_site, config.joint_prefix, entry.stage1, *self.pretraining_key(method))

    def pretraining_key(self, method: str) -> tuple[Any, ...]:
        """What of ``method``'s corpus pretraining is not in its fine-tuning key (empty in the ``"task"`` regime)."""
        if self.regime != "pretrain":
            return ()
        entry = METHOD_BY_NAME[method]
        return (entry.corpus, self.stage1_share(method))

    def stage1_share(self, method: str) -> float | None:
        """``"pretrain"`` regime: ``method``'s share of pretraining in Stage 1 (``None`` for the baselines)."""
        entry = METHOD_BY_NAME[method]
        if not entry.two_stage:
            return None
        return self.stage1_fraction if entry.stage1_fraction is None else entry.stage1_fraction

    def pretraining_payload(self, method: str) -> dict[str, Any]:
        """``"pretrain"`` regime: the benchmark's part of a pretrained policy's cache key (the corpus and the model
        sizes); the rest is :func:`apt_studies.pretrain_study.pretrained_policy`'s. A subclass for another
        benchmark returns its own corpus settings here."""
        return {
            "corpus": METHOD_BY_NAME[method].corpus,
            "corpus_settings": [self.corpus_layouts, self.corpus_episodes_per_layout, self.corpus_habit],
            "sizes": [self.hidden_size, self.chunk_size],
        }

    def pretraining_corpus(
        self, method: str, seed: int, cache_dir: str | Path | None = None, progress: bool = True
    ) -> Any:
        """``"pretrain"`` regime: the corpus ``method`` pretrains on for ``seed``, a dataset of policy samples with
        an ``episodes`` list (the tabletop's is built in memory: ``cache_dir`` and ``progress`` are unused)."""
        from apt_studies.pretrain_study import corpus_data  # imports this module

        return corpus_data(self, seed, METHOD_BY_NAME[method].corpus, self.chunk_size)

    def corpus_record(self, method: str, pretraining: Mapping[str, Any]) -> dict[str, Any]:
        """``"pretrain"`` regime: what each run records of its pretraining corpus (``pretraining`` is the cached
        ``pretraining.json``)."""
        return {"corpus": METHOD_BY_NAME[method].corpus}

    def head_language(self, arch: str, method: str) -> bool:
        """Whether ``method`` builds ``arch``'s head with its own gated language path."""
        return METHOD_BY_NAME[method].head_language and arch == "groot"

    def method_policy(
        self,
        arch: str,
        method: str,
        apt_config: APTConfig,
        vocabulary: Mapping[str, int],
        vlm_dir: str | Path | None,
    ) -> FlowMatchingPolicy:
        """:func:`build_policy` with the structure ``method`` asks for: the head's own language path, its fusion
        fields and per-site contexts (the same for its pretraining and its fine-tuning)."""
        entry = METHOD_BY_NAME[method]
        return build_policy(
            arch,
            vocabulary,
            apt_config,
            vlm_dir,
            self.hidden_size,
            self.chunk_size,
            self.head_language(arch, method),
            dict(entry.fusion) or None,
            entry.per_site,
        )


def build_policy(
    arch: str,
    vocabulary: Mapping[str, int],
    apt_config: APTConfig,
    vlm_dir: str | Path | None = None,
    hidden_size: int = 64,
    chunk_size: int = 8,
    head_reads_language: bool = False,
    fusion_options: dict[str, Any] | None = None,
    per_site_language: bool = False,
) -> FlowMatchingPolicy:
    """A reference policy sized for the benchmark, its VLM loaded from ``vlm_dir`` when given.

    ``vocabulary`` is the tokenizer's :attr:`~apt_studies.tokenizer.WordTokenizer.vlm_vocabulary`.
    """
    vlm = str(vlm_dir) if vlm_dir is not None else None
    if arch == "pi0":
        config = tiny_pi0_config(chunk_size=chunk_size, hidden_size=hidden_size, **vocabulary)
        return PI0Policy(
            config,
            apt_config=apt_config,
            vlm_pretrained=vlm,
            fusion_options=fusion_options,
            per_site_language=per_site_language,
        )
    if arch == "groot":
        return GR00TStylePolicy(
            tiny_paligemma_config(hidden_size=hidden_size, **vocabulary),
            vlm_pretrained=vlm,
            chunk_size=chunk_size,
            head_width=hidden_size,
            head_depth=4,
            apt_config=apt_config,
            head_reads_language=head_reads_language,
            fusion_options=fusion_options,
            per_site_language=per_site_language,
        )
    raise ValueError(f"Unknown arch {arch!r}; expected one of {ARCHS}.")


class _StepProgress(Callback):
    """Advances one study-wide progress bar per optimiser step and shows the current run and loss."""

    def __init__(self, bar: Any, label: str) -> None:
        self.bar, self.label = bar, label

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"{self.label} loss {float(outputs['loss']):.3f}", refresh=False)


class LearningCurve(Callback):
    """Evaluates the policy every ``every`` optimiser steps (and at the last step) on :data:`CURVE_SPLITS`.

    One curve per guidance scale, so methods that share a training (``apt_dropout`` and ``apt_dropout_guided``)
    share the recording and each gets the curve of the scale it is evaluated with. Evaluation leaves training
    untouched: :func:`evaluate_policy` forks torch's global generator, numpy's and Python's global generators
    are saved and restored here, and every module's train/eval mode is put back.

    Attributes:
        curves: ``{guidance_scale: [{"step": s, "seen": x, "counterfactual": y}, ...]}``.
        eval_s: seconds spent evaluating.
    """

    def __init__(
        self, every: int, episodes: int, seed: int, guidance_scales: tuple[float, ...] = (1.0,), max_steps: int = -1
    ) -> None:
        if every < 1:
            raise ValueError(f"`every` must be >= 1, got {every!r}.")
        self.every, self.episodes, self.seed, self.max_steps = every, episodes, seed, max_steps
        self.curves: dict[float, list[dict[str, Any]]] = {float(w): [] for w in dict.fromkeys(guidance_scales)}
        self.eval_s = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        last = self.max_steps > 0 and step >= self.max_steps
        recorded = next(iter(self.curves.values()), [])
        if (step % self.every == 0 or last) and not (recorded and recorded[-1]["step"] == step):
            self.record(pl_module, step)

    def record(self, policy: Any, step: int) -> None:
        tic = time.perf_counter()
        modes = {module: module.training for module in policy.modules()}
        numpy_state, python_state = np.random.get_state(), random.getstate()
        try:
            with torch.no_grad():
                for w, curve in self.curves.items():
                    metrics = evaluate_policy(
                        policy,
                        CURVE_SPLITS,
                        self.episodes,
                        seed=self.seed,
                        sensitivity_episodes=0,
                        action_error_split=None,
                        outcome_splits=(),
                        guidance_scale=w,
                    )
                    curve.append({"step": int(step), **{s: metrics["success"][s] for s in CURVE_SPLITS}})
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
            for module, training in modes.items():
                module.training = training
        self.eval_s += time.perf_counter() - tic


def training_runs(config: StudyConfig) -> Iterator[tuple[str, int, str, list[str]]]:
    """``(arch, seed, trained_as, methods evaluated on that training)`` of every training ``config`` asks for,
    methods in catalogue order (methods whose training is identical share one, see :meth:`StudyConfig.trained_as`)."""
    ordered = [m.name for m in METHODS if m.name in config.methods]
    for arch in config.archs:
        for seed in config.seeds:
            groups: dict[str, list[str]] = {}
            for method in ordered:
                groups.setdefault(config.trained_as(arch, method), []).append(method)
            for trained_as, methods in groups.items():
                yield arch, seed, trained_as, methods


def run_study(
    config: StudyConfig, out: str | Path | None = None, progress: bool = True, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """Train and evaluate every (arch, method, seed) of ``config``.

    Returns:
        ``{"config", "pretraining", "runs", "wall_s"}``; each run as :func:`apt_studies.report.aggregate`
        expects (``success`` per split, ``outcomes`` of counterfactual episodes, ``instruction_sensitivity``,
        ``action_error``, ``gates``, ``train_s``, ``eval_s``), plus ``trained_as`` (the method whose training it
        shares) and ``guidance_scale``; with :attr:`StudyConfig.curve_every`, ``curve`` (``[{"step", "seen",
        "counterfactual"}, ...]``, shared by methods trained together, at each method's guidance scale) and
        ``curve_s`` (seconds spent recording it, not counted in ``train_s``).
    """
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # 4 info lines per fit would bury the bar; restored on return
    try:
        with fixed_threads(config.threads):  # the numbers depend on the thread count: the config fixes it
            return _run_study(config, out, progress, cache_dir)
    finally:
        lightning_log.setLevel(level)


def prepare_vlm(
    config: StudyConfig, progress: bool = True, cache_dir: str | Path | None = None
) -> tuple[dict[str, int], Path | None, dict[str, Any] | None]:
    """``(vocabulary, vlm_dir, pretraining record)``: the pretrained VLM every run starts from (cached on disk).

    ``vocabulary`` holds the VLM config's ``vocab_size`` and ``image_token_id`` for the benchmark's tokenizer.
    """
    tokenizer = TabletopDataModule().tokenizer
    vocabulary = tokenizer.vlm_vocabulary
    if not config.pretrain_vlm:
        return vocabulary, None, None
    vlm_config = tiny_paligemma_config(hidden_size=config.hidden_size, **vocabulary)
    vlm_dir, pretraining = pretrained_vlm(
        vlm_config, tokenizer, config.pretraining, cache_dir=cache_dir, progress=progress
    )
    return vocabulary, vlm_dir, pretraining


def train_method(
    config: StudyConfig,
    arch: str,
    method: str,
    seed: int,
    vocabulary: Mapping[str, int],
    vlm_dir: str | Path | None,
    data: TabletopDataModule,
    callbacks: list[Callback] | None = None,
) -> tuple[FlowMatchingPolicy, pl.Trainer, GateMonitor, float]:
    """Train one (arch, method, seed) of ``config``: ``(policy, trainer, gate monitor, train seconds)``."""
    apt_config = config.apt_config(arch, method, seed)
    pl.seed_everything(seed, verbose=False)  # same expert initialisation for every method
    policy = config.method_policy(arch, method, apt_config, vocabulary, vlm_dir)
    monitor = GateMonitor(every_n_steps=10)
    trainer = quiet_trainer(config.steps, [config.scheduler(method), monitor, *(callbacks or [])])
    tic = time.perf_counter()
    trainer.fit(policy, data.train_dataloader())
    return policy, trainer, monitor, time.perf_counter() - tic


def study_data(config: StudyConfig, seed: int) -> TabletopDataModule:
    """The demonstrations of ``seed`` (shared by every arch and method)."""
    data = TabletopDataModule(config.episodes, seed, config.chunk_size, config.batch_size)
    data.setup("fit")
    return data


def _run_study(
    config: StudyConfig, out: str | Path | None, progress: bool, cache_dir: str | Path | None
) -> dict[str, Any]:
    started = time.perf_counter()
    out = Path(out) if out is not None else None
    vocabulary, vlm_dir, pretraining = prepare_vlm(config, progress, cache_dir)
    plan = list(training_runs(config))
    bar = tqdm(total=len(plan) * config.steps, desc="training", unit="step", disable=not progress)
    runs: list[dict[str, Any]] = []
    data: dict[int, TabletopDataModule] = {}  # demonstrations of a seed are collected once, shared by every arch
    for index, (arch, seed, trained_as, methods) in enumerate(plan):
        if seed not in data:
            data[seed] = study_data(config, seed)
        label = f"[{index + 1}/{len(plan)}] {arch} {trained_as} seed {seed}"
        callbacks: list[Callback] = [_StepProgress(bar, label)]
        recorder = None
        if config.curve_every is not None:
            scales = tuple(config.eval_guidance(m) for m in methods)
            recorder = LearningCurve(config.curve_every, config.curve_episodes, seed, scales, config.steps)
            callbacks.append(recorder)
        extra: dict[str, Any] = {}
        if config.regime == "pretrain":
            from apt_studies.pretrain_study import finetune_method  # imports this module

            policy, trainer, monitor, train_s, extra = finetune_method(
                config, arch, trained_as, seed, vocabulary, vlm_dir, data[seed], callbacks, cache_dir
            )
        else:
            policy, trainer, monitor, train_s = train_method(
                config, arch, trained_as, seed, vocabulary, vlm_dir, data[seed], callbacks
            )
        curve_s = recorder.eval_s if recorder is not None else 0.0
        train_s -= curve_s  # the training's own time, comparable with runs without curves
        if out is not None and config.save_checkpoints:
            trainer.save_checkpoint(out / "checkpoints" / f"{arch}-{trained_as}-seed{seed}.ckpt")
        two_stage = METHOD_BY_NAME[trained_as].two_stage
        switch = (config.switch_step if METHOD_BY_NAME[trained_as].stage1 else 0) if two_stage else None
        if config.regime == "pretrain":
            switch = extra.get("pretrain_switch_step")  # fine-tuning is Stage 2 (or joint) from its step 0
        dropout = config.apt_config(arch, trained_as, seed).language_dropout
        for method in methods:
            bar.set_postfix_str(f"{label} evaluating {method}", refresh=True)
            guidance = config.eval_guidance(method)
            tic = time.perf_counter()
            metrics = evaluate_policy(policy, EVAL_SPLITS, config.eval_episodes, seed=seed, guidance_scale=guidance)
            if config.regime == "pretrain":  # what the study's choices are made on (never the reported splits)
                validation = evaluate_validation(policy, seed, config.eval_episodes, (guidance,))[guidance]
                metrics["validation"] = validation["success"]
            runs.append(
                {
                    "arch": arch,
                    "method": method,
                    "seed": seed,
                    **metrics,
                    "train_s": train_s,
                    "eval_s": time.perf_counter() - tic,
                    "steps": trainer.global_step,
                    "trained_as": trained_as,
                    "guidance_scale": guidance,
                    "language_dropout": dropout,
                    "switch_step": switch,
                    "gates": monitor.history,
                    **({"curve": recorder.curves[guidance], "curve_s": curve_s} if recorder is not None else {}),
                    **extra,
                }
            )
    bar.close()
    return {
        "config": dataclasses.asdict(config),
        "pretraining": pretraining,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
