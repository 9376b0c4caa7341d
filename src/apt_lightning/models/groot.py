"""GR00T-style reference policy: a transformers VLM whose mid-layer features condition a DiT action head.

As in GR00T N1.5+, features come from one VLM layer, pass a LayerNorm and a small self-attention stack, and
the DiT cross-attends to them in its even blocks; flow matching uses GR00T's time convention
(``x_t = (1 - t) * noise + t * actions``, integrate from t = 0 to 1). APT changes only the conditioning:
the VL tokens the head sees exclude language (dropped by key mask *before* the self-attention stack, which
is unmasked in GR00T), and Stage 2 adds language through gated cross-attention after every DiT block.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, cast

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PaliGemmaConfig, PretrainedConfig

from apt_lightning.attention import masked_attention
from apt_lightning.config import APTConfig, fusion_config_with_options
from apt_lightning.controller import APT
from apt_lightning.feature_cache import gather_tokens, visible_first
from apt_lightning.guidance import PriorGuidance
from apt_lightning.models.base import (
    FlowMatchingPolicy,
    as_apt_config,
    chunk_mse,
    per_site_text,
    tiny_gemma,
    tiny_siglip,
)
from apt_lightning.models.dit import DiTActionHead
from apt_lightning.models.hf_config import check_config_keys
from apt_lightning.models.sampling import SamplingCondition


def tiny_paligemma_config(
    vocab_size: int = 128,
    image_size: int = 32,
    hidden_size: int = 32,
    num_layers: int = 2,
    image_token_id: int | None = None,
) -> PaliGemmaConfig:
    """A PaliGemma small enough for CPU tests (random weights, no download).

    ``image_token_id`` is the id prompts use for image placeholders (the last id when None); pass your
    tokenizer's, e.g. ``tiny_paligemma_config(**tokenizer.vlm_vocabulary)`` for the benchmark's.
    """
    return PaliGemmaConfig(
        text_config=tiny_gemma(hidden_size, num_layers, vocab_size=vocab_size),
        vision_config=tiny_siglip(hidden_size, num_layers, image_size),
        projection_dim=hidden_size,
        image_token_id=vocab_size - 1 if image_token_id is None else image_token_id,
    )


def _vlm_config(config: PretrainedConfig | dict[str, Any] | None) -> PretrainedConfig:
    """A backbone config from a config, its dict (YAML, checkpoints) or ``None`` (the tiny PaliGemma).

    Raises:
        ConfigError: a key transformers would silently ignore (``num_atention_heads`` in ``text_config``), named
            with the closest valid keys.
    """
    if config is None:
        return tiny_paligemma_config()
    built = AutoConfig.for_model(**config) if isinstance(config, dict) else config
    check_config_keys(config, built, "vlm_config")
    return built


class VLSelfAttention(nn.Module):
    """GR00T's ``vl_self_attention`` stack, with a key mask so that dropped (language) tokens stay invisible."""

    def __init__(self, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.layers = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "out": nn.Linear(dim, dim)})
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        for layer in self.layers:
            layer = cast(nn.ModuleDict, layer)  # built as one in __init__
            q, k, v = layer["qkv"](layer["norm"](x)).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)
            attn = masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask)
            x = x + layer["out"](attn.transpose(1, 2).reshape(b, n, d))
        return x


class Encoded(NamedTuple):
    """What the head reads: VL tokens without language and their key mask; the fusion context (text features
    and language mask, ``None`` outside Stage 2); the text as the head's VL stack sees it with language visible
    (``head_reads_language`` in Stage 2, else ``None``)."""

    vl_tokens: torch.Tensor
    visible: torch.Tensor
    language: torch.Tensor | list[torch.Tensor] | None
    language_mask: torch.Tensor
    head_tokens: torch.Tensor | None


class GR00TStylePolicy(FlowMatchingPolicy):
    """VLM backbone (PaliGemma here; any ``AutoModel`` VLM with ``image_token_id``) + DiT flow-matching head.

    Args:
        vlm_config: config of the backbone (random init); ignored when ``vlm_pretrained`` is given.
        vlm_pretrained: path or hub id for ``AutoModel.from_pretrained`` of the backbone (the VLM); the same
            argument name as :class:`PI0Policy`'s.
        select_layer: hidden-states index the features are taken from (GR00T N1.5 uses 12).
        action_dim, state_dim, chunk_size: data dimensions.
        head_width, head_depth, head_heads: DiT size: width of the head's hidden states (not the width per
            attention head, which is ``head_width // head_heads``), blocks, attention heads.
        head_dim: deprecated name of ``head_width`` (it read as a per-attention-head width); still accepted.
        vl_self_attention_depth: layers of the masked self-attention stack over VL tokens.
        causal_vlm: ``True`` for decoder-only VLMs (Qwen-VL, Eagle); ``False`` for PaliGemma's bidirectional prefix.
        num_inference_steps: Euler steps (GR00T uses 4).
        apt_config: APT optimisation and VLM-mode settings.
        head_reads_language: in Stage 2 the head's own cross-attention blocks also read the instruction (its text
            tokens through the VL self-attention stack, as GR00T's baseline head does), each behind a zero-init
            :class:`~apt_lightning.fusion.LanguageGate`, in addition to the fusion blocks; the switch stays exact.
        fusion_options: other :class:`FusionConfig` fields for the fusion blocks (``gate``, ``gate_shape``,
            ``ff_mult`` ...), e.g. ``{"gate": "sigmoid"}`` for the ablations.
        per_site_language: each fusion site reads the backbone layer at its own relative depth (DiT block i reads
            layer ceil((i + 1) L_vlm / n_blocks)) instead of ``select_layer``.

    Example::

        >>> policy = GR00TStylePolicy(tiny_paligemma_config(), select_layer=1, head_width=16, head_depth=2)
        >>> policy.apt.fusion.target_modules
        'action_head\\\\.blocks\\\\.\\\\d+'
    """

    @classmethod
    def vlm_text_width(cls, init_args: Any) -> int:
        """Hidden size of the text model of the backbone that ``vlm_config`` (a config or its dict) describes."""
        return int(_vlm_config(init_args.get("vlm_config")).get_text_config().hidden_size)

    def __init__(
        self,
        vlm_config: PaliGemmaConfig | dict[str, Any] | None = None,
        vlm_pretrained: str | None = None,
        select_layer: int = -1,
        action_dim: int = 2,
        state_dim: int = 2,
        chunk_size: int = 4,
        head_width: int = 64,
        head_depth: int = 4,
        head_heads: int = 4,
        vl_self_attention_depth: int = 1,
        causal_vlm: bool = False,
        num_inference_steps: int = 4,
        apt_config: APTConfig | dict[str, Any] | None = None,
        head_reads_language: bool = False,
        fusion_options: dict[str, Any] | None = None,
        per_site_language: bool = False,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        if head_dim is not None:
            warnings.warn(
                "GR00TStylePolicy(head_dim=...) is deprecated: it is the DiT head's width, now `head_width` (the width "
                "per attention head is head_width // head_heads).",
                DeprecationWarning,
                stacklevel=2,
            )
            head_width = head_dim
        if vlm_pretrained is not None:
            self.backbone = AutoModel.from_pretrained(vlm_pretrained)
        else:
            self.backbone = AutoModel.from_config(_vlm_config(vlm_config))
        config = self.backbone.config
        width = config.get_text_config().hidden_size
        self.save_policy_hyperparameters(vlm_config=config.to_dict(), head_width=head_width, head_dim=None)
        self.select_layer = select_layer
        self.causal_vlm = causal_vlm
        self.action_dim, self.chunk_size, self.num_inference_steps = action_dim, chunk_size, num_inference_steps
        vision = config.vision_config
        self.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
        self.image_token_id = config.image_token_id
        self.vl_norm = nn.LayerNorm(width)
        self.vl_self_attention = VLSelfAttention(width, vl_self_attention_depth, num_heads=2)
        self.head_reads_language, self.per_site_language = head_reads_language, per_site_language
        self.action_head = DiTActionHead(
            action_dim,
            state_dim,
            chunk_size,
            width,
            head_width,
            head_depth,
            head_heads,
            language_gates=head_reads_language,
        )
        fusion = fusion_config_with_options(
            fusion_options, target_modules=r"action_head\.blocks\.\d+", num_heads=head_heads
        )
        self.apt = APT(self, vlm="backbone", fusion=fusion, config=as_apt_config(apt_config))

    def encode(self, batch: dict[str, torch.Tensor]) -> Encoded:
        """VL tokens and their key mask for the head (language dropped), plus language features and mask.

        The head's tokens are the selected layer's visible (non-language) tokens first, so they do not depend on
        where the instruction sat. In Stage-1 training under a :class:`~apt_lightning.Stage1FeatureCache` the
        selected-layer features come from the cache (language features are then ``None``).
        """
        prompt = self.prompt(batch)
        masks = self.apt.masks(prompt["attention_mask"], prompt["language_mask"], causal=self.causal_vlm)
        order = visible_first(masks.expert_attention)

        def vlm_pass() -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
            with self.apt.vlm_context():
                out = self.backbone(
                    input_ids=prompt["input_ids"],
                    pixel_values=batch["pixel_values"],
                    attention_mask=masks.vlm_attention,
                    position_ids=masks.position_ids,
                    output_hidden_states=True,
                )
            features = out.hidden_states[self.select_layer]
            selected = gather_tokens(features, order, 1)
            return selected, gather_tokens(masks.expert_attention, order, 1), out.hidden_states

        language = masks.language
        fusion_context: torch.Tensor | list[torch.Tensor] | None = None
        head_tokens = None
        if self.apt.needs_language:
            selected, visible, hidden_states = vlm_pass()
            # the fusion context: the text part of the images-first prompt (language lies there)
            start = self.num_image_tokens
            text = hidden_states[self.select_layer][:, start:]
            language = language[:, start:]
            fusion_context = (
                per_site_text(hidden_states, len(self.apt.sites), start) if self.per_site_language else text
            )
            if self.head_reads_language:  # the text as GR00T's own VL stack sees it with language visible
                stack = self.vl_norm(torch.cat([selected, text], 1))
                head_tokens = self.vl_self_attention(stack, torch.cat([visible, language], 1))[:, selected.shape[1] :]
        else:  # Stage 1 and joint: the head reads only the selected layer (served by the feature cache when enabled)
            selected, visible = self.apt.cached_vlm(batch, lambda: vlm_pass()[:2])
        vl_tokens = self.vl_self_attention(self.vl_norm(selected), visible)
        return Encoded(vl_tokens, visible, fusion_context, language, head_tokens)

    def _head_language(
        self, encoded: Encoded, guide: PriorGuidance | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The language tokens and key mask the head's own cross-attention reads (behind its language gates)."""
        if encoded.head_tokens is None:
            return None
        mask = self.apt.expert_language_mask(encoded.language_mask, guide)
        tokens = guide.expand(encoded.head_tokens) if guide is not None else encoded.head_tokens
        return tokens, mask

    # ------------------------------------------------------------------ flow matching (GR00T convention)
    def sample_time(self, batch_size: int) -> torch.Tensor:
        one = torch.tensor(1.0, dtype=torch.float32)  # float32 whatever the default dtype (bf16-true)
        sample = torch.distributions.Beta(1.5 * one, one).sample((batch_size,))
        return (0.999 - sample) / 0.999

    def flow_loss(self, batch: dict[str, torch.Tensor], noise: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        actions = batch["actions"]
        encoded = self.encode(batch)
        t = time[:, None, None].to(noise.dtype)  # time is drawn in float32; the mix runs in the data dtype
        x_t = (1 - t) * noise + t * actions
        with self.apt.fusion_context(encoded.language, encoded.language_mask):
            velocity = self.action_head(
                x_t, time, batch["state"], encoded.vl_tokens, encoded.visible, self._head_language(encoded)
            )
        return chunk_mse(velocity, actions - noise, batch.get("action_pad_mask"))

    # ------------------------------------------------------------------ sampling (loop in FlowMatchingPolicy)
    @property
    def default_sampling_steps(self) -> int:
        return self.num_inference_steps

    def sampling_times(self, num_steps: int) -> tuple[list[float], float]:
        """GR00T integrates from t = 0 (noise) up to 1 (actions)."""
        return [step / num_steps for step in range(num_steps)], 1.0 / num_steps

    def sampling_condition(self, batch: dict[str, torch.Tensor]) -> SamplingCondition:
        encoded = self.encode(batch)  # once per chunk
        return SamplingCondition(encoded.language, encoded.language_mask, encoded)

    def denoising_inputs(self, batch: dict[str, torch.Tensor], encoded: Any, guide: PriorGuidance) -> tuple[Any, ...]:
        state, vl_tokens = guide.expand(batch["state"]), guide.expand(encoded.vl_tokens)
        return state, vl_tokens, guide.expand(encoded.visible), self._head_language(encoded, guide)

    def denoising_step(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        state: torch.Tensor,
        vl_tokens: torch.Tensor,
        visible: torch.Tensor,
        language: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        return self.action_head(x, time, state, vl_tokens, visible, language)
