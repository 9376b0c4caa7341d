"""APT's optimiser: one param group per role, a stage-aware schedule, and the optimizer hooks of the one clock.

Roles are found by module type (:mod:`apt_lightning.structure`), never by parameter-name substrings. The clock is
:attr:`APT.step <apt_lightning.APT.step>`: the optimizer built here advances it after each step and refuses to step
when its own count disagrees (a resume that forgot the optimizer's state), and the learning-rate factors are a
function of it, applied right before every step, so no second counter (the scheduler's own) can drift from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from apt_lightning.errors import ClockError
from apt_lightning.schedule import StageLRFactor
from apt_lightning.structure import fusion_parameters, gate_parameters

if TYPE_CHECKING:
    from apt_lightning.controller import APT

PARAM_GROUPS = ("expert", "fusion", "gates", "vlm")
STEP_KEY = "apt_step"
"""Param-group entry counting the optimizer steps taken; saved with ``optimizer.state_dict()``."""


def is_idle_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every param group's learning rate is 0: a step that moves no weight and is not a training step.

    Code that creates optimizer state takes such steps (``torch.distributed.checkpoint`` before it loads a sharded
    optimizer, :func:`~apt_lightning.sharding.prime_optimizer_state`): the clock does not count them, and the
    schedule does not give them a learning rate (AdamW's decoupled weight decay would then move the weights)."""
    return all(float(group.get("lr", 0.0)) == 0.0 for group in optimizer.param_groups)


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
    apt: APT, optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW, **optimizer_kwargs: Any
) -> dict[str, Any]:
    """``configure_optimizers`` output: ``optimizer_cls`` over :func:`param_groups`, bound to APT's clock
    (:func:`bind_optimizer`), with a :class:`StageLRScheduler` whose factor for each group is 0 outside its stages
    and warms up from each stage's start."""
    groups = param_groups(apt)
    optimizer = optimizer_cls(groups, lr=apt.config.lr, **optimizer_kwargs)
    bind_optimizer(apt, optimizer)
    factors = [StageLRFactor(apt.plan, g["name"], apt.config.warmup_steps) for g in groups]
    scheduler = StageLRScheduler(optimizer, apt, factors)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def bind_optimizer(apt: APT, optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer`` drive APT's clock: after each step :meth:`APT.advance` runs, and before each step the
    optimizer's own step count (:data:`STEP_KEY` in every param group, saved with its state) must equal
    :attr:`APT.step`.

    A fresh optimizer has taken 0 steps; restored with ``optimizer.load_state_dict`` it has taken what it had when
    saved. So a plain loop resumed with the model's weights and APT's state but a fresh optimizer stops at its first
    step with a :class:`ClockError` (its Adam moments would be zero: the run would silently differ from the
    uninterrupted one). A Trainer that owns the clock (Lightning, which restores the optimizer itself and counts
    skipped mixed-precision steps) is followed instead of checked.
    """
    for group in optimizer.param_groups:
        group.setdefault(STEP_KEY, 0)
    idle = [False]  # whether the step under way is idle, as the pre-hook saw it (the schedule may change lrs after)

    def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        idle[0] = is_idle_step(optimizer)
        if idle[0]:
            return
        trainer_clock = apt._counters() if apt._counters is not None else None
        for group in optimizer.param_groups:
            taken = group.get(STEP_KEY)
            if trainer_clock is not None or taken is None:  # a Trainer's clock, or state saved before the count
                group[STEP_KEY] = apt.step
            elif taken != apt.step:
                raise ClockError(
                    f"The optimizer has taken {taken} steps but the weights have taken {apt.step} (`apt.step`): "
                    "stepping now would continue a different run. When resuming, restore the optimizer's saved "
                    "state (`optimizer.load_state_dict(saved)`) before training; to start a new run from these "
                    "weights, call `apt.start_finetune(plan)` first (its step is 0)."
                )

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if idle[0]:
            return
        apt.advance()
        for group in optimizer.param_groups:
            group[STEP_KEY] = apt.step

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)


class StageLRScheduler(LRScheduler):
    """Per-group learning rate ``initial_lr * factor(apt.step)``, one :class:`StageLRFactor` per param group.

    The factors read APT's clock, not a counter of the scheduler's own, and are applied before every optimizer step
    (an optimizer pre-hook): a scheduler that is not stepped, stepped twice, or restored from another run's state
    still gives each step the learning rate of its stage. An idle step (every learning rate set to 0 by whoever
    steps, :func:`is_idle_step`) keeps its zeros. ``step()`` re-applies them for logging. Its
    ``state_dict`` is plain data (no controller, no callables), so it loads with ``weights_only=True``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, apt: APT, factors: list[StageLRFactor]) -> None:
        if len(factors) != len(optimizer.param_groups):
            raise ClockError(
                f"StageLRScheduler got {len(factors)} factors for {len(optimizer.param_groups)} param groups."
            )
        self._apt = apt
        self.factors = factors
        super().__init__(optimizer)
        optimizer.register_step_pre_hook(lambda *_: None if is_idle_step(optimizer) else self._apply())

    def get_lr(self) -> list[float]:  # type: ignore[override]  # torch: list[float | Tensor]; floats here
        step = self._apt.step
        lrs: list[Any] = [base * factor(step) for base, factor in zip(self.base_lrs, self.factors, strict=True)]
        return lrs  # floats, as param_groups gives them; a Tensor learning rate would stay a Tensor

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        skipped = {"optimizer", "_apt", "factors"}
        return {key: value for key, value in self.__dict__.items() if key not in skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The factors come from this run's plan (checked by `apt.load_state_dict`); older LambdaLR states carry theirs.
        kept = {key: value for key, value in state_dict.items() if key not in {"factors", "lr_lambdas", "_apt"}}
        self.__dict__.update(kept)
        self._apply()


def has_apt_groups(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` was built on :func:`param_groups` (every group carries an APT role name)."""
    return bool(optimizer.param_groups) and all(g.get("name") in PARAM_GROUPS for g in optimizer.param_groups)
