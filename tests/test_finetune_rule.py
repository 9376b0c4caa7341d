"""One rule for fine-tune vs resume, for every combination of ``finetune``, ``ckpt_path``, plan and checkpoint kind;
every refusal comes before the model's plan, step or weights change.

| model given to fit            | scheduler                       | ckpt_path         | result                       |
| ----------------------------- | ------------------------------- | ----------------- | ---------------------------- |
| loaded APT pretraining        | stage=2, finetune=True          | none              | fine-tune from step 0        |
| loaded APT pretraining        | stage=2, finetune=True          | the pretraining's | refused: it would resume it  |
| loaded APT pretraining        | stage=2, finetune=True          | the fine-tune's   | resumes the fine-tune        |
| loaded APT pretraining (S2)   | stage=1, finetune=True          | none              | refused unless warm_start    |
| loaded joint pretraining      | stage=2 (no finetune)           | none              | refused: use finetune=True   |
| fresh                         | the checkpoint's plan           | the pretraining's | resumes it                   |
| fresh                         | another plan                    | the pretraining's | refused                      |
| fresh, other fusion heads     | load_from_checkpoint            | -                 | refused, field named         |
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning import AptError, APTStageScheduler, ConfigError, StageMismatchError
from apt_lightning.models import PI0Policy, load_policy
from helpers import loader, make_policy, pretrain_checkpoints, trainer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """APT pretraining (switch at 2, 4 steps), joint pretraining (4 steps), and 2 steps of a fine-tune of the first."""
    path = pretrain_checkpoints(tmp_path_factory.mktemp("rule"))
    checkpoint = ModelCheckpoint(dirpath=path, filename="finetune", every_n_train_steps=2)
    callbacks = [APTStageScheduler(stage=2, finetune=True), checkpoint]
    trainer(2, callbacks, enable_checkpointing=True).fit(load_policy(path / "apt.ckpt"), loader())
    return path


def snapshot(policy):
    return policy.apt.plan, policy.apt.step, {k: v.clone() for k, v in policy.state_dict().items()}


def assert_unchanged(policy, before):
    plan, step, weights = before
    assert policy.apt.plan == plan and policy.apt.step == step
    assert all(torch.equal(v, weights[k]) for k, v in policy.state_dict().items())


def test_a_fine_tune_refuses_the_pretraining_checkpoint_as_ckpt_path(checkpoints):
    policy = load_policy(checkpoints / "apt.ckpt")
    before = snapshot(policy)
    with pytest.raises(StageMismatchError, match=r"pretraining run's \('stage1->stage2' plan, step 4\).*without"):
        trainer(6, [APTStageScheduler(stage=2, finetune=True)]).fit(
            policy, loader(), ckpt_path=checkpoints / "apt.ckpt"
        )
    assert_unchanged(policy, before)


def test_a_fine_tune_resumes_its_own_checkpoint(checkpoints):
    policy = load_policy(checkpoints / "apt.ckpt")
    fit = trainer(3, [APTStageScheduler(stage=2, finetune=True)])
    fit.fit(policy, loader(), ckpt_path=checkpoints / "finetune.ckpt")
    assert fit.global_step == 3 and policy.apt.step == 3 and policy.apt.stage == 2


def test_fine_tuning_stage_2_weights_under_a_stage_1_plan_is_refused_unless_a_warm_start(checkpoints):
    policy = load_policy(checkpoints / "apt.ckpt")
    before = snapshot(policy)
    with pytest.raises(StageMismatchError, match=r"into Stage 2 .* closes them.*warm_start=True"):
        trainer(1, [APTStageScheduler(stage=1, finetune=True)]).fit(policy, loader())
    assert_unchanged(policy, before)
    trainer(1, [APTStageScheduler(stage=1, finetune=True, warm_start=True)]).fit(policy, loader())
    assert policy.apt.stage == 1


def test_another_plan_on_loaded_weights_without_finetune_is_refused(checkpoints):
    policy = load_policy(checkpoints / "joint.ckpt")
    before = snapshot(policy)
    with pytest.raises(StageMismatchError, match=r"trained under the 'joint' plan .* finetune=True"):
        trainer(1, [APTStageScheduler(stage=2)]).fit(policy, loader())
    assert_unchanged(policy, before)


def test_a_fresh_model_resumes_under_the_checkpoints_plan_and_refuses_another(checkpoints):
    resumed = trainer(5, [APTStageScheduler(switch_at_step=2)])
    resumed.fit(make_policy("pi0"), loader(), ckpt_path=checkpoints / "apt.ckpt")
    assert resumed.global_step == 5 and resumed.lightning_module.apt.step == 5
    with pytest.raises(StageMismatchError, match="Resume with the same APTStageScheduler arguments"):
        trainer(5, [APTStageScheduler(switch_at_step=3)]).fit(
            make_policy("pi0"), loader(), ckpt_path=checkpoints / "apt.ckpt"
        )


def test_loading_into_a_model_with_other_fusion_heads_is_refused_by_name(checkpoints):
    # The reference policies compare their recorded arguments first; any module's APT record is compared after.
    with pytest.raises(
        AptError, match=r"`fusion_heads`: checkpoint 2, here 4|`fusion\.num_heads`: saved 2, this model 4"
    ):
        PI0Policy.load_from_checkpoint(checkpoints / "apt.ckpt", fusion_heads=4, weights_only=True)
    policy = PI0Policy(**_arguments(checkpoints, fusion_heads=4))
    with pytest.raises(ConfigError, match=r"`fusion\.num_heads`: saved 2, this model 4"):
        policy.apt.load_state_dict(torch.load(checkpoints / "apt.ckpt", weights_only=True)["apt"])


def _arguments(checkpoints, **changes):
    recorded = torch.load(checkpoints / "apt.ckpt", weights_only=True)["hyper_parameters"]
    return {**{k: v for k, v in recorded.items() if not k.startswith("_")}, **changes}
