"""Pretrain, then fine-tune in a fresh Trainer (APT's authors' recipe): the fine-tune starts from exactly the
pretrained model, trains in train mode, resumes exactly, and refuses weights that saw the instruction another way."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from apt_lightning import APTConfig, APTStageScheduler, StageMismatchError
from apt_lightning.models import load_policy
from helpers import LossRecorder, loader, make_batch, pretrain_checkpoints, trainer


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An APT-pretrained pi0 (Stage 1 for 2 steps, Stage 2 for 2) and a joint-pretrained one, as checkpoints."""
    return pretrain_checkpoints(tmp_path_factory.mktemp("pretrained"))


class FirstStepProbe(Callback):
    """What the model is at the first fine-tuning step: its stage, its mode, and the actions it samples."""

    def __init__(self, batch, noise) -> None:
        self.batch, self.noise, self.seen = batch, noise, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and not self.seen:
            self.seen = {"stage": pl_module.apt.stage, "training": pl_module.training}
            pl_module.eval()
            self.seen["actions"] = pl_module.sample_actions(self.batch, noise=self.noise.clone())
            pl_module.train()


@pytest.mark.parametrize("vlm_mode", ["frozen", "lora", "full"])
def test_fine_tuning_a_loaded_checkpoint_starts_from_exactly_what_it_computes(pretrained, recwarn, vlm_mode):
    policy = load_policy(pretrained / "apt.ckpt")
    batch, noise = make_batch(["left", "right"]), torch.randn(2, 4, policy.noise_dim)
    expected = policy.sample_actions(batch, noise=noise.clone())
    gates = policy.apt.gate_values()
    assert any(v != 0 for g in gates.values() for v in g.values()), "the pretrained gates are open"
    policy.apt.config = APTConfig(lr=3e-3, vlm_mode=vlm_mode, vlm_lr=1e-5)
    probe = FirstStepProbe(batch, noise)
    fit = trainer(2, [APTStageScheduler(stage=2, finetune=True), probe])
    fit.fit(policy, loader())
    assert probe.seen["stage"] == 2 and probe.seen["training"], "fine-tuning trains in train mode, in Stage 2"
    assert torch.equal(probe.seen["actions"], expected)
    assert not [w for w in recwarn if "ckpt_path" in str(w.message)], "a deliberate fine-tune is not warned about"
    lrs = {g["name"]: g["initial_lr"] for g in fit.optimizers[0].param_groups}
    assert lrs.get("vlm") == (None if vlm_mode == "frozen" else 1e-5), "the VLM trains at its own learning rate"


def test_resuming_mid_fine_tuning_is_exact(pretrained, tmp_path):
    recorder = LossRecorder()
    uninterrupted = load_policy(pretrained / "apt.ckpt")
    trainer(4, [APTStageScheduler(stage=2, finetune=True), recorder]).fit(uninterrupted, loader())

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="ft", every_n_train_steps=2)
    first = load_policy(pretrained / "apt.ckpt")
    trainer(2, [APTStageScheduler(stage=2, finetune=True), checkpoint], enable_checkpointing=True).fit(first, loader())
    resumed_recorder = LossRecorder()
    second = load_policy(pretrained / "apt.ckpt")
    trainer(4, [APTStageScheduler(stage=2, finetune=True), resumed_recorder]).fit(
        second, loader(), ckpt_path=str(tmp_path / "ft.ckpt")
    )
    assert resumed_recorder.losses == {k: v for k, v in recorder.losses.items() if k >= 2}
    final = uninterrupted.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in second.state_dict().items())


def test_fine_tuning_joint_weights_with_apt_is_refused_before_any_step(pretrained):
    policy = load_policy(pretrained / "joint.ckpt")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(StageMismatchError, match=r"trained jointly .*warm_start=True"):
        trainer(2, [APTStageScheduler(stage=2, finetune=True)]).fit(policy, loader())
    assert policy.state_dict().keys() == before.keys(), "no fusion block was added"
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())


def test_a_joint_checkpoint_fine_tunes_jointly_from_exactly_what_it_computes(pretrained):
    policy = load_policy(pretrained / "joint.ckpt")
    batch, noise = make_batch(["left", "right"]), torch.randn(2, 4, policy.noise_dim)
    probe = FirstStepProbe(batch, noise)
    expected = policy.sample_actions(batch, noise=noise.clone())
    trainer(1, [APTStageScheduler(stage="joint", finetune=True), probe]).fit(policy, loader())
    assert probe.seen["stage"] == 0 and torch.equal(probe.seen["actions"], expected)


def test_warm_start_needs_finetune():
    with pytest.raises(ValueError, match="only applies to a fine-tune"):
        APTStageScheduler(stage=2, warm_start=True)
