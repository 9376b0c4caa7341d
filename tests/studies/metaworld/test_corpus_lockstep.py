"""Pretraining corpus (own seeded starts, recorded and replayable) and lockstep rollouts."""

import dataclasses

import numpy as np
import pytest

import apt_studies.metaworld  # noqa: F401  (headless EGL defaults, before metaworld imports mujoco)
from apt_studies.metaworld.corpus import CORPUS_TASKS, collect_corpus, episode_seed
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.groups import GROUPS
from apt_studies.metaworld.tasks import INSTRUCTIONS

pytest.importorskip("metaworld")


def test_corpus_covers_the_other_tasks_with_recorded_replayable_starts():
    from apt_studies.metaworld.sim import make_env, proprioception, reset_to

    assert len(CORPUS_TASKS) == 45 and not {t for g in GROUPS.values() for t in g.tasks} & set(CORPUS_TASKS)
    tasks = ("button-press-topdown-v3", "drawer-close-v3")
    corpus = collect_corpus(1, seed=0, chunk_size=4, tasks=tasks, stride=3, image_size=32, progress=False)
    assert [e.task for e in corpus.episodes] == list(tasks) and corpus.attempted == 2
    assert np.all(corpus.step % 3 == 0) and corpus.images.shape[1:] == (32, 32, 3)
    for i, episode in enumerate(corpus.episodes):
        assert episode.seed == episode_seed(0, episode.task, 0)
        assert episode.instruction in INSTRUCTIONS[episode.task].training
        obs = reset_to(make_env(episode.task), episode.rand_vec)  # the recorded start replays exactly
        np.testing.assert_array_equal(proprioception(obs), corpus.states[corpus.episode_index == i][0])
    assert episode_seed(0, tasks[0], 0) != episode_seed(1, tasks[0], 0) != episode_seed(0, tasks[0], 1)
    with pytest.raises(MetaWorldConfigError, match="not a corpus task"):
        collect_corpus(1, tasks=("push-v3",), progress=False)


def test_lockstep_rollouts_keep_episodes_apart(tmp_path):
    from apt_studies.metaworld.demos import cached_demonstrations
    from apt_studies.metaworld.lockstep import EnvPool, evaluate_lockstep

    demos = cached_demonstrations("seen", 1, seed=0, chunk_size=4, image_size=32, cache_dir=tmp_path, progress=False)
    push = demos.episodes[0]
    actions = demos.actions[:, 0]
    reach = dataclasses.replace(push, task="reach-v3", instruction="reach the yellow ball", split="counterfactual")
    counters = {}

    def replay(batch):  # each episode replays the push demonstration from its own position
        chunks = []
        for index in batch["episode_index"].tolist():
            t = counters.get(index, 0)
            chunk = actions[t : t + 4]
            counters[index] = t + 4
            chunks.append(np.concatenate([chunk, np.zeros((4 - len(chunk), 4), np.float32)]))
        return np.stack(chunks)

    pool = EnvPool(image_size=32)
    try:
        result = evaluate_lockstep(replay, [push, reach, reach], batch_size=3, execute_steps=4, pool=pool)
        idle = evaluate_lockstep(lambda b: np.zeros((len(b["state"]), 4, 4)), [reach], max_steps=8, pool=pool)
    finally:
        pool.close()
    assert result.outcomes == ("success", "habitual", "habitual") and idle.outcomes == ("none",)
    assert result.steps[0] == result.steps[1] == len(actions) and idle.steps[0] == 8
    with pytest.raises(MetaWorldConfigError, match="batch_size"):
        evaluate_lockstep(replay, [push], batch_size=0)
