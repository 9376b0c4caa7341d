"""The smallest adoption of APT: an existing Lightning VLA, one controller, one callback.

The model below stands for *your* code: a VLM (here a toy transformer over image patches + text) whose
features condition a flow-matching expert. Lines marked ``# APT`` are everything APT needs.

    python examples/add_apt_to_existing_trainer.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from apt_lightning import APT, APTMixin, APTStageScheduler, FusionConfig, GateMonitor  # APT
from apt_lightning.data import ResumableDataLoader

VOCAB, DIM, PATCHES, CHUNK = 32, 32, 4, 4


class ToyVLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(12, DIM)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(DIM, 2, 64, batch_first=True), 2)

    def forward(self, patches, input_ids, attention):  # attention: (B, 1, L, L) bool, True = may attend
        x = torch.cat([self.patch(patches), self.embed(input_ids)], 1)
        return self.encoder(x, mask=~attention[:, 0].repeat_interleave(2, 0))


class ExpertBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden_size = DIM
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, DIM), nn.GELU())

    def forward(self, x, context, context_mask):
        x = x + self.attn(x, context, context, key_padding_mask=~context_mask)[0]
        return x + self.mlp(x)


class MyVLA(APTMixin, pl.LightningModule):  # APT: subclass the mixin
    def __init__(self) -> None:
        super().__init__()
        self.vlm = ToyVLM()
        self.action_in = nn.Linear(2 + 1, DIM)
        self.blocks = nn.ModuleList([ExpertBlock() for _ in range(2)])
        self.action_out = nn.Linear(DIM, 2)
        fusion = FusionConfig(target_modules=r"blocks\.\d+", num_heads=2, context_dim=DIM)  # APT: where fusion goes
        self.apt = APT(self, vlm="vlm", fusion=fusion)  # APT: which module is the VLM

    def velocity(self, batch, x_t, t):
        attention = torch.ones(batch["patches"].shape[:2], dtype=torch.long)
        attention = torch.cat([attention, torch.ones_like(batch["input_ids"])], 1)
        image_part = torch.zeros_like(batch["patches"][..., 0], dtype=torch.bool)
        masks = self.apt.masks(attention, torch.cat([image_part, batch["language_mask"]], 1))  # APT
        with self.apt.vlm_context():  # APT
            features = self.vlm(batch["patches"], batch["input_ids"], masks.vlm_attention)
        h = self.action_in(torch.cat([x_t, t[:, None, None].expand(-1, CHUNK, 1)], -1))
        with self.apt.fusion_context(features, masks.language):  # APT
            for block in self.blocks:
                h = block(h, features, masks.expert_attention.bool())
        return self.action_out(h)

    def training_step(self, batch, batch_idx):
        with self.apt.rng(batch_idx):  # APT (optional): noise that resumes exactly
            noise, t = torch.randn_like(batch["actions"]), torch.rand(batch["actions"].shape[0])
        x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * batch["actions"]
        loss = nn.functional.mse_loss(self.velocity(batch, x_t, t), batch["actions"] - noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss


def toy_data(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        word = i % 2  # the instruction ("left" = 5, "right" = 6) decides the action
        items.append(
            {
                "patches": torch.randn(PATCHES, 12, generator=g),
                "input_ids": torch.tensor([1, 5 + word, 2]),
                "language_mask": torch.tensor([False, True, False]),
                "actions": torch.full((CHUNK, 2), 1.0 if word == 0 else -1.0),
            }
        )
    return items


if __name__ == "__main__":
    model = MyVLA()
    trainer = pl.Trainer(
        max_steps=120,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[APTStageScheduler(switch_at_step=60), GateMonitor(every_n_steps=20)],  # APT: one callback
    )
    trainer.fit(model, ResumableDataLoader(toy_data(), batch_size=8, shuffle=True))
    print({site: {k: round(v, 4) for k, v in gates.items()} for site, gates in model.apt.gate_values().items()})
