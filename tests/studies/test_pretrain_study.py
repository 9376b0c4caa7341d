"""The pretraining regime: catalogue entries, cached pretraining shared by methods, exact step-0 fine-tuning,
and study numbers that do not depend on the caller's torch thread settings."""

from __future__ import annotations

import pytest
import torch

from apt_studies.determinism import fixed_threads
from apt_studies.pretrain_study import Step0Check
from apt_studies.study import PRETRAIN_METHODS, StudyConfig, run_study

TINY_PRETRAIN = dict(
    archs=("groot",),
    seeds=(0,),
    steps=2,
    episodes=4,
    eval_episodes=2,
    pretrain_vlm=False,
    regime="pretrain",
    pretrain_steps=4,
    corpus_layouts=4,
    corpus_episodes_per_layout=4,
    save_checkpoints=False,
)


def test_pretrain_catalogue_entries() -> None:
    with pytest.raises(ValueError, match="exist in the 'pretrain' regime only"):
        StudyConfig(methods=("apt_habit",))
    with pytest.raises(ValueError, match="`regime` must be one of"):
        StudyConfig(regime="corpus")
    config = StudyConfig(regime="pretrain", methods=PRETRAIN_METHODS)
    ft_vlm = config.apt_config("pi0", "apt_ft_vlm", 0)
    assert (ft_vlm.vlm_mode, ft_vlm.resolved_vlm_lr) == ("full", pytest.approx(0.1 * config.lr))
    assert config.scheduler("apt").plan.first_stage == 2 and config.scheduler("apt").plan.switch_step is None
    assert config.scheduler("baseline").plan.is_joint and config.scheduler("baseline_habit").plan.is_joint
    assert [config.stage1_share(m) for m in ("apt", "apt_s1_quarter", "apt_s1_0", "apt_habit", "baseline")] == [
        0.5,
        0.25,
        0.0,
        0.5,
        None,
    ]
    assert [config.trained_as("pi0", m) for m in PRETRAIN_METHODS] == list(PRETRAIN_METHODS)  # seven trainings
    assert config.pretraining_key("apt_habit") != config.pretraining_key("apt")
    assert StudyConfig().pretraining_key("apt") == ()  # the task regime is unchanged


@pytest.mark.slow  # ~15 s alone: two pretrainings, three fine-tunings, three evaluations
def test_pretrained_weights_are_cached_shared_and_fine_tuning_starts_exactly_there(tmp_path) -> None:
    config = StudyConfig(**TINY_PRETRAIN, methods=("baseline", "apt", "apt_ft_vlm"))
    study = run_study(config, progress=False, cache_dir=tmp_path)
    runs = {r["method"]: r for r in study["runs"]}
    assert all(r["step0_max_diff"] == 0.0 for r in runs.values()), {m: r["step0_max_diff"] for m, r in runs.items()}
    cached = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pretrained-"))
    assert len(cached) == 2  # apt and apt_ft_vlm share one pretraining
    assert runs["apt"]["pretrain_s"] == runs["apt_ft_vlm"]["pretrain_s"]
    assert runs["apt"]["pretrain_switch_step"] == 2 and runs["baseline"]["pretrain_switch_step"] is None
    assert runs["apt"]["gates"][0]["stage"] == 2  # fine-tuning is Stage 2 from its first step
    assert set(runs["apt"]["validation"]) == {"counterfactual", "seen"}
    again = run_study(StudyConfig(**TINY_PRETRAIN, methods=("apt",)), progress=False, cache_dir=tmp_path)
    assert again["runs"][0]["pretrain_s"] == runs["apt"]["pretrain_s"]  # reused, not retrained
    assert again["runs"][0]["success"] == runs["apt"]["success"]


def test_step0_check_reports_a_changed_model() -> None:
    class Policy(torch.nn.Module):
        def sample_actions(self, batch, noise):
            return noise * 2

    probe = ({"x": torch.zeros(1)}, torch.ones(2, 3))
    check = Step0Check(probe, torch.full((2, 3), 2.0))
    check.on_train_start(None, Policy())
    assert check.max_diff == 0.0
    check = Step0Check(probe, torch.full((2, 3), 2.5))
    check.on_train_start(None, Policy())
    assert check.max_diff == pytest.approx(0.5)


def test_study_numbers_do_not_depend_on_the_callers_threads() -> None:
    config = StudyConfig(
        archs=("pi0",),
        methods=("apt",),
        seeds=(0,),
        steps=3,
        switch_step=1,
        episodes=3,
        eval_episodes=2,
        pretrain_vlm=False,
    )
    before = torch.get_num_threads()
    results = []
    for outer in (1, 2):
        torch.set_num_threads(outer)
        try:
            study = run_study(config, progress=False)
        finally:
            torch.set_num_threads(before)
        assert study["torch_threads"] == config.threads == 1 and study["deterministic_algorithms"]
        results.append({k: study["runs"][0][k] for k in ("success", "action_error", "instruction_sensitivity")})
    assert results[0] == results[1]
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()


def test_fixed_threads_pins_and_restores() -> None:
    before = torch.get_num_threads()
    with fixed_threads(1) as threads:
        assert torch.get_num_threads() == threads == 1 and torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError, match="`threads` must be a positive integer"), fixed_threads(0):
        pass
