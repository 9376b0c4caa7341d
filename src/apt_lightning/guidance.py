"""Prior-contrast guidance: contrast the language-conditioned velocity with APT's own vision-action prior.

With its fusion context empty, a Stage-2 model computes exactly the Stage-1 (language-free) path, so APT
carries the "language-free branch" that counterfactual action guidance needs at no extra training:
``v = v_prior + w * (v_cond - v_prior)``. ``w = 1`` is the plain model; ``w > 1`` pushes the actions away from
the visual habit, towards what the instruction adds. Both branches run as one doubled expert batch after one
VLM pass: row ``2i`` is sample ``i`` with its language, row ``2i + 1`` the same sample without.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PriorGuidance:
    """What :meth:`~apt_lightning.APTMixin.apt_fusion_context` yields: how to run the expert under guidance.

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
        if not math.isfinite(self.scale):
            raise ValueError(f"`guidance_scale` must be finite, got {self.scale!r}.")

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
