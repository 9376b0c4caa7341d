"""FSDP2 (ModelParallelStrategy, 2 CPU processes on gloo) across the switch: the same losses as DDP, exact resume
from a sharded checkpoint, and configurations that cannot work refused at setup."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from apt_lightning import AptError, APTStageScheduler, ContractError, StagePlan
from apt_lightning.fit_checks import check_strategy
from apt_lightning.sharding import fully_shard_apt
from helpers import make_policy, run_script


def launch(*args: str) -> None:
    run_script("fsdp_script.py", *args)


# Resumed mid-Stage-1 (step 3: fusion blocks without optimizer state yet) on one arch and mid-Stage-2 (step 6) on the
# other: each resume is another 2-process launch (about 20 s on 2 CPU cores).
@pytest.mark.parametrize(("arch", "resume_at"), [("pi0", 3), ("groot", 6)])
def test_fsdp2_trains_across_the_switch_like_ddp_and_resumes_exactly(arch, resume_at, tmp_path):
    for engine in ("fsdp2", "ddp"):
        (tmp_path / engine).mkdir()
        launch(arch, engine, str(tmp_path / engine))
    checkpoint = tmp_path / "fsdp2" / "ckpt" / f"step={resume_at}.ckpt"  # a sharded (distributed) checkpoint
    assert checkpoint.is_dir()
    (tmp_path / "resumed").mkdir()
    launch(arch, "fsdp2", str(tmp_path / "resumed"), str(checkpoint))
    for rank in (0, 1):
        fsdp = torch.load(tmp_path / "fsdp2" / f"fsdp2-rank{rank}.pt")
        ddp = torch.load(tmp_path / "ddp" / f"ddp-rank{rank}.pt")
        assert fsdp["stage"] == 2 and sorted(fsdp["losses"]) == list(range(10))
        assert max(abs(fsdp["losses"][s] - ddp["losses"][s]) for s in range(10)) <= 1e-6
        again = torch.load(tmp_path / "resumed" / f"fsdp2-resumed-rank{rank}.pt")
        assert sorted(again["losses"]) == list(range(resume_at, 10))
        assert max(abs(again["losses"][s] - fsdp["losses"][s]) for s in range(resume_at, 10)) <= 1e-6


def test_fsdp1_without_original_parameters_is_refused_at_setup():
    scheduler = APTStageScheduler(switch_at_step=2)

    class Trainer:
        strategy = FSDPStrategy(use_orig_params=False)

    with pytest.raises(AptError, match=r"use_orig_params=True.*apt_fully_shard"):
        check_strategy(Trainer(), scheduler.plan)
    for accepted in (FSDPStrategy(use_orig_params=True), FSDPStrategy()):  # Lightning's default keeps them
        Trainer.strategy = accepted
        check_strategy(Trainer(), scheduler.plan)


def test_model_parallel_without_sharding_is_refused_before_the_first_step():
    class Trainer:
        strategy = ModelParallelStrategy()
        optimizers: list = []  # noqa: RUF012

    policy = make_policy("groot")
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=2))
    with pytest.raises(ContractError, match=r"not sharded.*apt_fully_shard"):
        APTStageScheduler(switch_at_step=2).on_fit_start(Trainer(), policy)


def test_sharding_an_unprepared_module_names_the_fix():
    with pytest.raises(ContractError, match="configure_model"):
        fully_shard_apt(make_policy("groot"))


def test_units_cover_every_parameter_with_a_module_whose_forward_uses_it(monkeypatch):
    sharded: list[nn.Module] = []
    monkeypatch.setattr("torch.distributed.fsdp.fully_shard", lambda module, **kwargs: sharded.append(module))
    policy = make_policy("groot")
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=2))
    names = fully_shard_apt(policy, units=r".*(layers|blocks)\.\d+")
    assert "action_head.blocks.0" in names and "action_head.blocks.0.apt_fusion" in names
    assert "vl_self_attention.layers.0" not in names  # a ModuleDict has no forward: its children are units
    covered = {id(p) for m in sharded for p in m.parameters()}
    assert all(id(p) in covered for p in policy.parameters())
    depth = [n.count(".") for n in names]
    order = sorted(range(len(names)), key=lambda i: -depth[i])
    assert [sharded.index(dict(policy.named_modules())[names[i]]) for i in order] == sorted(
        sharded.index(dict(policy.named_modules())[names[i]]) for i in order
    )  # children before parents


def test_priming_gives_lazy_optimizer_state_and_leaves_weights_alone():
    from apt_lightning.sharding import prime_optimizer_state

    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([used, unused], lr=0.1, weight_decay=0.1)
    used.grad = torch.ones(3)
    optimizer.step()
    assert prime_optimizer_state(optimizer) == 1 and prime_optimizer_state(optimizer) == 0
    assert torch.equal(unused.detach(), torch.ones(2)) and used.grad is not None and unused.grad is None
    state = optimizer.state[unused]
    assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert optimizer.param_groups[0]["lr"] == 0.1 and len(optimizer.param_groups[0]["params"]) == 2


def test_priming_an_apt_optimizer_moves_neither_the_clock_nor_the_weights():
    from apt_lightning.sharding import prime_optimizer_state
    from plain_vla import build, optimizer_of

    model = build()  # Stage 1 until step 3: the fusion blocks take no gradient, so they have no optimizer state
    optimizer, _ = optimizer_of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert prime_optimizer_state(optimizer) > 0
    assert model.apt.step == 0 and all(g["apt_step"] == 0 for g in optimizer.param_groups)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
