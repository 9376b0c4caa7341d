"""Run by tests/test_ddp.py: 2 CPU processes (gloo) train across the Stage-2 switch, each saves its parameters."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy

from apt_lightning import APTStageScheduler
from helpers import loader, make_policy, trainer

if __name__ == "__main__":
    arch, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    policy = make_policy(arch, vlm_mode="lora")
    strategy = DDPStrategy(find_unused_parameters=True, process_group_backend="gloo")
    t = trainer(8, [APTStageScheduler(switch_at_step=4)], devices=2, strategy=strategy, use_distributed_sampler=False)
    t.fit(policy, loader(size=16, batch_size=2))
    torch.save({k: v.detach().clone() for k, v in policy.state_dict().items()}, out / f"rank{t.global_rank}.pt")
    torch.save({"stage": policy.apt_stage, "step": t.global_step}, out / f"meta{t.global_rank}.pt")
