"""The ``APT`` controller alone: one owner of plan and step, usable from a plain PyTorch loop with nothing from
Lightning, and training a reference policy exactly as the Lightning path does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from apt_lightning import APT, APTConfig, APTStageScheduler, FusionConfig, StageMismatchError, StagePlan
from apt_lightning.data import ResumableDataLoader
from helpers import LanguageDecidesDataset, LossRecorder, collate, make_batch, make_policy, trainer

DIM, CHUNK, SWITCH, TOTAL = 16, 4, 3, 6


class PlainVLA(nn.Module):
    """A VLA with no Lightning at all: a bidirectional toy VLM over [patches, text] and a cross-attending expert."""

    def __init__(self) -> None:
        super().__init__()
        self.vlm = nn.ModuleDict({"patch": nn.Linear(6, DIM), "embed": nn.Embedding(16, DIM)})
        layer = {"nhead": 2, "dim_feedforward": 32, "dropout": 0.0, "batch_first": True}
        self.vlm["encoder"] = nn.TransformerEncoder(nn.TransformerEncoderLayer(DIM, **layer), 1)
        self.action_in = nn.Linear(3, DIM)
        self.blocks = nn.ModuleList([nn.TransformerDecoderLayer(DIM, **layer) for _ in range(2)])
        self.action_out = nn.Linear(DIM, 2)
        fusion = FusionConfig(target_modules=r"blocks\.\d+", num_heads=2, hidden_dim=DIM, context_dim=DIM)
        self.apt = APT(self, vlm="vlm", fusion=fusion, config=APTConfig(lr=3e-3, warmup_steps=0))

    def velocity(self, batch: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        patches, ids = batch["patches"], batch["input_ids"]
        attention = torch.ones(ids.shape[0], patches.shape[1] + ids.shape[1], dtype=torch.long)
        language = torch.cat([torch.zeros(patches.shape[:2], dtype=torch.bool), batch["language_mask"]], 1)
        masks = self.apt.masks(attention, language)
        with self.apt.vlm_context():
            x = torch.cat([self.vlm["patch"](patches), self.vlm["embed"](ids)], 1)
            mask = ~masks.vlm_attention[:, 0].repeat_interleave(2, 0)
            features = self.vlm["encoder"](x, mask=mask)
        h = self.action_in(torch.cat([x_t, t[:, None, None].expand(-1, CHUNK, 1)], -1))
        with self.apt.fusion_context(features, masks.language):
            for block in self.blocks:
                h = block(h, features, memory_key_padding_mask=~masks.expert_attention)
        return self.action_out(h)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.apt.rng():
            noise, t = torch.randn_like(batch["actions"]), torch.rand(batch["actions"].shape[0])
        x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * batch["actions"]
        return nn.functional.mse_loss(self.velocity(batch, x_t, t), batch["actions"] - noise)


def plain_batch(word: int, seed: int = 0, batch_size: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "patches": torch.randn(batch_size, 3, 6, generator=g),
        "input_ids": torch.tensor([[1, 5 + word, 2]] * batch_size),
        "language_mask": torch.tensor([[False, True, False]] * batch_size),
        "actions": torch.full((batch_size, CHUNK, 2), 1.0 if word == 0 else -1.0),
    }


def small_loader() -> ResumableDataLoader:
    return ResumableDataLoader(LanguageDecidesDataset(8), batch_size=4, collate_fn=collate)


def build() -> PlainVLA:
    torch.manual_seed(0)
    model = PlainVLA()
    model.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH))
    return model


def optimizer_of(model: PlainVLA) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    configured = model.apt.configure_optimizers()
    return configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def train(model: PlainVLA, optimizer, scheduler, start: int, stop: int) -> list[float]:
    """The whole plain loop: tell the controller the step, then an ordinary optimisation step."""
    model.train()
    losses = []
    for step in range(start, stop):
        model.apt.set_step(step)
        loss = model.loss(plain_batch(step % 2, seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    model.apt.set_step(stop)
    return losses


def sample(model: PlainVLA, word: int) -> torch.Tensor:
    model.eval()
    batch = plain_batch(word, seed=99)
    with torch.no_grad():
        return model.velocity(batch, torch.zeros_like(batch["actions"]), torch.full((4,), 0.5))


def test_a_plain_loop_runs_stage1_then_stage2_with_the_invariants():
    model = build()
    optimizer, scheduler = optimizer_of(model)
    vlm_before = copy.deepcopy(model.vlm.state_dict())
    train(model, optimizer, scheduler, 0, SWITCH)
    assert model.apt.stage == 2 and model.apt.step == SWITCH
    assert all(torch.equal(v, model.vlm.state_dict()[k]) for k, v in vlm_before.items()), "VLM bit-identical"
    model.apt.set_step(SWITCH - 1)  # Stage 1: the instruction cannot change the action
    assert torch.equal(sample(model, 0), sample(model, 1))
    stage1 = sample(model, 0)
    model.apt.set_step(SWITCH)  # the switch: closed gates, exactly the Stage-1 model
    assert torch.equal(sample(model, 0), stage1)
    train(model, optimizer, scheduler, SWITCH, TOTAL)
    assert not torch.equal(sample(model, 0), sample(model, 1)), "Stage 2 reads the instruction"
    assert any(abs(v) > 0 for gates in model.apt.gate_values().values() for v in gates.values())


def test_a_plain_loop_resumes_exactly_from_the_controllers_state_dict(tmp_path):
    uninterrupted = build()
    optimizer, scheduler = optimizer_of(uninterrupted)
    expected = train(uninterrupted, optimizer, scheduler, 0, TOTAL)

    first = build()
    optimizer, scheduler = optimizer_of(first)
    resumed = train(first, optimizer, scheduler, 0, SWITCH + 1)  # stop inside Stage 2
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
    resumed += train(second, optimizer, scheduler, SWITCH + 1, TOTAL)
    assert resumed == expected
    final = uninterrupted.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in second.state_dict().items())


def test_the_controllers_state_is_plain_data_and_refuses_a_changed_plan():
    model = build()
    model.apt.set_step(2)
    assert model.apt.state_dict() == {
        "plan": {"first_stage": 1, "switch_step": SWITCH},
        "step": 2,
        "stage": 1,
        "version": 3,
    }
    other = build()
    other.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH + 5))
    with pytest.raises(StageMismatchError, match="Resume with the same APTStageScheduler arguments"):
        other.apt.on_load_checkpoint({"apt": model.apt.state_dict(), "global_step": 2})


def test_a_reference_policy_trains_identically_under_lightning_and_under_a_plain_loop():
    batches = ResumableDataLoader(LanguageDecidesDataset(16), batch_size=4, shuffle=False, collate_fn=collate)
    recorder = LossRecorder()
    lightning_policy = make_policy("groot")
    trainer(TOTAL, [APTStageScheduler(switch_at_step=SWITCH), recorder]).fit(lightning_policy, batches)

    policy = make_policy("groot")
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH))
    configured = policy.apt.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    policy.train()
    epoch = [collate([batches.dataset[i] for i in range(j, j + 4)]) for j in range(0, 16, 4)]
    losses = {}
    for step in range(TOTAL):
        batch_idx = step % len(epoch)
        policy.apt.set_step(step, micro_batch=batch_idx)
        noise, time = policy.draw_noise_time(4, batch_idx)
        loss = policy.flow_loss(epoch[batch_idx], noise, time)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
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
