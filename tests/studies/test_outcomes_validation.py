"""Counterfactual outcome classes, guidance passed down by the evaluation, validation seeds no reported split uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt_studies import expert_policy, make_episodes, rollout, shortcut_policy
from apt_studies.evaluation import (
    MAX_STUDY_SEED,
    evaluate_policy,
    evaluate_validation,
    evaluation_seeds,
    validation_episodes,
    validation_seed,
)
from apt_studies.outcomes import OUTCOMES, classify_outcomes, outcome_rates
from apt_studies.scene import Episode
from apt_studies.selection import choose


def _key(episode: Episode) -> tuple:
    """What makes two episodes the same task: instruction, object positions and the gripper start."""
    return (episode.instruction, episode.scene.centres().round(6).tobytes(), tuple(np.round(episode.ee_start, 6)))


# ------------------------------------------------------------------------------------------ outcome classes


def test_shortcut_policy_fails_every_counterfactual_at_the_habitual_object() -> None:
    episodes = make_episodes("counterfactual", 60, seed=3)
    rates = outcome_rates(rollout(shortcut_policy(episodes, 8), episodes, chunk_size=8), episodes)
    assert rates == {"success": 0.0, "habitual": 1.0, "other": 0.0, "none": 0.0}


@pytest.mark.parametrize(
    ("make_policy", "expected"),
    [
        (lambda eps: expert_policy(eps, 8), "success"),
        (lambda eps: lambda b: torch.zeros(len(b["state"]), 8, 2), "none"),
        # heads for an object that is neither the instructed one nor the habitual one
        (lambda eps: expert_policy([_third_object(e) for e in eps], 8), "other"),
    ],
)
def test_outcome_classes(make_policy, expected) -> None:
    episodes = [e for e in make_episodes("counterfactual", 40, seed=5) if len(e.scene.objects) == 4][:10]
    result = rollout(make_policy(episodes), episodes, chunk_size=8, max_steps=60)
    labels = classify_outcomes(result, episodes)
    assert labels == [expected] * len(episodes)
    rates = outcome_rates(result, episodes)
    assert set(rates) == set(OUTCOMES) and sum(rates.values()) == pytest.approx(1.0)


def _third_object(episode: Episode) -> Episode:
    other = next(
        i for i in range(len(episode.scene.objects)) if i not in (episode.scene.target, episode.canonical_target)
    )
    return Episode(episode.scene.with_target(other), episode.instruction, episode.ee_start, episode.split)


def test_outcomes_reject_mismatched_episodes() -> None:
    episodes = make_episodes("counterfactual", 4, seed=0)
    result = rollout(shortcut_policy(episodes, 8), episodes, chunk_size=8)
    with pytest.raises(ValueError, match="holds 4 episodes but `episodes` has 3"):
        classify_outcomes(result, episodes[:3])


# ------------------------------------------------------------------------------ guidance reaches sampling


class _RecordingPolicy(torch.nn.Module):
    """Moves nowhere; records the guidance scale of every ``sample_actions`` call."""

    chunk_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.scales: list[float] = []

    def sample_actions(self, batch, noise=None, num_steps=None, guidance_scale=1.0):
        self.scales.append(guidance_scale)
        return torch.zeros(batch["state"].shape[0], self.chunk_size, 2)


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_evaluate_policy_passes_guidance_to_every_sample(scale) -> None:
    policy = _RecordingPolicy()
    out = evaluate_policy(
        policy, ("counterfactual",), 3, seed=0, guidance_scale=scale, sensitivity_episodes=2, action_error_episodes=2
    )
    assert policy.scales and set(policy.scales) == {scale}  # rollouts, sensitivity probe and action error
    assert out["outcomes"]["counterfactual"]["none"] == 1.0 and out["success"]["counterfactual"] == 0.0


def test_evaluate_validation_rolls_each_scale_on_validation_episodes() -> None:
    policy = _RecordingPolicy()
    out = evaluate_validation(policy, seed=1, episodes=2, guidance_scales=(1.0, 2.0))
    assert set(out) == {1.0, 2.0} and set(policy.scales) == {1.0, 2.0}
    assert set(out[2.0]["success"]) == {"counterfactual", "seen"} and "counterfactual" in out[2.0]["outcomes"]


# ----------------------------------------------------------------------------------------- validation split


def test_validation_seeds_are_never_reported_seeds() -> None:
    reported = {s for seed in range(MAX_STUDY_SEED) for s in evaluation_seeds(seed).values()}
    training = set(range(MAX_STUDY_SEED)) | {seed + 10_000 for seed in range(MAX_STUDY_SEED)}  # data, val loss
    validation = {validation_seed(seed) for seed in range(MAX_STUDY_SEED)}
    assert len(validation) == MAX_STUDY_SEED and not validation & (reported | training)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_validation_episodes_differ_from_every_reported_episode(seed) -> None:
    validation = validation_episodes(seed, 100)
    for split, episodes in validation.items():
        reported = {_key(e) for s in evaluation_seeds(seed).values() for e in make_episodes(split, 100, seed=s)}
        assert not {_key(e) for e in episodes} & reported
    assert all(e.split == "counterfactual" for e in validation["counterfactual"])


@pytest.mark.parametrize("seed", [-1, MAX_STUDY_SEED, True])
def test_study_seeds_outside_the_documented_range_are_refused(seed) -> None:
    with pytest.raises(ValueError, match="`seed` must be an integer in"):
        validation_seed(seed)


# ---------------------------------------------------------------------------------------------- the rule


def _record(p: float, w: float, cf: float, seen: float) -> dict:
    return {"language_dropout": p, "guidance_scale": w, "success": {"counterfactual": cf, "seen": seen}}


def test_choose_picks_p_unguided_then_w_within_the_seen_tolerance() -> None:
    records = [
        _record(0.1, 1.0, 0.30, 0.80),
        _record(0.5, 1.0, 0.40, 0.80),
        _record(0.25, 1.0, 0.40, 0.80),
        _record(0.1, 2.0, 0.90, 0.80),  # best of all, but not at the chosen p
        _record(0.25, 1.5, 0.50, 0.77),
        _record(0.25, 2.0, 0.60, 0.60),  # w=2 costs seen success: excluded
        _record(0.5, 1.5, 0.70, 0.80),
    ]
    chosen = choose(records)
    assert (chosen["language_dropout"], chosen["guidance_scale"]) == (0.25, 1.5)  # tie at p: smaller p
    assert choose([_record(0.1, 1.0, 0.5, 0.8), _record(0.1, 1.5, 0.4, 0.8)])["guidance_scale"] == 1.0
    with pytest.raises(ValueError, match="no unguided"):
        choose([_record(0.1, 1.5, 0.4, 0.8)])


class _NoisyPolicy(_RecordingPolicy):
    """Acts on its own sampling noise, as a flow-matching policy does."""

    def sample_actions(self, batch, noise=None, num_steps=None, guidance_scale=1.0):
        noise = torch.randn(batch["state"].shape[0], self.chunk_size, 2) if noise is None else noise
        return noise  # a random walk: which object it bumps into depends on the noise


def test_evaluation_is_a_pure_function_of_policy_and_seed() -> None:
    state = torch.random.get_rng_state()
    first = evaluate_policy(_NoisyPolicy(), ("counterfactual",), 4, seed=2, sensitivity_episodes=0)
    torch.randn(3)  # whatever ran in between
    assert evaluate_policy(_NoisyPolicy(), ("counterfactual",), 4, seed=2, sensitivity_episodes=0) == first
    assert evaluate_validation(_NoisyPolicy(), seed=2, episodes=3) == evaluate_validation(_NoisyPolicy(), 2, 3)
    torch.random.set_rng_state(state)
    torch.randn(3)
    after = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    evaluate_policy(_NoisyPolicy(), ("seen",), 2, seed=0, sensitivity_episodes=0, action_error_split=None)
    torch.randn(3)
    assert torch.equal(torch.random.get_rng_state(), after)  # the caller's generator is left as it was


def test_nearest_at_timeout_splits_the_none_class() -> None:
    from apt_studies.outcomes import nearest_at_timeout

    episodes = make_episodes("counterfactual", 12, seed=4)
    idle = rollout(lambda b: torch.zeros(len(b["state"]), 8, 2), episodes, chunk_size=8, max_steps=8)
    rates = nearest_at_timeout(idle, episodes)
    assert rates["none"] == 12 and rates["target"] + rates["habitual"] + rates["other"] == pytest.approx(1.0)
    gaps = [np.linalg.norm(e.scene.centres() - e.ee_start, axis=1) - e.scene.radii() for e in episodes]
    nearest = [int(np.argmin(g)) for g in gaps]
    expected = np.mean([n == e.scene.target for n, e in zip(nearest, episodes, strict=True)])
    assert rates["target"] == pytest.approx(expected)
    np.testing.assert_allclose(idle.final_state, np.array([e.ee_start for e in episodes]))
