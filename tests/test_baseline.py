"""The joint baseline plan (ordinary training, no APT) and self-contained policy checkpoints."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning import JOINT, APTStageScheduler, ContractError, StageMismatchError, StagePlan
from apt_lightning.models import GR00TStylePolicy, PI0Policy, load_policy
from helpers import loader, make_batch, make_policy, trainer


def _noise(policy, seed=123):
    return torch.randn(2, policy.chunk_size, policy.noise_dim, generator=torch.Generator().manual_seed(seed))


def test_joint_scheduler_arguments():
    assert APTStageScheduler(stage="joint").plan == StagePlan(first_stage=JOINT)
    assert APTStageScheduler(stage="joint").plan.name == "joint"
    with pytest.raises(ValueError, match="`switch_at_step` needs `stage=1`"):
        APTStageScheduler(switch_at_step=3, stage="joint")
    with pytest.raises(ValueError, match="must be 1, 2 or 'joint'"):
        APTStageScheduler(stage=3)


def test_joint_masks_hide_nothing_and_actions_follow_the_instruction(arch):
    policy = make_policy(arch)
    policy.apt.prepare(StagePlan(first_stage=JOINT))
    policy.eval()
    assert policy.apt.sites == {}
    batch = make_batch("left", pad=1)
    masks = policy.apt.masks(batch["attention_mask"], batch["language_mask"])
    valid = batch["attention_mask"].bool()
    assert torch.equal(
        masks.vlm_attention[:, 0] | torch.eye(valid.shape[1], dtype=torch.bool),
        (valid[:, None, :] | torch.eye(valid.shape[1], dtype=torch.bool)).expand_as(masks.vlm_attention[:, 0]),
    )
    assert torch.equal(masks.expert_attention, batch["attention_mask"])
    assert torch.equal(masks.language, batch["language_mask"])
    noise = _noise(policy)
    diff = (
        (policy.sample_actions(make_batch("left"), noise) - policy.sample_actions(make_batch("right"), noise))
        .abs()
        .max()
    )
    assert diff > 1e-5  # the instruction reaches the expert from step 0


def test_a_blind_joint_prefix_hides_the_instruction_from_image_tokens_not_from_the_expert(arch):
    policy = make_policy(arch, joint_prefix="blind")
    policy.apt.prepare(StagePlan(first_stage=JOINT))
    policy.eval()
    batch = make_batch("left", pad=1)
    joint = policy.apt.masks(batch["attention_mask"], batch["language_mask"])
    apt = make_policy(arch)
    apt.apt.prepare(StagePlan(first_stage=1))
    stage1 = apt.apt.masks(batch["attention_mask"], batch["language_mask"])
    assert torch.equal(joint.vlm_attention, stage1.vlm_attention) and torch.equal(
        joint.position_ids, stage1.position_ids
    )
    assert torch.equal(joint.expert_attention, batch["attention_mask"].bool())  # language keys stay visible
    assert not torch.equal(stage1.expert_attention, joint.expert_attention)
    noise = _noise(policy)
    diff = (policy.sample_actions(make_batch("left"), noise) - policy.sample_actions(make_batch("right"), noise)).abs()
    assert diff.max() > 1e-5  # the instruction still reaches the expert from step 0
    with pytest.raises(ValueError, match="`joint_prefix` must be 'full' or 'blind'"):
        make_policy(arch, joint_prefix="causal")


@pytest.mark.parametrize("mode", ["full", "lora", "frozen"])
def test_joint_trains_the_vlm_as_vlm_mode_says(mode):
    policy = make_policy("groot", vlm_mode=mode)
    before = copy.deepcopy(policy.apt.vlm_module.state_dict())
    trainer(3, [APTStageScheduler(stage="joint")]).fit(policy, loader())
    after = policy.apt.vlm_module.state_dict()

    def current(key):  # peft keeps a wrapped layer's own weights under `base_layer`
        return after[key] if key in after else after[key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]]

    changed = {k for k in before if not torch.equal(before[k], current(k))}
    if mode == "full":
        assert changed  # the VLM learns from step 0, unlike APT's Stage 1
    else:
        assert not changed
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert bool(lora_b) == (mode == "lora")
    if mode == "lora":
        assert any(v.abs().sum() > 0 for v in lora_b)  # adapters start at zero and train from step 0
    assert {g["name"] for g in policy.trainer.optimizers[0].param_groups} == (
        {"expert"} if mode == "frozen" else {"expert", "vlm"}
    )


def test_joint_refuses_a_model_that_holds_fusion_blocks():
    policy = make_policy("groot")
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=2))
    with pytest.raises(ContractError, match="joint baseline"):
        policy.apt.prepare(StagePlan(first_stage=JOINT))


@pytest.mark.parametrize(
    "scheduler", [APTStageScheduler(switch_at_step=1), APTStageScheduler(stage="joint")], ids=["apt", "joint"]
)
def test_load_policy_restores_the_saved_stage_and_outputs(arch, scheduler, tmp_path):
    policy = make_policy(arch)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(3, [copy.deepcopy(scheduler), checkpoint], enable_checkpointing=True).fit(policy, loader())
    loaded = load_policy(tmp_path / "last.ckpt")
    assert type(loaded) is type(policy)
    assert loaded.apt.stage == policy.apt.stage == (2 if scheduler.plan.has_stage2 else JOINT)
    assert set(loaded.apt.sites) == set(policy.apt.sites)
    policy.eval()
    batch, noise = make_batch(["left", "right"]), _noise(policy)
    assert torch.equal(loaded.sample_actions(batch, noise), policy.sample_actions(batch, noise))


def test_resuming_a_joint_checkpoint_under_apt_is_refused(tmp_path):
    policy = make_policy("groot")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(2, [APTStageScheduler(stage="joint"), checkpoint], enable_checkpointing=True).fit(policy, loader())
    with pytest.raises(StageMismatchError, match="joint baseline"):
        trainer(4, [APTStageScheduler(switch_at_step=3)]).fit(
            make_policy("groot"), loader(), ckpt_path=tmp_path / "last.ckpt"
        )


def test_load_policy_names_the_fix_for_foreign_checkpoints(tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="load_from_checkpoint"):
        load_policy(path)


@pytest.mark.parametrize("cls", [PI0Policy, GR00TStylePolicy])
def test_checkpoints_store_every_constructor_argument_but_pretrained_paths(cls):
    expected = set(inspect.signature(cls.__init__).parameters) - {"self", *cls.pretrained_arguments}
    policy = cls(per_site_language=True)
    assert set(policy.hparams) - {"_class_path"} == expected
    assert policy.hparams["per_site_language"] is True and isinstance(policy.hparams["apt_config"], dict)
