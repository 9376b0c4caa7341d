"""apt_lightning: APT (Action expert PreTraining) for Vision-Language-Action models in PyTorch Lightning.

Stage 1 learns a language-agnostic vision-action prior with the VLM frozen and the instruction masked;
Stage 2 injects language through zero-initialised tanh-gated cross-attention, starting as an exact identity.

The controller (:class:`APT`) and everything it needs import without Lightning; the Lightning adapter
(:class:`APTMixin`, the callbacks) is imported on first use, so a plain PyTorch loop never loads Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from apt_lightning.config import APTConfig, FusionConfig
from apt_lightning.controller import APT
from apt_lightning.errors import (
    AptError,
    CheckpointWriteError,
    ClockError,
    ConfigError,
    ContractError,
    ExportError,
    FeatureCacheError,
    FusionContextError,
    GuidanceScaleError,
    LanguageMaskError,
    NoMatchingTargetError,
    NonFiniteError,
    NonFiniteGateError,
    NonFiniteLossError,
    NotPreparedError,
    PolicyCheckpointError,
    RemovedNameError,
    StageMismatchError,
    StrategyError,
    UnverifiedCheckpointWarning,
    UnverifiedExportWarning,
)
from apt_lightning.export import (
    export_fusion,
    export_va_prior,
    export_vlm,
    fusion_state_dict,
    load_fusion,
    load_va_prior,
    load_vlm,
    va_prior_state_dict,
    verify_export,
)
from apt_lightning.fusion import GatedCrossAttentionBlock, GatedFusionLayer
from apt_lightning.guidance import PriorGuidance
from apt_lightning.inject import resolve_targets
from apt_lightning.masking import PrefixMasks, check_language_mask, language_blind_masks
from apt_lightning.optim import StageLRScheduler
from apt_lightning.schedule import JOINT, StageLRFactor, StagePlan
from apt_lightning.sharding import fully_shard_apt
from apt_lightning.structure import fusion_sites

if TYPE_CHECKING:
    from apt_lightning.callbacks import APTStageScheduler, GateMonitor
    from apt_lightning.checksum import VerifiedCheckpointIO
    from apt_lightning.feature_cache import Stage1FeatureCache
    from apt_lightning.guard import NonFiniteGuard
    from apt_lightning.mixin import APTMixin

_LIGHTNING_ADAPTER = {
    "APTMixin": "apt_lightning.mixin",
    "APTStageScheduler": "apt_lightning.callbacks",
    "GateMonitor": "apt_lightning.callbacks",
    "NonFiniteGuard": "apt_lightning.guard",
    "Stage1FeatureCache": "apt_lightning.feature_cache",
    "VerifiedCheckpointIO": "apt_lightning.checksum",
}
"""Public names that need Lightning, imported when first used (PEP 562)."""


def __getattr__(name: str) -> Any:
    module = _LIGHTNING_ADAPTER.get(name)
    if module is None:
        raise AttributeError(f"module 'apt_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "APT",
    "JOINT",
    "APTConfig",
    "APTMixin",
    "APTStageScheduler",
    "AptError",
    "CheckpointWriteError",
    "ClockError",
    "ConfigError",
    "ContractError",
    "ExportError",
    "FeatureCacheError",
    "FusionConfig",
    "FusionContextError",
    "GateMonitor",
    "GatedCrossAttentionBlock",
    "GatedFusionLayer",
    "GuidanceScaleError",
    "LanguageMaskError",
    "NoMatchingTargetError",
    "NonFiniteError",
    "NonFiniteGateError",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "NotPreparedError",
    "PolicyCheckpointError",
    "PrefixMasks",
    "PriorGuidance",
    "RemovedNameError",
    "Stage1FeatureCache",
    "StageLRFactor",
    "StageLRScheduler",
    "StageMismatchError",
    "StagePlan",
    "StrategyError",
    "UnverifiedCheckpointWarning",
    "UnverifiedExportWarning",
    "VerifiedCheckpointIO",
    "__version__",
    "check_language_mask",
    "export_fusion",
    "export_va_prior",
    "export_vlm",
    "fully_shard_apt",
    "fusion_sites",
    "fusion_state_dict",
    "language_blind_masks",
    "load_fusion",
    "load_va_prior",
    "load_vlm",
    "resolve_targets",
    "va_prior_state_dict",
    "verify_export",
]
