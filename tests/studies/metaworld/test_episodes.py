"""Splits, cached expert demonstrations and the rollout evaluator's outcome classes."""

import dataclasses

import numpy as np
import pytest

import apt_studies.metaworld  # noqa: F401  (headless EGL defaults, before metaworld imports mujoco)
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.groups import GROUPS
from apt_studies.metaworld.splits import make_episodes
from apt_studies.metaworld.tasks import INSTRUCTIONS


def test_training_is_habit_biased_and_splits_hold_what_they_claim():
    train = make_episodes("train", 400, seed=0)
    for name, group in GROUPS.items():
        mine = [e for e in train if e.group == name]
        share = np.mean([e.task == group.habitual for e in mine])
        assert 0.8 < share < 0.97, name
        assert all(group.in_training_box(np.array(e.rand_vec)) for e in mine)
    counterfactual = make_episodes("counterfactual", 40, seed=0)
    assert all(e.task != e.habitual for e in counterfactual)
    assert all(e.instruction in INSTRUCTIONS[e.task].training for e in counterfactual)
    paraphrase = make_episodes("paraphrase", 40, seed=0)
    assert all(e.task == e.habitual and e.instruction in INSTRUCTIONS[e.task].paraphrases for e in paraphrase)
    novel = make_episodes("novel_position", 40, seed=0)
    assert not any(GROUPS[e.group].in_training_box(np.array(e.rand_vec)) for e in novel)
    assert make_episodes("seen", 5, seed=3) == make_episodes("seen", 5, seed=3) != make_episodes("seen", 5, seed=4)


def test_bad_split_arguments_raise():
    with pytest.raises(MetaWorldConfigError, match="unknown split 'test'"):
        make_episodes("test", 1)
    with pytest.raises(MetaWorldConfigError, match="`habit` must be in"):
        make_episodes("train", 1, habit=1.5)
    with pytest.raises(MetaWorldConfigError, match="unknown group 'door'"):
        make_episodes("seen", 1, groups=["door"])


def _replay(actions):
    """A policy that replays recorded actions chunk by chunk (MuJoCo is deterministic, so the outcome repeats)."""
    state = {"t": 0}

    def policy(batch):
        chunk = actions[state["t"] : state["t"] + 4]
        state["t"] += len(chunk)
        if len(chunk) < 4:
            chunk = np.concatenate([chunk, np.zeros((4 - len(chunk), 4), np.float32)])
        return chunk[None]

    return policy


def test_demos_are_cached_and_the_evaluator_names_the_task_that_was_done(tmp_path):
    pytest.importorskip("metaworld")
    from apt_studies.metaworld.demos import cached_demonstrations
    from apt_studies.metaworld.rollout import Simulator, evaluate

    demos = cached_demonstrations("seen", 2, seed=0, chunk_size=4, image_size=32, cache_dir=tmp_path, progress=False)
    assert len(demos.episodes) == demos.attempted == 2 and {e.group for e in demos.episodes} == set(GROUPS)
    first = demos.episode_index == 0
    length = int(first.sum())
    assert demos.images.shape == (len(demos), 32, 32, 3) and demos.states.shape == (len(demos), 4)
    assert demos.actions.shape == (len(demos), 4, 4) and np.all(np.abs(demos.actions) <= 1)
    assert demos.action_pad[first][-1].tolist() == [False, True, True, True]  # last step: 3 chunk slots past the end
    np.testing.assert_array_equal(demos.actions[first][1:, 0], demos.actions[first][:-1, 1])  # chunks shift by one
    assert np.array_equal(demos.step[first], np.arange(length))
    again = cached_demonstrations("seen", 2, seed=0, chunk_size=4, image_size=32, cache_dir=tmp_path, progress=False)
    assert again.seconds == demos.seconds and np.array_equal(again.images, demos.images)  # served from the cache
    assert len(list((tmp_path / "metaworld_demos").iterdir())) == 1

    push = demos.episodes[0]
    assert push.task == "push-v3"
    push_actions = demos.actions[first][:, 0]
    reach = dataclasses.replace(push, task="reach-v3", instruction="reach the yellow ball", split="counterfactual")
    sim = Simulator(image_size=32)
    try:
        done = evaluate(_replay(push_actions), [push], execute_steps=4, sim=sim, progress=False)
        habit = evaluate(_replay(push_actions), [reach], execute_steps=4, sim=sim, progress=False)
        idle = evaluate(lambda b: np.zeros((1, 4, 4)), [reach], max_steps=12, sim=sim, progress=False)
    finally:
        sim.close()
    assert done.outcomes == ("success",) and habit.outcomes == ("habitual",) and idle.outcomes == ("none",)
    assert habit.summary()["outcome/habitual"] == 1.0 and habit.summary()["success_rate/counterfactual"] == 0.0
    with pytest.raises(MetaWorldConfigError, match=r"\(B=1, chunk, 4\)"):
        evaluate(lambda b: np.zeros((1, 4, 2)), [reach], progress=False)
