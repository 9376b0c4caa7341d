"""pi0-style reference policy: transformers' own ``PI0ForConditionalGeneration`` with APT.

The PaliGemma VLM runs the prefix once and returns a KV cache that the Gemma "dit" expert attends to in every
layer. APT hooks in at three places, all through the mixin's public helpers:

* the prefix runs with the language-blind block mask (image tokens cannot see the instruction, language
  tokens see everything), so the cache of non-language tokens is instruction-free in both stages;
* the expert's 2-D mask hides the language keys of the cache;
* Stage 2 adds language through gated cross-attention after every dit decoder layer, attending to the
  VLM's language hidden states from the same single prefix pass.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import AutoModel, DynamicCache, PI0Config, PI0ForConditionalGeneration

from apt_lightning.config import APTConfig, fusion_config_with_options
from apt_lightning.controller import APT
from apt_lightning.feature_cache import gather_tokens, visible_first
from apt_lightning.guidance import PriorGuidance
from apt_lightning.models.base import (
    FlowMatchingPolicy,
    as_apt_config,
    chunk_mse,
    pad_last_dim,
    per_site_text,
    tiny_gemma,
    tiny_siglip,
)
from apt_lightning.models.hf_config import check_config_keys
from apt_lightning.models.sampling import SamplingCondition


def tiny_pi0_config(
    action_dim: int = 2,
    state_dim: int = 2,
    chunk_size: int = 4,
    vocab_size: int = 128,
    image_size: int = 32,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_inference_steps: int = 5,
    image_token_id: int | None = None,
) -> PI0Config:
    """A PI0Config small enough to train on CPU in milliseconds (random weights, no download).

    ``image_token_id`` is the id prompts use for image placeholders (the last id when None).
    """
    gemma = tiny_gemma(hidden_size, num_layers)
    return PI0Config(
        vlm_config=dict(
            model_type="paligemma",
            text_config={**gemma, "vocab_size": vocab_size},
            vision_config=tiny_siglip(hidden_size, num_layers, image_size),
            projection_dim=hidden_size,
            image_token_id=vocab_size - 1 if image_token_id is None else image_token_id,
        ),
        dit_config=gemma,
        chunk_size=chunk_size,
        max_state_dim=state_dim,
        max_action_dim=action_dim,
        num_inference_steps=num_inference_steps,
    )


_CACHE_ARG = (
    "cache" if "cache" in inspect.signature(PI0ForConditionalGeneration.forward).parameters else "past_key_values"
)
"""transformers >= 5.2x names pi0's prefix cache ``cache``; earlier 5.x releases ``past_key_values``."""


def _output_cache(out: Any) -> Any:
    """The prefix KV cache of a VLM output, whichever name this transformers release gives it."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _pi0_config(config: PI0Config | dict[str, Any] | None) -> PI0Config:
    """A ``PI0Config`` from a config, its dict (YAML, checkpoints) or ``None`` (the tiny default).

    Raises:
        ConfigError: a key transformers would silently ignore (``hidden_sizee`` in ``dit_config``), named with the
            closest valid keys.
    """
    if config is None:
        return tiny_pi0_config()
    built = PI0Config.from_dict(config) if isinstance(config, dict) else config
    check_config_keys(config, built, "config")
    return built


class PI0Policy(FlowMatchingPolicy):
    """pi0 (openpi/LeRobot layout, transformers implementation) trained with APT.

    Args:
        config: a ``PI0Config`` (random init); ignored when ``pretrained`` is given.
        pretrained: path or hub id passed to ``PI0ForConditionalGeneration.from_pretrained``.
        apt_config: APT optimisation and VLM-mode settings.
        action_dim: dimensions of the dataset's actions (padded to ``max_action_dim``).
        fusion_heads: attention heads of each gated cross-attention block.
        fusion_options: other :class:`FusionConfig` fields for the fusion blocks (``gate``, ``gate_shape``,
            ``ff_mult`` ...), e.g. ``{"gate": "sigmoid"}`` for the ablations.
        per_site_language: each fusion site reads the VLM layer at its own relative depth (expert layer i reads
            VLM layer ceil((i + 1) L_vlm / L_expert)) instead of the last one.
        vlm_pretrained: directory of a pretrained PaliGemma (``save_pretrained``) whose weights replace the VLM's,
            e.g. from :func:`apt_studies.pretrained_vlm`.

    Example::

        >>> policy = PI0Policy(tiny_pi0_config())
        >>> policy.apt.vlm, policy.apt.fusion.target_modules
        ('pi0.model.vlm', 'pi0\\\\.model\\\\.dit\\\\.layers\\\\.\\\\d+')
    """

    @classmethod
    def vlm_text_width(cls, init_args: Any) -> int:
        """Hidden size of the PaliGemma text model that ``config`` (a ``PI0Config`` or its dict) describes."""
        return int(_pi0_config(init_args.get("config")).vlm_config.text_config.hidden_size)

    def __init__(
        self,
        config: PI0Config | dict[str, Any] | None = None,
        pretrained: str | None = None,
        apt_config: APTConfig | dict[str, Any] | None = None,
        action_dim: int | None = None,
        fusion_heads: int = 2,
        vlm_pretrained: str | None = None,
        fusion_options: dict[str, Any] | None = None,
        per_site_language: bool = False,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            self.pi0 = PI0ForConditionalGeneration.from_pretrained(pretrained)
        else:
            self.pi0 = PI0ForConditionalGeneration(_pi0_config(config))
        if vlm_pretrained is not None:
            self.pi0.model.vlm.load_state_dict(AutoModel.from_pretrained(vlm_pretrained).state_dict())
        cfg = self.pi0.config
        self.save_policy_hyperparameters(config=cfg.to_dict())
        self.per_site_language = per_site_language
        fusion = fusion_config_with_options(
            fusion_options, target_modules=r"pi0\.model\.dit\.layers\.\d+", num_heads=fusion_heads
        )
        self.apt = APT(self, vlm="pi0.model.vlm", fusion=fusion, config=as_apt_config(apt_config))
        self.chunk_size = cfg.chunk_size
        self.action_dim = action_dim or cfg.max_action_dim
        vision = cfg.vlm_config.vision_config
        self.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
        self.image_token_id = cfg.vlm_config.image_token_id

    @property
    def noise_dim(self) -> int:
        return self.pi0.config.max_action_dim

    # ------------------------------------------------------------------ conditioning
    def encode_prefix(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[Any, torch.Tensor | list[torch.Tensor] | None, Any]:
        """One VLM pass: KV cache for the expert, language features for Stage 2, and the masks.

        The cache holds the prefix's visible (non-language) tokens first, so it does not depend on where the
        instruction sat; ``masks.expert_attention`` is reordered to match. In Stage-1 training under a
        :class:`~apt_lightning.Stage1FeatureCache` the keys/values come from the cache (no language features).
        """
        prompt = self.prompt(batch)
        masks = self.apt.masks(prompt["attention_mask"], prompt["language_mask"])
        order = visible_first(masks.expert_attention)

        def vlm_pass() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor, Any]:
            pixels = batch["pixel_values"]
            if pixels.ndim == 4:
                pixels = pixels[:, None]
            cameras = torch.ones(pixels.shape[:2], dtype=torch.bool, device=pixels.device)
            model = self.pi0.model
            with self.apt.vlm_context():
                embeds = model.embed_prefix(prompt["input_ids"], pixels, cameras)
                out = model.vlm(
                    inputs_embeds=embeds,
                    attention_mask=masks.vlm_attention,
                    position_ids=masks.position_ids,
                    use_cache=True,
                    output_hidden_states=self.per_site_language and self.apt.needs_language,
                )
            layers = _output_cache(out).layers
            keys = tuple(gather_tokens(layer.keys, order, 2) for layer in layers)
            values = tuple(gather_tokens(layer.values, order, 2) for layer in layers)
            return keys, values, gather_tokens(masks.expert_attention, order, 1), out

        features: torch.Tensor | list[torch.Tensor] | None = None
        if self.apt.needs_language:
            keys, values, expert_mask, out = vlm_pass()
            # the fusion context: the text part of the images-first prompt (language lies there)
            start = self.num_image_tokens
            if self.per_site_language:
                features = per_site_text(out.hidden_states, len(self.apt.sites), start)
            else:
                features = out.last_hidden_state[:, start:]
            masks.language = masks.language[:, start:]
        else:  # Stage 1 and joint: the expert reads only the cache (served by the feature cache when enabled)
            keys, values, expert_mask = self.apt.cached_vlm(batch, lambda: vlm_pass()[:3])
        masks.expert_attention = expert_mask  # the cache's token order and length
        return DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True))), features, masks

    def _velocity(
        self, state: torch.Tensor, x: torch.Tensor, time: torch.Tensor, cache: Any, expert_mask: torch.Tensor
    ):
        return self.pi0(state=state, noise=x, timestep=time, attention_mask=expert_mask, **{_CACHE_ARG: cache}).logits

    # ------------------------------------------------------------------ flow matching (openpi convention)
    def sample_time(self, batch_size: int) -> torch.Tensor:
        cfg = self.pi0.config
        beta = torch.distributions.Beta(  # float32 whatever the default dtype (bf16-true has no Beta sampler)
            torch.tensor(cfg.time_sampling_beta_alpha, dtype=torch.float32),
            torch.tensor(cfg.time_sampling_beta_beta, dtype=torch.float32),
        )
        return beta.sample((batch_size,)) * cfg.time_sampling_scale + cfg.time_sampling_offset

    def flow_loss(self, batch: dict[str, torch.Tensor], noise: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        actions = pad_last_dim(batch["actions"], self.pi0.config.max_action_dim)
        cache, features, masks = self.encode_prefix(batch)
        t = time[:, None, None].to(noise.dtype)  # time is drawn in float32; the mix runs in the data dtype
        x_t = t * noise + (1 - t) * actions
        state = pad_last_dim(batch["state"], self.pi0.config.max_state_dim)
        with self.apt.fusion_context(features, masks.language):
            velocity = self._velocity(state, x_t, time, cache, masks.expert_attention)
        return chunk_mse(
            velocity[..., : self.action_dim], (noise - actions)[..., : self.action_dim], batch.get("action_pad_mask")
        )

    # ------------------------------------------------------------------ sampling (loop in FlowMatchingPolicy)
    @property
    def default_sampling_steps(self) -> int:
        return self.pi0.config.num_inference_steps

    def sampling_times(self, num_steps: int) -> tuple[list[float], float]:
        """openpi integrates from t = 1 (noise) down to 0 (actions)."""
        dt = -1.0 / num_steps
        return [1.0 + step * dt for step in range(num_steps)], dt

    def sampling_condition(self, batch: dict[str, torch.Tensor]) -> SamplingCondition:
        cache, features, masks = self.encode_prefix(batch)
        return SamplingCondition(features, masks.language, (cache, masks.expert_attention))

    def denoising_inputs(self, batch: dict[str, torch.Tensor], encoded: Any, guide: PriorGuidance) -> tuple[Any, ...]:
        cache, expert_mask = encoded
        if guide.active:
            cache.batch_repeat_interleave(2)  # the prior rows share the (language-blind) prefix
        state = guide.expand(pad_last_dim(batch["state"], self.pi0.config.max_state_dim))
        prefix = tuple((layer.keys, layer.values) for layer in cache.layers)
        return state, guide.expand(expert_mask), cache, prefix

    def denoising_step(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        state: torch.Tensor,
        expert_mask: torch.Tensor,
        cache: Any,
        prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    ) -> torch.Tensor:
        """One expert pass over the prefix cache; the cache is then put back to the prefix's own tensors (each
        step appends its action tokens by concatenation, so the prefix tensors are untouched), which keeps every
        step's inputs identical in shape and stride: one compiled graph for all steps."""
        velocity = self._velocity(state, x, time, cache, expert_mask)
        for layer, (keys, values) in zip(cache.layers, prefix, strict=True):
            layer.keys, layer.values = keys, values
        return velocity
