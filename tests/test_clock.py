"""One clock: ``apt.step`` counts the optimizer steps the weights took, advances by itself, and everything that
changes with training (stage, learning rates, random streams, the saved record) reads it. A plain loop resumed the
README's way at any step around the switch continues exactly, or stops with a clear error before its first step."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

from apt_lightning import ClockError, StageMismatchError, StagePlan
from plain_vla import SWITCH, TOTAL, PlainVLA, build, optimizer_of, plain_batch, train


@functools.cache
def uninterrupted() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = build()
    optimizer, scheduler = optimizer_of(model)
    return train(model, optimizer, scheduler, TOTAL), model.state_dict()


def save_at(step: int) -> tuple[list[float], dict]:
    model = build()
    optimizer, scheduler = optimizer_of(model)
    losses = train(model, optimizer, scheduler, step)
    saved = {
        "apt": model.apt.state_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    return losses, saved


def resume(saved: dict, with_optimizer: bool, with_scheduler: bool):
    torch.manual_seed(1)  # another fresh model: everything must come from the saved state
    model = PlainVLA()
    model.apt.load_state_dict(saved["apt"])  # plan and step first: they build the fusion blocks
    model.load_state_dict(saved["model"])
    optimizer, scheduler = optimizer_of(model)
    if with_optimizer:
        optimizer.load_state_dict(saved["optimizer"])
    if with_scheduler:
        scheduler.load_state_dict(saved["scheduler"])
    return model, optimizer, scheduler


@pytest.mark.parametrize("with_scheduler", [True, False], ids=["scheduler_state", "fresh_scheduler"])
@pytest.mark.parametrize("at", range(1, TOTAL))
def test_resuming_the_readme_way_anywhere_around_the_switch_continues_exactly(at, with_scheduler):
    expected_losses, expected_weights = uninterrupted()
    losses, saved = save_at(at)
    model, optimizer, scheduler = resume(saved, with_optimizer=True, with_scheduler=with_scheduler)
    assert model.apt.step == at and model.apt.stage == (2 if at >= SWITCH else 1)
    losses += train(model, optimizer, scheduler, TOTAL)  # the loop restarts at apt.step: no step repeated
    assert losses == expected_losses
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, expected_weights[k])] == []


@pytest.mark.parametrize("at", [SWITCH - 1, SWITCH, SWITCH + 1])
def test_resuming_without_the_optimizers_state_stops_before_the_first_step(at):
    _, saved = save_at(at)
    model, optimizer, scheduler = resume(saved, with_optimizer=False, with_scheduler=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ClockError, match=rf"taken 0 steps but the weights have taken {at}.*load_state_dict"):
        train(model, optimizer, scheduler, TOTAL)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "nothing was updated"
    assert model.apt.step == at


def test_the_stage_and_its_learning_rates_follow_the_optimizers_steps_with_no_call():
    model = build()
    optimizer, scheduler = optimizer_of(model)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append({g["name"]: g["lr"] for g in opt.param_groups}))
    train(model, optimizer, scheduler, TOTAL, step_scheduler=False)  # a forgotten scheduler.step() is harmless
    assert model.apt.step == TOTAL and model.apt.stage == 2
    assert [lrs["fusion"] for lrs in seen] == [0.0] * SWITCH + [3e-3] * (TOTAL - SWITCH)
    assert [lrs["gates"] for lrs in seen] == [0.0] * SWITCH + [3e-2] * (TOTAL - SWITCH)
    assert all(lrs["expert"] == 3e-3 for lrs in seen)


def test_stepping_the_scheduler_or_not_trains_identically():
    stepped, not_stepped = build(), build()
    for model, step_scheduler in ((stepped, True), (not_stepped, False)):
        optimizer, scheduler = optimizer_of(model)
        train(model, optimizer, scheduler, TOTAL, step_scheduler=step_scheduler)
    assert all(torch.equal(v, not_stepped.state_dict()[k]) for k, v in stepped.state_dict().items())


def test_a_state_saved_right_after_the_switch_step_reloads_in_stage_2():
    _, saved = save_at(SWITCH)
    assert saved["apt"]["step"] == SWITCH and saved["apt"]["stage"] == 2
    model, *_ = resume(saved, with_optimizer=True, with_scheduler=True)
    assert model.apt.stage == 2 and all(site.active for site in model.apt.sites.values())


def test_an_optimizer_apt_did_not_build_advances_the_clock_with_advance():
    model = build()
    optimizer = torch.optim.SGD([p for group in model.apt.param_groups() for p in group["params"]], lr=0.0)
    for _ in range(SWITCH):
        optimizer.step()
        model.apt.advance()
    assert model.apt.step == SWITCH and model.apt.stage == 2


def own_optimizer_loop(model: PlainVLA, steps: int, advance: bool, reload_at: int | None = None) -> None:
    """A plain loop with an optimizer APT did not build (plain SGD over every trainable weight)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        if step == reload_at:  # e.g. the loop reloads its best weights: one in-place change, not a step
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        loss = model.loss(plain_batch(step % 2, seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if advance:
            model.apt.advance()


def test_forgetting_advance_with_an_own_optimizer_stops_at_the_second_step_instead_of_staying_in_stage1():
    model = build()
    with pytest.raises(ClockError, match=r"changed 2 times .* stayed at 0.*configure_optimizers.*apt\.advance\(\)"):
        own_optimizer_loop(model, TOTAL, advance=False)
    assert model.apt.step == 0


def test_an_own_optimizer_with_advance_and_a_weight_reload_trains_through_the_switch():
    model = build()
    own_optimizer_loop(model, TOTAL, advance=True, reload_at=2)
    assert model.apt.step == TOTAL and model.apt.stage == 2


def test_gradient_accumulation_with_advance_after_each_optimizer_step_is_not_mistaken_for_a_forgotten_clock():
    model = build()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(SWITCH + 1):
        for micro in range(3):  # forwards with no weight change in between
            model.loss(plain_batch(micro % 2, seed=10 * step + micro)).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.apt.advance()
    assert model.apt.step == SWITCH + 1 and model.apt.stage == 2


def test_the_controller_imports_without_lightning():
    probe = "import sys; from apt_lightning import APT, StagePlan; print(any(m == 'lightning' for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"


def test_preparing_another_plan_on_trained_weights_is_refused_and_changes_nothing():
    model = build()
    optimizer, scheduler = optimizer_of(model)
    train(model, optimizer, scheduler, SWITCH + 1)
    with pytest.raises(
        StageMismatchError, match=r"trained under the 'stage1->stage2' plan .* to step 4.*start_finetune"
    ):
        model.apt.prepare(StagePlan(first_stage=2))
    assert model.apt.plan == StagePlan(first_stage=1, switch_step=SWITCH) and model.apt.step == SWITCH + 1


def test_an_idle_step_that_creates_optimizer_state_moves_neither_the_clock_nor_the_weights():
    """What torch.distributed.checkpoint does before loading a sharded optimizer: zero grads, every lr set to 0, step,
    lrs put back. AdamW's decoupled weight decay would move the weights if the schedule gave that step an lr."""
    model = build()
    optimizer, _ = optimizer_of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    assert model.apt.step == 0 and all(group["apt_step"] == 0 for group in optimizer.param_groups)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
