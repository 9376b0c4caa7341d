"""What the tiny VLM learns from the corpus: grounding, patch labelling and distillation losses.

The last hidden states of the language tokens are mean-pooled; linear heads predict the referred object's
position (MSE) and its colour, shape and size (cross-entropy each), and a linear map of the same state is
pulled towards the text's MiniLM embedding (cosine). Each image token's state predicts the attributes of the
object centred in its patch (or "nothing") and the patch's location. The heads are discarded afterwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PaliGemmaModel

from apt_lightning.masking import language_blind_masks
from apt_studies.scene import SHAPES, SIZES
from apt_studies.vlm_pretraining.corpus import COLOUR_NAMES, Corpus
from apt_studies.vlm_pretraining.language_prior import MINILM_DIM

__all__ = ["POSITION_SCALE", "Heads", "encode", "patch_centres", "pretraining_losses"]

POSITION_SCALE = 4.0
"""Positions are regressed as ``(xy - 0.5) * 4`` so the MSE starts near 1, like the cross-entropies."""


class Heads(nn.Module):
    """Pretraining heads (discarded after pretraining): on the pooled language state, and per image token."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.position = nn.Linear(width, 2)
        self.colour = nn.Linear(width, len(COLOUR_NAMES))
        self.shape = nn.Linear(width, len(SHAPES))
        self.size = nn.Linear(width, len(SIZES))
        self.distill = nn.Linear(width, MINILM_DIM)
        self.patch = nn.ModuleList(nn.Linear(width, n + 1) for n in (len(COLOUR_NAMES), len(SHAPES), len(SIZES)))
        self.patch_location = nn.Linear(width, 2)


def encode(
    vlm: PaliGemmaModel, corpus: Corpus, index: torch.Tensor, blind: bool, image_token_id: int, num_image_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the VLM on samples ``index``.

    Returns:
        ``(pooled, image)``: the mean of the last hidden states over language tokens ``(B, D)``, and the last
        hidden states of the image tokens ``(B, num_image_tokens, D)``.
    """
    length = int(corpus.attention_mask[index].sum(1).max())
    ids, attention, language = (
        t[index, :length] for t in (corpus.input_ids, corpus.attention_mask, corpus.language_mask)
    )
    image = torch.full((ids.shape[0], num_image_tokens), image_token_id, dtype=ids.dtype)
    ids = torch.cat([image, ids], 1)
    attention = torch.cat([torch.ones_like(image), attention], 1)
    language = torch.cat([torch.zeros_like(image, dtype=torch.bool), language], 1)
    masks = language_blind_masks(attention, language if blind else torch.zeros_like(language))
    out = vlm(
        input_ids=ids,
        pixel_values=corpus.images[index].float() / 255.0,
        attention_mask=masks.vlm_attention,
        position_ids=masks.position_ids,
    )
    hidden = out.last_hidden_state
    weight = (language & attention.bool()).unsqueeze(-1).to(hidden.dtype)
    return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1.0), hidden[:, :num_image_tokens]


def pretraining_losses(
    heads: Heads,
    pooled: torch.Tensor,
    image: torch.Tensor,
    corpus: Corpus,
    index: torch.Tensor,
    distill_target: torch.Tensor | None,
    patch: bool,
) -> dict[str, torch.Tensor]:
    losses = {
        "position": F.mse_loss(heads.position(pooled), (corpus.position[index] - 0.5) * POSITION_SCALE),
        "colour": F.cross_entropy(heads.colour(pooled), corpus.colour[index]),
        "shape": F.cross_entropy(heads.shape(pooled), corpus.shape[index]),
        "size": F.cross_entropy(heads.size(pooled), corpus.size[index]),
    }
    if distill_target is not None:
        losses["distill"] = 1.0 - F.cosine_similarity(heads.distill(pooled), distill_target[index], dim=-1).mean()
    if patch:
        labels = corpus.patch_labels[index]
        attributes = [
            F.cross_entropy(head(image).flatten(0, 1), labels[..., a].flatten()) for a, head in enumerate(heads.patch)
        ]
        location = F.mse_loss(heads.patch_location(image), patch_centres(image.shape[1]).expand(len(index), -1, -1))
        losses["patch"] = sum(attributes) / len(attributes) + location
    return losses


def patch_centres(num_patches: int) -> torch.Tensor:
    """``(num_patches, 2)`` centre ``(x, y)`` of each patch, row-major, scaled like the position targets."""
    grid = math.isqrt(num_patches)
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return (torch.stack([xs, ys], -1).reshape(-1, 2) - 0.5) * POSITION_SCALE
