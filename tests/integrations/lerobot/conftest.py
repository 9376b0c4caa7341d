"""LeRobot integration tests: they need LeRobot 0.6.1, which needs Python >= 3.12 and torch < 2.12, so they run
in their own venv (`.ci/run`, second step). Elsewhere (the main Python 3.11 / torch 2.13 suite) every module
here is skipped at import by `pytest.importorskip`, which says why."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny policies gain nothing from a second intra-op thread, and on a busy 2-core machine its spin-waits
    made calls 10x slower (3.2 s vs 0.35 s per benchmark query). Restored for other test folders."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny LeRobotDataset of the tabletop benchmark, a word-level tokenizer and a tiny SmolVLM, all local."""
    from lerobot_runs import write_assets

    return write_assets(tmp_path_factory.mktemp("plugin"))


@pytest.fixture(scope="session")
def smolvla_run(assets):
    """The checkpoints of one ``lerobot-train --policy.type=smolvla_apt`` run (4 steps, Stage 2 from step 2, saved
    every 2), shared by the plugin and ``lerobot-eval`` tests."""
    from lerobot_runs import train_smolvla_apt

    return train_smolvla_apt(assets)
