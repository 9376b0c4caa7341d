"""A checkpoint taken anywhere (mid-Stage-1, at the switch, mid-Stage-2) resumes exactly."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning import APTStageScheduler
from helpers import LossRecorder, loader, make_policy, trainer

SWITCH, TOTAL = 6, 12


@pytest.fixture(scope="module", params=["pi0", "groot"])
def uninterrupted(request, tmp_path_factory):
    arch = request.param
    ckpt_dir = tmp_path_factory.mktemp(f"ckpt_{arch}")
    recorder = LossRecorder()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    t = trainer(TOTAL, [APTStageScheduler(switch_at_step=SWITCH), recorder, checkpoint], enable_checkpointing=True)
    t.fit(make_policy(arch, vlm_mode="lora", warmup_steps=2), loader(size=16, batch_size=4))  # 4 batches/epoch
    return arch, ckpt_dir, recorder.losses


@pytest.mark.parametrize("step", [3, SWITCH, 9], ids=["mid_stage1", "at_switch", "mid_stage2"])
def test_resumed_loss_trajectory_equals_uninterrupted(uninterrupted, step):
    arch, ckpt_dir, reference = uninterrupted
    assert sorted(reference) == list(range(TOTAL))
    recorder = LossRecorder()
    t = trainer(TOTAL, [APTStageScheduler(switch_at_step=SWITCH), recorder])
    t.fit(
        make_policy(arch, vlm_mode="lora", warmup_steps=2),
        loader(size=16, batch_size=4),
        ckpt_path=str(ckpt_dir / f"step={step}.ckpt"),
    )
    assert sorted(recorder.losses) == list(range(step, TOTAL))
    diffs = [abs(recorder.losses[s] - reference[s]) for s in range(step, TOTAL)]
    assert max(diffs) <= 1e-6, diffs
    # the lr of every group follows the plan after resume, too
    groups = {g["name"]: g["lr"] for g in t.optimizers[0].param_groups}
    assert groups["gates"] > 0 and groups["vlm"] > 0
