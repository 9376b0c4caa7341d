"""torchmetrics metrics of the benchmark (distributed-safe: every state is a sum).

* :class:`SuccessRate`: fraction of successful episodes (one instance per split).
* :class:`ActionError`: MSE between predicted and expert action chunks, padding excluded.
* :class:`InstructionSensitivity`: how much a policy's actions move when only the instruction changes,
  relative to how much the expert's move. A policy that ignores language scores exactly 0; one that reacts
  like the expert scores ~1.

Closed-loop evaluation lives in :mod:`apt_studies.rollout`; :func:`rollout` is re-exported here.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from apt_studies.rollout import RolloutResult, rollout

__all__ = ["ActionError", "InstructionSensitivity", "RolloutResult", "SuccessRate", "rollout"]


def _zero() -> torch.Tensor:
    return torch.tensor(0.0, dtype=torch.float64)


class SuccessRate(Metric):
    """Fraction of successful episodes; NaN before any update."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    successes: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("successes", default=_zero(), dist_reduce_fx="sum")
        self.add_state("total", default=_zero(), dist_reduce_fx="sum")

    def update(self, success: torch.Tensor) -> None:
        """Add episode outcomes (bool or 0/1, any shape)."""
        success = torch.as_tensor(success, device=self.successes.device)
        self.successes += success.to(torch.float64).sum()
        self.total += success.numel()

    def compute(self) -> torch.Tensor:
        """Successes divided by episodes."""
        return self.successes / self.total if self.total > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class ActionError(Metric):
    """Mean squared error between action chunks, averaged over unpadded steps and action dimensions."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    squared_error: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("squared_error", default=_zero(), dist_reduce_fx="sum")
        self.add_state("count", default=_zero(), dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor, target: torch.Tensor, pad_mask: torch.Tensor | None = None) -> None:
        """Accumulate errors.

        Args:
            predicted: ``(B, chunk, D)`` predicted actions.
            target: ``(B, chunk, D)`` expert actions.
            pad_mask: ``(B, chunk)`` bool, True on padded steps that must not count.
        """
        if predicted.shape != target.shape:
            raise ValueError(f"shape mismatch: {tuple(predicted.shape)} vs {tuple(target.shape)}")
        error = (predicted.to(torch.float64) - target.to(torch.float64)) ** 2
        keep = (
            torch.ones(error.shape[:-1], dtype=torch.bool, device=error.device)
            if pad_mask is None
            else ~pad_mask.bool()
        )
        self.squared_error += (error * keep[..., None]).sum()
        self.count += keep.sum() * error.shape[-1]

    def compute(self) -> torch.Tensor:
        """Mean squared error over counted values."""
        return self.squared_error / self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class InstructionSensitivity(Metric):
    """Change of a policy's action chunk when only the instruction changes, normalised by the expert's.

    For every observation, the policy is queried twice with the same image, state and noise but two
    instructions naming different objects, giving chunks ``a`` and ``b``. The score is
    ``sum ||a - b|| / sum ||a* - b*||`` where ``a*, b*`` are the expert's chunks for the two targets and
    ``||.||`` is the L2 norm over the flattened chunk. A policy blind to language scores exactly 0; a policy
    that reacts to instructions as strongly as the expert scores about 1.

    Args:
        scale: If given, normalise by this fixed expert scale instead (``mean ||a - b|| / scale``) and
            ``update`` needs no expert chunks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    distance: torch.Tensor
    reference: torch.Tensor
    count: torch.Tensor

    def __init__(self, scale: float | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if scale is not None and scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale
        self.add_state("distance", default=_zero(), dist_reduce_fx="sum")
        self.add_state("reference", default=_zero(), dist_reduce_fx="sum")
        self.add_state("count", default=_zero(), dist_reduce_fx="sum")

    def update(
        self,
        actions_a: torch.Tensor,
        actions_b: torch.Tensor,
        expert_a: torch.Tensor | None = None,
        expert_b: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one batch of paired predictions (``(B, chunk, D)`` each)."""
        if actions_a.shape != actions_b.shape:
            raise ValueError(f"shape mismatch: {tuple(actions_a.shape)} vs {tuple(actions_b.shape)}")
        self.distance += self._norms(actions_a, actions_b).sum()
        self.count += actions_a.shape[0]
        if self.scale is None:
            if expert_a is None or expert_b is None:
                raise ValueError("expert chunks are required when no fixed scale was given")
            self.reference += self._norms(expert_a, expert_b).sum()

    @staticmethod
    def _norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.to(torch.float64) - b.to(torch.float64)).flatten(1).norm(dim=1)

    def compute(self) -> torch.Tensor:
        """Policy instruction sensitivity relative to the expert's (or to the fixed scale)."""
        if self.scale is not None:
            return self.distance / self.count / self.scale if self.count > 0 else torch.tensor(float("nan"))
        return self.distance / self.reference if self.reference > 0 else torch.tensor(float("nan"), dtype=torch.float64)
