"""Exception types raised by apt_lightning.

Every error subclasses :class:`AptError` and, where it makes sense, the builtin a caller would already catch
(``ValueError``, ``RuntimeError``), so ``except ValueError`` keeps working for users who do not know the
library's own types.
"""

from __future__ import annotations


class AptError(Exception):
    """Base class of every error raised by apt_lightning."""


class ContractError(AptError, TypeError):
    """The LightningModule does not declare what :class:`~apt_lightning.APTMixin` needs."""


class NoMatchingTargetError(AptError, ValueError):
    """A fusion ``target_modules`` pattern matched no module (or every match was excluded)."""


class LanguageMaskError(AptError, ValueError):
    """A language mask has the wrong shape, dtype or device for the token sequence it describes."""


class StageMismatchError(AptError, RuntimeError):
    """A checkpoint was taken under a stage plan that the current run cannot continue."""


class NonFiniteGateError(AptError, RuntimeError):
    """A gate of a gated cross-attention block became NaN or infinite."""


class FusionContextError(AptError, RuntimeError):
    """A Stage-2 fusion block ran without language context."""
