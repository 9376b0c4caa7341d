"""LeRobot's own command-line entry points in a subprocess, and the assets and training run the plugin tests share
(session fixtures in ``conftest.py``). Imports nothing of LeRobot at module level: the main suite collects the
conftest that imports this module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ID = "apt_lightning/tabletop"


def run_cli(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run LeRobot's console script ``name`` (``lerobot-train``, ``lerobot-eval``) of this venv, offline, and
    assert it succeeded (its output tail is the failure message)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = Path(sys.executable).with_name(name)
    result = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def write_assets(base: Path) -> Path:
    """A tiny LeRobotDataset of the tabletop benchmark, a word-level tokenizer and a tiny SmolVLM, all local."""
    from apt_lightning.integrations.lerobot.tiny import tiny_tokenizer, write_tiny_smolvlm
    from apt_studies.lerobot_format import write_lerobot_dataset
    from apt_studies.vocabulary import vocabulary_words

    write_lerobot_dataset(base / "dataset", "train", n_episodes=3, seed=0, repo_id=REPO_ID)
    tiny_tokenizer(vocabulary_words()).save_pretrained(base / "tokenizer")
    write_tiny_smolvlm(base / "smolvlm", vocabulary_words())
    return base


def train_smolvla_apt(assets: Path) -> Path:
    """``lerobot-train --policy.type=smolvla_apt``: 4 steps, Stage 2 from step 2, a checkpoint every 2 steps.
    Returns the run's ``checkpoints`` directory."""
    out = assets / "run"
    run_cli(
        "lerobot-train",
        "--policy.type=smolvla_apt",
        "--policy.apt_switch_step=2",
        f"--policy.vlm_model_name={assets / 'smolvlm'}",
        "--policy.load_vlm_weights=false",
        "--policy.resize_imgs_with_padding=[32,32]",
        "--policy.num_vlm_layers=4",
        "--policy.chunk_size=4",
        "--policy.n_action_steps=4",
        "--policy.max_state_dim=8",
        "--policy.max_action_dim=8",
        "--policy.tokenizer_max_length=24",
        "--policy.num_steps=3",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        f"--dataset.repo_id={REPO_ID}",
        f"--dataset.root={assets / 'dataset'}",
        "--steps=4",
        "--batch_size=2",
        "--save_freq=2",
        "--num_workers=0",
        "--log_freq=1",
        "--wandb.enable=false",
        f"--output_dir={out}",
    )
    return out / "checkpoints"
