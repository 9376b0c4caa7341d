"""``lerobot-eval`` on an APT policy, offline: the ``lerobot_env_apt`` plugin serves the tabletop benchmark as LeRobot
env type ``apt_tabletop``. LeRobot finds it by its distribution name, its features are the tabletop dataset's (so the
``lerobot-train`` checkpoint evaluates unchanged), LeRobot's own rollout scores the benchmark's success, and the real
``lerobot-eval`` entry point writes ``eval_info.json`` with ``pc_success`` per split."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip(
    "lerobot",
    reason="LeRobot 0.6.1 is not installed here (it needs Python >= 3.12 and torch < 2.12): these tests run in the "
    "second step of .ci/run, in their own venv",
)

import numpy as np
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
from lerobot.envs.factory import make_env, make_env_config
from lerobot.envs.utils import env_to_policy_features, preprocess_observation
from lerobot.scripts.lerobot_eval import rollout
from lerobot.utils.feature_utils import dataset_to_policy_features
from lerobot.utils.import_utils import register_third_party_plugins
from lerobot_runs import REPO_ID, run_cli
from torch import nn

from apt_lightning import ConfigError
from apt_studies.env import MAX_EPISODE_STEPS
from apt_studies.expert import scripted_actions
from apt_studies.render import render
from apt_studies.splits import make_episodes
from apt_studies.tokenizer import normalise

SPLITS = ("seen", "counterfactual")


def tabletop_config(**options):
    register_third_party_plugins()  # what lerobot-eval does first: imports every `lerobot_env_*` distribution
    return make_env_config("apt_tabletop", **options)


def test_env_type_is_found_by_lerobot_and_has_the_datasets_features(assets):
    config = tabletop_config()
    assert type(config).__module__.startswith("lerobot_env_apt.")
    dataset = dataset_to_policy_features(LeRobotDatasetMetadata(REPO_ID, root=assets / "dataset").features)
    assert env_to_policy_features(config) == dataset  # same keys, types and (channel-first) shapes
    small = tabletop_config(image_size=16)
    assert env_to_policy_features(small)["observation.images.top"].shape == (3, 16, 16)


def test_observations_and_instruction_are_the_benchmarks():
    envs = make_env(tabletop_config(task=",".join(SPLITS)), n_envs=2, use_async_envs=False)
    assert list(envs) == list(SPLITS) and all(list(tasks) == [0] for tasks in envs.values())
    for split, tasks in envs.items():
        vector = tasks[0]
        raw, _ = vector.reset(seed=[5, 6])
        batch = preprocess_observation(raw)
        assert set(batch) == {"observation.images.top", "observation.state"}
        assert batch["observation.images.top"].shape == (2, 3, 32, 32)
        for i, seed in enumerate((5, 6)):
            episode = make_episodes(split, 1, seed=seed)[0]  # the benchmark's own episode for (split, seed)
            assert vector.call("task_description")[i] == " ".join(normalise(episode.instruction))
            image = render(episode.scene, np.asarray(episode.ee_start), size=32)
            assert torch.equal(batch["observation.images.top"][i], torch.from_numpy(image).permute(2, 0, 1) / 255)
            assert torch.equal(batch["observation.state"][i], torch.tensor(episode.ee_start, dtype=torch.float32))
        assert vector.call("_max_episode_steps") == (MAX_EPISODE_STEPS, MAX_EPISODE_STEPS)
        vector.close()


class ScriptedPolicy(nn.Module):
    """The benchmark's expert behind LeRobot's ``select_action``, reaching for the target or (``wrong``) for another
    object; it reads each sub-env's scene, which a real policy cannot."""

    def __init__(self, vector, wrong: bool = False) -> None:
        super().__init__()
        self.vector, self.wrong = vector, wrong

    def reset(self) -> None:
        pass

    def select_action(self, batch) -> torch.Tensor:
        actions = []
        for env, ee in zip(self.vector.envs, batch["observation.state"].numpy(), strict=True):
            scene = env.episode.scene
            if self.wrong:
                scene = dataclasses.replace(scene, target=(scene.target + 1) % len(scene.objects))
            actions.append(scripted_actions(scene, ee, 1)[0])
        return torch.from_numpy(np.stack(actions))


@pytest.mark.parametrize("wrong", [False, True])
def test_lerobots_rollout_scores_the_benchmarks_success(wrong):
    vector = make_env(tabletop_config(task="counterfactual"), n_envs=3, use_async_envs=False)["counterfactual"][0]
    identity = lambda x: x  # noqa: E731  # the env type needs no processors; the expert takes raw observations
    data = rollout(vector, ScriptedPolicy(vector, wrong), identity, identity, identity, identity, seeds=[0, 1, 2])
    vector.close()
    assert data["done"][:, -1].all() and data["done"].shape[1] < MAX_EPISODE_STEPS  # all touched an object early
    end = data["done"].int().argmax(dim=1)  # each episode's last step (LeRobot autoresets a finished sub-env)
    in_episode = torch.arange(data["done"].shape[1]) <= end[:, None]
    success = (data["success"] & in_episode).any(dim=1)
    assert success.tolist() == [not wrong] * 3  # the target: success; another object: failure, not a timeout
    assert torch.equal((data["reward"] * in_episode).sum(dim=1), success.double())  # reward 1 exactly on success


def test_bad_env_options_fail_with_the_choices():
    with pytest.raises(ConfigError, match=r"`task`='seen,bogus': 'bogus' is not a split.*'counterfactual'"):
        tabletop_config(task="seen,bogus")
    with pytest.raises(ConfigError, match="`episode_length` must be a positive int"):
        tabletop_config(episode_length=0)


def test_lerobot_eval_runs_the_trained_apt_policy(smolvla_run, tmp_path):
    """The real ``lerobot-eval`` entry point on the ``lerobot-train`` checkpoint (``smolvla_apt``, Stage 2)."""
    out = tmp_path / "eval"
    run_cli(
        "lerobot-eval",
        f"--policy.path={smolvla_run / '000004/pretrained_model'}",
        "--policy.device=cpu",
        "--env.type=apt_tabletop",
        f"--env.task={','.join(SPLITS)}",
        "--eval.n_episodes=2",
        "--eval.batch_size=2",
        "--eval.use_async_envs=false",
        "--seed=0",
        f"--output_dir={out}",
    )
    info = json.loads((out / "eval_info.json").read_text())
    overall = info["overall"]
    assert overall["n_episodes"] == 2 * len(SPLITS)
    assert 0.0 <= overall["pc_success"] <= 100.0 and overall["eval_ep_s"] > 0
    assert set(info["per_group"]) == set(SPLITS)
    for group in info["per_group"].values():
        assert group["n_episodes"] == 2 and 0.0 <= group["pc_success"] <= 100.0
    for task in info["per_task"]:
        metrics = task["metrics"]
        assert len(metrics["successes"]) == 2
        assert [float(s) for s in metrics["successes"]] == metrics["sum_rewards"]  # reward 1 exactly on success
    assert all((out / "videos" / f"{split}_0" / "eval_episode_0.mp4").stat().st_size > 0 for split in SPLITS)
