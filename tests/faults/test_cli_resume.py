"""Kill-then-resume through the command line: a SIGKILLed ``apt-lightning fit`` resumed with ``--ckpt_path``
ends with exactly the weights and per-step losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "configs"
MAX_STEPS = 4
CASES = {  # kill in Stage 2 for one policy, in Stage 1 before the switch for the other
    "groot_apt": {"switch": 2, "kill_after": 3},
    "pi0_apt": {"switch": 3, "kill_after": 2},
}


def _config(run_dir: Path, name: str, *, kill_after: int | None = None) -> Path:
    """The bundled config shrunk to a few steps on tiny data, checkpointing every step, logging every loss."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=MAX_STEPS, default_root_dir=str(run_dir), enable_progress_bar=False, logger=False)
    callbacks = []
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("APTStageScheduler"):
            callback["init_args"]["switch_at_step"] = CASES[name]["switch"]
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"].update(dirpath=str(run_dir / "ckpt"), every_n_train_steps=1, save_last=True)
        callbacks.append(callback)
    callbacks.append({"class_path": "cli_hooks.StepLossLog", "init_args": {"path": str(run_dir / "losses.jsonl")}})
    if kill_after is not None:
        callbacks.append({"class_path": "cli_hooks.KillAfterCheckpoint", "init_args": {"at_step": kill_after}})
    trainer["callbacks"] = callbacks
    config["model"]["init_args"]["apt_config"]["warmup_steps"] = 1
    config["data"].update(episodes=4, batch_size=8)  # several batches per epoch: the kill lands mid-epoch
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra: str) -> subprocess.Popen:
    """``apt-lightning fit`` as a user runs it (``python -m`` so the test needs no installed script)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "apt_studies.cli", "fit", "--config", str(config), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=120)
    return process.returncode, output[-3000:]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """For each config: an uninterrupted run, and a run SIGKILLed after a checkpoint then resumed by the CLI.

    All runs of all configs overlap (one thread each), so the module costs about three CLI runs of wall time.
    """
    root = tmp_path_factory.mktemp("cli_resume")
    started = {
        name: {
            "reference": _fit(_config(root / name / "reference", name)),
            "killed": _fit(_config(root / name / "resumed", name, kill_after=case["kill_after"])),
        }
        for name, case in CASES.items()
    }
    results = {}
    for name, processes in started.items():
        result = results[name] = {"root": root / name, "killed": _finish(processes["killed"])}
        if result["killed"][0] == -signal.SIGKILL:
            last = root / name / "resumed" / "ckpt" / "last.ckpt"
            saved = torch.load(last, weights_only=True)
            result["at_kill"] = {
                "logged_steps": sorted(_losses(root / name / "resumed")),
                "saved_step": saved["global_step"],
                "saved_epoch": saved["epoch"],
            }
            processes["resumed"] = _fit(_config(root / name / "resumed", name), "--ckpt_path", str(last))
    for name, processes in started.items():
        for run in ("reference", "resumed"):
            if run in processes:
                results[name][run] = _finish(processes[run])
    return results


@pytest.mark.parametrize("name", sorted(CASES))
def test_sigkilled_cli_fit_resumes_exactly_through_the_cli(runs, name):
    result, kill_after = runs[name], CASES[name]["kill_after"]
    root = result["root"]
    rc, output = result["killed"]
    assert rc == -signal.SIGKILL, output
    at_kill = result["at_kill"]  # the run died in the step after its checkpoint of step `kill_after`
    assert at_kill["saved_step"] == kill_after and at_kill["logged_steps"] == list(range(1, kill_after + 1))
    assert at_kill["saved_epoch"] == 0  # mid-epoch: the data loader's position must resume too
    rc, output = result["resumed"]
    assert rc == 0, output  # was rc 2: "Key must be a string, got: 0 ... Parsing of ckpt_path hyperparameters failed"
    rc, output = result["reference"]
    assert rc == 0, output

    expected, got = _losses(root / "reference"), _losses(root / "resumed")
    assert sorted(expected) == sorted(got) == list(range(1, MAX_STEPS + 1))
    assert got == expected  # bit-exact per-step losses, before and after the kill
    final = {run: torch.load(root / run / "ckpt" / "last.ckpt", weights_only=True) for run in ("reference", "resumed")}
    assert final["resumed"]["global_step"] == final["reference"]["global_step"] == MAX_STEPS
    weights, reference_weights = final["resumed"]["state_dict"], final["reference"]["state_dict"]
    assert weights.keys() == reference_weights.keys()
    unequal = [key for key in weights if not torch.equal(weights[key], reference_weights[key])]
    assert not unequal, f"{len(unequal)} tensors differ after resume, e.g. {unequal[:5]}"
