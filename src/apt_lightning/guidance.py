"""Prior-contrast guidance: contrast the language-conditioned velocity with APT's own vision-action prior.

With its fusion context empty, a Stage-2 model computes exactly the Stage-1 (language-free) path, so APT
carries the "language-free branch" that counterfactual action guidance needs at no extra training:
``v = v_prior + w * (v_cond - v_prior)``. ``w = 1`` is the plain model; ``w > 1`` pushes the actions away from
the visual habit, towards what the instruction adds. Both branches run as one doubled expert batch after one
VLM pass: row ``2i`` is sample ``i`` with its language, row ``2i + 1`` the same sample without.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch

from apt_lightning.errors import GuidanceScaleError

MAX_GUIDANCE_SCALE = 1000.0
"""Largest accepted ``|w|``. The guided velocity is ``prior + w * (cond - prior)``: past this the actions leave
any trained range (``w = 1e6`` gave actions of 4.6e4 on a model trained on actions in [-1, 1]) and float32
overflows to NaN (``w = 1e30``)."""
LARGE_GUIDANCE_SCALE = 20.0
"""``|w|`` above which :func:`check_guidance_scale` warns: classifier-free guidance is used at 1-10."""


def check_guidance_scale(value: object) -> float:
    """The guidance weight ``w`` as a float, refused when it cannot give meaningful actions.

    Accepts any real number (int, float, numpy scalar, 0-d tensor) that is finite and at most
    :data:`MAX_GUIDANCE_SCALE` in magnitude; warns above :data:`LARGE_GUIDANCE_SCALE`. A ``bool`` or a string is
    refused rather than read as a number (``True`` would silently mean ``w = 1``, ``"2"`` is a CLI value never
    parsed).

    Raises:
        GuidanceScaleError: naming the value and the accepted range.

    Example::

        >>> check_guidance_scale(2), check_guidance_scale(1.5)
        (2.0, 1.5)
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GuidanceScaleError(
            f"`guidance_scale` must be a real number (1.0 = plain sampling, e.g. 1.5-3 for guidance), got "
            f"{value!r} ({type(value).__name__}). Convert it first, e.g. `float(args.guidance_scale)`."
        )
    scale = float(value)
    if not math.isfinite(scale):
        raise GuidanceScaleError(f"`guidance_scale` must be finite, got {value!r}; use 1.0 for plain sampling.")
    if abs(scale) > MAX_GUIDANCE_SCALE:
        raise GuidanceScaleError(
            f"`guidance_scale`={value!r} is beyond +-{MAX_GUIDANCE_SCALE:g}: the guided velocity prior + w * (cond - "
            "prior) leaves any trained range and overflows to NaN in float32 for huge w. Use 1.0 (plain) to ~10."
        )
    if abs(scale) > LARGE_GUIDANCE_SCALE:
        warnings.warn(
            f"`guidance_scale`={scale:g} is large (guidance is used at 1-10): the actions may leave the range the "
            "model was trained on. Check them, or lower the scale.",
            UserWarning,
            stacklevel=3,
        )
    return scale


@dataclass(frozen=True)
class PriorGuidance:
    """What :meth:`~apt_lightning.APT.fusion_context` yields: how to run the expert under guidance.

    Inside the context, pass every per-sample expert input through :meth:`expand` and the expert's velocity
    through :meth:`combine`. When guidance is off (``scale == 1``, or not in Stage 2) both return their input
    unchanged, so the same model code serves guided and plain sampling, bit for bit.

    Attributes:
        scale: the guidance weight ``w``.
        active: whether the expert batch is doubled (``scale != 1`` in Stage 2).

    Example::

        >>> guide = PriorGuidance(scale=2.0, active=True)
        >>> x = torch.tensor([[1.0], [3.0]])
        >>> guide.expand(x).flatten().tolist()
        [1.0, 1.0, 3.0, 3.0]
        >>> guide.combine(torch.tensor([[2.0], [1.0], [5.0], [5.0]])).flatten().tolist()  # prior + 2 (cond - prior)
        [3.0, 5.0]
    """

    scale: float = 1.0
    active: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or not math.isfinite(self.scale):
            raise GuidanceScaleError(f"`guidance_scale` must be a finite real number, got {self.scale!r}.")

    def expand(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (2B, ...): each sample twice, conditional row first."""
        return tensor.repeat_interleave(2, dim=0) if self.active else tensor

    def prior_rows_blind(self, key_mask: torch.Tensor) -> torch.Tensor:
        """Expanded (B, S) key mask with the prior rows (odd) all False: those rows take the Stage-1 path."""
        if not self.active:
            return key_mask
        expanded = self.expand(key_mask).clone()
        expanded[1::2] = False
        return expanded

    def combine(self, velocity: torch.Tensor) -> torch.Tensor:
        """(2B, ...) expert output -> (B, ...) guided velocity ``prior + w * (cond - prior)``."""
        if not self.active:
            return velocity
        pairs = velocity.unflatten(0, (-1, 2))
        cond, prior = pairs[:, 0], pairs[:, 1]
        return prior + self.scale * (cond - prior)
