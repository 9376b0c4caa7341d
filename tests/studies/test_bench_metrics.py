"""Metrics on hand-made cases, and closed-loop rollouts that prove the benchmark detects shortcuts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apt_studies import (
    ActionError,
    InstructionSensitivity,
    SuccessRate,
    WordTokenizer,
    expert_policy,
    make_episodes,
    measure_instruction_sensitivity,
    resolve_instruction,
    rollout,
    scripted_actions,
    sensitivity_probe,
    shortcut_policy,
)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_success_rate() -> None:
    metric = SuccessRate()
    assert math.isnan(float(metric.compute()))
    metric.update(torch.tensor([1, 0]))
    metric.update(torch.tensor([True, True]))
    assert float(metric.compute()) == pytest.approx(0.75)


def test_action_error_ignores_padding() -> None:
    metric = ActionError()
    predicted = torch.zeros(2, 3, 2)
    target = torch.ones(2, 3, 2)
    target[1, 2] = 100.0  # padded, must not count
    pad = torch.tensor([[False, False, False], [False, False, True]])
    predicted[0, 0, 0] = 3.0  # error 4 instead of 1 on one of 10 counted values
    metric.update(predicted, target, pad)
    assert float(metric.compute()) == pytest.approx((9 * 1.0 + 4.0) / 10)


def test_instruction_sensitivity_hand_made() -> None:
    metric = InstructionSensitivity()
    a = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])
    b = torch.zeros_like(a)
    metric.update(a, b, expert_a=2 * a, expert_b=b)
    assert float(metric.compute()) == pytest.approx(0.5)
    fixed = InstructionSensitivity(scale=2.0)
    fixed.update(a, b)
    assert float(fixed.compute()) == pytest.approx((5.0 + 1.0) / 2 / 2.0)
    with pytest.raises(ValueError):
        InstructionSensitivity().update(a, b)


def _language_reading_policy(episodes, chunk: int, gain: float = 1.0):
    """A privileged policy that reads its prompt: decodes the words and goes to the object they name."""
    tok = WordTokenizer()

    def policy(batch):
        out = []
        for ids, mask, index, state in zip(
            batch["input_ids"], batch["language_mask"], batch["episode_index"], batch["state"], strict=False
        ):
            scene = episodes[int(index)].scene
            target = resolve_instruction(tok.decode(ids[mask]), scene)
            out.append(gain * scripted_actions(scene.with_target(target), state.numpy().astype(np.float64), chunk))
        return torch.from_numpy(np.stack(out))

    return policy


def test_instruction_sensitivity_of_reference_policies() -> None:
    episodes = make_episodes("seen", 60, seed=0)
    probe = sensitivity_probe(episodes, chunk_size=8, seed=0)
    assert torch.equal(
        probe.observation["noise"], sensitivity_probe(episodes, chunk_size=8, seed=0).observation["noise"]
    )
    blind = measure_instruction_sensitivity(shortcut_policy(episodes, 8), probe)
    assert float(blind) == 0.0
    reader = measure_instruction_sensitivity(_language_reading_policy(episodes, 8), probe, batch_size=16)
    assert float(reader) == pytest.approx(1.0)
    half = measure_instruction_sensitivity(_language_reading_policy(episodes, 8, gain=0.5), probe)
    assert float(half) == pytest.approx(0.5)


@pytest.mark.parametrize("split", ["seen", "paraphrase", "counterfactual", "unseen_composition", "novel_layout"])
def test_expert_rollout_succeeds(split: str) -> None:
    episodes = make_episodes(split, 200, seed=21)
    result = rollout(expert_policy(episodes, 8), episodes, chunk_size=8, execute_steps=4)
    summary = result.summary()
    assert summary["success_rate"] >= 0.95 and summary[f"success_rate/{split}"] == summary["success_rate"]
    assert result.success.shape == (200,) and np.all(result.steps > 0)


def test_shortcut_policy_is_exposed_by_counterfactuals() -> None:
    seen, counterfactual = make_episodes("seen", 200, seed=9), make_episodes("counterfactual", 200, seed=9)
    assert rollout(shortcut_policy(seen, 8), seen, chunk_size=8).summary()["success_rate"] >= 0.95
    assert rollout(shortcut_policy(counterfactual, 8), counterfactual, chunk_size=8).summary()["success_rate"] <= 0.02
    reader = _language_reading_policy(counterfactual, 8)
    assert rollout(reader, counterfactual, chunk_size=8).summary()["success_rate"] >= 0.95


def test_rollout_of_mixed_splits_and_bad_policy() -> None:
    episodes = make_episodes("seen", 10, seed=0) + make_episodes("counterfactual", 10, seed=0)
    summary = rollout(shortcut_policy(episodes, 4), episodes, chunk_size=4).summary()
    assert summary["success_rate/seen"] == 1.0 and summary["success_rate/counterfactual"] == 0.0
    idle = rollout(lambda b: torch.zeros(len(b["state"]), 4, 2), episodes, chunk_size=4, max_steps=12)
    assert idle.summary()["timeout_rate"] == 1.0 and np.all(idle.steps == 12)
    with pytest.raises(ValueError, match="policy must return"):
        rollout(lambda b: torch.zeros(len(b["state"]), 4, 3), episodes, chunk_size=4)
