"""A GR00T-style DiT action head: AdaLN on flow-matching time, cross-attention to VL tokens in even blocks,
self-attention over the state and action tokens in odd blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from apt_lightning.attention import masked_attention
from apt_lightning.fusion import LanguageGate


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) times -> (B, dim) sin/cos features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        h = self.num_heads
        q = self.to_q(x).view(b, t, h, d // h).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, -1)
        k = k.view(b, -1, h, d // h).transpose(1, 2)
        v = v.view(b, -1, h, d // h).transpose(1, 2)
        return self.to_out(masked_attention(q, k, v, key_mask).transpose(1, 2).reshape(b, t, d))


class DiTBlock(nn.Module):
    """Pre-norm transformer block; the attention norm is AdaLN (scale/shift from the time embedding)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None, language_gate: bool = False) -> None:
        super().__init__()
        self.dim = self.hidden_size = dim
        self.cross = context_dim is not None
        # a cross-attention block may also read language tokens, behind a zero gate (exact at the switch)
        self.language_gate = LanguageGate() if language_gate and self.cross else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 2 * dim)
        self.attn = Attention(dim, context_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        language: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        scale, shift = self.ada(F.silu(temb))[:, None].chunk(2, -1)
        h = self.norm1(x) * (1 + scale) + shift
        if not self.cross:
            return self._ff(x + self.attn(h, h, None))
        attended = self.attn(h, context, context_mask)
        if self.language_gate is not None and language is not None:
            tokens, mask = language  # the same attention over the VL tokens and the language tokens
            with_language = self.attn(h, torch.cat([context, tokens], 1), torch.cat([context_mask, mask], 1))
            with_language = torch.where(mask.any(-1)[:, None, None], with_language, attended)  # no language: exact
            attended = self.language_gate(attended, with_language)
        return self._ff(x + attended)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm2(x))


class DiTActionHead(nn.Module):
    """Velocity field v(x_t, t | state, VL tokens) over an action chunk, GR00T layout.

    Args:
        action_dim: action dimensions A.
        state_dim: proprioception dimensions S.
        chunk_size: actions per chunk T.
        context_dim: width of the VL tokens.
        dim: width of the head.
        depth: number of blocks (even: cross-attention, odd: self-attention).
        num_heads: attention heads.
        language_gates: give each cross-attention block a :class:`~apt_lightning.fusion.LanguageGate`, so it can
            also attend to language tokens (``forward(..., language=(tokens, mask))``) behind a zero gate.

    Example::

        >>> head = DiTActionHead(action_dim=2, state_dim=3, chunk_size=4, context_dim=8, dim=16, depth=2)
        >>> head(torch.randn(1, 4, 2), torch.rand(1), torch.randn(1, 3), torch.randn(1, 5, 8),
        ...      torch.ones(1, 5, dtype=torch.bool)).shape
        torch.Size([1, 4, 2])
    """

    def __init__(
        self,
        action_dim: int,
        state_dim: int,
        chunk_size: int,
        context_dim: int,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        language_gates: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.state_encoder = nn.Sequential(nn.Linear(state_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.action_in = nn.Linear(action_dim, dim)
        self.action_time = nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.position = nn.Parameter(torch.zeros(1, chunk_size + 1, dim))
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(
            [DiTBlock(dim, num_heads, context_dim if i % 2 == 0 else None, language_gates) for i in range(depth)]
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, action_dim)
        nn.init.normal_(self.position, std=0.02)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        state: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        language: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        t_features = sinusoidal_embedding(t * 1000.0, self.dim).to(x_t.dtype)  # GR00T embeds the discretised time
        temb = self.time_mlp(t_features)
        actions = self.action_in(x_t)
        actions = self.action_time(torch.cat([actions, t_features[:, None].expand_as(actions)], -1))
        x = torch.cat([self.state_encoder(state)[:, None], actions], 1) + self.position
        for block in self.blocks:
            x = block(x, temb, context, context_mask, language)
        scale, shift = self.ada_out(F.silu(temb))[:, None].chunk(2, -1)
        x = self.norm_out(x) * (1 + scale) + shift
        return self.proj_out(x[:, 1:])
