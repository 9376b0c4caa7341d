"""``APTMixin``: the Lightning adapter of the :class:`~apt_lightning.APT` controller.

A LightningModule gets APT by composition and gains the hooks Lightning calls::

    class MyVLA(APTMixin, L.LightningModule):
        def __init__(self, lr=1e-4):
            super().__init__()
            self.vlm, self.expert = ..., ...
            self.apt = APT(self, vlm="vlm", fusion=FusionConfig(target_modules=r"expert\\.blocks\\.\\d+"),
                           config=APTConfig(lr=lr))

        def forward(self, batch, x_t, t):
            masks = self.apt.masks(batch["attention_mask"], batch["language_mask"])
            ...

The mixin adds what is Lightning's: ``configure_optimizers`` (APT's per-role groups and stage schedule),
checkpoint hooks that store the controller's plan and step, ``train()`` that keeps a frozen VLM in eval mode,
and the Trainer's step, rank and micro-batch as the seed of APT's random streams. Everything else lives on
``self.apt``; the ``apt_*`` methods of earlier releases forward to it with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

from apt_lightning.checksum import DIGEST_KEY, add_checkpoint_digest, verify_checkpoint_digest
from apt_lightning.config import APTConfig, FusionConfig
from apt_lightning.controller import APT
from apt_lightning.errors import ContractError


class APTMixin:
    """Mixin for a ``LightningModule`` holding a VLM and a continuous action expert.

    Assign ``self.apt = APT(self, vlm=..., fusion=FusionConfig(...), config=APTConfig(...))`` in ``__init__``.
    Modules written for earlier releases may instead declare ``apt_vlm``, ``apt_fusion`` (a
    :class:`FusionConfig`) and ``apt_config`` on the class or in ``__init__``: the controller is then built from
    them on first use.
    """

    apt_vlm: str
    apt_fusion: FusionConfig
    apt_config: APTConfig | None = None

    @property
    def apt(self) -> APT:
        """This module's :class:`~apt_lightning.APT` controller (built from the declarations if not assigned)."""
        controller = self.__dict__.get("_apt")
        if controller is None:
            controller = APT(
                self,  # type: ignore[arg-type]
                vlm=getattr(self, "apt_vlm", None),  # type: ignore[arg-type]
                fusion=getattr(self, "apt_fusion", None),  # type: ignore[arg-type]
                config=self.apt_config,
            )
            self.apt = controller
        return controller

    @apt.setter
    def apt(self, controller: APT) -> None:
        if not isinstance(controller, APT) or controller.model is not self:
            raise ContractError(
                f"`{type(self).__name__}.apt` must be `APT(self, vlm=..., fusion=...)`, the controller of this "
                f"module; got {type(controller).__name__}."
            )
        if controller.counters is None:
            controller.counters = self._apt_trainer_counters
        self.__dict__["_apt"] = controller

    def _apt_trainer_counters(self) -> tuple[int, int, int] | None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return None
        return trainer.global_step, trainer.global_rank, getattr(trainer.fit_loop.epoch_loop, "batch_idx", 0)

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self) -> Any:
        """AdamW over APT's per-role groups with a per-group, stage-aware ``LambdaLR`` stepped every step. For
        another optimiser: ``return self.apt.configure_optimizers(torch.optim.SGD, momentum=0.9)``."""
        return self.apt.configure_optimizers()

    def train(self, mode: bool = True) -> Any:
        """Lightning calls ``train()`` at every epoch and after validation: keep a frozen VLM in eval mode."""
        result = super().train(mode)  # type: ignore[misc]
        controller = self.__dict__.get("_apt")
        if controller is not None:
            controller.after_train_mode(mode)
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the plan and the step, so a module loaded for inference behaves as it did when saved."""
        controller = self.__dict__.get("_apt")
        if controller is not None:
            controller.on_save_checkpoint(checkpoint)
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        add_checkpoint_digest(checkpoint)  # last: covers the weights as written (apt_lightning.checksum)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the saved structure before weights load and restore the saved step (see
        :meth:`APT.on_load_checkpoint`). A checkpoint that records a content digest is verified first, so a
        corrupted file fails here (``fit(ckpt_path=...)``, ``load_from_checkpoint``) before any weight loads."""
        if DIGEST_KEY in checkpoint:
            verify_checkpoint_digest(checkpoint, "The checkpoint being loaded")
        self.apt.on_load_checkpoint(checkpoint)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def apt_fully_shard(self, units: str | list[str] | None = None, **fully_shard_kwargs: Any) -> list[str]:
        """Shard this module with FSDP2 for ``ModelParallelStrategy``: call it from ``configure_model``.

        Every parameter ends in a unit whose forward uses it (see :mod:`apt_lightning.sharding`): the modules
        ``units`` names (a regex or peft-style names, e.g. your transformer layers), every fusion block, and each
        other module that owns parameters. The mesh defaults to the strategy's data-parallel mesh.

        Example::

            def configure_model(self):
                self.apt_fully_shard(units=r".*layers\\.\\d+")
        """
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None and "mesh" not in fully_shard_kwargs:
            names = mesh.mesh_dim_names or ()
            fully_shard_kwargs["mesh"] = mesh["data_parallel"] if "data_parallel" in names else mesh
        return self.apt.fully_shard(units, **fully_shard_kwargs)

    def apt_set_stage(self, stage: Any) -> None:
        """Removed: the stage is no longer set, it follows the global step (see :meth:`APT.set_step`)."""
        raise ContractError(
            f"`apt_set_stage({stage!r})` was removed: a model's stage now follows the global step its weights "
            "reached under a StagePlan. Give the plan once (`model.apt.prepare(StagePlan(first_stage=1, "
            "switch_step=N))`, or APTStageScheduler in a Trainer), then call `model.apt.set_step(global_step)`; a "
            "fixed stage is `StagePlan(first_stage=2)` (or 1, or 'joint')."
        )


# Earlier releases' names, forwarded to the controller. (old name, controller attribute, is a method)
_FORWARDED = (
    ("apt_validate_contract", "validate", True),
    ("apt_prepare", "prepare", True),
    ("apt_set_step", "set_step", True),
    ("apt_masks", "masks", True),
    ("apt_vlm_context", "vlm_context", True),
    ("apt_cached_vlm", "cached_vlm", True),
    ("apt_fusion_context", "fusion_context", True),
    ("apt_expert_language_mask", "expert_language_mask", True),
    ("apt_rng", "rng", True),
    ("apt_param_groups", "param_groups", True),
    ("apt_configure_optimizers", "configure_optimizers", True),
    ("apt_gate_values", "gate_values", True),
    ("apt_cfg", "config", False),
    ("apt_vlm_module", "vlm_module", False),
    ("apt_is_prepared", "is_prepared", False),
    ("apt_plan", "plan", False),
    ("apt_step", "step", False),
    ("apt_stage", "stage", False),
    ("apt_needs_language", "needs_language", False),
    ("apt_vlm_frozen", "vlm_frozen", False),
)


def _forwarder(old: str, new: str, is_method: bool) -> Any:
    message = f"`{old}` is deprecated: use `self.apt.{new}` (the APT controller owns it)."

    if is_method:

        def method(self: APTMixin, *args: Any, **kwargs: Any) -> Any:
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            return getattr(self.apt, new)(*args, **kwargs)

        method.__doc__ = message
        return method

    def getter(self: APTMixin) -> Any:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(self.apt, new)

    return property(getter, doc=message)


for _old, _new, _is_method in _FORWARDED:
    setattr(APTMixin, _old, _forwarder(_old, _new, _is_method))


def _apt_sites(self: APTMixin) -> Any:
    """Deprecated: use ``self.apt.sites`` (a dict, no call)."""
    warnings.warn("`apt_sites()` is deprecated: use `self.apt.sites`.", DeprecationWarning, stacklevel=2)
    return dict(self.apt.sites)


APTMixin.apt_sites = _apt_sites  # type: ignore[attr-defined]
