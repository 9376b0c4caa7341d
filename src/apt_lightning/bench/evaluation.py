"""Evaluate a policy on every split: closed-loop success, held-out action error, instruction sensitivity.

One function serves the study, the checkpoint-evaluation CLI and users' own models: anything with
``sample_actions(batch, noise=...)`` over the reference-policy batch layout (see
:mod:`apt_lightning.models.base`), or any ``policy_fn`` mapping an observation batch to actions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from apt_lightning.bench.data import collect_demonstrations
from apt_lightning.bench.datamodule import policy_batch
from apt_lightning.bench.language import default_tokenizer
from apt_lightning.bench.metrics import ActionError
from apt_lightning.bench.probes import measure_instruction_sensitivity, sensitivity_probe
from apt_lightning.bench.rollout import rollout
from apt_lightning.bench.scene import Episode
from apt_lightning.bench.splits import EVAL_SPLITS, make_episodes
from apt_lightning.bench.tokenizer import WordTokenizer

__all__ = ["EVAL_SEED", "evaluate_policy", "policy_fn"]

EVAL_SEED = 1000
"""Episode seed offset of evaluation: disjoint from training seeds (0, 1, 2, ...)."""


def policy_fn(policy: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Adapt a reference policy to the benchmark's observation batches (``image`` and optional ``noise``)."""

    def act(observation: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = dict(observation)
        if "image" in batch:
            batch["pixel_values"] = batch.pop("image")
        noise = batch.pop("noise", None)
        return policy.sample_actions(batch, noise=noise)

    return act


@torch.no_grad()
def _action_error(policy: Any, split: str, episodes: int, seed: int, chunk_size: int, tokenizer: WordTokenizer) -> float:
    demos = collect_demonstrations(split, n_episodes=episodes, seed=seed, chunk_size=chunk_size, tokenizer=tokenizer)
    batch = policy_batch([demos[i] for i in range(len(demos))])
    noise = torch.randn(batch["actions"].shape, generator=torch.Generator().manual_seed(seed))
    metric = ActionError()
    predicted = policy.sample_actions(batch, noise=noise)
    metric.update(predicted, batch["actions"], batch["action_pad_mask"])
    return float(metric.compute())


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
    progress: bool = False,
) -> dict[str, Any]:
    """Roll ``policy`` out on each split and measure how much it listens to the instruction.

    Args:
        policy: a module with ``sample_actions(batch, noise=None)`` (switched to eval mode here).
        splits: benchmark splits to roll out, ``episodes`` each, with seed ``EVAL_SEED + seed``.
        episodes: episodes per split.
        seed: evaluation seed (episodes, probe noise).
        chunk_size: actions per query; ``policy.chunk_size`` when ``None``.
        tokenizer: prompt tokenizer; the benchmark's default when ``None``.
        extra_splits: more named episode lists, e.g. ``{"user": user_episodes(load_instruction_file(path))}``.
        sensitivity_episodes: probe size of the instruction-sensitivity score (0 skips it).
        action_error_split: split whose expert demonstrations give the held-out action error (``None`` skips it).
        action_error_episodes: episodes of those demonstrations.
        progress: show a progress bar over splits.

    Returns:
        ``{"success": {split: rate}, "instruction_sensitivity": float, "action_error": float}``.
    """
    chunk_size = chunk_size or policy.chunk_size
    tokenizer = tokenizer or default_tokenizer()
    policy.eval()
    act = policy_fn(policy)
    named: dict[str, Sequence[Episode]] = {s: make_episodes(s, episodes, seed=EVAL_SEED + seed) for s in splits}
    named.update(extra_splits or {})
    success = {}
    for name, split_episodes in tqdm(named.items(), desc="rollouts", disable=not progress, leave=False):
        result = rollout(act, split_episodes, chunk_size=chunk_size, tokenizer=tokenizer)
        success[name] = float(result.summary()["success_rate"])
    out: dict[str, Any] = {"success": success}
    if sensitivity_episodes > 0:
        probe_episodes = make_episodes("counterfactual", sensitivity_episodes, seed=EVAL_SEED + seed + 1)
        probe = sensitivity_probe(probe_episodes, chunk_size, seed=EVAL_SEED + seed, tokenizer=tokenizer)
        out["instruction_sensitivity"] = float(measure_instruction_sensitivity(act, probe))
    if action_error_split is not None:
        out["action_error"] = _action_error(
            policy, action_error_split, action_error_episodes, EVAL_SEED + seed + 2, chunk_size, tokenizer
        )
    return out
