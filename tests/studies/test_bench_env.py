"""Scene generation, rendering, physics and the single-episode environment."""

from __future__ import annotations

import numpy as np
import pytest

from apt_studies import (
    EVAL_SPLITS,
    STATE_DIM,
    Episode,
    Scene,
    SceneObject,
    TabletopEnv,
    make_episodes,
    render,
    scripted_actions,
    split_names,
)
from apt_studies.physics import MAX_STEP, advance
from apt_studies.render import GRIPPER_RGB


def _two_object_episode() -> Episode:
    scene = Scene(
        objects=(SceneObject("red", "square", "large", 0.2, 0.5), SceneObject("blue", "circle", "small", 0.8, 0.5)),
        target=1,
    )
    return Episode(scene=scene, instruction="pick up the blue circle", ee_start=(0.5, 0.5))


@pytest.mark.parametrize("split", split_names())
def test_episodes_are_deterministic_per_seed(split: str) -> None:
    first, again, other = (
        make_episodes(split, 20, seed=3),
        make_episodes(split, 20, seed=3),
        make_episodes(split, 20, seed=4),
    )
    assert first == again
    assert first != other
    for a, b in zip(first[:5], again[:5], strict=False):
        np.testing.assert_array_equal(render(a.scene, a.ee_start), render(b.scene, b.ee_start))


def test_scenes_are_valid() -> None:
    for split in split_names():
        for episode in make_episodes(split, 100, seed=0):
            scene = episode.scene
            assert 3 <= len(scene.objects) <= 4
            assert len({o.pair for o in scene.objects}) == len(scene.objects), "colour+shape must identify the target"
            centres, radii = scene.centres(), scene.radii()
            gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) - radii[:, None] - radii[None]
            assert np.all(gaps[~np.eye(len(radii), dtype=bool)] > 0), "objects overlap"
            assert np.all(centres - radii[:, None] > 0) and np.all(centres + radii[:, None] < 1)
            assert np.all(np.linalg.norm(centres - np.array(episode.ee_start), axis=1) > radii), (
                "start touches an object"
            )


def test_random_scene_is_the_one_fresh_scene_generator() -> None:
    from apt_studies.scene import random_scene

    rng = np.random.default_rng(0)
    targets = []
    for _ in range(200):
        scene = random_scene(rng, 4, include=[("red", None, "small")], accept=lambda a: a[0] != "red")
        assert scene.target_object.colour == "red" and scene.target_object.size == "small"
        assert sum(o.colour == "red" for o in scene.objects) == 1  # distractors pass `accept`
        assert len({o.pair for o in scene.objects}) == 4
        targets.append(scene.target)
    assert set(targets) == {0, 1, 2, 3}  # the target's position is shuffled
    a, b = (random_scene(np.random.default_rng(7), 3) for _ in range(2))
    assert a == b  # a pure function of the generator state
    with pytest.raises(ValueError, match="distinct"):
        random_scene(rng, 3, include=[("red", "circle", None), ("red", "circle", "large")])
    with pytest.raises(RuntimeError, match="admitted"):
        random_scene(rng, 3, accept=lambda a: False, max_tries=50)


def test_render_shape_dtype_and_gripper() -> None:
    episode = make_episodes("seen", 1, seed=0)[0]
    image = render(episode.scene, episode.ee_start)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert render(episode.scene, episode.ee_start, size=64).shape == (64, 64, 3)
    x, y = episode.ee_start
    np.testing.assert_array_equal(render(episode.scene, (x, y), supersample=1)[int(y * 32), int(x * 32)], GRIPPER_RGB)
    moved = render(episode.scene, (1.0 - x, 1.0 - y))
    assert not np.array_equal(image, moved), "the gripper must be visible"


def test_physics_stops_at_contact_without_tunnelling() -> None:
    centres = np.array([[[0.5, 0.5]]])
    radii = np.array([[0.01]])  # thinner than one step: a point test could jump over it
    new_ee, contact = advance(np.array([[0.5 - 0.03, 0.5]]), np.array([[1.0, 0.0]]), centres, radii)
    assert contact[0] == 0
    np.testing.assert_allclose(new_ee[0], [0.49, 0.5], atol=1e-9)
    new_ee, contact = advance(np.array([[0.1, 0.1]]), np.array([[5.0, -1.0]]), centres, radii)
    assert contact[0] == -1
    np.testing.assert_allclose(new_ee[0], [0.1 + MAX_STEP, 0.1 - MAX_STEP])  # actions are clipped to [-1, 1]


def test_env_success_failure_and_timeout() -> None:
    episode = _two_object_episode()
    env = TabletopEnv(seed=0)
    obs = env.reset(episode)
    assert obs["state"].shape == (STATE_DIM,) and obs["state"].dtype == np.float32
    assert obs["image"].shape == (32, 32, 3)
    _, reward, done, info = env.step_chunk(np.tile([[1.0, 0.0]], (20, 1)))
    assert done and info["success"] and reward == 1.0 and info["contact"] == 1
    assert info["executed"] < 20, "the chunk stops early when the episode ends"
    with pytest.raises(RuntimeError):
        env.step_chunk(np.zeros((1, 2)))

    env.reset(episode)
    _, reward, done, info = env.step_chunk(np.tile([[-1.0, 0.0]], (20, 1)))
    assert done and not info["success"] and info["contact"] == 0 and reward == 0.0

    env = TabletopEnv(seed=0, max_steps=5)
    env.reset(episode)
    _, _, done, info = env.step_chunk(np.zeros((8, 2)))
    assert done and not info["success"] and info["contact"] == -1 and info["steps"] == 5


def test_env_reset_without_episode_is_seeded() -> None:
    a, b, c = (
        TabletopEnv(seed=1, split="counterfactual"),
        TabletopEnv(seed=1, split="counterfactual"),
        TabletopEnv(seed=2),
    )
    for _ in range(3):
        np.testing.assert_array_equal(a.reset()["image"], b.reset()["image"])
        assert a.episode == b.episode
    assert a.episode.split == "counterfactual"
    assert c.reset() is not None and c.episode != a.episode


@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_env_with_expert_chunks_succeeds(split: str) -> None:
    env = TabletopEnv(seed=0)
    successes = 0
    for episode in make_episodes(split, 30, seed=5):
        obs, done, info = env.reset(episode), False, {}
        while not done:
            obs, _, done, info = env.step_chunk(scripted_actions(episode.scene, obs["state"], 8))
        successes += info["success"]
    assert successes == 30


def test_env_reset_with_bare_scene() -> None:
    scene = _two_object_episode().scene
    env = TabletopEnv(seed=0)
    env.reset(scene)
    assert env.episode.scene == scene and env.instruction in ("pick up the blue circle", "pick the blue circle up")


def test_env_rollout_and_expert_trajectories_step_alike() -> None:
    """The three users of the stepping rule end every episode at the same step, contact and position."""
    from apt_studies import LockstepEpisodes, expert_trajectory, rollout, scripted_actions

    episodes = make_episodes("counterfactual", 12, seed=5) + make_episodes("novel_layout", 12, seed=5)

    def expert(batch):
        idx, state = batch["episode_index"].numpy(), batch["state"].double().numpy()
        return np.stack([scripted_actions(episodes[i].scene, state[j], 1) for j, i in enumerate(idx)])

    batched = rollout(expert, episodes, chunk_size=1)
    env = TabletopEnv()
    for i, episode in enumerate(episodes):
        positions, _, success = expert_trajectory(episode)
        env.reset(episode)
        done, info = False, {}
        while not done:
            observed = env.ee_pos.astype(np.float32).astype(np.float64)  # as the rollout's policy sees it
            _, _, done, info = env.step_chunk(scripted_actions(episode.scene, observed, 1))
        assert info["steps"] == len(positions) == batched.steps[i]
        assert info["contact"] == batched.contact[i] and info["success"] == success == batched.success[i]
        assert np.array_equal(env.ee_pos, batched.final_state[i])

    state = LockstepEpisodes(episodes[:2], max_steps=1)
    state.step(np.zeros((2, 2)))
    assert state.done.all() and (state.contact == -1).all()  # out of budget, nothing touched
    with pytest.raises(RuntimeError, match="has ended"):
        state.step(np.zeros((2, 2)))
