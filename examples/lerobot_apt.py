"""APT through LeRobot's own command lines, end to end: ``lerobot-train``, ``lerobot-eval``, ``select_action``.

Tiny, random weights, offline, CPU. What a LeRobot user runs, with APT's plugins installed and no APT code:

1. The tabletop benchmark writes its expert demonstrations as a ``LeRobotDataset`` (v3.0, local), and a tiny
   SmolVLM (config, processor, word-level tokenizer) is written locally, so nothing is downloaded.
2. ``lerobot-train --policy.type=smolvla_apt --policy.apt_switch_step=S``: LeRobot's loop, optimizer and checkpoints;
   Stage 1 (vision-action prior, VLM frozen, instruction hidden) until optimizer step S, then Stage 2.
3. ``lerobot-eval --env.type=apt_tabletop --env.task=seen,counterfactual``: LeRobot's rollout on the benchmark's
   splits (``eval_info.json``: ``pc_success`` per split).
4. Deployment as on a robot: ``get_policy_class(cfg.type).from_pretrained``, ``make_pre_post_processors(cfg,
   pretrained_path=...)``, ``select_action`` on one observation of the env.

Needs the ``lerobot`` extra (Python >= 3.12) and both plugins::

    pip install -e ".[lerobot]" -e plugins/lerobot_policy_apt -e plugins/lerobot_env_apt
    python examples/lerobot_apt.py --out /tmp/lerobot_apt

With a real policy, drop the ``--policy.vlm_model_name``/size options (SmolVLA loads its Hub VLM), or use
``--policy.type=pi0_apt --policy.pretrained_path=lerobot/pi0_base``; the APT options (``--policy.apt_*``) stay the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ID = "apt_lightning/tabletop"


def lerobot(script: str, *args: str) -> None:
    """Run one of LeRobot's console scripts (``lerobot-train``, ``lerobot-eval``) of this Python, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(Path(sys.executable).with_name(script)), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("lerobot_apt_out"))
    parser.add_argument("--episodes", type=int, default=20, help="demonstration episodes written to the dataset")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of lerobot-train")
    parser.add_argument("--switch", type=int, default=20, help="optimizer step at which Stage 2 starts")
    parser.add_argument("--eval-episodes", type=int, default=8, help="lerobot-eval episodes per benchmark split")
    args = parser.parse_args()
    if not 0 < args.switch < args.steps:
        parser.error(f"--switch must lie in (0, --steps={args.steps}), got {args.switch}: both stages should run")

    from apt_lightning.integrations.lerobot.tiny import write_tiny_smolvlm
    from apt_studies.lerobot_format import write_lerobot_dataset
    from apt_studies.vocabulary import vocabulary_words

    dataset, vlm, run = args.out / "dataset", args.out / "smolvlm", args.out / "train"
    if not dataset.exists():
        write_lerobot_dataset(dataset, "train", n_episodes=args.episodes, seed=0, repo_id=REPO_ID)
    write_tiny_smolvlm(vlm, vocabulary_words())

    # 2. Train: LeRobot's CLI, APT's options. The tiny SmolVLM replaces the Hub VLM (random weights).
    if not (run / "checkpoints/last").exists():
        lerobot(
            "lerobot-train",
            "--policy.type=smolvla_apt",
            f"--policy.apt_switch_step={args.switch}",
            f"--policy.vlm_model_name={vlm}",
            "--policy.load_vlm_weights=false",
            "--policy.resize_imgs_with_padding=[32,32]",
            "--policy.num_vlm_layers=4",
            "--policy.chunk_size=4",
            "--policy.n_action_steps=4",
            "--policy.max_state_dim=8",
            "--policy.max_action_dim=8",
            "--policy.tokenizer_max_length=24",
            "--policy.device=cpu",
            "--policy.push_to_hub=false",
            f"--dataset.repo_id={REPO_ID}",
            f"--dataset.root={dataset}",
            f"--steps={args.steps}",
            "--batch_size=8",
            f"--save_freq={args.steps}",
            "--num_workers=0",
            "--wandb.enable=false",
            f"--output_dir={run}",
        )
    checkpoint = run / "checkpoints/last/pretrained_model"

    # 3. Evaluate: LeRobot's rollout on the benchmark's splits.
    evaluation = args.out / "eval"
    lerobot(
        "lerobot-eval",
        f"--policy.path={checkpoint}",
        "--policy.device=cpu",
        "--env.type=apt_tabletop",
        "--env.task=seen,counterfactual",
        f"--eval.n_episodes={args.eval_episodes}",
        f"--eval.batch_size={min(args.eval_episodes, 4)}",
        "--eval.use_async_envs=false",
        "--seed=0",
        f"--output_dir={evaluation}",
    )
    info = json.loads((evaluation / "eval_info.json").read_text())

    # 4. Deploy: LeRobot's loaders and select_action, as a robot loop calls them.
    import torch
    from lerobot.configs import PreTrainedConfig
    from lerobot.envs.utils import preprocess_observation
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()  # imports lerobot_policy_apt and lerobot_env_apt, as LeRobot's scripts do
    from lerobot_env_apt import TabletopGymEnv

    config = PreTrainedConfig.from_pretrained(checkpoint)
    policy = get_policy_class(config.type).from_pretrained(checkpoint)
    preprocessor, postprocessor = make_pre_post_processors(config, pretrained_path=str(checkpoint))
    env = TabletopGymEnv("counterfactual")
    observation, _ = env.reset(seed=0)
    batch = preprocess_observation(
        {"pixels": {"top": observation["pixels"]["top"][None]}, "agent_pos": observation["agent_pos"][None]}
    )
    batch["task"] = [env.task_description]
    with torch.inference_mode():
        action = postprocessor(policy.select_action(preprocessor(batch)))

    results = {
        "policy": config.type,
        "apt_step": policy.apt.step,
        "apt_stage": int(policy.apt.stage),
        "pc_success": {split: group["pc_success"] for split, group in info["per_group"].items()},
        "instruction": env.task_description,
        "first_action": [round(float(a), 4) for a in action[0]],
    }
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
