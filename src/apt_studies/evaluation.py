"""Evaluate a policy on every split: closed-loop success, held-out action error, instruction sensitivity.

One function serves the study, the checkpoint-evaluation CLI and users' own models: anything with
``sample_actions(batch, noise=...)`` over the reference-policy batch layout (see
:mod:`apt_lightning.models.base`), or any ``policy_fn`` mapping an observation batch to actions.

Episode seeds (every split draws from its own stream ``default_rng([seed, split])``, so distinct seeds give
independent episodes):

==========================  =========================================  ==================================
use                         seeds, for a study seed ``s`` in [0, 1000)  where
==========================  =========================================  ==================================
training demonstrations     ``s`` (``train`` split)                    :class:`TabletopDataModule`
training-time val loss      ``s + 10_000``                             :class:`TabletopDataModule`
reported evaluation         ``1000 + s + {0, 1, 2}`` (rollouts, probe,  :func:`evaluate_policy`
                            action error): 1000-2001
validation (selection)      ``20_000 + s``: 20000-20999                :func:`evaluate_validation`
==========================  =========================================  ==================================

Settings (language dropout, guidance scale) are chosen on :func:`evaluate_validation` only; its episodes are
never reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from apt_studies.data import collect_demonstrations
from apt_studies.datamodule import policy_batch
from apt_studies.language import default_tokenizer
from apt_studies.metrics import ActionError
from apt_studies.outcomes import outcome_rates
from apt_studies.probes import measure_instruction_sensitivity, sensitivity_probe
from apt_studies.rollout import rollout
from apt_studies.scene import Episode
from apt_studies.splits import EVAL_SPLITS, make_episodes
from apt_studies.tokenizer import WordTokenizer

__all__ = [
    "EVAL_SEED",
    "MAX_STUDY_SEED",
    "VALIDATION_SEED",
    "VALIDATION_SPLITS",
    "evaluate_policy",
    "evaluate_validation",
    "evaluation_seeds",
    "policy_fn",
    "validation_episodes",
    "validation_seed",
]

EVAL_SEED = 1000
"""Episode seed offset of evaluation: disjoint from training seeds (0, 1, 2, ...)."""
VALIDATION_SEED = 20_000
"""Episode seed offset of the validation episodes that settings are chosen on (never reported)."""
MAX_STUDY_SEED = 1000
"""Study seeds are in ``[0, MAX_STUDY_SEED)``, which keeps the seed ranges of the table above disjoint."""
VALIDATION_SPLITS: tuple[str, ...] = ("counterfactual", "seen")
"""Validation splits: ``counterfactual`` is what settings are chosen for, ``seen`` guards against a setting
that buys counterfactual success with the familiar tasks."""


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_STUDY_SEED:
        raise ValueError(
            f"`seed` must be an integer in [0, {MAX_STUDY_SEED}) so that evaluation and validation episodes "
            f"never share a seed, got {seed!r}."
        )


def evaluation_seeds(seed: int) -> dict[str, int]:
    """Episode seeds of the reported evaluation of study seed ``seed``: rollouts, sensitivity probe, action error."""
    _check_seed(seed)
    return {"rollouts": EVAL_SEED + seed, "probe": EVAL_SEED + seed + 1, "action_error": EVAL_SEED + seed + 2}


def validation_seed(seed: int) -> int:
    """Episode seed of the validation episodes of study seed ``seed`` (disjoint from :func:`evaluation_seeds`)."""
    _check_seed(seed)
    return VALIDATION_SEED + seed


def policy_fn(policy: Any, guidance_scale: float = 1.0) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Adapt a reference policy to the benchmark's observation batches (``image`` and optional ``noise``).

    ``guidance_scale`` is passed to ``sample_actions`` when it is not 1 (so policies without the argument
    still work unguided).
    """
    guided = {} if guidance_scale == 1.0 else {"guidance_scale": guidance_scale}

    def act(observation: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = dict(observation)
        if "image" in batch:
            batch["pixel_values"] = batch.pop("image")
        noise = batch.pop("noise", None)
        return policy.sample_actions(batch, noise=noise, **guided)

    return act


@torch.no_grad()
def _action_error(
    policy: Any, split: str, episodes: int, seed: int, chunk_size: int, tokenizer: WordTokenizer, guidance_scale: float
) -> float:
    demos = collect_demonstrations(split, n_episodes=episodes, seed=seed, chunk_size=chunk_size, tokenizer=tokenizer)
    batch = policy_batch([demos[i] for i in range(len(demos))])
    noise = torch.randn(batch["actions"].shape, generator=torch.Generator().manual_seed(seed))
    metric = ActionError()
    guided = {} if guidance_scale == 1.0 else {"guidance_scale": guidance_scale}
    predicted = policy.sample_actions(batch, noise=noise, **guided)
    metric.update(predicted, batch["actions"], batch["action_pad_mask"])
    return float(metric.compute())


def _roll(
    act: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    named: Mapping[str, Sequence[Episode]],
    chunk_size: int,
    tokenizer: WordTokenizer,
    outcome_splits: Sequence[str],
    progress: bool,
) -> dict[str, Any]:
    success: dict[str, float] = {}
    outcomes: dict[str, dict[str, float]] = {}
    for name, split_episodes in tqdm(named.items(), desc="rollouts", disable=not progress, leave=False):
        result = rollout(act, split_episodes, chunk_size=chunk_size, tokenizer=tokenizer)
        success[name] = float(result.summary()["success_rate"])
        if name in outcome_splits:
            outcomes[name] = outcome_rates(result, split_episodes)
    return {"success": success, "outcomes": outcomes}


def evaluate_policy(
    policy: Any,
    splits: Sequence[str] = EVAL_SPLITS,
    episodes: int = 100,
    seed: int = 0,
    *,
    chunk_size: int | None = None,
    tokenizer: WordTokenizer | None = None,
    extra_splits: Mapping[str, Sequence[Episode]] | None = None,
    sensitivity_episodes: int = 64,
    action_error_split: str | None = "counterfactual",
    action_error_episodes: int = 20,
    guidance_scale: float = 1.0,
    outcome_splits: Sequence[str] = ("counterfactual",),
    progress: bool = False,
) -> dict[str, Any]:
    """Roll ``policy`` out on each split and measure how much it listens to the instruction.

    Args:
        policy: a module with ``sample_actions(batch, noise=None)`` (switched to eval mode here).
        splits: benchmark splits to roll out, ``episodes`` each, with seed ``EVAL_SEED + seed``.
        episodes: episodes per split.
        seed: evaluation seed (episodes, probe noise), in ``[0, MAX_STUDY_SEED)``.
        chunk_size: actions per query; ``policy.chunk_size`` when ``None``.
        tokenizer: prompt tokenizer; the benchmark's default when ``None``.
        extra_splits: more named episode lists, e.g. ``{"user": user_episodes(load_instruction_file(path))}``.
        sensitivity_episodes: probe size of the instruction-sensitivity score (0 skips it).
        action_error_split: split whose expert demonstrations give the held-out action error (``None`` skips it).
        action_error_episodes: episodes of those demonstrations.
        guidance_scale: prior-contrast guidance ``w`` passed to ``sample_actions`` everywhere (1: plain model).
        outcome_splits: splits whose episodes are classified by :func:`~apt_studies.outcomes.outcome_rates`
            (success / habitual object / other object / none).
        progress: show a progress bar over splits.

    Returns:
        ``{"success": {split: rate}, "outcomes": {split: {outcome: rate}}, "instruction_sensitivity": float,
        "action_error": float}``: a pure function of the policy and the arguments. The sampling noise a policy
        draws itself comes from torch's global generator, seeded here from ``seed`` and restored on return, so
        the same checkpoint evaluated twice (or with another ``guidance_scale``) sees the same noise.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SEED + seed)
        return _evaluate_policy(
            policy,
            splits,
            episodes,
            seed,
            chunk_size,
            tokenizer,
            extra_splits,
            sensitivity_episodes,
            action_error_split,
            action_error_episodes,
            guidance_scale,
            outcome_splits,
            progress,
        )


def _evaluate_policy(
    policy: Any,
    splits: Sequence[str],
    episodes: int,
    seed: int,
    chunk_size: int | None,
    tokenizer: WordTokenizer | None,
    extra_splits: Mapping[str, Sequence[Episode]] | None,
    sensitivity_episodes: int,
    action_error_split: str | None,
    action_error_episodes: int,
    guidance_scale: float,
    outcome_splits: Sequence[str],
    progress: bool,
) -> dict[str, Any]:
    seeds = evaluation_seeds(seed)
    chunk_size = chunk_size or policy.chunk_size
    tokenizer = tokenizer or default_tokenizer()
    policy.eval()
    act = policy_fn(policy, guidance_scale)
    named: dict[str, Sequence[Episode]] = {s: make_episodes(s, episodes, seed=seeds["rollouts"]) for s in splits}
    named.update(extra_splits or {})
    out = _roll(act, named, chunk_size, tokenizer, outcome_splits, progress)
    if sensitivity_episodes > 0:
        probe_episodes = make_episodes("counterfactual", sensitivity_episodes, seed=seeds["probe"])
        probe = sensitivity_probe(probe_episodes, chunk_size, seed=seeds["rollouts"], tokenizer=tokenizer)
        out["instruction_sensitivity"] = float(measure_instruction_sensitivity(act, probe))
    if action_error_split is not None:
        out["action_error"] = _action_error(
            policy,
            action_error_split,
            action_error_episodes,
            seeds["action_error"],
            chunk_size,
            tokenizer,
            guidance_scale,
        )
    return out


def validation_episodes(
    seed: int, episodes: int = 100, splits: Sequence[str] = VALIDATION_SPLITS
) -> dict[str, list[Episode]]:
    """The validation episodes of study seed ``seed``: drawn with :func:`validation_seed`, never reported."""
    return {s: make_episodes(s, episodes, seed=validation_seed(seed)) for s in splits}


def evaluate_validation(
    policy: Any,
    seed: int = 0,
    episodes: int = 100,
    guidance_scales: Sequence[float] = (1.0,),
    *,
    splits: Sequence[str] = VALIDATION_SPLITS,
    chunk_size: int | None = None,
    tokenizer: WordTokenizer | None = None,
) -> dict[float, dict[str, Any]]:
    """Success (and counterfactual outcomes) on the validation episodes, for each guidance scale.

    This is where settings are chosen (see ``examples/choose_settings.py``); :func:`evaluate_policy` is what
    is reported, on episodes of other seeds.

    Returns:
        ``{w: {"success": {split: rate}, "outcomes": {"counterfactual": {...}}}}``; the sampling noise is seeded
        from :func:`validation_seed` for every ``w`` (as in :func:`evaluate_policy`).
    """
    chunk_size = chunk_size or policy.chunk_size
    tokenizer = tokenizer or default_tokenizer()
    policy.eval()
    named = validation_episodes(seed, episodes, splits)
    results = {}
    for w in guidance_scales:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(validation_seed(seed))
            results[float(w)] = _roll(policy_fn(policy, w), named, chunk_size, tokenizer, ("counterfactual",), False)
    return results
