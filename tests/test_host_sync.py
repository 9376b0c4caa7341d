"""The library reads no device value on the host in the training step, except the one non-finite check."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from apt_lightning import APTStageScheduler
from helpers import loader, make_policy, trainer

READS = ("__bool__", "item", "tolist", "__float__", "__int__", "cpu", "numpy")
LIBRARY = "apt_lightning."
NOT_LIBRARY = ("apt_lightning.models", "apt_studies")  # the reference models are users' code here


@pytest.fixture
def host_reads(monkeypatch):
    """Counts host reads of tensor values made directly by library code, per global step."""
    counts: Counter[int] = Counter()
    step = {"now": -1}

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(LIBRARY) and not caller.startswith(NOT_LIBRARY):
                counts[step["now"]] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    # what an accelerator sees: mask values are not free to read, so only the first batches check them
    monkeypatch.setattr("apt_lightning.controller.reading_is_free", lambda tensor: False)

    class Step(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step["now"] = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step["now"] = -1

    return counts, Step()


@pytest.mark.parametrize("check_finite, per_step", [(True, 1), (False, 0)])
def test_one_host_read_per_step_across_the_switch(host_reads, check_finite, per_step, monkeypatch):
    monkeypatch.setattr("apt_lightning.controller._MASK_ROW_CHECKS", 2)
    counts, step = host_reads
    t = trainer(8, [step, APTStageScheduler(switch_at_step=4, check_finite=check_finite)])
    policy = make_policy("groot")
    t.fit(policy, loader(size=16, batch_size=4))
    steady = {s: counts[s] for s in (2, 3, 5, 6, 7)}  # after the 2 batches whose mask rows are checked
    assert steady == dict.fromkeys((2, 3, 5, 6, 7), per_step), dict(counts)
    assert counts[0] == counts[1] == per_step + 1  # + the row check of the language mask
    assert counts[4] == per_step + 2 * len(policy.apt.sites)  # once, at the switch: are all gates closed?


def test_nan_loss_is_still_caught_with_one_read(host_reads):
    _, step = host_reads
    policy = make_policy("groot")
    policy.action_head.proj_out.weight.register_hook(lambda grad: grad * float("nan"))
    t = trainer(4, [step, APTStageScheduler(stage=2)])
    with pytest.raises(Exception, match="gradients of 1 parameters"):
        t.fit(policy, loader())
    assert t.global_step == 0
