"""APT's regime on Meta-World: pretrain on the other MT50 tasks, fine-tune on the language-critical groups.

The tabletop study's method catalogue, :class:`~apt_lightning.APTConfig` per method, stage plans, cached
pretraining, step-0 check and fine-tuning are reused as they are (:mod:`apt_studies.study`,
:mod:`apt_studies.pretrain_study`); :class:`MetaWorldStudyConfig` answers their benchmark hooks (the corpus, its part
of the cache key, what a run records of it). What differs is the benchmark:

==================  ==============================================  ============================================
piece               tabletop (``pretrain_study``)                   Meta-World (here)
==================  ==============================================  ============================================
corpus              64 layouts of other objects                     the 45 other MT50 tasks (:mod:`.corpus`)
task data           300 habit-biased episodes                       habit-biased ``train`` episodes (:mod:`.splits`)
policy              2-dim state/actions, 32 px                      4-dim state/actions, 96 px (:mod:`.policies`)
VLM                 the pretrained tabletop VLM                     the same, resized and with Meta-World's words
                                                                    (:mod:`.vlm`, :mod:`.language`)
evaluation          the tabletop's splits and outcome classes       Meta-World's splits and outcome classes
                                                                    (:mod:`.rollout`)
==================  ==============================================  ============================================

Each run records the schema of ``docs/study_pretrain_results.json``: ``success`` per reported split,
``outcomes`` (per split, the rate of each outcome class), ``validation`` (success on validation episodes, what
choices are made on), ``instruction_sensitivity``, ``train_s``, ``eval_s``, ``pretrain_s``, ``step0_max_diff``...

Episode seeds: training demonstrations ``s`` (split ``train``), corpus ``s`` (its own stream), reported evaluation
``EVAL_SEED + s``, validation ``VALIDATION_SEED + s`` (the tabletop's offsets; the splits draw from streams of
their own, so the seeds never share an episode).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from apt_lightning.models.base import FlowMatchingPolicy
from apt_studies.determinism import fixed_threads
from apt_studies.environment import environment_record
from apt_studies.evaluation import EVAL_SEED, VALIDATION_SEED
from apt_studies.metaworld.camera import DEFAULT_IMAGE_SIZE
from apt_studies.metaworld.corpus import CORPUS_TASKS, cached_corpus
from apt_studies.metaworld.datamodule import MetaWorldDataModule, MetaWorldDataset, prompt_encoder
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.language import metaworld_tokenizer, vocabulary_coverage
from apt_studies.metaworld.lockstep import EnvPool, evaluate_lockstep
from apt_studies.metaworld.policies import build_metaworld_policy, policy_fn
from apt_studies.metaworld.probe import instruction_sensitivity
from apt_studies.metaworld.rollout import MAX_STEPS
from apt_studies.metaworld.splits import DEFAULT_HABIT, EVAL_SPLITS, make_episodes
from apt_studies.metaworld.vlm import metaworld_vlm
from apt_studies.outcomes import OUTCOMES
from apt_studies.pretrain_study import FORMAT_VERSION, finetune_method
from apt_studies.study import METHOD_BY_NAME, StudyConfig, prepare_vlm, training_runs
from apt_studies.vocabulary import vocabulary_words

__all__ = [
    "CORPUS_NAME",
    "FORMAT_VERSION",
    "METAWORLD_METHODS",
    "VALIDATION_SPLITS",
    "MetaWorldStudyConfig",
    "corpus_dataset",
    "evaluate_metaworld",
    "prepare_data",
    "prepare_metaworld_vlm",
    "run_metaworld_study",
    "study_data",
]

# FORMAT_VERSION (pretrained policies) is :data:`apt_studies.pretrain_study.FORMAT_VERSION`: one pretraining code.
CORPUS_NAME = "metaworld_mt50_others"
"""What a run records as its ``corpus``: the MT50 tasks outside the groups (:data:`.corpus.CORPUS_TASKS`)."""
METAWORLD_METHODS: tuple[str, ...] = ("baseline", "apt", "apt_ft_vlm")
"""The study's methods (issue 25): joint -> joint; Stage 1 then 2 -> Stage 2 (VLM frozen); the same, VLM at 0.1 x lr."""
VALIDATION_SPLITS: tuple[str, ...] = ("counterfactual", "seen")


@dataclass
class MetaWorldStudyConfig(StudyConfig):
    """:class:`~apt_studies.study.StudyConfig` of the Meta-World study (``"pretrain"`` regime only).

    Fields it adds or reads differently:

    Args:
        episodes: fine-tuning expert episodes (habit-biased ``train`` split, both groups).
        habit: share of the habitual task in each group's fine-tuning episodes.
        eval_episodes: rollouts per reported split (cycling over the groups).
        validation_episodes: rollouts per validation split.
        sensitivity_episodes: start states of the instruction-sensitivity probe (0 skips it).
        image_size: frame side in pixels.
        corpus_episodes_per_task: expert episodes per corpus task (45 tasks).
        corpus_stride: keep every ``corpus_stride``-th step of a corpus episode as a sample.
        corpus_tasks: the corpus's tasks (all of :data:`~apt_studies.metaworld.corpus.CORPUS_TASKS`; fewer in tests).
        max_steps: step budget of an evaluation episode.
        eval_batch: evaluation episodes run side by side (:func:`~apt_studies.metaworld.lockstep.evaluate_lockstep`).
        pretrain_vlm: start from the study's pretrained VLM adapted to Meta-World (``False``: a random VLM, tests).
    """

    methods: tuple[str, ...] = METAWORLD_METHODS
    seeds: tuple[int, ...] = (0,)
    regime: str = "pretrain"
    pretrain_steps: int = 400
    steps: int = 200
    episodes: int = 100
    habit: float = DEFAULT_HABIT
    eval_episodes: int = 30
    validation_episodes: int = 20
    sensitivity_episodes: int = 16
    image_size: int = DEFAULT_IMAGE_SIZE
    corpus_episodes_per_task: int = 4
    corpus_stride: int = 2
    corpus_tasks: tuple[str, ...] = CORPUS_TASKS
    max_steps: int = MAX_STEPS
    eval_batch: int = 10
    save_checkpoints: bool = False

    pretrained_prefix: ClassVar[str] = "pretrained-metaworld"

    def __post_init__(self) -> None:
        if self.regime != "pretrain":
            raise MetaWorldConfigError(f"the Meta-World study runs the 'pretrain' regime only, got {self.regime!r}.")
        super().__post_init__()
        self.corpus_tasks = tuple(self.corpus_tasks)
        habit_methods = [m for m in self.methods if METHOD_BY_NAME[m].corpus != "balanced"]
        if habit_methods:
            raise MetaWorldConfigError(f"methods {habit_methods} need a habit-biased corpus, which Meta-World lacks.")
        names = ("episodes", "eval_episodes", "validation_episodes", "corpus_episodes_per_task", "corpus_stride")
        for name in (*names, "max_steps", "eval_batch"):
            if getattr(self, name) < 1:
                raise MetaWorldConfigError(f"`{name}` must be >= 1, got {getattr(self, name)!r}.")
        if self.image_size % 8:
            raise MetaWorldConfigError(f"`image_size` must be a multiple of the 8 px patch, got {self.image_size}.")

    def method_policy(
        self,
        arch: str,
        method: str,
        apt_config: Any,
        vocabulary: Mapping[str, int],
        vlm_dir: str | Path | None,
    ) -> FlowMatchingPolicy:
        """The method's policy (its head language, fusion fields, per-site contexts) at Meta-World's sizes."""
        entry = METHOD_BY_NAME[method]
        return build_metaworld_policy(
            arch,
            vocabulary,
            apt_config,
            vlm_dir,
            hidden_size=self.hidden_size,
            chunk_size=self.chunk_size,
            image_size=self.image_size,
            head_reads_language=self.head_language(arch, method),
            fusion_options=dict(entry.fusion) or None,
            per_site_language=entry.per_site,
        )

    def pretraining_payload(self, method: str) -> dict[str, Any]:
        """The Meta-World part of a pretrained policy's cache key: the corpus and the model sizes (frame side too)."""
        return {
            "benchmark": "metaworld",
            "corpus": [self.corpus_episodes_per_task, self.corpus_stride, list(self.corpus_tasks)],
            "sizes": [self.hidden_size, self.chunk_size, self.image_size],
        }

    def pretraining_corpus(
        self, method: str, seed: int, cache_dir: str | Path | None = None, progress: bool = True
    ) -> MetaWorldDataset:
        """The corpus of ``seed`` (every method pretrains on the same one): :func:`corpus_dataset`."""
        return corpus_dataset(self, seed, cache_dir, progress)

    def corpus_record(self, method: str, pretraining: Mapping[str, Any]) -> dict[str, Any]:
        """``corpus`` (:data:`CORPUS_NAME`), and its ``corpus_samples`` and ``corpus_episodes`` as pretrained on."""
        return {
            "corpus": CORPUS_NAME,
            "corpus_samples": pretraining["samples"],
            "corpus_episodes": pretraining["episodes"],
        }


def prepare_metaworld_vlm(
    config: MetaWorldStudyConfig, cache_dir: str | Path | None = None, progress: bool = True
) -> tuple[dict[str, int], Path | None, dict[str, Any]]:
    """``(vocabulary, vlm_dir, record)``: the study's pretrained VLM adapted to Meta-World (both cached)."""
    tokenizer = metaworld_tokenizer()
    if not config.pretrain_vlm:
        return tokenizer.vlm_vocabulary, None, {"source": None, "pretraining": None, "adaptation": None}
    _, source_dir, pretraining = prepare_vlm(config, progress, cache_dir)
    assert source_dir is not None
    words = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>", *vocabulary_words())
    vlm_dir, adaptation = metaworld_vlm(source_dir, words, tokenizer, config.image_size, cache_dir)
    record = {"source": source_dir.name, "pretraining": pretraining, "adaptation": adaptation}
    return tokenizer.vlm_vocabulary, vlm_dir, record


_CORPORA: dict[tuple[Any, ...], MetaWorldDataset] = {}


def corpus_dataset(
    config: MetaWorldStudyConfig, seed: int, cache_dir: str | Path | None, progress: bool = True
) -> MetaWorldDataset:
    """The pretraining corpus of ``seed`` as a dataset (memoised per process, cached on disk)."""
    key = (config.corpus_episodes_per_task, seed, config.chunk_size, config.corpus_stride, config.image_size)
    key = (*key, config.corpus_tasks, str(cache_dir))
    if key not in _CORPORA:
        corpus = cached_corpus(
            config.corpus_episodes_per_task,
            seed,
            config.chunk_size,
            tasks=config.corpus_tasks,
            stride=config.corpus_stride,
            image_size=config.image_size,
            cache_dir=cache_dir,
            progress=progress,
        )
        _CORPORA[key] = MetaWorldDataset(corpus, metaworld_tokenizer())
    return _CORPORA[key]


def _outcome_rates(result: Any) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for split in dict.fromkeys(result.splits):
        mine = [o for o, s in zip(result.outcomes, result.splits, strict=True) if s == split]
        out[split] = {k: mine.count(k) / len(mine) for k in OUTCOMES}
    return out


def _by_task(result: Any) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {task: {outcome: rate, "n": episodes}}}``: which task of a group an outcome came from."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    rows = list(zip(result.outcomes, result.splits, result.tasks, strict=True))
    for split, task in dict.fromkeys((s, t) for _, s, t in rows):
        mine = [o for o, s, t in rows if s == split and t == task]
        out.setdefault(split, {})[task] = {**{k: mine.count(k) / len(mine) for k in OUTCOMES}, "n": len(mine)}
    return out


def evaluate_metaworld(
    policy: FlowMatchingPolicy,
    seed: int,
    episodes: int,
    splits: Sequence[str] = EVAL_SPLITS,
    *,
    offset: int = EVAL_SEED,
    max_steps: int = MAX_STEPS,
    batch_size: int = 10,
    pool: EnvPool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Success and outcome classes of ``policy`` on ``episodes`` rollouts per split, episode seed ``offset + seed``.

    The policy's own sampling noise comes from torch's global generator, seeded with ``offset + seed`` and restored
    on return, so the numbers are a function of the policy and the arguments.
    """
    policy.eval()
    named = [e for split in splits for e in make_episodes(split, episodes, seed=offset + seed)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(offset + seed)
        result = evaluate_lockstep(
            policy_fn(policy),
            named,
            batch_size=batch_size,
            execute_steps=policy.chunk_size,
            max_steps=max_steps,
            encode=prompt_encoder(),
            pool=pool,
            progress=progress,
        )
    summary = result.summary()
    return {
        "success": {s: float(summary[f"success_rate/{s}"]) for s in splits},
        "outcomes": _outcome_rates(result),
        "by_task": _by_task(result),
        "mean_steps": float(np.mean(result.steps)),
    }


def study_data(
    config: MetaWorldStudyConfig, seed: int, cache_dir: str | Path | None = None, progress: bool = True
) -> MetaWorldDataModule:
    """The fine-tuning demonstrations of ``seed`` (habit-biased ``train`` episodes, cached), set up for fitting."""
    data = MetaWorldDataModule(
        config.episodes,
        seed,
        config.chunk_size,
        config.batch_size,
        habit=config.habit,
        image_size=config.image_size,
        cache_dir=cache_dir,
        progress=progress,
    )
    data.setup("fit")
    return data


def prepare_data(
    config: MetaWorldStudyConfig, cache_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Build every cached input of ``config`` without training: the VLMs, each seed's demonstrations and corpus.

    Returns:
        Seconds per artefact as built (or as recorded when it was cached already).
    """
    tic = time.perf_counter()
    with fixed_threads(config.threads):
        prepare_metaworld_vlm(config, cache_dir, progress)
    out: dict[str, Any] = {"vlm_s": time.perf_counter() - tic}
    for seed in config.seeds:
        data = study_data(config, seed, cache_dir, progress)
        corpus = corpus_dataset(config, seed, cache_dir, progress)
        out[f"seed{seed}"] = {"demo_samples": len(data.train_set), "corpus_samples": len(corpus)}
    out["wall_s"] = time.perf_counter() - tic
    return out


def run_metaworld_study(
    config: MetaWorldStudyConfig,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train and evaluate every (arch, method, seed) of ``config``: the schema of ``docs/study_pretrain_results.json``
    plus ``vlm`` (source, adaptation and vocabulary coverage) and ``environment``. With ``checkpoint_dir``, each
    fine-tuned policy's state dict is saved there as ``<arch>-<method>-seed<seed>.pt`` (for later probes)."""
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        with fixed_threads(config.threads):
            return _run(config, cache_dir, progress, checkpoint_dir)
    finally:
        lightning_log.setLevel(level)


def _run(
    config: MetaWorldStudyConfig, cache_dir: str | Path | None, progress: bool, checkpoint_dir: str | Path | None
) -> dict[str, Any]:
    started = time.perf_counter()
    vocabulary, vlm_dir, vlm_record = prepare_metaworld_vlm(config, cache_dir, progress)
    vlm_record["coverage"] = vocabulary_coverage()
    plan = list(training_runs(config))
    runs: list[dict[str, Any]] = []
    data: dict[int, MetaWorldDataModule] = {}
    pool = EnvPool(config.image_size)
    try:
        for index, (arch, seed, trained_as, methods) in enumerate(tqdm(plan, desc="runs", disable=not progress)):
            if seed not in data:
                data[seed] = study_data(config, seed, cache_dir, progress)
            policy, _, monitor, train_s, extra = finetune_method(
                config, arch, trained_as, seed, vocabulary, vlm_dir, data[seed], cache_dir=cache_dir, progress=progress
            )
            if checkpoint_dir is not None:
                Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
                torch.save(policy.state_dict(), Path(checkpoint_dir) / f"{arch}-{trained_as}-seed{seed}.pt")
            for method in methods:
                tic = time.perf_counter()
                metrics = evaluate_metaworld(
                    policy,
                    seed,
                    config.eval_episodes,
                    max_steps=config.max_steps,
                    batch_size=config.eval_batch,
                    pool=pool,
                    progress=progress,
                )
                validation = evaluate_metaworld(
                    policy,
                    seed,
                    config.validation_episodes,
                    VALIDATION_SPLITS,
                    offset=VALIDATION_SEED,
                    max_steps=config.max_steps,
                    batch_size=config.eval_batch,
                    pool=pool,
                )
                if config.sensitivity_episodes:
                    metrics["instruction_sensitivity"] = instruction_sensitivity(
                        policy, seed, config.sensitivity_episodes, pool=pool
                    )
                runs.append(
                    {
                        "arch": arch,
                        "method": method,
                        "seed": seed,
                        **metrics,
                        "validation": validation["success"],
                        "validation_outcomes": validation["outcomes"],
                        "train_s": train_s,
                        "eval_s": time.perf_counter() - tic,
                        "steps": config.steps,
                        "trained_as": trained_as,
                        "guidance_scale": 1.0,
                        "language_dropout": config.apt_config(arch, trained_as, seed).language_dropout,
                        "switch_step": extra["pretrain_switch_step"],
                        "gates": monitor.history,
                        "benchmark": "metaworld",
                        "demo_episodes": len(data[seed].train_set.episodes),
                        **extra,
                    }
                )
                if progress:
                    tqdm.write(f"[{index + 1}/{len(plan)}] {arch} {method} seed {seed}: {metrics['success']}")
    finally:
        pool.close()
    return {
        "config": dataclasses.asdict(config),
        "pretraining": vlm_record["pretraining"],
        "vlm": vlm_record,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "environment": environment_record(),
    }
