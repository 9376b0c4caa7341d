"""The study's reference policies sized for Meta-World: 4-dim state and actions, frames at the benchmark's size.

:func:`~apt_studies.study.build_policy` builds the tabletop's (2-dim state and actions, 32 px); this builds the same
two architectures with Meta-World's dimensions and the adapted VLM (:mod:`apt_studies.metaworld.vlm`), and
:func:`policy_fn` turns one into the rollout evaluator's ``policy_fn``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from apt_lightning.config import APTConfig
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_lightning.models.base import FlowMatchingPolicy
from apt_studies.metaworld.camera import DEFAULT_IMAGE_SIZE
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.sim import ACTION_DIM, PROPRIO_DIM

__all__ = ["ARCHS", "build_metaworld_policy", "policy_fn"]

ARCHS: tuple[str, ...] = ("pi0", "groot")


def build_metaworld_policy(
    arch: str,
    vocabulary: Mapping[str, int],
    apt_config: APTConfig,
    vlm_dir: str | Path | None = None,
    *,
    hidden_size: int = 64,
    chunk_size: int = 8,
    image_size: int = DEFAULT_IMAGE_SIZE,
    head_reads_language: bool = False,
    fusion_options: dict[str, Any] | None = None,
    per_site_language: bool = False,
) -> FlowMatchingPolicy:
    """A reference policy for Meta-World, its VLM loaded from ``vlm_dir`` (which must read ``image_size`` frames).

    Args:
        arch: ``"pi0"`` or ``"groot"``.
        vocabulary: ``vocab_size`` and ``image_token_id`` of the prompts' tokenizer.
        apt_config: The run's :class:`~apt_lightning.APTConfig`.
        vlm_dir: A PaliGemma saved by :func:`~apt_studies.metaworld.vlm.metaworld_vlm` (None: random VLM).

    Raises:
        MetaWorldConfigError: unknown ``arch``.
    """
    vlm = str(vlm_dir) if vlm_dir is not None else None
    sizes = dict(vocab_size=vocabulary["vocab_size"], image_token_id=vocabulary["image_token_id"])
    if arch == "pi0":
        config = tiny_pi0_config(
            action_dim=ACTION_DIM,
            state_dim=PROPRIO_DIM,
            chunk_size=chunk_size,
            image_size=image_size,
            hidden_size=hidden_size,
            **sizes,
        )
        return PI0Policy(
            config,
            apt_config=apt_config,
            vlm_pretrained=vlm,
            fusion_options=fusion_options,
            per_site_language=per_site_language,
        )
    if arch == "groot":
        return GR00TStylePolicy(
            tiny_paligemma_config(hidden_size=hidden_size, image_size=image_size, **sizes),
            vlm_pretrained=vlm,
            action_dim=ACTION_DIM,
            state_dim=PROPRIO_DIM,
            chunk_size=chunk_size,
            head_width=hidden_size,
            head_depth=4,
            apt_config=apt_config,
            head_reads_language=head_reads_language,
            fusion_options=fusion_options,
            per_site_language=per_site_language,
        )
    raise MetaWorldConfigError(f"unknown arch {arch!r}; expected one of {ARCHS}.")


def policy_fn(policy: FlowMatchingPolicy) -> Any:
    """The rollout evaluator's ``policy_fn`` for a reference policy: ``image`` becomes ``pixel_values``."""

    def act(observation: dict[str, Any]) -> torch.Tensor:
        batch = {k: v for k, v in observation.items() if isinstance(v, torch.Tensor)}
        batch["pixel_values"] = batch.pop("image")
        return policy.sample_actions(batch, noise=batch.pop("noise", None))

    return act
