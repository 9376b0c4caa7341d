"""``NonFiniteGuard``: no NaN or infinite value ever reaches the weights or a checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from apt_lightning.controller import APT
from apt_lightning.errors import NonFiniteGateError, NonFiniteLossError
from apt_lightning.sharding import is_sharded, local_shard
from apt_lightning.structure import fusion_sites, gate_parameters, language_gates


def _controller(pl_module: pl.LightningModule) -> APT | None:
    controller = getattr(pl_module, "apt", None)
    return controller if isinstance(controller, APT) else None


def _where(module: APT | None) -> str:
    if module is None or not module.is_prepared:
        return ""
    return f" (stage {module.stage}, plan {module.plan.name})"


def _gates_finite(gates: Sequence[torch.Tensor]) -> torch.Tensor:
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


class NonFiniteGuard(Callback):
    """Stops training before a NaN or infinite loss, gradient or gate reaches the weights or a checkpoint.

    A non-finite loss or gradient stops training before the optimizer step (:class:`NonFiniteLossError`, naming
    the batch entries that hold non-finite values, the step and the stage); a non-finite gate stops it before any
    checkpoint (:class:`NonFiniteGateError`). All flags are computed on the device and read together: one host
    synchronisation per optimizer step. :class:`APTStageScheduler` runs one unless ``check_finite=False``; use it
    alone with any LightningModule.

    Example::

        >>> NonFiniteGuard().state_key
        'NonFiniteGuard'
    """

    def __init__(self) -> None:
        self._batch: Any = None
        self._loss_finite: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # kept on the device; read with the gradients
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """The step's one host synchronisation: loss, gradients and gates checked together, on the device."""
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
        module = _controller(pl_module)
        if gates and not ok[-1]:  # a non-finite gate makes the loss non-finite too: name the cause
            self._check_gates(trainer, pl_module)
            raise NonFiniteGateError(  # the bad gate is in another rank's shard
                f"A gate became non-finite on another rank (sharded training) before global step "
                f"{trainer.global_step}. Training stopped before any checkpoint of this state. Lower "
                "`APTConfig.gate_lr` or enable gradient clipping."
            )
        if not ok[0]:
            assert self._loss is not None  # the loss was found non-finite, so on_before_backward recorded it
            where = " on some rank" if sharded else ""
            self._stop(trainer, module, f"The loss is {self._loss.float().cpu().tolist()}{where}")
        if named and not ok[1]:
            finite = torch.stack([torch.isfinite(local_shard(g)).all() for _, g in named]).tolist()
            bad = [n for (n, _), good in zip(named, finite, strict=True) if not good]
            self._stop(trainer, module, f"The gradients of {len(bad)} parameters ({bad[:3]} ...) are not finite")

    def _stop(self, trainer: pl.Trainer, module: APT | None, what: str) -> None:
        stage = module.stage if module is not None and module.is_prepared else None
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
            if stage == 2 and module is not None:
                cause += (
                    f" (in Stage 2 often the gate learning rate, APTConfig.gate_lr={module.config.resolved_gate_lr})"
                )
            cause += "."
        raise NonFiniteLossError(
            f"{what} at global step {trainer.global_step}{_where(module)}. Training stopped "
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
                for k, g in zip(("attn", "ff"), block.gate_parameters(), strict=False)  # ff_mult=0: attn only
                if not bool(torch.isfinite(local_shard(g)).all())
            ]
            if bad:
                values = {
                    k: float(local_shard(g.detach()).flatten()[0]) if local_shard(g).numel() else float("nan")
                    for k, g in zip(("attn", "ff"), block.gate_parameters(), strict=False)  # ff_mult=0: attn only
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
        gates = gate_parameters(pl_module)
        if gates and not bool(_gates_finite(gates)):
            self._check_gates(trainer, pl_module)
