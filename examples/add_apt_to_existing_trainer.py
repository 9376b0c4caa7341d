"""The smallest adoption of APT: an existing Lightning VLA, one controller, one callback.

The model below stands for *your* code: a VLM (here a toy transformer over image patches + text) whose
features condition a flow-matching expert. Lines marked ``# APT`` are everything APT needs. After training it
samples action chunks with the expert compiled (``torch.compile``, one graph per stage: docs/performance.md).

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


class FlowExpert(nn.Module):
    """The action expert: one call is one denoising step (what ``torch.compile`` compiles for sampling)."""

    def __init__(self) -> None:
        super().__init__()
        self.action_in = nn.Linear(2 + 1, DIM)
        self.blocks = nn.ModuleList([ExpertBlock() for _ in range(2)])
        self.action_out = nn.Linear(DIM, 2)

    def forward(self, x_t, t, features, context_mask):
        h = self.action_in(torch.cat([x_t, t[:, None, None].expand(-1, x_t.shape[1], 1)], -1))
        for block in self.blocks:
            h = block(h, features, context_mask)
        return self.action_out(h)


class MyVLA(APTMixin, pl.LightningModule):  # APT: subclass the mixin
    def __init__(self) -> None:
        super().__init__()
        self.vlm = ToyVLM()
        self.expert = FlowExpert()
        fusion = FusionConfig(target_modules=r"expert\.blocks\.\d+", num_heads=2, context_dim=DIM)  # APT
        self.apt = APT(self, vlm="vlm", fusion=fusion)  # APT: which module is the VLM

    def condition(self, batch):
        """One VLM pass: the features the expert reads, and the masks (padding in ``attention_mask`` is optional)."""
        text = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        attention = torch.cat([torch.ones(batch["patches"].shape[:2], dtype=text.dtype), text], 1)
        image_part = torch.zeros_like(batch["patches"][..., 0], dtype=torch.bool)
        masks = self.apt.masks(attention, torch.cat([image_part, batch["language_mask"]], 1))  # APT
        with self.apt.vlm_context():  # APT
            features = self.vlm(batch["patches"], batch["input_ids"], masks.vlm_attention)
        return features, masks

    def velocity(self, batch, x_t, t):
        features, masks = self.condition(batch)
        with self.apt.fusion_context(features, masks.language):  # APT
            return self.expert(x_t, t, features, masks.expert_attention.bool())

    @torch.no_grad()
    def sample_actions(self, batch, noise, num_steps=10, guidance_scale=1.0):
        """Euler integration of the flow from ``noise`` (t = 0) to actions (t = 1): the VLM runs once per chunk,
        the expert once per step (twice the rows under guidance: conditional and language-free prior)."""
        features, masks = self.condition(batch)
        x, mask = noise, masks.expert_attention.bool()
        with self.apt.fusion_context(features, masks.language, guidance_scale) as guide:  # APT
            features, mask = guide.expand(features), guide.expand(mask)
            for step in range(num_steps):
                t = torch.full((x.shape[0],), step / num_steps)
                x = x + guide.combine(self.expert(guide.expand(x), guide.expand(t), features, mask)) / num_steps
        return x

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
    batch = {key: torch.stack([item[key] for item in toy_data(4)]) for key in ("patches", "input_ids", "language_mask")}
    model.expert.compile(fullgraph=True, dynamic=False)  # optional: compiled sampling, one graph per stage
    print("first sampled action per chunk:", model.eval().sample_actions(batch, torch.randn(4, CHUNK, 2))[:, 0])
