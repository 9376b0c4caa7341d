"""LoRA on the VLM through peft, for Stage 2 with ``vlm_mode="lora"``.

Adapters are injected in place (``peft.inject_adapter_in_model``), so module names stay those of the user's
model and fusion targets keep matching. ``lora_B`` starts at zero: the adapted VLM computes exactly what the
frozen one did until the first Stage-2 update.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from apt_lightning.config import APTConfig
from apt_lightning.structure import lora_parameters


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in module.modules())


def inject_vlm_lora(vlm: nn.Module, config: APTConfig) -> None:
    """Add LoRA adapters to ``vlm`` (no-op if it already has them) and make only them trainable."""
    if not has_lora(vlm):
        lora_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules
            if isinstance(config.lora_target_modules, str)
            else list(config.lora_target_modules),
        )
        inject_adapter_in_model(lora_config, vlm)
    vlm.requires_grad_(False)
    for param in lora_parameters(vlm):
        param.requires_grad_(True)


def merged_state_dict(vlm: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of ``vlm`` with every LoRA adapter merged into its base weight, under the original names.

    Works on a copy: the live model keeps its adapters. The result loads into a VLM built without LoRA.
    """
    merged = copy.deepcopy(vlm)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, module.get_base_layer())
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def remove_vlm_lora(vlm: nn.Module) -> None:
    """Put every LoRA-wrapped layer of ``vlm`` back as its base layer (adapters dropped, not merged)."""
    for name, module in list(vlm.named_modules()):
        if isinstance(module, LoraLayer) and isinstance(module, nn.Module) and name:
            parent_name, _, child = name.rpartition(".")
            parent = vlm.get_submodule(parent_name) if parent_name else vlm
            setattr(parent, child, module.get_base_layer())
