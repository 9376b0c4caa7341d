"""Lightning callbacks that drive APT's stages and watch its gates."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from apt_lightning.errors import AptError, ContractError, NonFiniteGateError, NonFiniteLossError, StageMismatchError
from apt_lightning.mixin import APTMixin
from apt_lightning.optim import has_apt_groups
from apt_lightning.schedule import Stage, StagePlan, parse_stage
from apt_lightning.sharding import is_sharded, local_shard, prime_optimizer_state, unsharded_parameters
from apt_lightning.structure import fusion_sites, gate_parameters, language_gates

log = logging.getLogger(__name__)


def _as_apt_module(pl_module: pl.LightningModule) -> APTMixin:
    if not isinstance(pl_module, APTMixin):
        raise ContractError(
            f"{type(pl_module).__name__} does not subclass APTMixin: declare `class "
            f"{type(pl_module).__name__}(APTMixin, LightningModule)` to use APT callbacks."
        )
    return pl_module


def _gates_finite(gates: list[torch.Tensor]) -> torch.Tensor:
    """On the device: whether every gate (this rank's shards) is finite."""
    return torch.isfinite(torch.cat([local_shard(g.detach()).flatten() for g in gates])).all()


def non_finite_entries(batch: Any, prefix: str = "") -> list[str]:
    """Keys (``"state"``, ``"obs.image"``, ``"[1]"``) of the floating-point tensors in ``batch`` holding NaN/inf.

    Example::

        >>> non_finite_entries({"state": torch.tensor([1.0, float("nan")]), "ids": torch.tensor([3])})
        ['state']
    """
    if isinstance(batch, torch.Tensor):
        bad = batch.is_floating_point() or batch.is_complex()
        return [prefix or "batch"] if bad and not bool(torch.isfinite(batch).all()) else []
    if isinstance(batch, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in batch.items()]
    elif isinstance(batch, (list, tuple)):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(batch)]
    else:
        return []
    return [name for key, value in items for name in non_finite_entries(value, key)]


class APTStageScheduler(Callback):
    """Freezes the VLM and masks language in Stage 1, then opens gated fusion for Stage 2, by global step.

    Three plans cover both workflows, and a fourth runs the baseline APT is measured against:

    * ``APTStageScheduler(switch_at_step=N)``: one ``fit``; Stage 1 for steps ``[0, N)``, Stage 2 after.
    * ``APTStageScheduler(stage=1)``: Stage 1 only; export the VA prior with :func:`export_va_prior`.
    * ``APTStageScheduler(stage=2)``: Stage 2 only, on a model that loaded a prior with :func:`load_va_prior`,
      or from scratch (frozen VLM, gated fusion from step 0: the best counterfactual following on the
      bundled benchmark, where a language-free Stage 1 learns the layout habit; see the README's study).
    * ``APTStageScheduler(stage="joint")``: ordinary single-stage training, no APT: the expert sees the
      instruction from step 0 through the model's own attention, no fusion blocks, the VLM trains as
      ``APTConfig.vlm_mode`` says. Same model code, data and optimiser groups, so comparisons are fair.

    ``setup`` builds structure only (fusion blocks and LoRA adapters, before any checkpoint restores into them
    and before DDP wraps the model; ``requires_grad`` for the whole fit). The stage itself is the plan applied
    to the global step, set at every entry point: training (each batch, and on resume once the step is
    restored), validation, test and predict (a ``validate`` after a fit runs in the stage the fit ended in). A
    one-fit plan under DDP therefore needs ``find_unused_parameters=True``: Stage-2 parameters exist but take
    no gradient during Stage 1.

    With ``check_finite`` (default), a NaN or infinite loss or gradient stops training before the optimizer
    step (:class:`NonFiniteLossError` naming the batch entries that hold non-finite values and the step), and a
    non-finite gate stops it before any checkpoint (:class:`NonFiniteGateError`): no weight, and no
    checkpoint, ever holds the bad value.

    Args:
        switch_at_step: global step at which Stage 2 starts; ``None`` to stay in ``stage``.
        stage: the stage the fit starts in: 1, 2, or ``"joint"`` (also ``0``) for the baseline.
        check_finite: stop on non-finite losses, gradients and gates: one host synchronisation per optimizer
            step (all three flags computed on the device and read together), plus a gate check when a checkpoint
            is written. ``False`` removes it.

    Example::

        >>> APTStageScheduler(switch_at_step=1000).plan.name
        'stage1->stage2'
    """

    def __init__(
        self, switch_at_step: int | None = None, stage: Stage | Literal["joint"] = 1, check_finite: bool = True
    ) -> None:
        stage = parse_stage(stage)
        if switch_at_step is not None and stage != 1:
            raise ValueError(f"`switch_at_step` needs `stage=1` (the fit starts in Stage 1), got stage={stage!r}.")
        self.plan = StagePlan(first_stage=stage, switch_step=switch_at_step)
        self.check_finite = check_finite
        self._batch: Any = None
        self._loss_finite: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup: structure and early checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        module = _as_apt_module(pl_module)
        if stage == TrainerFn.FITTING:
            self._check_strategy(trainer)
            self._check_budget(trainer)
            self._check_learning_rate(module)
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
        one_fit = self.plan.switch_step is not None
        if isinstance(strategy, DDPStrategy) and one_fit and not strategy._ddp_kwargs.get("find_unused_parameters"):
            raise AptError(
                "A one-fit APT plan (`switch_at_step`) under DDP needs `find_unused_parameters=True`: fusion "
                "parameters take no gradient before the switch. Use strategy='ddp_find_unused_parameters_true' "
                "or DDPStrategy(find_unused_parameters=True), or run the two stages as two fits."
            )
        if isinstance(strategy, FSDPStrategy) and not strategy.kwargs.get("use_orig_params", True):
            raise AptError(
                "FSDPStrategy (FSDP1) flattens each wrapped unit's parameters into one, which cannot mix the frozen "
                "VLM with the trainable expert and fusion blocks, nor keep APT's per-role param groups. Pass "
                "FSDPStrategy(use_orig_params=True, ...) (see examples/fsdp_gpu.py), or use ModelParallelStrategy "
                "(FSDP2) with `self.apt_fully_shard(...)` in `configure_model`."
            )

    def _check_budget(self, trainer: pl.Trainer) -> None:
        switch, max_steps = self.plan.switch_step, trainer.max_steps
        if switch is not None and max_steps is not None and 0 <= max_steps <= switch:
            rank_zero_warn(
                f"`switch_at_step`={switch} >= Trainer(max_steps={max_steps}): this fit never reaches Stage 2. "
                "Raise max_steps above the switch (or resume later with a larger max_steps), or use "
                "APTStageScheduler(stage=1) for a Stage-1-only fit."
            )

    @staticmethod
    def _check_learning_rate(module: APTMixin) -> None:
        """A model's own ``lr`` is dead under APT's optimiser unless it went into ``APTConfig``: say so."""
        hparams = getattr(module, "hparams", {})
        for name in ("lr", "learning_rate"):
            value = getattr(module, name, None)
            value = hparams.get(name, value) if value is None else value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value != module.apt_cfg.lr:
                rank_zero_warn(
                    f"{type(module).__name__}.{name}={value} is not the learning rate APT's optimiser uses "
                    f"(APTConfig.lr={module.apt_cfg.lr}). Pass it on: `self.apt_config = APTConfig(lr={name})` in "
                    "`__init__`."
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(trainer.strategy, ModelParallelStrategy):
            unsharded = unsharded_parameters(pl_module)
            if unsharded:
                raise ContractError(
                    f"Under ModelParallelStrategy {len(unsharded)} parameters of {type(pl_module).__name__} are not "
                    f"sharded ({unsharded[:3]} ...): FSDP2 would never reduce their gradients, and the ranks would "
                    "drift apart. Shard the whole module in `configure_model`: "
                    '`self.apt_fully_shard(units=r".*layers\\.\\d+")` (Lightning calls it after the fusion blocks '
                    "are built)."
                )
        if not all(has_apt_groups(optimizer) for optimizer in trainer.optimizers):
            rank_zero_warn(
                f"{type(pl_module).__name__}.configure_optimizers does not build on APT's param groups: the gates get "
                "no larger learning rate and no group follows the stage schedule (Stage-2 parameters may even train "
                "in Stage 1). Return `self.apt_configure_optimizers(YourOptimizer, **kwargs)` from it, or delete it "
                "to use AdamW with APTConfig's learning rates."
            )

    # ------------------------------------------------------------------ the stage at every entry point
    def _sync(self, module: APTMixin, step: int) -> None:
        before = module.apt_stage
        module.apt_set_step(step)
        if before == 1 and module.apt_stage == 2 and step == self.plan.switch_step:
            self._on_switch(module, step)

    def _on_switch(self, module: APTMixin, step: int) -> None:
        blocks = {site: layer.apt_fusion for site, layer in module.apt_sites().items()}
        open_gates = sorted(site for site, block in blocks.items() if block.gate == "tanh" and not block.is_identity)
        if open_gates:
            rank_zero_warn(
                f"Gates are not zero at the Stage-2 switch ({open_gates[:3]} ...): the switch will not be an "
                "exact identity. Call `reset_gates()` on those blocks if this is not intended."
            )
        rank_zero_info(f"APT: switching to Stage 2 (language through gated fusion) at global step {step}.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = _as_apt_module(pl_module)
        if module.apt_step > trainer.global_step:
            rank_zero_warn(
                f"The model was trained to global step {module.apt_step}, but this fit starts at step "
                f"{trainer.global_step}: the plan restarts from Stage {self.plan.stage_at(trainer.global_step)}. "
                "To continue a run, pass `ckpt_path=` to `fit`."
            )
        module.apt_set_step(trainer.global_step)  # the step is restored by now when resuming
        if isinstance(trainer.strategy, ModelParallelStrategy):  # sharded checkpoints need every state present
            for optimizer in trainer.optimizers:
                prime_optimizer_state(optimizer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        module = _as_apt_module(pl_module)
        self._batch = batch
        self._sync(module, trainer.global_step)
        pl_module.log("apt/stage", float(module.apt_stage), on_step=True, on_epoch=False, prog_bar=True, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch = None
        _as_apt_module(pl_module).apt_set_step(trainer.global_step)

    def _sync_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = _as_apt_module(pl_module)
        fitting = trainer.state.fn == TrainerFn.FITTING
        module.apt_set_step(trainer.global_step if fitting else module.apt_step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_evaluation(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_evaluation(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_evaluation(trainer, pl_module)

    # ------------------------------------------------------------------ nothing non-finite reaches the weights
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._check_site_outputs(pl_module)
        if self.check_finite:  # kept on the device; read with the gradients, in one host sync per step
            finite = torch.isfinite(loss.detach()).all()
            self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
            self._loss = loss.detach()

    @staticmethod
    def _check_site_outputs(pl_module: pl.LightningModule) -> None:
        """Every fusion site checked its wrapped module's output in this forward (Stage 1 included): report
        all that cannot take fusion now, at the first step, not when the switch comes."""
        problems = [
            f"`{site}`: {layer.output_problem}" for site, layer in fusion_sites(pl_module) if layer.output_problem
        ]
        if problems:
            raise ContractError(
                f"{len(problems)} fusion site(s) of {type(pl_module).__name__} cannot take gated fusion (found in "
                "the first forward, before any weight changed):\n- " + "\n- ".join(problems)
            )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """The step's one host synchronisation: loss, gradients and gates checked together, on the device."""
        if not self.check_finite:
            return
        loss_finite, self._loss_finite = self._loss_finite, None
        flags = [loss_finite if loss_finite is not None else torch.ones((), dtype=torch.bool)]
        named = []
        if str(trainer.precision) != "16-mixed":  # fp16 loss scaling skips steps with inf gradients itself
            named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        sharded = any(is_sharded(g) for _, g in named)
        if named:  # one fused kernel; an inf/NaN anywhere makes a norm non-finite
            norms = torch._foreach_norm([local_shard(g) for _, g in named])
            flags.append(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())
        gates = gate_parameters(pl_module)  # as the previous step left them
        if gates:
            flags.append(_gates_finite(gates))
        device = flags[-1].device
        flag_tensor = torch.stack([f.to(device) for f in flags]).float()
        if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
            # each rank holds only its shards: agree on the verdict, so every rank stops together
            torch.distributed.all_reduce(flag_tensor, op=torch.distributed.ReduceOp.MIN)
        ok = [bool(v) for v in flag_tensor.tolist()]  # the step's one host synchronisation
        if all(ok):
            return
        module = _as_apt_module(pl_module)
        if gates and not ok[-1]:  # a non-finite gate makes the loss non-finite too: name the cause
            self._check_gates(trainer, pl_module)
            raise NonFiniteGateError(  # the bad gate is in another rank's shard
                f"A gate became non-finite on another rank (sharded training) before global step "
                f"{trainer.global_step}. Training stopped before any checkpoint of this state. Lower "
                "`APTConfig.gate_lr` or enable gradient clipping."
            )
        if not ok[0]:
            where = " on some rank" if sharded else ""
            self._stop(trainer, module, f"The loss is {self._loss.float().cpu().tolist()}{where}")
        if named and not ok[1]:
            finite = torch.stack([torch.isfinite(local_shard(g)).all() for _, g in named]).tolist()
            bad = [n for (n, _), good in zip(named, finite, strict=True) if not good]
            self._stop(trainer, module, f"The gradients of {len(bad)} parameters ({bad[:3]} ...) are not finite")

    def _stop(self, trainer: pl.Trainer, module: APTMixin, what: str) -> None:
        stage = module.apt_stage
        entries = non_finite_entries(self._batch)
        if entries:
            cause = (
                f"The batch holds NaN/inf in {entries}: fix or filter that data (e.g. drop samples with "
                "non-finite values in your dataset or collate function)."
            )
        else:
            cause = (
                "The batch is finite, so the model produced the value: lower the learning rate or set "
                "`gradient_clip_val`"
            )
            if stage == 2:
                cause += (
                    f" (in Stage 2 often the gate learning rate, APTConfig.gate_lr={module.apt_cfg.resolved_gate_lr})"
                )
            cause += "."
        raise NonFiniteLossError(
            f"{what} at global step {trainer.global_step} (stage {stage}, plan {self.plan.name}). Training stopped "
            f"before the optimizer step: no weight changed and no checkpoint of this step was written. {cause}"
        )

    @staticmethod
    def _check_gates(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, gate in language_gates(pl_module):
            if not bool(torch.isfinite(local_shard(gate.apt_gate.detach())).all()):
                raise NonFiniteGateError(
                    f"The language gate `{name}` became non-finite at global step {trainer.global_step}. Training "
                    "stopped before any checkpoint of this state. Lower `APTConfig.gate_lr` or enable gradient "
                    "clipping."
                )
        for site, layer in fusion_sites(pl_module):
            block = layer.apt_fusion
            bad = [
                k
                for k, g in zip(("attn", "ff"), block.gate_parameters(), strict=True)
                if not bool(torch.isfinite(local_shard(g)).all())
            ]
            if bad:
                values = {
                    k: float(local_shard(g.detach()).flatten()[0]) if local_shard(g).numel() else float("nan")
                    for k, g in zip(("attn", "ff"), block.gate_parameters(), strict=True)
                }
                raise NonFiniteGateError(
                    f"Gate(s) {bad} of fusion site `{site}` became non-finite ({values}) at global step "
                    f"{trainer.global_step}. Training stopped before any checkpoint of this state. Lower "
                    "`APTConfig.gate_lr`, enable gradient clipping, or check the language features for NaN."
                )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """No checkpoint holds a non-finite gate: checked when one is written (not every step)."""
        if self.check_finite:
            gates = gate_parameters(pl_module)
            if gates and not bool(_gates_finite(gates)):
                self._check_gates(trainer, pl_module)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "version": 2}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the plan is checked against the checkpoint in on_load_checkpoint; the step lives in the module

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
