"""One owner for the stage: the plan applied to the step the weights reached, at every entry point; and the
contract checked before step 0 (issue 8)."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from apt_lightning import (
    APT,
    APTConfig,
    APTMixin,
    APTStageScheduler,
    ContractError,
    FusionConfig,
    FusionContextError,
    LanguageMaskError,
    NotPreparedError,
    StagePlan,
    language_blind_masks,
)
from apt_lightning.models import load_policy
from helpers import loader, make_batch, make_policy, trainer


class StageProbe(Callback):
    """Records the model's stage inside every kind of step."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {"train": [], "validate": [], "test": [], "predict": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen["train"].append(pl_module.apt.stage)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen["validate"].append(pl_module.apt.stage)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen["test"].append(pl_module.apt.stage)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen["predict"].append(pl_module.apt.stage)


def _probe_callbacks(switch: int) -> tuple[StageProbe, list[Callback]]:
    probe = StageProbe()
    return probe, [APTStageScheduler(switch_at_step=switch), probe]  # the scheduler sets the stage first


def test_validate_test_predict_after_a_fit_run_in_the_stage_the_fit_ended_in():
    policy = make_policy("groot")
    probe, callbacks = _probe_callbacks(switch=2)
    t = trainer(4, callbacks, limit_val_batches=1, limit_test_batches=1, limit_predict_batches=1)
    t.fit(policy, loader())
    assert probe.seen["train"] == [1, 1, 2, 2]
    policy.test_step = policy.validation_step
    t.validate(policy, loader(size=4))
    t.test(policy, loader(size=4))
    t.predict(policy, loader(size=4))  # Lightning re-creates the loader around its own sampler for predict
    assert probe.seen["validate"] == probe.seen["test"] == probe.seen["predict"] == [2]
    assert policy.apt.stage == 2 and all(site.active for site in policy.apt.sites.values())


def test_validation_inside_fit_follows_the_training_step():
    policy = make_policy("groot")
    seen: list[tuple[int, int]] = []

    class ValidationProbe(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.append((trainer.global_step, pl_module.apt.stage))

    callbacks = [APTStageScheduler(switch_at_step=2), ValidationProbe()]
    trainer(4, callbacks, limit_val_batches=1, val_check_interval=1).fit(policy, loader(), loader(size=4))
    assert seen and all(stage == (2 if step >= 2 else 1) for step, stage in seen)
    assert {stage for _, stage in seen} == {1, 2}


def test_resume_is_in_stage_2_from_the_start_and_logs_the_switch_once(tmp_path, caplog):
    policy = make_policy("groot")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    with caplog.at_level(logging.INFO):
        trainer(3, [APTStageScheduler(switch_at_step=2), checkpoint], enable_checkpointing=True).fit(policy, loader())

        stages_at_start: list[int] = []

        class StartProbe(Callback):
            def on_fit_start(self, trainer, pl_module):
                stages_at_start.append(pl_module.apt.stage)  # weights restored, loops not yet

            def on_train_start(self, trainer, pl_module):
                stages_at_start.append(pl_module.apt.stage)

        probe, callbacks = _probe_callbacks(switch=2)
        resumed = make_policy("groot")
        trainer(5, [StartProbe(), *callbacks]).fit(resumed, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert stages_at_start == [2, 2] and probe.seen["train"] == [2, 2]
    assert sum("switching to Stage 2" in r.getMessage() for r in caplog.records) == 1


def test_load_from_checkpoint_and_validate_with_a_fresh_trainer_keep_the_saved_stage(tmp_path):
    policy = make_policy("pi0")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(3, [APTStageScheduler(switch_at_step=2), checkpoint], enable_checkpointing=True).fit(policy, loader())
    loaded = load_policy(tmp_path / "last.ckpt")
    assert loaded.apt.stage == 2 and loaded.apt.step == 3
    probe, callbacks = _probe_callbacks(switch=2)
    fresh = make_policy("pi0")
    trainer(3, callbacks, limit_val_batches=1).validate(fresh, loader(size=4), ckpt_path=tmp_path / "last.ckpt")
    assert probe.seen["validate"] == [2] and fresh.apt.stage == 2


# ---------------------------------------------------------------------------- unprepared state, no Trainer
def test_a_fresh_model_is_explicitly_unprepared_and_the_no_trainer_path_works():
    policy = make_policy("groot")
    assert not policy.apt.is_prepared
    with pytest.raises(NotPreparedError, match=r"apt\.prepare\(StagePlan"):
        _ = policy.apt.stage
    with pytest.raises(NotPreparedError, match="APTStageScheduler"):
        policy.sample_actions(make_batch("left"))
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=10), step=12)  # e.g. a notebook on a trained model
    assert policy.apt.stage == 2 and not policy.apt.vlm_module.training
    assert policy.sample_actions(make_batch("left")).shape == (2, 4, 2)


# ---------------------------------------------------------------------------- the contract, before step 0
class Opaque(nn.Module):
    """A VLM with no ``config``: nothing to infer the language width from."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)


class Block(nn.Module):
    """An expert layer with no ``hidden_size``-like attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Sequential(nn.Linear(8, 8), nn.GELU())

    def forward(self, x):
        return self.mix(x)


class Widthless(APTMixin, pl.LightningModule):
    def __init__(self, fusion: FusionConfig) -> None:
        super().__init__()
        self.vlm = Opaque()
        self.expert = nn.ModuleList([Block(), Block()])
        self.apt = APT(self, vlm="vlm", fusion=fusion)

    def training_step(self, batch, batch_idx):
        return self.expert[1](self.expert[0](self.vlm.proj(batch["state"].repeat(1, 2)))).sum()


def test_every_missing_width_is_reported_in_one_error_before_fit():
    model = Widthless(FusionConfig(target_modules=r"expert\.\d+"))
    with pytest.raises(ContractError) as info:
        model.apt.validate()
    message = str(info.value)
    assert "`FusionConfig.context_dim` is unset" in message
    assert "['expert.0', 'expert.1']" in message and "set `FusionConfig.hidden_dim`" in message
    with pytest.raises(ContractError, match="context_dim"):
        trainer(1, [APTStageScheduler(switch_at_step=1)]).fit(model, loader())
    assert not model.apt.sites, "a failed prepare leaves the model untouched"
    widths = FusionConfig(target_modules=r"expert\.\d+", hidden_dim=8, context_dim=[8, 4])
    Widthless(widths).apt.validate()  # per-site widths: one per site is fine
    with pytest.raises(ContractError, match="lists 2 widths but there are 1 fusion sites"):
        Widthless(FusionConfig(target_modules=["expert.0"], hidden_dim=8, context_dim=[8, 4])).apt.validate()


def test_a_target_that_is_not_the_hidden_state_stream_fails_at_the_first_step_not_at_the_switch(tmp_path):
    policy = make_policy("groot")
    policy.apt.fusion = FusionConfig(target_modules=["action_head"], num_heads=2)  # outputs actions, not hidden states
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1)
    t = trainer(20, [APTStageScheduler(switch_at_step=10), checkpoint], enable_checkpointing=True)
    with pytest.raises(
        ContractError, match=r"`action_head`: .*returns shape \(\d+, 4, 2\).*target the expert's layers"
    ):
        t.fit(policy, loader())
    assert t.global_step == 0 and not list(tmp_path.iterdir())
    after = policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k in after), "no weight may change"


def test_stage2_only_plan_names_the_bad_site_instead_of_a_raw_runtime_error():
    policy = make_policy("groot")
    policy.apt.fusion = FusionConfig(target_modules=["action_head"], num_heads=2)
    policy.apt.prepare(StagePlan(first_stage=2))
    with pytest.raises(ContractError, match=r"cannot take gated fusion.*returns shape"):
        policy.sample_actions(make_batch("left"))


# ---------------------------------------------------------------------------- optimiser ownership
class OwnOptimizer(type(make_policy("groot"))):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BuildsOnAPT(type(make_policy("groot"))):
    def configure_optimizers(self):
        return self.apt.configure_optimizers(torch.optim.SGD, momentum=0.9)


def _groot(cls, **kwargs):
    from apt_lightning.models import tiny_paligemma_config

    torch.manual_seed(0)
    return cls(tiny_paligemma_config(), select_layer=1, head_width=32, head_depth=2, **kwargs)


def test_own_configure_optimizers_is_warned_about_and_the_one_liner_keeps_apt_groups():
    with pytest.warns(UserWarning, match=r"does not build on APT's param groups.*apt\.configure_optimizers"):
        trainer(1, [APTStageScheduler(switch_at_step=1)]).fit(_groot(OwnOptimizer), loader())
    model = _groot(BuildsOnAPT, apt_config=APTConfig(lr=1e-3))
    t = trainer(1, [APTStageScheduler(switch_at_step=1)])
    t.fit(model, loader())
    optimizer = t.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert lrs == {"expert": 1e-3, "fusion": 1e-3, "gates": 1e-2}


def test_a_models_own_lr_that_apt_would_ignore_is_named():
    policy = make_policy("groot")
    policy.lr = 3e-4
    with pytest.warns(UserWarning, match=r"lr=0.0003 is not the learning rate .*APTConfig\(lr=lr\)"):
        trainer(1, [APTStageScheduler()]).fit(policy, loader())


# ---------------------------------------------------------------------------- masks
def test_expert_mask_is_bool_whatever_the_input_mask_dtype():
    attention = torch.tensor([[1, 1, 1, 1, 0]])
    language = torch.tensor([[False, False, True, True, False]])
    masks = language_blind_masks(attention, language)
    assert masks.expert_attention.dtype == torch.bool
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 5, 8)
    out, _ = attn(x, x, x, key_padding_mask=~masks.expert_attention)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda m: m.numpy(), r"got ndarray\. Convert it with `torch.as_tensor"),
        (lambda m: m[0], r"It is 1-D: give one row per sample"),
        (lambda m: m.T, r"It looks transposed: use `mask.T`"),
        (lambda m: torch.ones_like(m), r"covers every valid token of row\(s\) \[0, 1\].*Mark only the instruction"),
    ],
    ids=["numpy", "1-D", "transposed", "covers-everything"],
)
def test_bad_language_masks_raise_language_mask_error(bad, match):
    batch = make_batch("left")
    with pytest.raises(LanguageMaskError, match=match):
        language_blind_masks(batch["attention_mask"], bad(batch["language_mask"]))


def test_models_pass_features_unconditionally_and_the_library_ignores_them_outside_stage2():
    """Stage 1 with language features passed equals Stage 1 with none: the context helper decides."""
    policy = make_policy("groot")
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=5))
    assert not policy.apt.needs_language
    with policy.apt.fusion_context(None, None):
        pass  # ignored outside Stage 2
    policy.apt._set_step(5)
    assert policy.apt.needs_language
    needs = pytest.raises(FusionContextError, match="Stage 2 needs language features")
    with needs, policy.apt.fusion_context(None, None):
        pass
