"""Bad input fails early with an error that names the problem and the fix."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from apt_lightning import (
    APT,
    APTConfig,
    AptError,
    APTMixin,
    APTStageScheduler,
    ConfigError,
    ContractError,
    FusionConfig,
    GatedCrossAttentionBlock,
    LanguageMaskError,
    NoMatchingTargetError,
    NonFiniteGateError,
    RemovedNameError,
    StageMismatchError,
    StagePlan,
)
from apt_lightning.fit_checks import check_strategy
from helpers import loader, make_batch, make_policy, trainer


class Incomplete(APTMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.head(self.backbone(batch["state"])).sum()


def test_a_module_without_a_controller_is_told_how_to_add_one():
    with pytest.raises(ContractError, match=r"Incomplete has no APT controller: assign `self\.apt = APT\(self, vlm="):
        trainer(1, [APTStageScheduler()]).fit(Incomplete(), loader())


def test_controller_declarations_list_every_missing_piece():
    with pytest.raises(ContractError) as info:
        APT(Incomplete(), vlm=None, fusion=None)
    message = str(info.value)
    assert "`vlm` is not set" in message
    assert "`fusion` must be a FusionConfig, got NoneType" in message


def test_controller_arguments_are_checked_at_construction():
    module = Incomplete()
    with pytest.raises(ContractError, match=r"`vlm`='backbon' names no module. Closest names: \['backbone'\]"):
        APT(module, vlm="backbon", fusion=FusionConfig(target_modules=["head"]))
    with pytest.raises(ContractError, match="`config` must be an APTConfig, got dict"):
        APT(module, vlm="backbone", fusion=FusionConfig(target_modules=["head"]), config={"lr": 1.0})
    with pytest.raises(ContractError, match=r"must be `APT\(self, vlm=\.\.\., fusion=\.\.\.\)`"):
        module.apt = APT(Incomplete(), vlm="backbone", fusion=FusionConfig(target_modules=["head"]))  # another module's


def test_pre_1_0_names_raise_an_error_naming_their_replacement():
    policy = make_policy("pi0")
    with pytest.raises(RemovedNameError, match=r"`PI0Policy.apt_set_stage` was removed.*StagePlan"):
        policy.apt_set_stage(2)
    with pytest.raises(RemovedNameError, match=r"apt_prepare` was removed.*self\.apt\.prepare\(plan\)"):
        policy.apt_prepare(StagePlan())
    with pytest.raises(RemovedNameError, match=r"apt_set_step` was removed.*advances self\.apt\.step"):
        policy.apt_set_step(3)
    with pytest.raises(RemovedNameError, match=r"`PI0Policy.apt_config` was removed.*APT\(self, config=APTConfig"):
        policy.apt_config = APTConfig(vlm_mode="lora")  # once silently ignored: no LoRA
    assert policy.apt.config.vlm_mode == "frozen"
    assert isinstance(RemovedNameError("x"), AttributeError)  # hasattr() keeps working


def test_a_subclass_declaring_a_pre_1_0_attribute_fails_at_class_definition():
    with pytest.raises(RemovedNameError, match=r"`Declared.apt_fusion` was removed.*FusionConfig"):

        class Declared(APTMixin, pl.LightningModule):
            apt_fusion = FusionConfig(target_modules=["head"])


def test_callback_on_module_without_mixin():
    with pytest.raises(ContractError, match=r"has no APT controller.*APTMixin.*self\.apt = APT"):
        trainer(1, [APTStageScheduler()]).fit(BoringModel())


@pytest.mark.parametrize(
    "mask, match",
    [
        (lambda b: b["language_mask"].long(), "must have dtype torch.bool"),
        (lambda b: b["language_mask"][:, :-1], r"has shape \(2, 19\) but the token sequence has shape \(2, 20\)"),
    ],
    ids=["dtype", "shape"],
)
def test_language_mask_of_wrong_dtype_or_shape(arch, mask, match):
    policy = make_policy(arch)
    policy.apt.prepare(StagePlan())
    batch = make_batch("left")
    batch["language_mask"] = mask(batch)
    with pytest.raises(LanguageMaskError, match=match):
        policy.flow_loss(batch, torch.zeros(2, 4, policy.noise_dim), torch.rand(2))


def test_fusion_target_matching_nothing_lists_nearest_names():
    policy = make_policy("groot")
    policy.apt.fusion = FusionConfig(target_modules=["action_head.blockz.0"])
    with pytest.raises(
        NoMatchingTargetError, match=r"matched no module.*Closest existing names: \[.*'action_head.blocks.0'"
    ):
        policy.apt.prepare(StagePlan())
    assert not policy.apt.sites, "a failed injection must leave the model untouched"


def test_lora_targets_matching_no_vlm_module_are_refused_with_the_vlms_own_names_and_nothing_changed():
    from plain_vla import PlainVLA

    model = PlainVLA()  # a VLM of torch's own TransformerEncoder: none of the default q_proj/v_proj names
    model.apt.config = APTConfig(vlm_mode="lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"lora_target_modules.*matches no module of the VLM.*'linear1', 'linear2'"):
        model.apt.prepare(StagePlan(first_stage=2))
    assert not model.apt.is_prepared and not model.apt.sites
    assert model.state_dict().keys() == before.keys(), "neither fusion blocks nor LoRA adapters were added"
    model.apt.config = APTConfig(vlm_mode="lora", lora_target_modules=["linear1", "linear2"])
    model.apt.prepare(StagePlan(first_stage=2))
    assert any(".lora_A." in k for k in model.state_dict())


def test_fusion_target_inside_the_vlm_is_rejected():
    policy = make_policy("groot")
    policy.apt.fusion = FusionConfig(target_modules=r".*layers\.\d+")
    with pytest.raises(NoMatchingTargetError, match="inside the VLM `backbone`"):
        policy.apt.prepare(StagePlan())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans")
    for name, scheduler, steps in [
        ("stage2", APTStageScheduler(switch_at_step=2), 4),
        ("stage1", APTStageScheduler(stage=1), 2),
    ]:
        ckpt = ModelCheckpoint(dirpath=path, filename=name, save_last=False, every_n_train_steps=steps)
        trainer(steps, [scheduler, ckpt], enable_checkpointing=True).fit(make_policy("pi0"), loader())
    return path


def test_stage2_checkpoint_under_stage1_only_plan(checkpoints):
    with pytest.raises(StageMismatchError, match=r"trained in Stage 2 .* Stage-1-only plan"):
        trainer(6, [APTStageScheduler(stage=1)]).fit(
            make_policy("pi0"), loader(), ckpt_path=str(checkpoints / "stage2.ckpt")
        )


def test_stage1_checkpoint_under_stage2_only_plan(checkpoints):
    with pytest.raises(StageMismatchError, match=r"holds Stage-1 training .* export the prior with `export_va_prior`"):
        trainer(6, [APTStageScheduler(stage=2)]).fit(
            make_policy("pi0"), loader(), ckpt_path=str(checkpoints / "stage1.ckpt")
        )


def test_changed_switch_step_on_resume(checkpoints):
    with pytest.raises(StageMismatchError, match="Resume with the same APTStageScheduler arguments"):
        trainer(6, [APTStageScheduler(switch_at_step=3)]).fit(
            make_policy("pi0"), loader(), ckpt_path=str(checkpoints / "stage2.ckpt")
        )


@pytest.mark.parametrize("context_mask", ["all_masked", "empty"])
def test_empty_or_fully_masked_fusion_context_gives_identity_not_nan(context_mask):
    block = GatedCrossAttentionBlock(dim=8, context_dim=4, num_heads=2)
    with torch.no_grad():
        block.apt_gate_attn.fill_(1.0)
        block.apt_gate_ff.fill_(1.0)
    x = torch.randn(2, 3, 8)
    length = 0 if context_mask == "empty" else 5
    out = block(x, torch.randn(2, length, 4), torch.zeros(2, length, dtype=torch.bool))
    assert torch.isfinite(out).all() and torch.equal(out, x)
    # a batch mixing an empty row with a valid one: the empty row is untouched, the other one is not
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, :2] = True
    out = block(x, torch.randn(2, 5, 4), mask)
    assert torch.equal(out[0], x[0]) and not torch.equal(out[1], x[1]) and torch.isfinite(out).all()


def test_all_language_masked_batch_trains_without_nan(arch):
    policy = make_policy(arch)
    policy.apt.prepare(StagePlan(first_stage=2))
    batch = make_batch("left")
    batch["language_mask"][:] = False
    loss = policy.flow_loss(batch, torch.randn(2, 4, policy.noise_dim), torch.rand(2))
    loss.backward()
    assert torch.isfinite(loss)


def test_non_finite_gate_stops_training_and_names_the_site(tmp_path):
    policy = make_policy("groot")

    class Poison(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                site = pl_module.apt.sites["action_head.blocks.1"]
                site.apt_fusion.apt_gate_ff.data.fill_(float("nan"))

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    t = trainer(10, [Poison(), APTStageScheduler(switch_at_step=1), ckpt], enable_checkpointing=True)
    with pytest.raises(NonFiniteGateError, match=r"\['ff'\] of fusion site `action_head.blocks.1` became non-finite"):
        t.fit(policy, loader())
    assert t.global_step == 3
    assert [p.name for p in tmp_path.iterdir()] == [], "no checkpoint of the non-finite state may be written"


def test_one_fit_plan_under_ddp_requires_find_unused_parameters():
    strategy = DDPStrategy(find_unused_parameters=False)
    t = pl.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False
    )
    with pytest.raises(AptError, match="ddp_find_unused_parameters_true"):
        check_strategy(t, StagePlan(first_stage=1, switch_step=5))


def test_the_ddp_check_reads_the_wrapped_model_when_lightning_keeps_no_kwargs():
    from types import SimpleNamespace

    from apt_lightning.fit_checks import find_unused_parameters

    assert find_unused_parameters(DDPStrategy(find_unused_parameters=True)) is True
    assert find_unused_parameters(DDPStrategy(find_unused_parameters=False)) is False
    wrapped = SimpleNamespace(model=SimpleNamespace(find_unused_parameters=False))  # a strategy without _ddp_kwargs
    assert find_unused_parameters(wrapped) is False
    assert find_unused_parameters(SimpleNamespace()) is None
