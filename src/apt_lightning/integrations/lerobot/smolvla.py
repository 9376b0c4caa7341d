"""APT on LeRobot's SmolVLA (``lerobot.policies.smolvla``), trained through LeRobot's own modules.

SmolVLA's prefix is images, the prompt and one state token; image and prompt tokens form one bidirectional
block (so the language-blind mask is needed), the state token sees them. Its expert interleaves layers that
self-attend jointly with the VLM's cached keys/values and layers that cross-attend to them. LeRobot's own layer
loop (``SmolVLMWithExpertModel.forward``) calls the layers' submodules, not the layers, so the Stage-2 fusion
blocks wrap each expert layer's ``mlp``: a gated cross-attention right after the MLP, inside its residual
branch, an exact identity while the gates are closed. Training runs LeRobot's two passes (prefix to a cache,
then the expert), as its inference does; in the joint plan the loss equals ``policy.forward``'s (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from apt_lightning import ContractError
from apt_lightning.config import fusion_config_with_options
from apt_lightning.integrations.lerobot.base import INSTRUCTION_MASK, LeRobotAPTModule
from apt_lightning.integrations.lerobot.pi import TOKEN_MASK, TOKENS, Prefix, visible_first

__all__ = ["SmolVLAAPT"]

_EXPERT_MLP = r"policy\.model\.vlm_with_expert\.lm_expert\.layers\.\d+\.mlp"


class SmolVLAAPT(LeRobotAPTModule):
    """APT around a LeRobot ``SmolVLAPolicy``.

    Args:
        policy: ``SmolVLAPolicy`` (``prefix_length`` <= 0 and ``adapt_to_pi_aloha`` False), trained in place.
        apt_config: APT settings; ``policy.config.optimizer_lr`` when ``None``.
        fusion_heads: attention heads of each Stage-2 fusion block.
        fusion_options: other :class:`~apt_lightning.FusionConfig` fields (e.g. ``{"ff_mult": 0}``).
    """

    def __init__(
        self, policy: Any, apt_config: Any = None, fusion_heads: int = 2, fusion_options: dict[str, Any] | None = None
    ) -> None:
        fusion = fusion_config_with_options(fusion_options, target_modules=_EXPERT_MLP, num_heads=fusion_heads)
        super().__init__(policy, apt_config, vlm="policy.model.vlm_with_expert.vlm", fusion=fusion)
        if policy.config.prefix_length > 0 or policy.config.adapt_to_pi_aloha:
            raise ContractError(
                "SmolVLAAPT supports SmolVLAConfig(prefix_length<=0, adapt_to_pi_aloha=False), got "
                f"prefix_length={policy.config.prefix_length}, adapt_to_pi_aloha={policy.config.adapt_to_pi_aloha}."
            )

    def language_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        """Over the prefix: image tokens, then the prompt (instruction tokens), then the state token."""
        language = batch.get(INSTRUCTION_MASK, batch[TOKEN_MASK]).bool()
        zeros = language.new_zeros
        images = zeros(language.shape[0], self._image_tokens(batch))
        return torch.cat([images, language, zeros(language.shape[0], 1)], dim=1)

    def _image_tokens(self, batch: dict[str, Any]) -> int:
        """Prefix tokens before the prompt: SmolVLM's pixel-shuffled patches (and special tokens) per camera."""
        config, vlm = self.policy.config, self.apt.vlm_module.config
        per_camera = (vlm.vision_config.image_size // vlm.vision_config.patch_size) ** 2 // vlm.scale_factor**2
        present = sum(key in batch for key in config.image_features)
        cameras = present + min(len(config.image_features) - present, config.empty_cameras)
        return cameras * (per_camera + (3 if config.add_image_special_tokens else 0))

    def encode(self, batch: dict[str, Any]) -> Prefix:
        from lerobot.policies.common.vla_utils import make_att_2d_masks

        model = self.policy.model
        images, image_masks = self.policy.prepare_images(batch)
        with self.apt.vlm_context():
            embeddings, valid, blocks = model.embed_prefix(
                images, image_masks, batch[TOKENS], batch[TOKEN_MASK], state=self.policy.prepare_state(batch)
            )
            language = self.language_mask(batch)
            if language.shape != valid.shape:
                raise ContractError(
                    f"SmolVLA's prefix has {valid.shape[1]} tokens but the adapter expects {language.shape[1]} "
                    "(images, prompt, state): a SmolVLM layout this adapter does not know."
                )
            masks = self.apt.masks(valid, language)
            order = visible_first(masks.expert_attention)
            rows = order[:, :, None].expand(-1, -1, order.shape[1])
            allowed = masks.vlm_attention[:, 0] & make_att_2d_masks(valid, blocks)  # keep the state token's block
            attention = allowed.gather(1, rows).gather(2, rows.transpose(1, 2))
            embeddings = embeddings.gather(1, order[:, :, None].expand(-1, -1, embeddings.shape[-1]))
            (hidden, _), cache = model.vlm_with_expert.forward(
                attention_mask=attention,
                position_ids=masks.position_ids.gather(1, order),
                inputs_embeds=[embeddings, None],
                use_cache=True,
            )
        return Prefix(cache, masks.expert_attention.gather(1, order), hidden, masks.language.gather(1, order))

    def fusion_context(self, prefix: Prefix) -> tuple[torch.Tensor, torch.Tensor]:
        return prefix.hidden, prefix.language

    def velocity(self, prefix: Prefix, batch: dict[str, Any], x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        from lerobot.policies.common.vla_utils import clone_past_key_values, make_att_2d_masks

        model = self.policy.model
        embeddings, valid, blocks = model.embed_suffix(x_t, time)
        visible = prefix.visible
        b, n = valid.shape
        keys = torch.cat([visible[:, None, :].expand(b, n, visible.shape[1]), make_att_2d_masks(valid, blocks)], 2)
        positions = visible.sum(-1)[:, None] + torch.cumsum(valid, dim=1) - 1
        (_, out), _ = model.vlm_with_expert.forward(
            attention_mask=keys,
            position_ids=positions,
            past_key_values=clone_past_key_values(prefix.cache),  # self-attention layers append to the cache
            inputs_embeds=[None, embeddings],
            use_cache=True,
        )
        return model.action_out_proj(out[:, -self.chunk_size :].to(torch.float32))

    def reduce_loss(self, losses: torch.Tensor, batch: dict[str, Any], per_sample: bool = False) -> torch.Tensor:
        """SmolVLA's reduction: padded chunk steps (``action_is_pad``) count as zero and are not averaged;
        ``per_sample`` gives (B,) means over each sample's valid entries."""
        losses = losses[:, :, : self.action_dim]
        pad = batch.get("action_is_pad")
        if pad is None:
            return losses.mean(dim=(1, 2)) if per_sample else losses.mean()
        losses = losses * (~pad).unsqueeze(-1)
        if per_sample:
            return losses.sum(dim=(1, 2)) / ((~pad).sum(dim=1) * losses.shape[-1]).clamp_min(1)
        return losses.sum() / ((~pad).sum() * losses.shape[-1]).clamp_min(1)
