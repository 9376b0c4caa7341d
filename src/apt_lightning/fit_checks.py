"""Checks of a Lightning fit that would otherwise fail late or silently under APT, each a small function the
:class:`~apt_lightning.APTStageScheduler` calls at the right hook (``setup`` or ``on_fit_start``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from apt_lightning.controller import APT
from apt_lightning.errors import ContractError, StrategyError
from apt_lightning.optim import has_apt_groups
from apt_lightning.schedule import StagePlan
from apt_lightning.sharding import unsharded_parameters


def find_unused_parameters(strategy: Any) -> bool | None:
    """Whether a DDP strategy lets parameters go without gradient: from the kwargs it will pass to
    ``DistributedDataParallel`` (Lightning keeps them in ``_ddp_kwargs``), else from the wrapped model once it
    exists; ``None`` when neither says."""
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if isinstance(kwargs, dict):
        return bool(kwargs.get("find_unused_parameters", False))
    wrapped = getattr(strategy, "model", None)
    flag = getattr(wrapped, "find_unused_parameters", None)
    return flag if isinstance(flag, bool) else None


def check_strategy(trainer: pl.Trainer, plan: StagePlan) -> None:
    """Refuse strategies APT cannot run under, in ``setup`` (before any step).

    Raises:
        StrategyError: DeepSpeed; DDP without ``find_unused_parameters`` for a one-fit plan; FSDP1 without
            ``use_orig_params``.
    """
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        raise StrategyError(
            "APTStageScheduler does not support the DeepSpeed strategy (its ZeRO partitions cannot keep APT's frozen "
            "VLM and per-role groups). Use DDP, FSDP or ModelParallelStrategy (FSDP2)."
        )
    if isinstance(strategy, DDPStrategy) and plan.switch_step is not None and find_unused_parameters(strategy) is False:
        raise StrategyError(
            "A one-fit APT plan (`switch_at_step`) under DDP needs `find_unused_parameters=True`: fusion "
            "parameters take no gradient before the switch. Use strategy='ddp_find_unused_parameters_true' "
            "or DDPStrategy(find_unused_parameters=True), or run the two stages as two fits."
        )
    if isinstance(strategy, FSDPStrategy) and not strategy.kwargs.get("use_orig_params", True):
        raise StrategyError(
            "FSDPStrategy (FSDP1) flattens each wrapped unit's parameters into one, which cannot mix the frozen "
            "VLM with the trainable expert and fusion blocks, nor keep APT's per-role param groups. Pass "
            "FSDPStrategy(use_orig_params=True, ...) (see examples/fsdp_gpu.py), or use ModelParallelStrategy "
            "(FSDP2) with `self.apt_fully_shard(...)` in `configure_model`."
        )


def check_budget(trainer: pl.Trainer, plan: StagePlan) -> None:
    """Warn when ``max_steps`` ends the fit before the switch."""
    switch, max_steps = plan.switch_step, trainer.max_steps
    if switch is not None and max_steps is not None and 0 <= max_steps <= switch:
        rank_zero_warn(
            f"`switch_at_step`={switch} >= Trainer(max_steps={max_steps}): this fit never reaches Stage 2. "
            "Raise max_steps above the switch (or resume later with a larger max_steps), or use "
            "APTStageScheduler(stage=1) for a Stage-1-only fit."
        )


def check_learning_rate(pl_module: pl.LightningModule, apt: APT) -> None:
    """A model's own ``lr`` is dead under APT's optimiser unless it went into ``APTConfig``: say so."""
    hparams = getattr(pl_module, "hparams", {})
    for name in ("lr", "learning_rate"):
        value = getattr(pl_module, name, None)
        value = hparams.get(name, value) if value is None else value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != apt.config.lr:
            rank_zero_warn(
                f"{type(pl_module).__name__}.{name}={value} is not the learning rate APT's optimiser uses "
                f"(APTConfig.lr={apt.config.lr}). Pass it on: `APT(self, ..., config=APTConfig(lr={name}))` in "
                "`__init__`."
            )


def check_sharding(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Under FSDP2 every parameter must sit in a sharded unit, or its gradient is never reduced.

    Raises:
        ContractError: listing the first unsharded parameters and the fix.
    """
    if not isinstance(trainer.strategy, ModelParallelStrategy):
        return
    unsharded = unsharded_parameters(pl_module)
    if unsharded:
        raise ContractError(
            f"Under ModelParallelStrategy {len(unsharded)} parameters of {type(pl_module).__name__} are not "
            f"sharded ({unsharded[:3]} ...): FSDP2 would never reduce their gradients, and the ranks would "
            "drift apart. Shard the whole module in `configure_model`: "
            '`self.apt_fully_shard(units=r".*layers\\.\\d+")` (Lightning calls it after the fusion blocks '
            "are built)."
        )


def check_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Warn when the optimizer does not build on APT's groups (no stage schedule, no gate learning rate)."""
    if not all(has_apt_groups(optimizer) for optimizer in trainer.optimizers):
        rank_zero_warn(
            f"{type(pl_module).__name__}.configure_optimizers does not build on APT's param groups: the gates get "
            "no larger learning rate and no group follows the stage schedule (Stage-2 parameters may even train "
            "in Stage 1). Return `self.apt.configure_optimizers(YourOptimizer, **kwargs)` from it, or delete it "
            "to use AdamW with APTConfig's learning rates."
        )
