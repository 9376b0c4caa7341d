"""APT on a LeRobot policy, end to end from LeRobot-format data (tiny, random weights, offline, CPU).

1. The tabletop benchmark writes its expert demonstrations as a ``LeRobotDataset`` (v3.0, local).
2. LeRobot's own PI0 (or PI05) policy is built for that dataset's features (tiny Gemmas: no weights download).
3. ``LeRobotDataModule`` reads the dataset through LeRobot's reader, statistics and pre-processor.
4. ``PI0APT`` trains LeRobot's modules with ``APTStageScheduler``: Stage 1, then Stage 2.
5. The result is saved with LeRobot's ``save_pretrained`` (+ ``apt_fusion.safetensors``) and evaluated on the
   benchmark's splits through ``evaluate_policy``.

Needs the ``lerobot`` extra (Python >= 3.12)::

    python examples/lerobot_apt.py --policy pi0 --out /tmp/lerobot_apt

With a real policy, replace ``tiny_pi_policy(...)`` by ``PI0Policy.from_pretrained(...)`` and the tiny tokenizer
by the policy's own (saved locally); the APT lines (marked ``# APT``) stay the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl

from apt_lightning import APTConfig, APTStageScheduler  # APT
from apt_lightning.integrations.lerobot import PI0APT, PI05APT, LeRobotDataModule  # APT
from apt_lightning.integrations.lerobot.tiny import tiny_pi_config, tiny_pi_policy, tiny_tokenizer
from apt_studies.evaluation import evaluate_policy
from apt_studies.lerobot_format import LeRobotBenchPolicy, write_lerobot_dataset
from apt_studies.vocabulary import vocabulary_words

REPO_ID = "apt_lightning/tabletop"


def policy_for(kind: str, root: Path):
    """A tiny LeRobot policy whose features are the dataset's (as ``make_policy`` derives them)."""
    from lerobot.configs.types import FeatureType
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.utils.feature_utils import dataset_to_policy_features

    features = dataset_to_policy_features(LeRobotDatasetMetadata(REPO_ID, root=root).features)
    config = tiny_pi_config(
        kind,
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={"action": features["action"]},
        tokenizer_max_length=24 if kind == "pi05" else 12,  # PI05's prompt also holds the state
    )
    return tiny_pi_policy(kind, config)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", choices=["pi0", "pi05"], default="pi0")
    parser.add_argument("--out", type=Path, default=Path("lerobot_apt_out"))
    parser.add_argument("--episodes", type=int, default=20, help="demonstration episodes written to the dataset")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--switch", type=int, default=20, help="global step at which Stage 2 starts")
    parser.add_argument("--eval-episodes", type=int, default=8, help="episodes per benchmark split")
    args = parser.parse_args()

    root = args.out / "dataset"
    if not root.exists():
        write_lerobot_dataset(root, "train", n_episodes=args.episodes, seed=0, repo_id=REPO_ID)

    policy = policy_for(args.policy, root)
    tokenizer = tiny_tokenizer(vocabulary_words())
    data = LeRobotDataModule(root, policy.config, tokenizer, repo_id=REPO_ID, batch_size=8)
    adapter = (PI0APT if args.policy == "pi0" else PI05APT)(policy, APTConfig(lr=1e-3))  # APT
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[APTStageScheduler(switch_at_step=args.switch)],  # APT
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(adapter, datamodule=data)
    adapter.save_pretrained(args.out / "policy")  # APT: LeRobot's files + apt_fusion.safetensors

    results = evaluate_policy(
        LeRobotBenchPolicy(adapter, data),
        episodes=args.eval_episodes,
        sensitivity_episodes=8,
        action_error_episodes=4,
    )
    results["stage"] = int(adapter.apt.stage)
    print(json.dumps(results, indent=2, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
