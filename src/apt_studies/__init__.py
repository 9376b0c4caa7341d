"""apt_studies: the benchmark and the studies behind apt_lightning's numbers (its own import package).

It depends on the core library (``apt_lightning``), never the reverse, and installs its extra dependencies with the
``bench`` extra (``pip install "apt_lightning[bench]"``). The tabletop benchmark is below; the studies are in
``apt_studies.study`` (task regime) and ``apt_studies.pretrain_study`` (APT's pretraining regime).

Instruction-generalisation benchmark for Vision-Language-Action policies.

A procedurally generated 2-D tabletop where the instruction, not the scene, decides which object to reach.
Training data reproduces the imbalance of real VLA data (few templates, layouts that give the task away);
evaluation splits test paraphrases, counterfactual instructions on familiar layouts, unseen attribute
compositions and user-written instructions. Everything is numpy/torch, deterministic per seed, and fast
enough for thousands of demonstrations and hundreds of rollouts on one CPU core.

Typical use::

    from apt_studies import collect_demonstrations, make_episodes, rollout, EVAL_SPLITS

    train = collect_demonstrations("train", n_episodes=500, seed=0, chunk_size=8)
    for split in EVAL_SPLITS:
        result = rollout(policy_fn, make_episodes(split, 200, seed=1), chunk_size=8)
        print(split, result.summary()["success_rate"])
"""

from apt_studies.data import (
    DemonstrationDataset,
    collate,
    collect_demonstrations,
    expert_trajectory,
    images_to_tensor,
)
from apt_studies.datamodule import TabletopDataModule, policy_batch
from apt_studies.env import TabletopEnv
from apt_studies.evaluation import evaluate_policy, evaluate_validation, policy_fn
from apt_studies.expert import plan_path, scripted_actions
from apt_studies.language import (
    AttributeQuery,
    InstructionResolutionError,
    caption,
    default_tokenizer,
    describe_object,
    diverse_instruction,
    matches_training_wording,
    paraphrase_instruction,
    parse_referring_expression,
    question_answer,
    resolve_instruction,
    training_content_words,
    training_instruction,
)
from apt_studies.layouts import HELD_OUT_PAIRS, TRAIN_LAYOUTS, TrainingLayout, canonical_pairs, training_pairs
from apt_studies.metrics import ActionError, InstructionSensitivity, SuccessRate
from apt_studies.outcomes import OUTCOMES, classify_outcomes, outcome_rates
from apt_studies.physics import ACTION_DIM, MAX_STEP, STATE_DIM
from apt_studies.policies import expert_policy, shortcut_policy
from apt_studies.probes import SensitivityProbe, measure_instruction_sensitivity, sensitivity_probe
from apt_studies.render import render
from apt_studies.report import (
    aggregate,
    format_outcome_table,
    format_table,
    plot_gates,
    plot_outcomes,
    plot_success,
)
from apt_studies.rollout import RolloutResult, rollout
from apt_studies.scene import COLOURS, SHAPES, SIZES, Episode, Scene, SceneObject
from apt_studies.splits import (
    EVAL_SPLITS,
    TRAIN_SPLIT,
    held_out_violations,
    load_instruction_file,
    make_episodes,
    sample_episode,
    split_names,
    user_episodes,
    wording_violations,
)
from apt_studies.stepping import MAX_EPISODE_STEPS, LockstepEpisodes
from apt_studies.tokenizer import PromptTokens, WordTokenizer, build_prompt
from apt_studies.user_file import (
    InstructionFileError,
    InstructionFormatWarning,
    InstructionLayoutWarning,
    UnknownWordWarning,
)
from apt_studies.vlm_pretraining import VLMPretrainingConfig, pretrain_vlm, pretrained_vlm
from apt_studies.vocabulary import vocabulary_words

__all__ = [
    "ACTION_DIM",
    "COLOURS",
    "EVAL_SPLITS",
    "HELD_OUT_PAIRS",
    "MAX_EPISODE_STEPS",
    "MAX_STEP",
    "OUTCOMES",
    "SHAPES",
    "SIZES",
    "STATE_DIM",
    "TRAIN_LAYOUTS",
    "TRAIN_SPLIT",
    "ActionError",
    "AttributeQuery",
    "DemonstrationDataset",
    "Episode",
    "InstructionFileError",
    "InstructionFormatWarning",
    "InstructionLayoutWarning",
    "InstructionResolutionError",
    "InstructionSensitivity",
    "LockstepEpisodes",
    "PromptTokens",
    "RolloutResult",
    "Scene",
    "SceneObject",
    "SensitivityProbe",
    "SuccessRate",
    "TabletopDataModule",
    "TabletopEnv",
    "TrainingLayout",
    "UnknownWordWarning",
    "VLMPretrainingConfig",
    "WordTokenizer",
    "aggregate",
    "build_prompt",
    "canonical_pairs",
    "caption",
    "classify_outcomes",
    "collate",
    "collect_demonstrations",
    "default_tokenizer",
    "describe_object",
    "diverse_instruction",
    "evaluate_policy",
    "evaluate_validation",
    "expert_policy",
    "expert_trajectory",
    "format_outcome_table",
    "format_table",
    "held_out_violations",
    "images_to_tensor",
    "load_instruction_file",
    "make_episodes",
    "matches_training_wording",
    "measure_instruction_sensitivity",
    "outcome_rates",
    "paraphrase_instruction",
    "parse_referring_expression",
    "plan_path",
    "plot_gates",
    "plot_outcomes",
    "plot_success",
    "policy_batch",
    "policy_fn",
    "pretrain_vlm",
    "pretrained_vlm",
    "question_answer",
    "render",
    "resolve_instruction",
    "rollout",
    "sample_episode",
    "scripted_actions",
    "sensitivity_probe",
    "shortcut_policy",
    "split_names",
    "training_content_words",
    "training_instruction",
    "training_pairs",
    "user_episodes",
    "vocabulary_words",
    "wording_violations",
]
