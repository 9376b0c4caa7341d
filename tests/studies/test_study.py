"""The study runner: equal budgets, the baseline's VLM mode per codebase, and a complete run record."""

from __future__ import annotations

import logging

import pytest

from apt_studies.report import aggregate
from apt_studies.study import DEFAULT_METHODS, METHOD_NAMES, METHODS, StudyConfig, run_study


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
        (dict(methods=("apt_guided",)), "Unknown arch/method \\['apt_guided'\\]"),
        (dict(language_dropout=1.0), "`language_dropout` must be in \\(0, 1\\)"),
        (dict(guidance_scale=0.0), "`guidance_scale` must be > 0"),
    ],
)
def test_study_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kwargs)


def test_method_catalogue_derives_each_run():
    assert METHOD_NAMES == (
        "baseline",
        "baseline_frozen",
        "baseline_blind",
        "apt",
        "apt_dropout",
        "apt_dropout_guided",
        "apt_sigmoid",
        "apt_channel",
        "apt_per_site",
        "apt_stage2_only",
        "apt_head",
        "apt_ft_vlm",
        "apt_ft_vlm_no_ff",
        "apt_s1_0",
        "apt_s1_quarter",
        "baseline_habit",
        "apt_habit",
    )
    assert set(DEFAULT_METHODS) <= set(METHOD_NAMES) and all(type(m).__dataclass_params__.frozen for m in METHODS)
    task_methods = tuple(m.name for m in METHODS if not m.pretrain_only)
    config = StudyConfig(methods=task_methods, language_dropout=0.25, guidance_scale=1.5)
    frozen = config.apt_config("pi0", "baseline_frozen", 0)
    assert (frozen.vlm_mode, frozen.language_dropout) == ("frozen", 0.0)
    assert config.apt_config("pi0", "apt", 0).language_dropout == 0.0
    assert config.apt_config("pi0", "apt_dropout", 0).language_dropout == 0.25
    assert [config.eval_guidance(m) for m in task_methods] == [1.0] * 5 + [1.5] + [1.0] * 7
    assert config.scheduler("apt_stage2_only").plan.first_stage == 2 and config.scheduler("apt").plan.first_stage != 2
    assert config.trained_as("pi0", "apt_stage2_only") == "apt_stage2_only"
    blind = config.apt_config("groot", "baseline_blind", 0)
    assert (blind.joint_prefix, blind.vlm_mode) == ("blind", "frozen") and config.scheduler(
        "baseline_blind"
    ).plan.is_joint
    assert config.trained_as("groot", "baseline_blind") == "baseline_blind"  # not the baseline's training
    assert config.trained_as("groot", "apt_sigmoid") == "apt_sigmoid" != config.trained_as("groot", "apt_channel")
    # one training per distinct (plan, APTConfig): guided reuses apt_dropout; GR00T's default baseline is frozen
    assert config.trained_as("pi0", "apt_dropout_guided") == "apt_dropout"
    assert config.trained_as("pi0", "baseline_frozen") == "baseline_frozen"
    assert config.trained_as("groot", "baseline_frozen") == "baseline"
    assert StudyConfig(methods=("apt_dropout_guided",)).trained_as("pi0", "apt_dropout_guided") == "apt_dropout_guided"
    # the head's own language path exists on GR00T only: pi0's apt_head is its apt
    assert config.trained_as("pi0", "apt_head") == "apt" and config.trained_as("groot", "apt_head") == "apt_head"
    assert config.head_language("groot", "apt_head") and not config.head_language("pi0", "apt_head")


def test_run_study_trains_both_methods_for_the_same_steps(tmp_path):
    config = StudyConfig(
        archs=("groot",),
        seeds=(0,),
        steps=4,
        switch_step=2,
        episodes=4,
        eval_episodes=3,
        pretrain_vlm=False,
        methods=("baseline", "apt", "apt_dropout", "apt_dropout_guided"),
    )
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    study = run_study(config, out=tmp_path, progress=False)
    assert lightning_log.level == level  # quieted during the study only, not for the rest of the process
    runs = {r["method"]: r for r in study["runs"]}
    assert set(runs) == {"baseline", "apt", "apt_dropout", "apt_dropout_guided"}
    assert runs["baseline"]["steps"] == runs["apt"]["steps"] == 4
    guided, plain = runs["apt_dropout_guided"], runs["apt_dropout"]
    assert guided["trained_as"] == "apt_dropout" and guided["train_s"] == plain["train_s"]  # trained once
    assert (guided["guidance_scale"], plain["guidance_scale"]) == (config.guidance_scale, 1.0)
    assert plain["language_dropout"] == config.language_dropout and runs["apt"]["language_dropout"] == 0.0
    assert sum(v for k, v in runs["apt"]["outcomes"]["counterfactual"].items()) == pytest.approx(1.0)
    assert set(runs["apt"]["success"]) == {"seen", "paraphrase", "counterfactual", "unseen_composition", "novel_layout"}
    assert runs["apt"]["gates"] and not runs["baseline"]["gates"]
    assert runs["apt"]["gates"][-1]["stage"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "groot-apt-seed0.ckpt",
        "groot-apt_dropout-seed0.ckpt",
        "groot-baseline-seed0.ckpt",
    ]
    summary = aggregate(study["runs"])
    assert list(summary["groot"]) == ["baseline", "apt", "apt_dropout", "apt_dropout_guided"]
    assert set(summary["groot"]["apt"]["outcomes"]["counterfactual"]) == {"success", "habitual", "other", "none"}
