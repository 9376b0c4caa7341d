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
checkpoint hooks that store the controller's record (plan, step, configuration) and restore it through the
controller's one load path, ``train()`` that keeps a frozen VLM in eval mode, and the Trainer's step, rank and
micro-batch as APT's clock. Everything else lives on ``self.apt``. The ``apt_*`` methods and the ``apt_vlm`` /
``apt_fusion`` / ``apt_config`` declarations of pre-1.0 releases are gone: using one raises an error that names
its replacement (docs/guide.md, "Migrating to 1.0").
"""

from __future__ import annotations

from typing import Any

from apt_lightning.checksum import VerifiedCheckpointIO, add_checkpoint_digest, verify_checkpoint_digest
from apt_lightning.controller import APT
from apt_lightning.errors import ContractError, PolicyCheckpointError, RemovedNameError
from apt_lightning.record import StateRecord
from apt_lightning.sharding import fully_shard_apt

CHECKPOINT_KEY = "apt"
"""Key of APT's record (:class:`~apt_lightning.record.StateRecord`) in a Lightning checkpoint."""

REMOVED_NAMES: dict[str, str] = {
    "apt_vlm": "APT(self, vlm=...) in __init__; read it as self.apt.vlm",
    "apt_fusion": "APT(self, fusion=FusionConfig(...)) in __init__; read it as self.apt.fusion",
    "apt_config": "APT(self, config=APTConfig(...)) in __init__; read it as self.apt.config",
    "apt_cfg": "self.apt.config",
    "apt_validate_contract": "self.apt.validate()",
    "apt_prepare": "self.apt.prepare(plan)",
    "apt_set_step": "nothing: the optimizer from self.apt.configure_optimizers() advances self.apt.step (or call "
    "self.apt.advance() after an optimizer APT did not build)",
    "apt_set_stage": "a StagePlan: self.apt.prepare(StagePlan(first_stage=..., switch_step=...))",
    "apt_masks": "self.apt.masks(...)",
    "apt_vlm_context": "self.apt.vlm_context()",
    "apt_cached_vlm": "self.apt.cached_vlm(batch, compute)",
    "apt_fusion_context": "self.apt.fusion_context(features, mask)",
    "apt_expert_language_mask": "self.apt.expert_language_mask(mask)",
    "apt_rng": "self.apt.rng(*keys)",
    "apt_param_groups": "self.apt.param_groups()",
    "apt_configure_optimizers": "self.apt.configure_optimizers()",
    "apt_gate_values": "self.apt.gate_values()",
    "apt_sites": "self.apt.sites",
    "apt_vlm_module": "self.apt.vlm_module",
    "apt_is_prepared": "self.apt.is_prepared",
    "apt_plan": "self.apt.plan",
    "apt_step": "self.apt.step",
    "apt_stage": "self.apt.stage",
    "apt_needs_language": "self.apt.needs_language",
    "apt_vlm_frozen": "self.apt.stage == 1 or self.apt.config.vlm_mode == 'frozen'",
}
"""Pre-1.0 names on the module and what replaced them."""


def _removed(owner: str, name: str) -> RemovedNameError:
    return RemovedNameError(
        f"`{owner}.{name}` was removed in apt_lightning 1.0: use {REMOVED_NAMES[name]} instead "
        "(docs/guide.md, 'Migrating to 1.0')."
    )


class APTMixin:
    """Mixin for a ``LightningModule`` holding a VLM and a continuous action expert.

    Assign ``self.apt = APT(self, vlm=..., fusion=FusionConfig(...), config=APTConfig(...))`` in ``__init__``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        old = sorted(name for name in REMOVED_NAMES if name in cls.__dict__)
        if old:
            raise _removed(cls.__name__, old[0])

    def __setattr__(self, name: str, value: Any) -> None:
        if name in REMOVED_NAMES:
            raise _removed(type(self).__name__, name)
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name in REMOVED_NAMES:
            raise _removed(type(self).__name__, name)
        return super().__getattr__(name)  # type: ignore[misc]  # a mixin: nn.Module.__getattr__ is later in the MRO

    @property
    def apt(self) -> APT:
        """This module's :class:`~apt_lightning.APT` controller."""
        controller = self.__dict__.get("_apt")
        if controller is None:
            name = type(self).__name__
            raise ContractError(
                f"{name} has no APT controller: assign `self.apt = APT(self, vlm=..., fusion=FusionConfig(...))` in "
                f"`{name}.__init__`."
            )
        return controller

    @apt.setter
    def apt(self, controller: APT) -> None:
        if not isinstance(controller, APT) or controller.model is not self:
            raise ContractError(
                f"`{type(self).__name__}.apt` must be `APT(self, vlm=..., fusion=...)`, the controller of this "
                f"module; got {type(controller).__name__}."
            )
        controller._counters = self._trainer_clock
        self.__dict__["_apt"] = controller

    def _trainer_clock(self) -> tuple[int, int, int] | None:
        """``(global_step, rank, micro_batch)`` while a Trainer drives this module, else ``None``."""
        trainer = self.__dict__.get("_trainer")
        if trainer is None:
            return None
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        return trainer.global_step, trainer.global_rank, int(getattr(loop, "batch_idx", 0) or 0)

    # ------------------------------------------------------------------ Lightning hooks
    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path: Any, map_location: Any = None, weights_only: bool | None = True, **kwargs: Any
    ) -> Any:
        """Lightning's ``load_from_checkpoint`` with ``weights_only=True`` passed explicitly (whatever
        ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says): a checkpoint never unpickles Python objects. The digest and APT's
        record are checked in :meth:`on_load_checkpoint`, before any weight loads.

        Raises:
            PolicyCheckpointError: ``weights_only=False``.
        """
        if weights_only is False:
            raise PolicyCheckpointError(
                f"Refusing `{cls.__name__}.load_from_checkpoint(..., weights_only=False)`: unpickling anything but "
                "tensors and plain data runs code from the file. Drop `weights_only=False`."
            )
        parent: Any = super()
        return parent.load_from_checkpoint(checkpoint_path, map_location=map_location, weights_only=True, **kwargs)

    def setup(self, stage: str) -> None:
        """Install :class:`~apt_lightning.VerifiedCheckpointIO` around the strategy's checkpoint IO (once), so a
        resume (``Trainer.fit(ckpt_path=)``) reads with ``weights_only=True`` and verifies every digest part, and a
        checkpoint write is atomic, with any Trainer; then the next class's ``setup``."""
        trainer = self.__dict__.get("_trainer")
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and not isinstance(strategy.checkpoint_io, VerifiedCheckpointIO):
            strategy.checkpoint_io = VerifiedCheckpointIO(strategy.checkpoint_io)
        parent = getattr(super(), "setup", None)
        if parent is not None:
            parent(stage)

    def configure_optimizers(self) -> Any:
        """AdamW over APT's per-role groups with the stage-aware schedule. For another optimiser:
        ``return self.apt.configure_optimizers(torch.optim.SGD, momentum=0.9)``."""
        return self.apt.configure_optimizers()

    def train(self, mode: bool = True) -> Any:
        """Lightning calls ``train()`` at every epoch and after validation: keep a frozen VLM in eval mode."""
        result = super().train(mode)  # type: ignore[misc]  # a mixin: nn.Module.train comes later in the MRO
        controller = self.__dict__.get("_apt")
        if controller is not None:
            controller._after_train_mode(mode)
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the plan, the step (the checkpoint's ``global_step``) and the configuration, so the checkpoint
        loads only into a model built the same way and behaves there as it did when saved."""
        controller = self.__dict__.get("_apt")
        if controller is not None and controller.is_prepared:
            step = checkpoint.get("global_step")
            checkpoint[CHECKPOINT_KEY] = StateRecord.of(controller, step=step).to_dict()
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        add_checkpoint_digest(checkpoint)  # last: covers the checkpoint as written (apt_lightning.checksum)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Verify the digest, then restore APT's record through :meth:`APT.load_state_dict` (the one load path: a
        fresh module takes the checkpoint's plan, a resumed fit must run the same plan, and a differently
        configured module is refused) before any weight loads."""
        verify_checkpoint_digest(checkpoint, "The checkpoint being loaded")  # a damaged digest key is refused too
        record = checkpoint.get(CHECKPOINT_KEY)
        if record:
            self.apt.load_state_dict(record)
        else:  # written without a record: build what its weights need, nothing to check the plan against
            self.apt._restore_structure_for(list(checkpoint.get("state_dict", {})))
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
        return fully_shard_apt(self.apt.model, units, **fully_shard_kwargs)
