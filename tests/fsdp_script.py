"""Run by tests/test_fsdp.py: 2 CPU processes (gloo) train across the switch under FSDP2 or DDP; each rank saves
its losses (and the test compares them)."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from apt_lightning import APTStageScheduler
from apt_lightning.models import GR00TStylePolicy, PI0Policy
from helpers import LossRecorder, loader, make_policy, trainer

UNITS = {"pi0": r".*layers\.\d+", "groot": r".*(layers|blocks)\.\d+"}


def sharded(cls):
    class Sharded(cls):
        def configure_model(self):
            self.apt_fully_shard(units=UNITS["pi0" if cls is PI0Policy else "groot"])

    Sharded.__name__ = Sharded.__qualname__ = f"Sharded{cls.__name__}"
    return Sharded


if __name__ == "__main__":
    arch, engine, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    policy = make_policy(arch)
    if engine == "fsdp2":
        policy.__class__ = sharded(PI0Policy if arch == "pi0" else GR00TStylePolicy)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    else:
        strategy = DDPStrategy(find_unused_parameters=True, process_group_backend="gloo")
    recorder = LossRecorder()
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    t = trainer(
        10,
        [APTStageScheduler(switch_at_step=4), recorder, checkpoint],
        devices=2,
        strategy=strategy,
        use_distributed_sampler=False,
        enable_checkpointing=True,
    )
    t.fit(policy, loader(size=16, batch_size=2), ckpt_path=resume)
    torch.save(
        {"losses": recorder.losses, "stage": policy.apt.stage},
        out / f"{engine}{'-resumed' if resume else ''}-rank{t.global_rank}.pt",
    )
