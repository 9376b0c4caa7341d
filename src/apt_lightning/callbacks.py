"""Lightning callbacks that drive APT's stages and watch its gates."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from apt_lightning.errors import AptError, ContractError, NonFiniteGateError, StageMismatchError
from apt_lightning.mixin import APTMixin
from apt_lightning.schedule import JOINT, Stage, StagePlan

log = logging.getLogger(__name__)


def _as_apt_module(pl_module: pl.LightningModule) -> APTMixin:
    if not isinstance(pl_module, APTMixin):
        raise ContractError(
            f"{type(pl_module).__name__} does not subclass APTMixin: declare `class "
            f"{type(pl_module).__name__}(APTMixin, LightningModule)` to use APT callbacks."
        )
    return pl_module


class APTStageScheduler(Callback):
    """Freezes the VLM and masks language in Stage 1, then opens gated fusion for Stage 2, by global step.

    Three plans cover both workflows, and a fourth runs the baseline APT is measured against:

    * ``APTStageScheduler(switch_at_step=N)``: one ``fit``; Stage 1 for steps ``[0, N)``, Stage 2 after.
    * ``APTStageScheduler(stage=1)``: Stage 1 only; export the VA prior with :func:`export_va_prior`.
    * ``APTStageScheduler(stage=2)``: Stage 2 only, on a model that loaded a prior with :func:`load_va_prior`.
    * ``APTStageScheduler(stage="joint")``: ordinary single-stage training, no APT: the expert sees the
      instruction from step 0 through the model's own attention, no fusion blocks, the VLM trains as
      ``APTConfig.vlm_mode`` says. Same model code, data and optimiser groups, so comparisons are fair.

    Fusion blocks and (for ``vlm_mode="lora"``) adapters are injected in ``setup``, before any checkpoint
    restores into them and before DDP wraps the model; ``requires_grad`` is then fixed for the whole fit. A
    one-fit plan under DDP therefore needs ``find_unused_parameters=True``: Stage-2 parameters exist but take
    no gradient during Stage 1.

    Args:
        switch_at_step: global step at which Stage 2 starts; ``None`` to stay in ``stage``.
        stage: the stage the fit starts in: 1, 2, or ``"joint"`` (also ``0``) for the baseline.
        check_finite: stop training with :class:`NonFiniteGateError` when a gate becomes NaN or infinite.

    Example::

        >>> APTStageScheduler(switch_at_step=1000).plan.name
        'stage1->stage2'
    """

    def __init__(
        self, switch_at_step: int | None = None, stage: Stage | Literal["joint"] = 1, check_finite: bool = True
    ) -> None:
        if stage == "joint":
            stage = JOINT
        if stage not in (JOINT, 1, 2):
            raise ValueError(f"`stage` must be 1, 2 or 'joint', got {stage!r}.")
        if switch_at_step is not None and stage != 1:
            raise ValueError(f"`switch_at_step` needs `stage=1` (the fit starts in Stage 1), got stage={stage!r}.")
        self.plan = StagePlan(first_stage=stage, switch_step=switch_at_step)
        self.check_finite = check_finite
        self._switched_at: int | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        module = _as_apt_module(pl_module)
        if stage == "fit":
            self._check_strategy(trainer)
        module.apt_prepare(self.plan)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        rank_zero_info(
            f"APT plan {self.plan.name}: {len(module.apt_sites())} fusion sites, VLM mode "
            f"{module.apt_cfg.vlm_mode!r}, {trainable:,} trainable parameters over the plan."
        )

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if type(strategy).__name__.startswith("DeepSpeed"):
            raise AptError("APTStageScheduler does not support the DeepSpeed strategy. Use DDP or FSDP instead.")
        if isinstance(strategy, DDPStrategy) and self.plan.switch_step is not None:
            if not strategy._ddp_kwargs.get("find_unused_parameters", False):
                raise AptError(
                    "A one-fit APT plan (`switch_at_step`) under DDP needs `find_unused_parameters=True`: fusion "
                    "parameters take no gradient before the switch. Use strategy='ddp_find_unused_parameters_true' "
                    "or DDPStrategy(find_unused_parameters=True), or run the two stages as two fits."
                )

    # ------------------------------------------------------------------ stage tracking
    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Stage:
        module = _as_apt_module(pl_module)
        stage = self.plan.stage_at(trainer.global_step)
        if stage != module.apt_stage:
            if stage == 2 and module.apt_stage == 1:
                self._on_switch(trainer, module)
            module.apt_set_stage(stage)
        return stage

    def _on_switch(self, trainer: pl.Trainer, module: APTMixin) -> None:
        open_gates = {
            site: v for site, v in module.apt_gate_values().items() if v["attn"] != 0.0 or v["ff"] != 0.0
        }
        if open_gates and trainer.global_step == self.plan.switch_step:
            rank_zero_warn(
                f"Gates are not zero at the Stage-2 switch ({sorted(open_gates)[:3]} ...): the switch will not be an "
                "exact identity. Call `reset_gates()` on those blocks if this is not intended."
            )
        self._switched_at = trainer.global_step
        rank_zero_info(f"APT: switching to Stage 2 (language through gated fusion) at global step {trainer.global_step}.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _as_apt_module(pl_module).apt_set_stage(self.plan.stage_at(trainer.global_step))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        stage = self._apply(trainer, pl_module)
        pl_module.log("apt/stage", float(stage), on_step=True, on_epoch=False, prog_bar=True, batch_size=1)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.check_finite:
            return
        module = _as_apt_module(pl_module)
        for site, block in module.apt_sites().items():
            values = block.apt_fusion.gate_values()
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            if bad:
                raise NonFiniteGateError(
                    f"Gate(s) {sorted(bad)} of fusion site `{site}` became non-finite ({bad}) at global step "
                    f"{trainer.global_step}. Training stopped before any checkpoint of this state. Lower "
                    "`APTConfig.gate_lr`, enable gradient clipping, or check the language features for NaN."
                )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "switched_at": self._switched_at, "version": 1}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._switched_at = state_dict.get("switched_at")

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            rank_zero_warn("The checkpoint holds no APTStageScheduler state: its stage plan cannot be verified.")
            return
        saved = StagePlan(**state["plan"])
        step = int(checkpoint.get("global_step", 0))
        trained_stage2 = step > 0 and saved.stage_at(step - 1) == 2
        if saved == self.plan:
            return
        if trained_stage2 and not self.plan.has_stage2:
            raise StageMismatchError(
                f"This checkpoint (global step {step}) was trained in Stage 2 under plan {saved.name!r}, but this fit "
                f"runs the Stage-1-only plan {self.plan.name!r}. Resume with "
                f"APTStageScheduler(switch_at_step={saved.switch_step}) (or stage=2 to match the checkpoint's plan), "
                "or start Stage 1 from a fresh model."
            )
        if not trained_stage2 and self.plan.first_stage == 2:
            raise StageMismatchError(
                f"This checkpoint (global step {step}) holds Stage-1 training under plan {saved.name!r}, but this fit "
                "runs a Stage-2-only plan. To start Stage 2 from it, export the prior with `export_va_prior` and load "
                "it with `load_va_prior` into a fresh Stage-2 run; to continue this run, resume with the "
                f"checkpoint's own plan ({saved.to_dict()})."
            )
        raise StageMismatchError(
            f"The checkpoint was trained under stage plan {saved.to_dict()} but this fit uses {self.plan.to_dict()}. "
            "Resume with the same APTStageScheduler arguments; the learning-rate schedule and optimizer groups "
            "depend on them."
        )


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
        every = self.every_n_steps or trainer.log_every_n_steps
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
        module = _as_apt_module(pl_module)
        values = module.apt_gate_values()
        step = trainer.global_step
        if values and (not self.history or self.history[-1]["step"] != step):  # no sites (joint baseline): no history
            self.history.append({"step": step, "stage": module.apt_stage, "gates": values})
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
