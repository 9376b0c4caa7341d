"""Lightning callbacks that drive APT's stages and watch its gates: thin adapters over the :class:`APT` controller."""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from apt_lightning.controller import APT
from apt_lightning.errors import ConfigError, ContractError
from apt_lightning.fit_checks import check_budget, check_learning_rate, check_optimizers, check_sharding, check_strategy
from apt_lightning.guard import NonFiniteGuard, non_finite_entries
from apt_lightning.schedule import Stage, StagePlan, parse_stage
from apt_lightning.sharding import prime_optimizer_state

__all__ = ["APTStageScheduler", "GateMonitor", "non_finite_entries"]

log = logging.getLogger(__name__)


class _TrainerSettings(Protocol):
    """Public ``Trainer`` attributes that Lightning's connectors assign and its class does not annotate."""

    callbacks: list[Callback]
    log_every_n_steps: int


def _settings(trainer: pl.Trainer) -> _TrainerSettings:
    return cast(_TrainerSettings, trainer)


def _controller(pl_module: pl.LightningModule) -> APT:
    """The module's :class:`APT` controller (``self.apt``), or a :class:`ContractError` that says how to add one."""
    controller = getattr(pl_module, "apt", None)
    if not isinstance(controller, APT):
        name = type(pl_module).__name__
        raise ContractError(
            f"{name} has no APT controller: declare `class {name}(APTMixin, LightningModule)` and assign "
            "`self.apt = APT(self, vlm=..., fusion=FusionConfig(...))` in `__init__` to use APT callbacks."
        )
    return controller


def check_site_outputs(pl_module: pl.LightningModule) -> None:
    """Every fusion site checked its wrapped module's output in this forward (Stage 1 included): report all that
    cannot take fusion, at the first step, not when the switch comes."""
    sites = _controller(pl_module).sites  # found at prepare: no module walk on the per-step path
    problems = [f"`{site}`: {layer.output_problem}" for site, layer in sites.items() if layer.output_problem]
    if problems:
        raise ContractError(
            f"{len(problems)} fusion site(s) of {type(pl_module).__name__} cannot take gated fusion (found in the "
            "first forward, before any weight changed):\n- " + "\n- ".join(problems)
        )


class APTStageScheduler(Callback):
    """Drives the module's :class:`APT` controller through a stage plan: the Lightning side of ``apt.prepare`` and
    of the clock (the Trainer's ``global_step`` is ``apt.step``).

    Four plans cover APT's workflows and the baseline it is measured against:

    * ``APTStageScheduler(switch_at_step=N)``: one ``fit``; Stage 1 for steps ``[0, N)``, Stage 2 after.
    * ``APTStageScheduler(stage=1)``: Stage 1 only; export the VA prior with :func:`export_va_prior`.
    * ``APTStageScheduler(stage=2)``: Stage 2 only, on a model that loaded a prior with :func:`load_va_prior`,
      or from scratch (frozen VLM, gated fusion from step 0).
    * ``APTStageScheduler(stage="joint")``: ordinary single-stage training, no APT: the expert sees the
      instruction from step 0 through the model's own attention, no fusion blocks, the VLM trains as
      ``APTConfig.vlm_mode`` says. Same model code, data and optimiser groups, so comparisons are fair.

    ``finetune=True`` starts the plan from step 0 on the weights the model already holds (pretrain, then
    fine-tune on task data in a fresh ``Trainer``; see :meth:`APT.start_finetune`): a Stage-2 model keeps its
    fusion blocks and gates, so at step 0 it computes exactly what it did. ``warm_start=True`` allows a plan that
    sees the instruction differently from the one the weights were trained under (joint weights under APT).

    ``setup`` builds structure only (fusion blocks and LoRA adapters, before any checkpoint restores into them and
    before DDP wraps the model; ``requires_grad`` for the whole fit). The stage is the plan applied to the global
    step, set at every entry point: each training batch, resume, validation, test and predict. A one-fit plan
    under DDP needs ``find_unused_parameters=True``: Stage-2 parameters exist but take no gradient in Stage 1.

    Args:
        switch_at_step: global step at which Stage 2 starts; ``None`` to stay in ``stage``.
        stage: the stage the fit starts in: 1, 2, or ``"joint"`` (also ``0``) for the baseline.
        check_finite: make sure the Trainer runs a :class:`NonFiniteGuard` (a NaN/inf loss, gradient or gate stops
            training before it reaches the weights or a checkpoint; one host synchronisation per step): one is added
            to ``trainer.callbacks`` at ``setup`` unless the Trainer already has one. ``False`` adds none.
        finetune: this fit fine-tunes the weights the model holds, from step 0.
        warm_start: with ``finetune``, accept weights trained under a plan that saw the instruction differently.

    Example::

        >>> APTStageScheduler(switch_at_step=1000).plan.name
        'stage1->stage2'
    """

    def __init__(
        self,
        switch_at_step: int | None = None,
        stage: Stage | Literal["joint"] = 1,
        check_finite: bool = True,
        finetune: bool = False,
        warm_start: bool = False,
    ) -> None:
        stage = parse_stage(stage)
        if switch_at_step is not None and stage != 1:
            raise ConfigError(f"`switch_at_step` needs `stage=1` (the fit starts in Stage 1), got stage={stage!r}.")
        for name, value in (("check_finite", check_finite), ("finetune", finetune), ("warm_start", warm_start)):
            if not isinstance(value, bool):
                raise ConfigError(f"`{name}` must be a bool, got {value!r}.")
        if warm_start and not finetune:
            raise ConfigError("`warm_start=True` only applies to a fine-tune: pass `finetune=True` as well.")
        self.plan = StagePlan(first_stage=stage, switch_step=switch_at_step)
        """The plan this fit asks for; the controller holds the one in force."""
        self.finetune, self.warm_start, self.check_finite = finetune, warm_start, check_finite
        self._announced: int | None = None

    # ------------------------------------------------------------------ setup: structure and early checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        apt = _controller(pl_module)
        if stage != TrainerFn.FITTING:
            if not apt.is_prepared:  # a loaded model keeps the plan its checkpoint recorded
                apt.prepare(self.plan)
            return
        check_strategy(trainer, self.plan)
        check_budget(trainer, self.plan)
        check_learning_rate(pl_module, apt)
        callbacks = _settings(trainer).callbacks
        if self.check_finite and not any(isinstance(c, NonFiniteGuard) for c in callbacks):
            # its own callback, right after this one (before checkpointing): Lightning calls its hooks from here on
            callbacks.insert(callbacks.index(self) + 1, NonFiniteGuard())
        if self.finetune:
            apt.start_finetune(self.plan, warm_start=self.warm_start)
        else:
            apt.prepare(self.plan)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        rank_zero_info(
            f"APT plan {self.plan.name}: {len(apt.sites)} fusion sites, VLM mode {apt.config.vlm_mode!r}, "
            f"{trainable:,} trainable parameters over the plan."
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_sharding(trainer, pl_module)
        check_optimizers(trainer, pl_module)

    # ------------------------------------------------------------------ the stage at every entry point
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        apt = _controller(pl_module)
        if apt.step > trainer.global_step:
            rank_zero_warn(
                f"The model was trained to global step {apt.step}, but this fit starts at step {trainer.global_step}: "
                f"the plan restarts from Stage {self.plan.stage_at(trainer.global_step)}. To continue that run, pass "
                "`ckpt_path=` to `fit`; to fine-tune these weights on new data, pass "
                "`APTStageScheduler(..., finetune=True)`."
            )
        if not pl_module.training:  # e.g. `load_policy` returns the model in eval mode, and fit keeps modes
            rank_zero_info(f"APT: {type(pl_module).__name__} was in eval mode at train start; set to train mode.")
            pl_module.train()
        apt._set_step(trainer.global_step)  # the step is restored by now when resuming
        if isinstance(trainer.strategy, ModelParallelStrategy):  # sharded checkpoints need every state present
            for optimizer in trainer.optimizers:
                prime_optimizer_state(optimizer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        apt = _controller(pl_module)
        apt._set_step(trainer.global_step, micro_batch=batch_idx)
        if apt.stage == 2 and trainer.global_step == apt.plan.switch_step and self._announced != trainer.global_step:
            self._announced = trainer.global_step  # once, also when the batch loop repeats the switch step
            self._on_switch(apt, trainer.global_step)
        pl_module.log("apt/stage", float(apt.stage), on_step=True, on_epoch=False, prog_bar=True, batch_size=1)

    @staticmethod
    def _on_switch(apt: APT, step: int) -> None:
        blocks = {site: layer.apt_fusion for site, layer in apt.sites.items()}
        open_gates = sorted(site for site, block in blocks.items() if block.gate == "tanh" and not block.is_identity)
        if open_gates:
            rank_zero_warn(
                f"Gates are not zero at the Stage-2 switch ({open_gates[:3]} ...): the switch will not be an "
                "exact identity. Call `reset_gates()` on those blocks if this is not intended."
            )
        rank_zero_info(f"APT: switching to Stage 2 (language through gated fusion) at global step {step}.")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _controller(pl_module)._set_step(trainer.global_step)

    def _sync_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        apt = _controller(pl_module)
        apt._set_step(trainer.global_step if trainer.state.fn == TrainerFn.FITTING else apt.step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_evaluation(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_evaluation(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_evaluation(trainer, pl_module)

    # ------------------------------------------------------------------ every fusion site fits
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        check_site_outputs(pl_module)

    # ------------------------------------------------------------------ checkpointing
    # No state of its own: the plan in force and the step are the controller's record (APTMixin's checkpoint hooks).
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not checkpoint.get("apt"):
            rank_zero_warn("The checkpoint holds no APT record (plan and step): its stage plan cannot be verified.")


class GateMonitor(Callback):
    """Logs ``tanh`` of every gate (``apt/gate/<site>/attn|ff``) and keeps a history for plots.

    Args:
        every_n_steps: log every this many global steps (defaults to the Trainer's ``log_every_n_steps``).

    Example::

        >>> GateMonitor(every_n_steps=10).history
        []
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.history: list[dict[str, Any]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.every_n_steps or _settings(trainer).log_every_n_steps
        step = trainer.global_step
        if step % max(every, 1) != 0 and step != 1:
            return
        values = self._record(trainer, pl_module)
        metrics = {f"apt/gate/{site}/{kind}": v for site, gates in values.items() for kind, v in gates.items()}
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)  # the final gates, whatever the interval

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        apt = _controller(pl_module)
        values = apt.gate_values()
        step = trainer.global_step
        if values and (not self.history or self.history[-1]["step"] != step):  # no sites (joint baseline): no history
            self.history.append({"step": step, "stage": apt.stage, "gates": values})
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
