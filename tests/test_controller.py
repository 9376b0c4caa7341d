"""The ``APT`` controller alone: one owner of plan and step, usable from a plain PyTorch loop with nothing from
Lightning, and training a reference policy exactly as the Lightning path does."""

from __future__ import annotations

import copy

import pytest
import torch

from apt_lightning import APTStageScheduler, StageMismatchError, StagePlan
from apt_lightning.data import ResumableDataLoader
from helpers import LanguageDecidesDataset, LossRecorder, collate, make_batch, make_policy, trainer
from plain_vla import SWITCH, TOTAL, PlainVLA, build, optimizer_of, sample, train


def small_loader() -> ResumableDataLoader:
    return ResumableDataLoader(LanguageDecidesDataset(8), batch_size=4, collate_fn=collate)


def test_a_plain_loop_runs_stage1_then_stage2_with_the_invariants():
    model = build()
    optimizer, scheduler = optimizer_of(model)
    vlm_before = copy.deepcopy(model.vlm.state_dict())
    train(model, optimizer, scheduler, SWITCH - 1)
    assert model.apt.stage == 1 and model.apt.step == SWITCH - 1
    assert torch.equal(sample(model, 0), sample(model, 1)), "Stage 1: the instruction cannot change the action"
    train(model, optimizer, scheduler, SWITCH)
    assert model.apt.stage == 2 and model.apt.step == SWITCH, "the optimizer's step switched the stage"
    assert all(torch.equal(v, model.vlm.state_dict()[k]) for k, v in vlm_before.items()), "VLM bit-identical"
    as_stage1 = copy.deepcopy(model)
    as_stage1.apt.start_finetune(StagePlan(first_stage=1))  # the same weights, as a Stage-1 model
    assert torch.equal(sample(model, 0), sample(as_stage1, 0)), "the switch: closed gates, the Stage-1 model exactly"
    train(model, optimizer, scheduler, TOTAL)
    assert not torch.equal(sample(model, 0), sample(model, 1)), "Stage 2 reads the instruction"
    assert any(abs(v) > 0 for gates in model.apt.gate_values().values() for v in gates.values())


def test_a_plain_loop_resumes_exactly_from_the_controllers_state_dict(tmp_path):
    uninterrupted = build()
    optimizer, scheduler = optimizer_of(uninterrupted)
    expected = train(uninterrupted, optimizer, scheduler, TOTAL)

    first = build()
    optimizer, scheduler = optimizer_of(first)
    resumed = train(first, optimizer, scheduler, SWITCH + 1)  # stop inside Stage 2
    path = tmp_path / "checkpoint.pt"
    state = {
        "apt": first.apt.state_dict(),
        "model": first.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    torch.save(state, path)

    torch.manual_seed(1)  # a different fresh model: everything must come from the checkpoint
    second = PlainVLA()
    saved = torch.load(path, weights_only=True)
    second.apt.load_state_dict(saved["apt"])  # the plan and step first: they build the fusion blocks
    second.load_state_dict(saved["model"])
    optimizer, scheduler = optimizer_of(second)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    assert second.apt.step == SWITCH + 1 and second.apt.stage == 2
    resumed += train(second, optimizer, scheduler, TOTAL)
    assert resumed == expected
    final = uninterrupted.state_dict()
    assert [k for k, v in second.state_dict().items() if not torch.equal(v, final[k])] == []


def test_the_controllers_state_is_plain_data_and_refuses_a_changed_plan():
    model = build()
    optimizer, scheduler = optimizer_of(model)
    train(model, optimizer, scheduler, 2)
    state = model.apt.state_dict()
    assert {k: state[k] for k in ("plan", "step", "stage", "finetune", "version")} == {
        "plan": {"first_stage": 1, "switch_step": SWITCH},
        "step": 2,
        "stage": 1,
        "finetune": False,
        "version": 4,
    }
    assert state["configuration"]["fusion"]["num_heads"] == 2 and state["configuration"]["vlm_mode"] == "frozen"
    other = build()
    other.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH + 5))
    with pytest.raises(StageMismatchError, match="Resume with the same APTStageScheduler arguments"):
        other.apt.load_state_dict(state)
    assert other.apt.plan.switch_step == SWITCH + 5 and other.apt.step == 0, "a refusal changes nothing"


def test_a_reference_policy_trains_identically_under_lightning_and_under_a_plain_loop():
    batches = ResumableDataLoader(LanguageDecidesDataset(16), batch_size=4, shuffle=False, collate_fn=collate)
    recorder = LossRecorder()
    lightning_policy = make_policy("groot")
    trainer(TOTAL, [APTStageScheduler(switch_at_step=SWITCH), recorder]).fit(lightning_policy, batches)

    policy = make_policy("groot")
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH))
    optimizer = policy.apt.configure_optimizers()["optimizer"]  # its schedule applies itself at every step
    policy.train()
    epoch = [collate([batches.dataset[i] for i in range(j, j + 4)]) for j in range(0, 16, 4)]
    losses = {}
    for step in range(TOTAL):
        batch_idx = step % len(epoch)
        noise, time = policy.draw_noise_time(4, batch_idx)
        loss = policy.flow_loss(epoch[batch_idx], noise, time)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses[step] = float(loss.detach())
    assert losses == recorder.losses
    final = lightning_policy.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in policy.state_dict().items())


def test_fine_tuning_starts_from_step_zero_computing_exactly_what_the_pretrained_model_computed():
    policy = make_policy("pi0")
    trainer(4, [APTStageScheduler(switch_at_step=2)]).fit(policy, small_loader())
    policy.eval()
    batch, noise = make_batch(["left", "right"]), torch.randn(2, 4, policy.noise_dim)
    pretrained = policy.sample_actions(batch, noise=noise.clone())
    policy.apt.start_finetune(StagePlan(first_stage=2))
    assert policy.apt.step == 0 and policy.apt.stage == 2
    assert torch.equal(policy.sample_actions(batch, noise=noise.clone()), pretrained)


def test_fine_tuning_joint_weights_under_apt_is_refused_unless_it_is_a_warm_start():
    policy = make_policy("pi0")
    trainer(2, [APTStageScheduler(stage="joint")]).fit(policy, small_loader())
    with pytest.raises(StageMismatchError, match=r"trained jointly .* to step 2.*warm_start=True"):
        policy.apt.start_finetune(StagePlan(first_stage=2))
    assert not policy.apt.sites, "a refused fine-tune leaves the model untouched"
    policy.apt.start_finetune(StagePlan(first_stage=2), warm_start=True)
    assert policy.apt.stage == 2 and policy.apt.sites
