"""The tabletop benchmark written as a LeRobotDataset, read back through LeRobotDataModule (LeRobot's reader,
statistics and pre-processor, a user tokenizer), trained on by the adapters and evaluated on the benchmark."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "lerobot",
    reason="LeRobot 0.6.1 is not installed here (it needs Python >= 3.12 and torch < 2.12): these tests run in the "
    "second step of .ci/run, in their own venv",
)

import numpy as np
import torch
from lerobot.configs.types import FeatureType
from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
from lerobot.utils.feature_utils import dataset_to_policy_features
from lerobot_helpers import ADAPTERS

from apt_lightning import APTConfig, StagePlan
from apt_lightning.integrations.lerobot import INSTRUCTION_MASK, LeRobotDataModule
from apt_lightning.integrations.lerobot.tiny import tiny_pi_config, tiny_pi_policy, tiny_tokenizer
from apt_studies.data import expert_trajectory
from apt_studies.evaluation import evaluate_policy
from apt_studies.lerobot_format import LeRobotBenchPolicy, write_lerobot_dataset
from apt_studies.rollout import rollout
from apt_studies.splits import make_episodes
from apt_studies.tokenizer import normalise
from apt_studies.vocabulary import vocabulary_words

REPO_ID = "apt_lightning/tabletop"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("lerobot") / "tabletop"
    write_lerobot_dataset(path, "train", n_episodes=3, seed=0, repo_id=REPO_ID)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(vocabulary_words())


def _config(kind, root):
    features = dataset_to_policy_features(LeRobotDatasetMetadata(REPO_ID, root=root).features)
    return tiny_pi_config(
        kind,
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={"action": features["action"]},
        tokenizer_max_length=24,
    )


def test_written_dataset_holds_the_expert_demonstrations(root):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset(REPO_ID, root=root)
    episodes = make_episodes("train", 3, 0)
    trajectories = [expert_trajectory(e) for e in episodes]
    kept = [(e, t) for e, t in zip(episodes, trajectories, strict=True) if t[2]]
    assert dataset.num_episodes == len(kept) and dataset.num_frames == sum(len(t[0]) for _, t in kept)
    episode, (positions, actions, _) = kept[0]
    first = dataset[1]
    assert np.allclose(first["observation.state"].numpy(), positions[1]) and np.allclose(first["action"], actions[1])
    assert first["task"] == " ".join(normalise(episode.instruction))
    assert first["observation.images.top"].shape == (3, 32, 32)


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_datamodule_batches_use_lerobot_stats_and_mark_the_instruction(kind, root, tokenizer):
    config = _config(kind, root)
    data = LeRobotDataModule(root, config, tokenizer, repo_id=REPO_ID, batch_size=4)
    data.setup("fit")
    samples = [data.dataset[i] for i in range(4)]
    batch = data.collate(samples)
    stats = data.dataset.meta.stats["observation.state"]
    raw = torch.stack([s["observation.state"] for s in samples])
    mean, std, q01, q99 = (torch.as_tensor(stats[k], dtype=torch.float32) for k in ("mean", "std", "q01", "q99"))
    # PI0 normalises the state by mean/std, PI05 maps its 1st..99th percentiles to [-1, 1]
    expected = (raw - mean) / (std + 1e-8) if kind == "pi0" else 2 * (raw - q01) / (q99 - q01) - 1
    assert torch.allclose(batch["observation.state"], expected, atol=1e-5)
    assert batch["action"].shape == (4, config.chunk_size, 2)
    mask, tokens = batch[INSTRUCTION_MASK], batch["observation.language.tokens"]
    for row, sample in enumerate(samples):
        assert tokenizer.decode(tokens[row][mask[row]]) == sample["task"]
    if kind == "pi0":  # PI0's prompt is the instruction (and a newline, which this tokenizer drops)
        assert torch.equal(mask, batch["observation.language.attention_mask"])
    else:  # PI05's prompt also holds "Task:", "State: <bins>": visible to Stage 1
        assert (batch["observation.language.attention_mask"] & ~mask).sum(1).min() > 2


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_adapter_trains_on_the_dataset_and_evaluates_on_the_benchmark(kind, root, tokenizer):
    config = _config(kind, root)
    data = LeRobotDataModule(root, config, tokenizer, repo_id=REPO_ID, batch_size=4)
    adapter = ADAPTERS[kind](tiny_pi_policy(kind, config), APTConfig(lr=1e-3))
    adapter.apt.prepare(StagePlan(first_stage=1))
    batch = next(iter(data.train_dataloader()))
    loss = adapter.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and adapter.policy.model.action_out_proj.weight.grad is not None
    bench_policy = LeRobotBenchPolicy(adapter, data)
    episodes = make_episodes("counterfactual", 2, seed=1000)
    result = rollout(lambda obs: bench_policy.sample_actions({**obs, "pixel_values": obs["image"]}), episodes, 4)
    assert result.steps.shape == (2,)
    scores = evaluate_policy(
        bench_policy, splits=("seen",), episodes=1, sensitivity_episodes=2, action_error_episodes=1
    )
    assert set(scores) >= {"success", "instruction_sensitivity", "action_error"}
    assert scores["instruction_sensitivity"] == 0.0  # Stage 1: the instruction cannot move the actions
