"""Learning curves (issue 10): recorded at the expected steps, shared by methods trained together, and free.

Recording evaluates the policy mid-training; it must not change what is trained (same final weights) nor the
policy's train/eval modes.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from apt_studies.report import curve_records, format_curve_table, mean_curves, plot_curves
from apt_studies.study import CURVE_SPLITS, LearningCurve, StudyConfig, run_study

TINY = dict(
    archs=("groot",),
    seeds=(0,),
    steps=5,
    switch_step=2,
    episodes=4,
    eval_episodes=2,
    pretrain_vlm=False,
    methods=("apt_dropout", "apt_dropout_guided"),
)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "groot-apt_dropout-seed0.ckpt", weights_only=False)["state_dict"]


def test_curves_are_recorded_and_do_not_change_training(tmp_path):
    plain = run_study(StudyConfig(**TINY), out=tmp_path / "plain", progress=False)
    config = StudyConfig(**TINY, curve_every=2, curve_episodes=3)
    curved = run_study(config, out=tmp_path / "curved", progress=False)

    assert all("curve" not in r for r in plain["runs"])
    runs = {r["method"]: r for r in curved["runs"]}
    for run in runs.values():
        assert [p["step"] for p in run["curve"]] == [2, 4, 5]  # every 2 steps, and the last step
        assert all(set(p) == {"step", *CURVE_SPLITS} and 0.0 <= p["seen"] <= 1.0 for p in run["curve"])
        assert run["curve_s"] > 0
    # one recording for the shared training, at each method's own guidance scale (equal in Stage 1: gates shut)
    assert runs["apt_dropout_guided"]["curve"][0] == runs["apt_dropout"]["curve"][0]

    # recording consumed no training randomness (language dropout draws from it) and restored module modes
    before, after = _weights(tmp_path / "plain"), _weights(tmp_path / "curved")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the final evaluation is that of the same policy too
    assert [r["success"] for r in plain["runs"]] == [r["success"] for r in curved["runs"]]


class _Failing(torch.nn.Module):
    """Draws from every global generator while sampling, then fails."""

    chunk_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.body, self.vlm = torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)

    def sample_actions(self, batch, noise=None):
        torch.randn(3), np.random.rand(), random.random()
        raise RuntimeError("boom")


def test_recorder_restores_modes_and_rng():
    policy = _Failing().train()
    policy.vlm.eval()  # e.g. a frozen VLM kept in eval mode while the rest trains
    recorder = LearningCurve(every=1, episodes=1, seed=0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    with pytest.raises(RuntimeError, match="boom"):  # modes and generators are restored even on failure
        recorder.record(policy, 1)
    assert policy.training and policy.body.training and not policy.vlm.training
    assert torch.equal(torch.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]


def test_curve_settings_are_checked():
    with pytest.raises(ValueError, match="`curve_every`"):
        StudyConfig(curve_every=0)
    with pytest.raises(ValueError, match="`curve_episodes`"):
        StudyConfig(curve_every=10, curve_episodes=0)


RUNS = [
    {
        "arch": "pi0",
        "method": "apt",
        "seed": seed,
        "switch_step": 2,
        "gates": [],
        "curve": [
            {"step": 2, "seen": 0.2 + seed / 10, "counterfactual": 0.1},
            {"step": 4, "seen": 0.5, "counterfactual": 0.3},
        ],
    }
    for seed in (0, 1)
] + [{"arch": "pi0", "method": "baseline", "seed": 0, "success": {"seen": 0.5}}]


def test_curves_are_averaged_over_seeds(tmp_path):
    curves = mean_curves(RUNS)
    assert list(curves) == [("pi0", "apt")]  # the run without a curve is skipped
    entry = curves[("pi0", "apt")]
    assert entry["steps"] == [2, 4] and entry["n"] == [2, 2]
    assert entry["seen"] == pytest.approx([0.25, 0.5]) and entry["counterfactual"] == pytest.approx([0.1, 0.3])
    assert [r["seed"] for r in curve_records(RUNS)] == [0, 1] and "gates" not in curve_records(RUNS)[0]
    table = format_curve_table(RUNS)
    assert "pi0 apt" in table and "0.25 / 0.10" in table and "0.50 / 0.30" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot_curves(RUNS, tmp_path / "curves.png").stat().st_size > 0
        assert plot_curves(RUNS[-1:], tmp_path / "none.png").stat().st_size > 0  # a note, no curve


def test_cli_passes_curve_options():
    spec = importlib.util.spec_from_file_location("apt_study", Path(__file__).parents[2] / "examples" / "apt_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config, _ = module.parse_args(["--curve-every", "100", "--curve-episodes", "20"])
    assert (config.curve_every, config.curve_episodes) == (100, 20)
    assert module.parse_args([])[0].curve_every is None
    chosen, _ = module.parse_args(["--language-dropout", "0.25", "--guidance-scale", "1.5", "--gate-lr", "0.02"])
    assert (chosen.language_dropout, chosen.guidance_scale, chosen.gate_lr) == (0.25, 1.5, 0.02)  # were ignored
    assert module.parse_args(["--threads", "2"])[0].threads == 2 and module.parse_args([])[0].threads == 1
