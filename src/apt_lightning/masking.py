"""Attention masks that hide the instruction from everything the action expert sees.

Masking language for the expert alone is not enough in a bidirectional prefix (PaliGemma, pi0): image tokens
attend to language there, so language reaches the expert through the image keys and values. The
*language-blind block mask* built here fixes the prefix itself: non-language queries never see language
keys, while language queries see everything valid. Image (and state) hidden states are then the same
whatever the instruction, and the language hidden states computed in the same single VLM pass carry the
instruction, grounded in the image, for the Stage-2 gated cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apt_lightning.errors import LanguageMaskError


@dataclass
class PrefixMasks:
    """Masks and positions for one VLM prefix pass.

    Attributes:
        vlm_attention: (B, 1, L, L) bool, True where a query may attend a key; pass as the VLM's 4-D mask.
        expert_attention: (B, L) bool, True on valid non-language tokens: what the expert (or any unmasked
            attention over VLM features) may see. Bool whatever ``attention_mask``'s dtype, so it works as a
            key mask for SDPA and ``nn.MultiheadAttention`` (invert it for ``key_padding_mask``).
        position_ids: (B, L) positions that do not depend on the instruction for non-language tokens.
        language: (B, L) bool, True on valid language tokens: the key mask of the fusion context.
    """

    vlm_attention: torch.Tensor
    expert_attention: torch.Tensor
    position_ids: torch.Tensor
    language: torch.Tensor


def _check_attention_mask(attention_mask: object) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        what = (
            f"shape {tuple(attention_mask.shape)}"
            if isinstance(attention_mask, torch.Tensor)
            else type(attention_mask).__name__
        )
        raise LanguageMaskError(
            f"The attention mask must be a (B, L) torch.Tensor, 1 on valid tokens; got {what}. "
            "Pass the prompt's `attention_mask` (image tokens included), as the VLM receives it."
        )
    return attention_mask


def check_language_mask(
    language_mask: torch.Tensor, attention_mask: torch.Tensor, check_rows: bool = True
) -> torch.Tensor:
    """Validate ``language_mask`` against ``attention_mask`` (B, L) and return it restricted to valid tokens.

    Types, dtypes and shapes are always checked; ``check_rows`` also reads the masks' values (the blind-row
    check below), which on an accelerator costs a host synchronisation.

    Raises:
        LanguageMaskError: not a tensor (numpy arrays too), not ``torch.bool``, not (B, L) like
            ``attention_mask`` (1-D, transposed, one token short ...), or a row whose every valid token is
            marked as language, which would leave the expert nothing to see.
    """
    attention_mask = _check_attention_mask(attention_mask)
    if not isinstance(language_mask, torch.Tensor):
        raise LanguageMaskError(
            f"The language mask must be a torch.Tensor, got {type(language_mask).__name__}. "
            "Convert it with `torch.as_tensor(mask, dtype=torch.bool)` in your collate function."
        )
    if language_mask.dtype != torch.bool:
        raise LanguageMaskError(
            f"The language mask must have dtype torch.bool (True on instruction tokens), got {language_mask.dtype}. "
            "Convert it with `.bool()` after checking which value marks language."
        )
    if language_mask.shape != attention_mask.shape:
        hint = ""
        if language_mask.ndim == 1:
            hint = " It is 1-D: give one row per sample, shape (B, L)."
        elif language_mask.ndim == 2 and language_mask.shape == attention_mask.shape[::-1]:
            hint = " It looks transposed: use `mask.T`."
        raise LanguageMaskError(
            f"The language mask has shape {tuple(language_mask.shape)} but the token sequence has shape "
            f"{tuple(attention_mask.shape)} (B, L): it must mark each token of `input_ids`, image tokens "
            f"included.{hint}"
        )
    valid = attention_mask.bool()
    language = language_mask.to(attention_mask.device) & valid
    if not check_rows:
        return language
    blind = (valid & ~language).sum(-1) == 0
    if bool(blind.any()):
        rows = blind.nonzero().flatten().tolist()
        raise LanguageMaskError(
            f"The language mask covers every valid token of row(s) {rows[:8]} (images included): the expert would "
            "see nothing in Stage 1. Mark only the instruction's tokens, not the image or state tokens."
        )
    return language


def language_blind_masks(
    attention_mask: torch.Tensor, language_mask: torch.Tensor, causal: bool = False, check_rows: bool = True
) -> PrefixMasks:
    """Build :class:`PrefixMasks` for a prefix whose ``language_mask`` tokens must stay invisible.

    Args:
        attention_mask: (B, L) 1 on valid tokens, 0 on padding.
        language_mask: (B, L) bool, True on instruction tokens (not on images or other prompt tokens such as
            a discretised state, which stay visible).
        causal: also apply a causal mask (decoder VLMs such as Qwen-VL); ``False`` for a bidirectional prefix.
        check_rows: also check each row's values (:func:`check_language_mask`; a host sync on accelerators).
    """
    language = check_language_mask(language_mask, attention_mask, check_rows=check_rows)
    valid = attention_mask.bool()
    visible = valid & ~language
    # query q may see key k if k is valid and (q is language or k is not language)
    allowed = valid[:, None, :] & (language[:, :, None] | ~language[:, None, :])
    length = attention_mask.shape[-1]
    eye = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    if causal:
        allowed = allowed & torch.ones_like(eye).tril()
    allowed = allowed | eye  # no empty row (padding queries), so no NaN in SDPA
    positions = torch.where(language, valid.long().cumsum(-1), visible.long().cumsum(-1)) - 1
    return PrefixMasks(
        vlm_attention=allowed[:, None],
        expert_attention=visible,
        position_ids=positions.clamp(min=0),
        language=language,
    )
