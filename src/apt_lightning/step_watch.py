"""Catch weights that an optimizer stepped without APT's clock advancing.

The optimizer :meth:`APT.configure_optimizers <apt_lightning.APT.configure_optimizers>` builds advances
:attr:`APT.step <apt_lightning.APT.step>` itself; an optimizer of the user's own needs one
:meth:`APT.advance <apt_lightning.APT.advance>` after each ``optimizer.step()``. Forgetting it is silent otherwise:
the model stays in Stage 1 past the switch and every step draws the same noise. PyTorch counts in-place changes of
a tensor in its version counter, so between two training forwards the trainable weights tell whether something
stepped them; if that happens twice while the step stays put, the clock is not being advanced.

Twice, not once: loading weights into the model (``model.load_state_dict``) also changes them in place, once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from apt_lightning.errors import ClockError

STRIKES = 2
"""Weight changes without a step advance, in a row, that make a :class:`ClockError`."""


class UncountedStepWatch:
    """Compare the trainable weights' version counters at each training forward with the step APT counted."""

    def __init__(self) -> None:
        self._versions: tuple[tuple[int, int], ...] | None = None
        self._step = -1
        self._strikes = 0

    def reset(self) -> None:
        """Forget what was seen (the structure or the step was set on purpose)."""
        self._versions, self._step, self._strikes = None, -1, 0

    def observe(self, parameters: Iterable[nn.Parameter], step: int) -> None:
        """Record the weights' versions at a training forward at ``step``.

        Raises:
            ClockError: the weights changed between :data:`STRIKES` consecutive pairs of training forwards while
                the step did not move.
        """
        if torch.compiler.is_compiling():  # version counters are an eager-mode notion
            return
        versions = tuple((id(p), p._version) for p in parameters if p.requires_grad)
        before, self._versions = self._versions, versions
        if step != self._step:
            self._step, self._strikes = step, 0
            return
        if before is None or versions == before:
            return
        if [i for i, _ in before] != [i for i, _ in versions]:  # other parameter objects (resharded, rebuilt)
            return
        self._strikes += 1
        if self._strikes >= STRIKES:
            self._strikes = 0
            raise ClockError(
                f"The trainable weights changed {STRIKES} times in a row between training forwards while `apt.step` "
                f"stayed at {step}: an optimizer APT did not build is stepping them and APT's clock is not advancing "
                "(the model would stay in its first stage past the switch and redraw the same noise every step). "
                "Build the optimizer with `apt.configure_optimizers()` (any optimizer class: `optimizer_cls=`), or "
                "call `apt.advance()` after each `optimizer.step()`."
            )
