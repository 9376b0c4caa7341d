"""APT's optimiser: one AdamW param group per role and a stage-aware ``LambdaLR``.

Roles are found by module type (:mod:`apt_lightning.structure`), never by parameter-name substrings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from apt_lightning.schedule import StageLRFactor
from apt_lightning.structure import fusion_parameters, gate_parameters

if TYPE_CHECKING:
    from apt_lightning.controller import APT

PARAM_GROUPS = ("expert", "fusion", "gates", "vlm")


def param_groups(apt: APT) -> list[dict[str, Any]]:
    """Trainable parameters split by role, each group named and with its own lr: expert, fusion, gates, vlm."""
    cfg, model = apt.config, apt.model
    roles: dict[int, str] = {id(p): "vlm" for p in apt.vlm_module.parameters()}
    roles.update({id(p): "fusion" for p in fusion_parameters(model)})
    roles.update({id(p): "gates" for p in gate_parameters(model)})
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in PARAM_GROUPS}
    for param in model.parameters():
        if param.requires_grad:
            groups[roles.get(id(param), "expert")].append(param)
    lrs = {
        "expert": cfg.lr,
        "fusion": cfg.resolved_fusion_lr,
        "gates": cfg.resolved_gate_lr,
        "vlm": cfg.resolved_vlm_lr,
    }
    decay = {"expert": cfg.weight_decay, "fusion": cfg.weight_decay, "gates": 0.0, "vlm": cfg.weight_decay}
    return [
        {"name": role, "params": params, "lr": lrs[role], "weight_decay": decay[role]}
        for role, params in groups.items()
        if params
    ]


def configure_apt_optimizers(
    apt: APT, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **optimizer_kwargs: Any
) -> dict[str, Any]:
    """``configure_optimizers`` output: ``optimizer_cls`` over :func:`param_groups`, stepped per global step by
    a ``LambdaLR`` whose factor for each group is 0 outside its stages and warms up from each stage's start."""
    groups = param_groups(apt)
    optimizer = optimizer_cls(groups, lr=apt.config.lr, **optimizer_kwargs)
    factors = [StageLRFactor(apt.plan, g["name"], apt.config.warmup_steps) for g in groups]
    scheduler = LambdaLR(optimizer, factors)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def has_apt_groups(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` was built on :func:`param_groups` (every group carries an APT role name)."""
    return bool(optimizer.param_groups) and all(g.get("name") in PARAM_GROUPS for g in optimizer.param_groups)
