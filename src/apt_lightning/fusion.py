"""Zero-initialised, tanh-gated cross-attention (Flamingo-style) and the wrapper that appends it to a module.

The block is an exact identity while its gates are zero: ``x + tanh(0) * f(x) == x`` bit for bit as long as
``f(x)`` is finite, which the block guarantees (rows without any valid context key are passed through
unchanged instead of producing NaN). That is what makes the Stage-1 -> Stage-2 switch lossless.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from apt_lightning.attention import masked_attention
from apt_lightning.errors import ConfigError, ContractError, FusionContextError

GATES = ("tanh", "sigmoid")
GATE_SHAPES = ("scalar", "channel")


class GatedCrossAttentionBlock(nn.Module):
    """``y = x + tanh(g_attn) * XAttn(LN(x), ctx)``; ``y = y + tanh(g_ff) * FF(LN(y))`` with ``g = 0`` at init.

    Args:
        dim: width of the query stream ``x``.
        context_dim: width of the context (language features).
        num_heads: attention heads.
        head_dim: width per head (``dim // num_heads`` when ``None``).
        ff_mult: hidden expansion of the feed-forward branch; ``0`` drops the branch and its gate (the block is then
            gated cross-attention only, about a fifth of the default's weights and FLOPs per query token).
        dropout: dropout on both branches before the gates.
        gate: ``"tanh"`` (Flamingo; ``tanh(0) = 0``, an exact identity at the switch) or ``"sigmoid"`` (APT's own
            code; ``sigmoid(0) = 0.5``, so the switch changes the outputs: an ablation, not an identity).
        gate_shape: ``"scalar"`` (one gate per branch, Flamingo) or ``"channel"`` (one per branch and channel,
            as in the APT paper).

    Example::

        >>> block = GatedCrossAttentionBlock(dim=8, context_dim=4, num_heads=2)
        >>> x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 4)
        >>> torch.equal(block(x, ctx, torch.ones(2, 5, dtype=torch.bool)), x)
        True
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_heads: int = 4,
        head_dim: int | None = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        gate: str = "tanh",
        gate_shape: str = "scalar",
    ) -> None:
        super().__init__()
        if gate not in GATES or gate_shape not in GATE_SHAPES:
            raise ConfigError(
                f"`gate` must be one of {GATES} and `gate_shape` one of {GATE_SHAPES}, got {gate!r}, {gate_shape!r}."
            )
        self.gate, self.gate_shape = gate, gate_shape
        head_dim = head_dim or max(dim // num_heads, 1)
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        # ff_mult = 0: no feed-forward branch (an empty Sequential keeps `block.ff` for code that inspects it)
        self.ff = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
            if ff_mult
            else nn.Sequential()
        )
        self.dropout = nn.Dropout(dropout)
        size = dim if gate_shape == "channel" else 1
        self.apt_gate_attn = nn.Parameter(torch.zeros(size))
        self.apt_gate_ff = nn.Parameter(torch.zeros(size)) if ff_mult else None
        self._kv_memo: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def _context_keys_values(self, context: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the language context; without autograd (sampling) they are computed once per
        context and reused by every denoising step, whose context is the same tensor."""
        memo = self._kv_memo
        if memo is not None and memo[0] is context and memo[1] == dtype and not torch.is_grad_enabled():
            return memo[2], memo[3]
        k, v = self.to_kv(self.context_norm(context.to(dtype))).chunk(2, dim=-1)
        self._kv_memo = None if torch.is_grad_enabled() else (context, dtype, k, v)
        return k, v

    def precompute_context(self, context: torch.Tensor, dtype: torch.dtype) -> None:
        """Memoise the keys/values of ``context`` now (without autograd), as the first denoising step would."""
        with torch.no_grad():
            self._context_keys_values(context, dtype)

    def clear_context_memo(self) -> None:
        """Forget the memoised context keys/values (called whenever a site's context changes)."""
        self._kv_memo = None

    def reset_gates(self) -> None:
        """Gates back to their initial value: an exact identity again with ``gate="tanh"``."""
        with torch.no_grad():
            for gate in self.gate_parameters():
                gate.zero_()

    def gate_factor(self, gate: torch.Tensor) -> torch.Tensor:
        """The factor a gate parameter scales its branch by: ``tanh(g)`` or ``sigmoid(g)``."""
        return gate.tanh() if self.gate == "tanh" else gate.sigmoid()

    @property
    def is_identity(self) -> bool:
        """Whether the block passes its input through unchanged (every gate factor exactly zero)."""
        return all(bool(self.gate_factor(g.detach()).eq(0).all()) for g in self.gate_parameters())

    @property
    def has_ff(self) -> bool:
        """Whether the block has its gated feed-forward branch (``ff_mult > 0``)."""
        return self.apt_gate_ff is not None

    def gate_parameters(self) -> tuple[nn.Parameter, ...]:
        """The gates (attention, then feed-forward when the block has that branch): the ``gates`` param group,
        no weight decay."""
        return (self.apt_gate_attn,) if self.apt_gate_ff is None else (self.apt_gate_attn, self.apt_gate_ff)

    def gate_values(self) -> dict[str, float]:
        """The factors that actually scale the branches (``tanh`` or ``sigmoid`` of the gates; the mean over
        channels for per-channel gates); no ``"ff"`` entry without a feed-forward branch."""
        gates = zip(("attn", "ff"), self.gate_parameters(), strict=False)  # no "ff" gate without the branch
        return {name: float(self.gate_factor(g.detach()).mean()) for name, g in gates}

    @property
    def dim(self) -> int:
        """Width of the query stream (the wrapped module's hidden states)."""
        return self.attn_norm.normalized_shape[0]

    @property
    def context_dim(self) -> int:
        """Width of the language context this block reads."""
        return self.context_norm.normalized_shape[0]

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """Attend from ``x`` (B, T, dim) to ``context`` (B, S, context_dim); ``context_mask`` (B, S) is True on
        valid keys. Rows whose mask is all False are returned unchanged: no language means the VA prior.

        Each gated branch is added in ``x``'s dtype, so under autocast (bf16) a closed gate returns ``x`` bit
        for bit and hands the host model the precision it passed in.
        """
        if context.shape[0] != x.shape[0] or context_mask.shape != context.shape[:2]:
            raise FusionContextError(
                f"Fusion context of shape {tuple(context.shape)} with mask {tuple(context_mask.shape)} does not "
                f"match queries of shape {tuple(x.shape)}: expected context (B={x.shape[0]}, S, D) and mask (B, S)."
            )
        if context.shape[1] == 0:
            return x
        context_mask = context_mask.to(device=x.device, dtype=torch.bool)
        b, t, _ = x.shape
        q = self.to_q(self.attn_norm(x)).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self._context_keys_values(context, x.dtype)
        k = k.view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        attn = masked_attention(q, k, v, context_mask)  # exact zeros on rows without language
        attn = self.to_out(attn.transpose(1, 2).reshape(b, t, -1))
        y = x + (self.gate_factor(self.apt_gate_attn) * self.dropout(attn)).to(x.dtype)
        if self.apt_gate_ff is None:
            return y
        keep = context_mask.any(dim=-1)[:, None, None]
        ff = torch.where(keep, self.dropout(self.ff(y)), 0.0)
        return y + (self.gate_factor(self.apt_gate_ff) * ff).to(y.dtype)


class LanguageGate(nn.Module):
    """A zero-initialised tanh gate on a language path *inside* the expert's own layers (not a fusion block).

    ``forward(prior, conditioned)`` returns ``prior + tanh(g) * (conditioned - prior)``: exactly ``prior`` while
    ``g = 0``, so an expert that also reads language through its own attention keeps the exact Stage-2 switch.
    The gate joins APT's ``gates`` param group (trained from the switch on, at ``gate_lr``) and its non-finite
    checks.

    Example::

        >>> gate = LanguageGate()
        >>> prior, conditioned = torch.randn(2, 3), torch.randn(2, 3)
        >>> torch.equal(gate(prior, conditioned), prior)
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self.apt_gate = nn.Parameter(torch.zeros(1))

    @property
    def is_identity(self) -> bool:
        return bool(self.apt_gate.detach().eq(0).all())

    def forward(self, prior: torch.Tensor, conditioned: torch.Tensor) -> torch.Tensor:
        return prior + (self.apt_gate.tanh() * (conditioned - prior)).to(prior.dtype)


class GatedFusionLayer(nn.Module):
    """Runs ``base_layer`` unchanged, then the gated block on its output hidden states.

    The host model calls this wrapper exactly as it called the original module, so the expert's forward code
    needs no edit. While ``active`` is False (Stage 1, joint) the block is skipped entirely. Context comes from
    :meth:`set_context`, which :meth:`APT.fusion_context` calls for every site at once.

    Every call checks (shapes only, no host sync) that the wrapped module returns hidden states the block can
    read; an inactive site records the problem in :attr:`output_problem` (so Stage 1 reports every bad site
    at its first step instead of the switch failing after it), an active one raises :class:`ContractError`.

    Attributes:
        base_layer: the wrapped module (peft convention), whose parameters keep their names under it.
        apt_fusion: the :class:`GatedCrossAttentionBlock`.
        output_problem: why the wrapped module's output cannot take fusion, or ``None``.
    """

    def __init__(self, base_layer: nn.Module, block: GatedCrossAttentionBlock) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.apt_fusion = block
        self.active = False
        self.output_problem: str | None = None
        self._context: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def set_context(self, context: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        self._context = None if context is None else (context, mask)
        self.apt_fusion.clear_context_memo()

    def precompute_context(self, dtype: torch.dtype) -> None:
        """Compute the block's context keys/values once for the current context (sampling: every denoising step
        reuses them). A no-op while the site is inactive, has no context or autograd is on."""
        if self.active and self._context is not None and not torch.is_grad_enabled():
            context = self._context[0]
            if context.shape[1]:
                self.apt_fusion.precompute_context(context, dtype)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def _hidden_states(self, out: Any) -> torch.Tensor | None:
        """The output's hidden states, or ``None`` after recording why the output cannot take fusion."""
        hidden = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) and out else None
        if not isinstance(hidden, torch.Tensor):
            self.output_problem = (
                f"{type(self.base_layer).__name__} returns {type(out).__name__}, not hidden states (a tensor, or a "
                "tuple whose first item is one): target a submodule that returns the expert's hidden states."
            )
        elif hidden.ndim != 3 or hidden.shape[-1] != self.apt_fusion.dim:
            self.output_problem = (
                f"{type(self.base_layer).__name__} returns shape {tuple(hidden.shape)}, but its fusion block reads "
                f"hidden states (B, T, {self.apt_fusion.dim}): target the expert's layers (whose output is the "
                "hidden-state stream), or set `FusionConfig.hidden_dim` to the output width."
            )
        else:
            self.output_problem = None
            return hidden
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        hidden = self._hidden_states(out)
        if not self.active:
            return out
        if hidden is None:
            raise ContractError(f"Fusion site cannot take gated fusion: {self.output_problem}")
        if self._context is None:
            raise FusionContextError(
                "Stage-2 fusion context must be set before forward: run the expert inside "
                "`with self.apt.fusion_context(language_features, language_mask):`."
            )
        fused = self.apt_fusion(hidden, *self._context)
        return fused if isinstance(out, torch.Tensor) else (fused, *out[1:])
