"""The study runner: equal budgets, the baseline's VLM mode per codebase, and a complete run record."""

from __future__ import annotations

import logging

import pytest

from apt_lightning.bench.report import aggregate
from apt_lightning.bench.study import StudyConfig, run_study


def test_study_settings_follow_each_codebase():
    config = StudyConfig()
    pi0, groot = config.apt_config("pi0", "baseline", 0), config.apt_config("groot", "baseline", 0)
    assert (pi0.vlm_mode, pi0.resolved_vlm_lr) == ("full", config.lr)  # openpi: one optimiser for everything
    assert groot.vlm_mode == "frozen"  # GR00T: tune_llm=False
    apt = config.apt_config("pi0", "apt", 0)
    assert (apt.vlm_mode, apt.resolved_gate_lr, apt.lr) == ("frozen", 10 * config.lr, pi0.lr)
    assert config.scheduler("baseline").plan.is_joint and config.scheduler("apt").plan.switch_step == config.switch_step


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(archs=("pi05",)), "Unknown arch/method"),
        (dict(steps=10, switch_step=10), "`switch_step` must be in"),
        (dict(baseline_vlm_mode={"pi0": "full"}), "no entry for \\['groot'\\]"),
    ],
)
def test_study_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kwargs)


def test_run_study_trains_both_methods_for_the_same_steps(tmp_path):
    config = StudyConfig(archs=("groot",), seeds=(0,), steps=4, switch_step=2, episodes=4, eval_episodes=3, pretrain_vlm=False)
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    study = run_study(config, out=tmp_path, progress=False)
    assert lightning_log.level == level  # quieted during the study only, not for the rest of the process
    runs = {r["method"]: r for r in study["runs"]}
    assert set(runs) == {"baseline", "apt"}
    assert runs["baseline"]["steps"] == runs["apt"]["steps"] == 4
    assert set(runs["apt"]["success"]) == {"seen", "paraphrase", "counterfactual", "unseen_composition", "novel_layout"}
    assert runs["apt"]["gates"] and not runs["baseline"]["gates"]
    assert runs["apt"]["gates"][-1]["stage"] == 2
    assert (tmp_path / "checkpoints" / "groot-apt-seed0.ckpt").is_file()
    assert set(aggregate(study["runs"])["groot"]) == {"baseline", "apt"}
