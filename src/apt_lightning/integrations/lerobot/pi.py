"""APT on LeRobot's PI0 and PI05 (``lerobot.policies.pi0`` / ``pi05``), trained through LeRobot's own modules.

LeRobot trains PI0 with one joint pass in which each layer's query/key/value projections are called directly
(``compute_layer_complete``), and infers with two passes: the image+language prefix through PaliGemma into a
KV cache, then the Gemma expert over the state/action suffix attending to that cache. The adapter trains
through the two-pass path, which calls the expert's decoder layers (so gated fusion can wrap them) and gives the
prefix its own mask (so APT can make it language-blind). In the joint plan, with no mask change, its loss equals
``policy.forward``'s (tested, ``torch.equal``).

APT's changes, all through the public mixin API:

* the prefix mask is language-blind (:meth:`~apt_lightning.APTMixin.apt_masks`): image tokens never attend to
  the instruction (PaliGemma's prefix is bidirectional), language tokens still see the images;
* the expert's keys over the prefix are ``masks.expert_attention`` (the instruction hidden), its positions
  start after the visible prefix tokens, so nothing the expert reads depends on the instruction in Stage 1;
* Stage 2 adds gated cross-attention after each expert layer, reading the prefix's language hidden states.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from apt_lightning import LanguageMaskError
from apt_lightning.config import fusion_config_with_options
from apt_lightning.integrations.lerobot.base import INSTRUCTION_MASK, LeRobotAPTModule

__all__ = ["PI0APT", "PI05APT"]

TOKENS, TOKEN_MASK = "observation.language.tokens", "observation.language.attention_mask"
_EXPERT = r"policy\.model\.paligemma_with_expert\.gemma_expert\.model\.layers\.\d+"


class Prefix(NamedTuple):
    """The VLM pass, its tokens ordered visible first (see :func:`visible_first`): the KV cache, the expert's key
    mask over it, the final hidden states and the language mask over them."""

    cache: Any
    visible: torch.Tensor
    hidden: torch.Tensor
    language: torch.Tensor


def visible_first(visible: torch.Tensor) -> torch.Tensor:
    """(B, L) permutation putting each row's visible (non-instruction, valid) tokens first, in prompt order.

    The prefix pass runs in this order (with the positions and mask permuted alike), so the tokens Stage 1 sees
    sit in the same slots whatever the instruction's length and place: every attention sum runs in the same
    order and Stage-1 actions are bit-identical across instructions, not just close. Where nothing is hidden
    and padding is on the right (the joint plan) it is the identity, and the loss is LeRobot's to the bit.
    """
    return torch.argsort((~visible).to(torch.int8), dim=1, stable=True)


class PI0APT(LeRobotAPTModule):
    """APT around a LeRobot ``PI0Policy``.

    Args:
        policy: ``PI0Policy`` (from its config or ``from_pretrained``), trained in place.
        apt_config: APT settings (:class:`~apt_lightning.APTConfig`); ``policy.config.optimizer_lr`` when ``None``.
        fusion_heads: attention heads of each Stage-2 fusion block.
        fusion_options: other :class:`~apt_lightning.FusionConfig` fields (e.g. ``{"ff_mult": 0}``).

    Example::

        adapter = PI0APT(PI0Policy.from_pretrained("lerobot/pi0_base"))
        trainer = L.Trainer(max_steps=N, callbacks=[APTStageScheduler(switch_at_step=N // 2)])
        trainer.fit(adapter, datamodule=LeRobotDataModule(root, adapter.policy.config, tokenizer))
        adapter.save_pretrained("out/")  # LeRobot's files + apt_fusion.safetensors
    """

    def __init__(
        self, policy: Any, apt_config: Any = None, fusion_heads: int = 2, fusion_options: dict[str, Any] | None = None
    ) -> None:
        fusion = fusion_config_with_options(fusion_options, target_modules=_EXPERT, num_heads=fusion_heads)
        super().__init__(policy, apt_config, vlm="policy.model.paligemma_with_expert.paligemma", fusion=fusion)
        experts = self.policy.model.paligemma_with_expert
        for part in (experts.paligemma.model.language_model, experts.gemma_expert.model):
            part.config._attn_implementation = "eager"  # as LeRobot's own inference and joint forward run

    # ------------------------------------------------------------------ instruction
    def instruction_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, L) bool over ``observation.language.tokens``: PI0's prompt is the instruction, so every valid
        token unless the batch says otherwise (``observation.language.instruction_mask``)."""
        mask = batch.get(INSTRUCTION_MASK)
        return batch[TOKEN_MASK].bool() if mask is None else mask.bool()

    def language_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        """Instruction tokens over the whole prefix: image tokens first (never language), then the prompt."""
        language = self.instruction_mask(batch)
        images = self._num_image_tokens(batch)
        return torch.cat([language.new_zeros(language.shape[0], images), language], dim=1)

    def _num_image_tokens(self, batch: dict[str, Any]) -> int:
        vision = self.apt.vlm_module.config.vision_config
        per_camera = (vision.image_size // vision.patch_size) ** 2
        return per_camera * len(self.policy.config.image_features)

    # ------------------------------------------------------------------ the two passes
    def encode(self, batch: dict[str, Any]) -> Prefix:
        from lerobot.policies.common.vla_utils import prepare_attention_masks_4d

        model = self.policy.model
        images, image_masks = self.policy._preprocess_images(batch)
        with self.apt.vlm_context():
            embeddings, valid, _ = model.embed_prefix(images, image_masks, batch[TOKENS], batch[TOKEN_MASK])
            masks = self.apt.masks(valid, self.language_mask(batch))
            order = visible_first(masks.expert_attention)
            rows = order[:, :, None].expand(-1, -1, order.shape[1])
            attention = masks.vlm_attention[:, 0].gather(1, rows).gather(2, rows.transpose(1, 2))
            embeddings = embeddings.gather(1, order[:, :, None].expand(-1, -1, embeddings.shape[-1]))
            if model.paligemma_with_expert.paligemma.model.language_model.layers[0].self_attn.q_proj.weight.dtype == (
                torch.bfloat16
            ):
                embeddings = embeddings.to(torch.bfloat16)
            (hidden, _), cache = model.paligemma_with_expert.forward(
                attention_mask=prepare_attention_masks_4d(attention),
                position_ids=masks.position_ids.gather(1, order),
                inputs_embeds=[embeddings, None],
                use_cache=True,
            )
        return Prefix(cache, masks.expert_attention.gather(1, order), hidden, masks.language.gather(1, order))

    def fusion_context(self, prefix: Prefix) -> tuple[torch.Tensor, torch.Tensor]:
        return prefix.hidden, prefix.language

    def suffix(self, batch: dict[str, Any], x_t: torch.Tensor, time: torch.Tensor) -> tuple[Any, ...]:
        """LeRobot's suffix embedding: (embeddings, valid, block flags, AdaRMS condition)."""
        return self.policy.model.embed_suffix(self.policy.prepare_state(batch), x_t, time)

    def velocity(self, prefix: Prefix, batch: dict[str, Any], x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        from lerobot.policies.common.vla_utils import (
            clone_past_key_values,
            make_att_2d_masks,
            prepare_attention_masks_4d,
        )

        model = self.policy.model
        embeddings, valid, blocks, condition = self.suffix(batch, x_t, time)
        visible = prefix.visible  # prefix keys the expert may read: the instruction hidden
        b, n = valid.shape
        keys = torch.cat([visible[:, None, :].expand(b, n, visible.shape[1]), make_att_2d_masks(valid, blocks)], 2)
        positions = visible.sum(-1)[:, None] + torch.cumsum(valid, dim=1) - 1
        if model.paligemma_with_expert.gemma_expert.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
            embeddings = embeddings.to(torch.bfloat16)
        (_, out), _ = model.paligemma_with_expert.forward(
            attention_mask=prepare_attention_masks_4d(keys),
            position_ids=positions,
            past_key_values=clone_past_key_values(prefix.cache),  # the expert pass appends to the cache
            inputs_embeds=[None, embeddings],
            use_cache=False,
            adarms_cond=[None, condition],
        )
        return model.action_out_proj(out[:, -self.chunk_size :].to(torch.float32))


class PI05APT(PI0APT):
    """APT around a LeRobot ``PI05Policy``.

    PI05's prompt is ``"Task: <instruction>, State: <discretised state>;\\nAction: "``: only the instruction's
    tokens may be hidden (the state must stay visible), so batches carry ``observation.language.instruction_mask``
    (:class:`~apt_lightning.integrations.lerobot.data.LeRobotDataModule` adds it).
    """

    def instruction_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        mask = batch.get(INSTRUCTION_MASK)
        if mask is None:
            raise LanguageMaskError(
                f"PI05's prompt embeds the robot state beside the instruction, so the batch must say which tokens "
                f"are the instruction: add `{INSTRUCTION_MASK}` (B, L) bool, True on the instruction's tokens "
                "(LeRobotDataModule adds it; `instruction_token_mask` computes it from a tokenizer's offsets)."
            )
        return mask.bool()

    def suffix(self, batch: dict[str, Any], x_t: torch.Tensor, time: torch.Tensor) -> tuple[Any, ...]:
        return self.policy.model.embed_suffix(x_t, time)
