"""apt_lightning: APT (Action expert PreTraining) for Vision-Language-Action models in PyTorch Lightning.

Stage 1 learns a language-agnostic vision-action prior with the VLM frozen and the instruction masked;
Stage 2 injects language through zero-initialised tanh-gated cross-attention, starting as an exact identity.
"""

from apt_lightning.callbacks import APTStageScheduler, GateMonitor
from apt_lightning.config import APTConfig, FusionConfig
from apt_lightning.controller import APT
from apt_lightning.errors import (
    AptError,
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
    StageMismatchError,
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
from apt_lightning.feature_cache import Stage1FeatureCache
from apt_lightning.fusion import GatedCrossAttentionBlock, GatedFusionLayer
from apt_lightning.guard import NonFiniteGuard
from apt_lightning.guidance import PriorGuidance
from apt_lightning.inject import inject_fusion, resolve_targets, unload_fusion
from apt_lightning.masking import PrefixMasks, check_language_mask, language_blind_masks
from apt_lightning.mixin import APTMixin
from apt_lightning.schedule import JOINT, StageLRFactor, StagePlan
from apt_lightning.sharding import fully_shard_apt
from apt_lightning.structure import fusion_sites

__version__ = "0.1.0"

__all__ = [
    "APT",
    "JOINT",
    "APTConfig",
    "APTMixin",
    "APTStageScheduler",
    "AptError",
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
    "Stage1FeatureCache",
    "StageLRFactor",
    "StageMismatchError",
    "StagePlan",
    "UnverifiedCheckpointWarning",
    "UnverifiedExportWarning",
    "__version__",
    "check_language_mask",
    "export_fusion",
    "export_va_prior",
    "export_vlm",
    "fully_shard_apt",
    "fusion_sites",
    "fusion_state_dict",
    "inject_fusion",
    "language_blind_masks",
    "load_fusion",
    "load_va_prior",
    "load_vlm",
    "resolve_targets",
    "unload_fusion",
    "va_prior_state_dict",
    "verify_export",
]
