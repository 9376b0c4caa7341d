"""A VLA with no Lightning at all, adopted the README's way, and the README's plain loop: shared by the controller,
clock and adapter-file tests."""

from __future__ import annotations

import torch
from torch import nn

from apt_lightning import APT, APTConfig, FusionConfig, StagePlan

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


def build() -> PlainVLA:
    torch.manual_seed(0)
    model = PlainVLA()
    model.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH))
    return model


def optimizer_of(model: PlainVLA) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    configured = model.apt.configure_optimizers()
    return configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def train(model: PlainVLA, optimizer, scheduler, stop: int, step_scheduler: bool = True) -> list[float]:
    """The whole plain loop, restarting where the weights are (``apt.step``): an ordinary optimisation step, with
    nothing to tell the controller."""
    model.train()
    losses = []
    while model.apt.step < stop:
        step = model.apt.step
        loss = model.loss(plain_batch(step % 2, seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step_scheduler:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def sample(model: PlainVLA, word: int) -> torch.Tensor:
    model.eval()
    batch = plain_batch(word, seed=99)
    with torch.no_grad():
        return model.velocity(batch, torch.zeros_like(batch["actions"]), torch.full((4,), 0.5))
