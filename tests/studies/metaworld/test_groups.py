"""Shared-scene groups: identical first frames in pixels, experts succeed, criteria agree with Meta-World's."""

import numpy as np
import pytest

import apt_studies.metaworld  # noqa: F401  (headless EGL defaults, before metaworld imports mujoco)

pytest.importorskip("metaworld")

from apt_studies.metaworld.camera import Camera, FrameRenderer
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.groups import GROUPS, get_group, group_of
from apt_studies.metaworld.sim import make_env as _make_env

SIZE = 64
_ENVS: dict = {}


def make_env(task):
    """One env per task for the whole module: building one parses its model (~0.3 s)."""
    if task not in _ENVS:
        _ENVS[task] = _make_env(task)
    return _ENVS[task]


def first_frames(group, vec):
    frames = []
    for task in group.tasks:
        env = make_env(task)
        group.reset(env, vec)
        renderer = FrameRenderer(env.model, SIZE)
        frames.append(renderer.render(env.data, group.markers(vec)))
        renderer.close()
    return frames


@pytest.mark.parametrize("name", sorted(GROUPS))
@pytest.mark.parametrize("novel", [False, True])
def test_first_frame_is_identical_across_a_group(name, novel):
    group = GROUPS[name]
    vec = group.sample(np.random.default_rng(3), novel=novel)
    assert group.in_training_box(vec) is not novel
    frames = first_frames(group, vec)
    assert frames[0].shape == (SIZE, SIZE, 3) and frames[0].std() > 10  # a real picture, not a blank buffer
    for task, frame in zip(group.tasks[1:], frames[1:], strict=True):
        assert np.array_equal(frames[0], frame), (
            f"{task} differs from {group.tasks[0]} in {np.any(frames[0] != frame, -1).sum()} px"
        )


def test_the_goal_marker_is_drawn_and_moves_with_the_goal():
    group = GROUPS["puck"]
    vec = group.sample(np.random.default_rng(0))
    moved = vec.copy()
    moved[3] = -vec[3]
    env = make_env("push-v3")
    group.reset(env, vec)
    renderer = FrameRenderer(env.model, SIZE)
    bare, marked, elsewhere = (renderer.render(env.data, m) for m in ((), group.markers(vec), group.markers(moved)))
    assert np.any(bare != marked) and np.any(marked != elsewhere)


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_experts_succeed_and_only_their_own_criterion_holds(name):
    from metaworld.policies import ENV_POLICY_MAP

    group = GROUPS[name]
    vec = group.sample(np.random.default_rng(1))
    for task in group.tasks:
        env = make_env(task)
        obs = start = group.reset(env, vec)
        policy = ENV_POLICY_MAP[task]()
        for _ in range(200):
            obs, _, _, _, info = env.step(np.clip(policy.get_action(obs), -1, 1))
            met = group.criteria(env, vec, start)
            if any(met.values()):
                break
        assert met == {t: t == task for t in group.tasks}, task
        assert info["success"] == 1.0, f"{task}: our criterion holds but Meta-World's does not"


def test_stick_tasks_are_not_a_group_and_errors_name_the_fix():
    assert group_of("stick-push-v3") is None and group_of("reach-v3") is GROUPS["puck"]
    with pytest.raises(MetaWorldConfigError, match="unknown group 'stick'"):
        get_group("stick")
    group = GROUPS["puck"]
    with pytest.raises(MetaWorldConfigError, match="sample"):
        group.reset(make_env("reach-v3"), np.array([0.0, 0.8, 0.02, 0.0, 0.85, 0.2]))
    with pytest.raises(MetaWorldConfigError, match="rand vec of shape"):
        group.reset(make_env("reach-v3"), np.zeros(3))
    with pytest.raises(MetaWorldConfigError, match="elevation"):
        Camera(elevation=10.0)
    with pytest.raises(MetaWorldConfigError, match="unknown Meta-World task"):
        _make_env("push-v2")
