"""The sampling loop the reference policies share, and what makes its denoising step compile once.

A policy conditions once per action chunk (VLM prefix, fusion context) and then runs the expert at every Euler
step. :meth:`FlowMatchingPolicy.sample_actions <apt_lightning.models.base.FlowMatchingPolicy.sample_actions>`
owns that loop; a policy supplies three pieces: how it conditions (``sampling_condition``), the per-call inputs of
its step (``denoising_inputs``) and the step itself (``denoising_step``, a pure function of tensors and the
prefix cache, which is what :meth:`~apt_lightning.models.base.FlowMatchingPolicy.compile_sampling` compiles).

Helpers here keep the compiled step's inputs stable:

* :func:`pad_prompt` pads the text prompt to a multiple of ``bucket`` tokens (masked out everywhere), so every
  instruction length inside one bucket gives the same shapes, hence no recompile;
* :func:`prime_fusion_context` computes each fusion block's context keys/values once per sampling call, before
  the first step: the language context is the same at every denoising step, so the step only projects queries.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from apt_lightning.errors import ConfigError
from apt_lightning.fusion import GatedFusionLayer

PROMPT_KEYS = ("input_ids", "attention_mask", "language_mask")


class SamplingCondition(NamedTuple):
    """What one VLM pass gives a sampling call: the fusion context (``None`` outside Stage 2) and its key mask,
    and the policy's own conditioning (a prefix KV cache, VL tokens ...), passed on to ``denoising_inputs``."""

    features: torch.Tensor | list[torch.Tensor] | None
    language_mask: torch.Tensor | None
    encoded: Any


def pad_prompt(batch: dict[str, torch.Tensor], bucket: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` with its text prompt right-padded to the next multiple of ``bucket`` tokens.

    Padding tokens have ``attention_mask`` 0 and ``language_mask`` False, so no query attends to them and they are
    no language: the sampled actions are those of the unpadded prompt up to floating-point summation order.

    Example::

        >>> batch = {"input_ids": torch.ones(1, 5, dtype=torch.long), "attention_mask": torch.ones(1, 5),
        ...          "language_mask": torch.ones(1, 5, dtype=torch.bool)}
        >>> padded = pad_prompt(batch, 8)
        >>> padded["input_ids"].shape, padded["attention_mask"].sum().item(), padded["language_mask"].sum().item()
        (torch.Size([1, 8]), 5.0, 5)
    """
    if bucket < 1:
        raise ConfigError(f"`bucket` must be a positive number of tokens, got {bucket!r}.")
    length = batch["input_ids"].shape[1]
    extra = -length % bucket
    if extra == 0:
        return batch
    values = {"input_ids": pad_id, "attention_mask": 0, "language_mask": False}
    padded = dict(batch)
    for key in PROMPT_KEYS:
        padded[key] = torch.nn.functional.pad(batch[key], (0, extra), value=values[key])
    return padded


def prime_fusion_context(model: nn.Module, dtype: torch.dtype) -> None:
    """Compute the context keys/values of every active fusion site of ``model`` now, without autograd.

    Call inside :meth:`~apt_lightning.APTMixin.apt_fusion_context` and before the first denoising step: every step
    of the call then reuses them (the eager path would compute them at its first step; priming makes every step,
    the first included, the same computation, which is what a compiled step needs). ``dtype`` is the dtype of the
    expert's hidden states (the weights' dtype).
    """
    for module in model.modules():
        if isinstance(module, GatedFusionLayer):
            module.precompute_context(dtype)
