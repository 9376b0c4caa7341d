"""Exception types raised by apt_lightning.

Every error subclasses :class:`AptError` and, where it makes sense, the builtin a caller would already catch
(``ValueError``, ``RuntimeError``), so ``except ValueError`` keeps working for users who do not know the
library's own types.
"""

from __future__ import annotations


class AptError(Exception):
    """Base class of every error raised by apt_lightning."""


class ContractError(AptError, ValueError):
    """The model, or what its :class:`~apt_lightning.APT` controller was told about it (VLM name, fusion targets and
    widths), does not fit what APT needs; the message lists every problem with its fix."""


class NotPreparedError(ContractError, RuntimeError):
    """The module was used before :meth:`~apt_lightning.APT.prepare` gave it a stage plan."""


class NoMatchingTargetError(ContractError, ValueError):
    """A fusion ``target_modules`` pattern matched no module (or every match was excluded)."""


class LanguageMaskError(AptError, ValueError):
    """A language mask has the wrong shape, dtype or device for the token sequence it describes."""


class StageMismatchError(AptError, RuntimeError):
    """A checkpoint was taken under a stage plan that the current run cannot continue."""


class NonFiniteError(AptError, RuntimeError):
    """Training produced a NaN or infinite value; it was stopped before the value reached the weights or a
    checkpoint."""


class NonFiniteLossError(NonFiniteError):
    """The loss or a gradient of a training step is NaN or infinite."""


class NonFiniteGateError(NonFiniteError):
    """A gate of a gated cross-attention block became NaN or infinite."""


class FusionContextError(AptError, RuntimeError):
    """A Stage-2 fusion block ran without language context."""


class FeatureCacheError(AptError, RuntimeError):
    """The Stage-1 feature cache cannot serve this run safely: no Stage 1, no sample identity, inputs that change
    between visits (random augmentation), or a dataset whose features exceed the memory budget."""


class PolicyCheckpointError(AptError, ValueError):
    """A file cannot be loaded as a reference policy: not a checkpoint, or it names no registered policy class."""


class ExportError(AptError, ValueError):
    """A safetensors export cannot be written or loaded safely: unreadable or corrupt file, content hash
    mismatch, non-finite tensors, wrong export kind, or a model whose fusion geometry differs from the
    exporting model's."""


class UnverifiedExportWarning(UserWarning):
    """An export written before verified exports (no content hash or geometry) was loaded without those
    checks. Turn it into an error with ``warnings.simplefilter("error", UnverifiedExportWarning)``."""


class ConfigError(AptError, ValueError):
    """A configuration value (``APTConfig``, ``FusionConfig``, ``StagePlan``, a cache size) is invalid: the message
    names the field, the value received and what is accepted."""


class GuidanceScaleError(AptError, ValueError):
    """``guidance_scale`` is not a finite real number in the range where guided sampling stays meaningful."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written before checkpoints carried a content digest (or by a strategy whose state dict is
    sharded) was loaded without that check. Turn it into an error with
    ``warnings.simplefilter("error", UnverifiedCheckpointWarning)``."""


class ClockError(AptError, RuntimeError):
    """The optimizer's own step count and APT's step (the one clock) disagree: a resume restored the weights and
    APT's state but not the optimizer's, or a step was taken outside the bound optimizer."""


class RemovedNameError(AptError, AttributeError):
    """A pre-1.0 name (an ``apt_*`` method or the ``apt_vlm``/``apt_fusion``/``apt_config`` declarations) was used;
    the message names its replacement."""


class StrategyError(AptError, RuntimeError):
    """The Lightning strategy cannot run APT as configured (DeepSpeed, DDP without unused-parameter detection for a
    one-fit plan, FSDP1 without ``use_orig_params``); the message says which strategy to use instead."""


class CheckpointWriteError(AptError, OSError):
    """A checkpoint could not be written (full disk, unwritable directory); no partial file was left behind."""
