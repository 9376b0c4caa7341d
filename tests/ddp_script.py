"""Run by tests/test_ddp.py: 2 CPU processes (gloo) train across the Stage-2 switch, each saves its parameters."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy

from apt_lightning import APTStageScheduler, Stage1FeatureCache
from helpers import LossRecorder, loader, make_policy, trainer

if __name__ == "__main__":
    arch, out = sys.argv[1], Path(sys.argv[2])
    variant = sys.argv[3] if len(sys.argv) > 3 else None  # "plain" or "cache": the feature-cache comparison
    cache = Stage1FeatureCache() if variant == "cache" else None
    torch.set_num_threads(1)
    policy = make_policy(arch, vlm_mode="lora")
    strategy = DDPStrategy(find_unused_parameters=True, process_group_backend="gloo")
    recorder = LossRecorder()
    callbacks = [APTStageScheduler(switch_at_step=12 if variant else 4), recorder]
    callbacks += [cache] if cache is not None else []
    steps = 16 if variant else 8  # the comparison runs 1.5 epochs of Stage 1, so epoch 1 hits the cache
    t = trainer(steps, callbacks, devices=2, strategy=strategy)
    t.fit(policy, loader(size=16, batch_size=2))
    torch.save({k: v.detach().clone() for k, v in policy.state_dict().items()}, out / f"rank{t.global_rank}.pt")
    meta = {"stage": policy.apt.stage, "step": t.global_step, "losses": recorder.losses}
    if cache is not None:
        meta["cache_hits"] = cache.hits
    torch.save(meta, out / f"meta{t.global_rank}.pt")
