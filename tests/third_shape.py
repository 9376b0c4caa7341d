"""A third VLA shape, adopted through the public ``APTMixin`` contract the way a new user would.

* VLM: transformers' ``Qwen2VLModel`` (causal decoder, M-RoPE, images *before* text), tiny random weights.
* Expert: a SmolVLA-style flow-matching head; its layer ``i`` self-attends over the action chunk (plus a state
  token) and cross-attends to the VLM hidden states of layer ``context_layers[i]``, with the key mask hiding
  the instruction. Stage 2 appends a gated cross-attention to every expert layer, fed with the *same* layer's
  VLM states (one context per fusion site), keyed on the instruction tokens only.

Batch layout: as :mod:`helpers` (``pixel_values`` (B, 3, H, W), ``state`` (B, S), ``actions`` (B, T, A),
``input_ids``/``attention_mask``/``language_mask`` (B, L) for the text prompt; the policy prepends the image
tokens as the Qwen2-VL processor would).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2VLConfig, Qwen2VLModel

from apt_lightning import APT, APTConfig, APTMixin, FusionConfig

IMAGE, VISION_START, VISION_END = 127, 125, 124


def tiny_qwen2vl_config(hidden_size: int = 32, num_layers: int = 4, vocab_size: int = 128) -> Qwen2VLConfig:
    """A Qwen2-VL small enough for CPU tests: 32-pixel images, 8-pixel patches, 2x2 merge = 4 image tokens."""
    head_dim = hidden_size // 2
    half = head_dim // 2  # M-RoPE splits the rotary frequencies over (t, h, w)
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=hidden_size,
            hidden_size=hidden_size,
            num_heads=2,
            mlp_ratio=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=IMAGE,
        video_token_id=126,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )


def qwen2vl_patches(
    pixel_values: torch.Tensor, patch: int, merge: int, temporal: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) images -> Qwen2-VL's flattened patches (B*h*w, C*temporal*patch*patch) and ``image_grid_thw``.

    Patches are ordered merge-window by merge-window, as the Qwen2-VL image processor orders them.
    """
    b, c, height, width = pixel_values.shape
    gh, gw = height // patch, width // patch
    x = pixel_values[:, :, None].expand(b, c, temporal, height, width)
    x = x.reshape(b, c, temporal, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 1, 2, 5, 8).reshape(b * gh * gw, c * temporal * patch * patch)
    grid = torch.tensor([[1, gh, gw]] * b, device=pixel_values.device)
    return x, grid


class ExpertLayer(nn.Module):
    """Self-attention over the chunk, cross-attention to one VLM layer's states, MLP (pre-norm residuals)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.hidden_size, self.num_heads = dim, num_heads
        self.self_norm, self.cross_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(context_dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, D); ``context`` (B, S, C) VLM states; ``context_mask`` (B, S) bool, True on visible keys."""
        q, k, v = self.qkv(self.self_norm(x)).chunk(3, dim=-1)
        attn = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        x = x + self.self_out(self._merge(attn))
        k, v = self.cross_kv(context).chunk(2, dim=-1)
        q = self.cross_q(self.cross_norm(x))
        key_mask = context_mask[:, None, None, :]
        attn = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), attn_mask=key_mask)
        x = x + self.cross_out(self._merge(attn))
        return x + self.mlp(self.mlp_norm(x))


class FlowExpert(nn.Module):
    """Action chunk + state token in, velocity out; layer ``i`` reads the ``i``-th context of ``contexts``."""

    def __init__(self, action_dim: int, state_dim: int, dim: int, context_dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.action_in = nn.Linear(action_dim, dim)
        self.time_mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.state_in = nn.Linear(state_dim, dim)
        self.layers = nn.ModuleList(ExpertLayer(dim, context_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.action_out = nn.Linear(dim, action_dim)

    def time_embedding(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        freqs = torch.exp(torch.linspace(0.0, 6.0, dim // 2, device=t.device)) * torch.pi
        angles = t[:, None] * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        state: torch.Tensor,
        contexts: Sequence[torch.Tensor],
        context_mask: torch.Tensor,
    ) -> torch.Tensor:
        actions = self.action_in(x_t)
        time = self.time_embedding(t, actions.shape[-1])[:, None].expand_as(actions)
        h = torch.cat([self.state_in(state)[:, None], self.time_mlp(torch.cat([actions, time], dim=-1))], dim=1)
        for layer, context in zip(self.layers, contexts, strict=True):
            h = layer(h, context, context_mask)
        return self.action_out(self.norm(h[:, 1:]))


class ThirdShapePolicy(APTMixin, L.LightningModule):
    """Qwen2-VL + per-layer cross-attending flow expert, with APT.

    Args:
        vlm_config: the Qwen2-VL config (random weights); :func:`tiny_qwen2vl_config` when ``None``.
        context_layers: VLM hidden-states index each expert layer reads (``0`` = embeddings), one per layer.
        expert_dim, expert_heads: expert width and heads.
        action_dim, state_dim, chunk_size: data dimensions.
        num_inference_steps: Euler steps from noise (t = 0) to actions (t = 1).
        apt_config: APT optimisation settings.

    Example::

        >>> policy = ThirdShapePolicy(context_layers=(2, 4))
        >>> [name for name, _ in policy.expert.layers.named_children()]
        ['0', '1']
    """

    def __init__(
        self,
        vlm_config: Qwen2VLConfig | None = None,
        context_layers: Sequence[int] = (2, 4),
        expert_dim: int = 32,
        expert_heads: int = 2,
        action_dim: int = 2,
        state_dim: int = 2,
        chunk_size: int = 4,
        num_inference_steps: int = 4,
        apt_config: APTConfig | None = None,
    ) -> None:
        super().__init__()
        self.vlm = Qwen2VLModel(vlm_config or tiny_qwen2vl_config())
        config = self.vlm.config
        width = config.text_config.hidden_size
        self.context_layers = list(context_layers)
        self.expert = FlowExpert(action_dim, state_dim, expert_dim, width, len(self.context_layers), expert_heads)
        fusion = FusionConfig(target_modules=r"expert\.layers\.\d+", num_heads=2, context_dim=width)
        self.apt = APT(self, vlm="vlm", fusion=fusion, config=apt_config)
        self.action_dim, self.chunk_size, self.num_inference_steps = action_dim, chunk_size, num_inference_steps
        vision = config.vision_config
        self.patching = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)

    # ------------------------------------------------------------------ prompt (what a processor would build)
    def prompt(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``<vision_start> <image>*N <vision_end>`` before the text prompt; the image part is never language."""
        ids = batch["input_ids"]
        patch, merge, _ = self.patching
        h, w = batch["pixel_values"].shape[-2:]
        n = (h // patch) * (w // patch) // merge**2
        image = torch.tensor([VISION_START] + [IMAGE] * n + [VISION_END], dtype=ids.dtype, device=ids.device)
        image = image.expand(ids.shape[0], -1)
        attention = batch["attention_mask"]
        return {
            "input_ids": torch.cat([image, ids], 1),
            "attention_mask": torch.cat([torch.ones_like(image, dtype=attention.dtype), attention], 1),
            "language_mask": torch.cat([torch.zeros_like(image, dtype=torch.bool), batch["language_mask"]], 1),
        }

    # ------------------------------------------------------------------ VLM pass
    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-expert-layer VLM states, the expert's key mask (no language) and the language mask."""
        prompt = self.prompt(batch)
        ids = prompt["input_ids"]
        masks = self.apt.masks(prompt["attention_mask"], prompt["language_mask"], causal=True)
        patches, grid = qwen2vl_patches(batch["pixel_values"], *self.patching)
        # M-RoPE positions from the model's own helper: non-language tokens numbered as if the instruction were
        # absent (its mask is `masks.expert_attention`), instruction tokens numbered as in the full prompt.
        image_types = (ids == IMAGE).int()
        blind, _ = self.vlm.get_rope_index(ids, image_types, grid, attention_mask=masks.expert_attention)
        full, _ = self.vlm.get_rope_index(ids, image_types, grid, attention_mask=prompt["attention_mask"])
        positions = torch.where(masks.language, full, blind)
        with self.apt.vlm_context():
            out = self.vlm(
                input_ids=ids,
                pixel_values=patches,
                image_grid_thw=grid,
                attention_mask=masks.vlm_attention,
                position_ids=positions,
                output_hidden_states=True,
                use_cache=False,
            )
        contexts = [out.hidden_states[k] for k in self.context_layers]
        return contexts, masks.expert_attention.bool(), masks.language

    # ------------------------------------------------------------------ flow matching
    def flow_loss(self, batch: dict[str, torch.Tensor], noise: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        contexts, visible, language = self.encode(batch)
        t = time[:, None, None]
        x_t = (1 - t) * noise + t * batch["actions"]
        with self.apt.fusion_context(contexts, language):
            velocity = self.expert(x_t, time, batch["state"], contexts, visible)
        return F.mse_loss(velocity, batch["actions"] - noise)

    @torch.no_grad()
    def sample_actions(
        self, batch: dict[str, torch.Tensor], noise: torch.Tensor, num_steps: int | None = None
    ) -> torch.Tensor:
        num_steps = num_steps or self.num_inference_steps
        contexts, visible, language = self.encode(batch)
        x, b = noise, noise.shape[0]
        with self.apt.fusion_context(contexts, language):
            for step in range(num_steps):
                time = torch.full((b,), step / num_steps, device=x.device)
                x = x + self.expert(x, time, batch["state"], contexts, visible) / num_steps
        return x

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        b = batch["state"].shape[0]
        with self.apt.rng(batch_idx):
            noise = torch.randn(b, self.chunk_size, self.action_dim, device=self.device)
            time = torch.rand(b, device=self.device)
        loss = self.flow_loss(batch, noise, time)
        self.log("train/loss", loss, batch_size=b)
        return loss
