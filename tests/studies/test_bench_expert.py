"""The scripted expert solves every split, so failures of learned policies are the policies' fault."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from apt_studies import expert_trajectory, make_episodes, plan_path, scripted_actions, split_names
from apt_studies.expert import CLEARANCE


@pytest.mark.parametrize("split", split_names())
def test_expert_success_at_least_95_percent(split: str) -> None:
    episodes = make_episodes(split, 200, seed=11)
    successes = [expert_trajectory(e)[2] for e in episodes]
    assert np.mean(successes) >= 0.95


def test_expert_actions_are_bounded_and_stop_at_target() -> None:
    for episode in make_episodes("counterfactual", 50, seed=0):
        actions = scripted_actions(episode.scene, episode.ee_start, 64)
        assert actions.shape == (64, 2) and actions.dtype == np.float32
        assert np.all(np.abs(actions) <= 1.0 + 1e-6)
        assert np.all(actions[-1] == 0.0), "the expert stops once it reaches the target centre"


def test_planned_path_keeps_clear_of_distractors() -> None:
    for episode in make_episodes("unseen_composition", 100, seed=1):
        scene = episode.scene
        path = plan_path(scene, episode.ee_start)
        samples = np.concatenate([np.linspace(a, b, 50) for a, b in itertools.pairwise(path)])
        for i, obj in enumerate(scene.objects):
            if i != scene.target:
                gap = np.linalg.norm(samples - np.array([obj.x, obj.y]), axis=1).min() - obj.radius
                assert gap > CLEARANCE * 0.5
