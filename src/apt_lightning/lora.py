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
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from apt_lightning.config import APTConfig
from apt_lightning.errors import ConfigError
from apt_lightning.structure import lora_parameters


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in module.modules())


def inject_vlm_lora(vlm: nn.Module, config: APTConfig) -> None:
    """Add LoRA adapters to ``vlm`` (no-op if it already has them) and make only them trainable.

    Call :func:`check_lora_targets` first: peft's own error for a target that matches nothing says neither which
    VLM nor how to fix it.
    """
    if not has_lora(vlm):
        lora_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=_peft_targets(config),
        )
        inject_adapter_in_model(lora_config, vlm)
    vlm.requires_grad_(False)
    for param in lora_parameters(vlm):
        param.requires_grad_(True)


def check_lora_targets(vlm: nn.Module, config: APTConfig) -> None:
    """Refuse ``lora_target_modules`` that match no module of ``vlm`` (peft's matching rule), changing nothing.

    Raises:
        ConfigError: nothing matches; the message lists the VLM's own linear-layer names to choose from.
    """
    probe = LoraConfig(target_modules=_peft_targets(config))
    if any(check_target_module_exists(probe, name) for name, _ in vlm.named_modules() if name):
        return
    linear = sorted({name.rpartition(".")[2] for name, m in vlm.named_modules() if isinstance(m, nn.Linear)})
    raise ConfigError(
        f"vlm_mode='lora': `lora_target_modules`={config.lora_target_modules!r} matches no module of the VLM "
        f"({type(vlm).__name__}). Set `APTConfig(lora_target_modules=[...])` to names of its linear layers "
        f"(its own: {linear[:8]}), or to one regex over their full names."
    )


def _peft_targets(config: APTConfig) -> str | list[str]:
    targets = config.lora_target_modules
    return targets if isinstance(targets, str) else list(targets)


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
