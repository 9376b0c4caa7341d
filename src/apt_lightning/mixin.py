"""``APTMixin``: what a user's LightningModule declares, and the helpers its forward calls.

A module adopts APT with three declarations and a few lines in its forward::

    class MyVLA(APTMixin, L.LightningModule):
        apt_vlm = "backbone"                                            # which module is the VLM
        apt_fusion = FusionConfig(target_modules=r"head\\.blocks\\.\\d+")  # where gated fusion goes

        def apt_language_mask(self, batch):                             # which tokens are the instruction
            return batch["language_mask"]

        def forward(self, batch, noise):
            masks = self.apt_masks(batch["attention_mask"], self.apt_language_mask(batch))
            with self.apt_vlm_context():
                feats = self.backbone(..., attention_mask=masks.vlm_attention, position_ids=masks.position_ids)
            with self.apt_fusion_context(feats, masks.language):
                return self.head(noise, feats, context_mask=masks.expert_attention)

The stage itself is driven by :class:`~apt_lightning.APTStageScheduler`, which calls :meth:`apt_prepare` in
``setup`` and :meth:`apt_set_stage` as global steps pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from apt_lightning.config import APTConfig, FusionConfig
from apt_lightning.errors import ContractError, FusionContextError, StageMismatchError
from apt_lightning.fusion import GatedFusionLayer
from apt_lightning.inject import fusion_sites, inject_fusion
from apt_lightning.lora import LORA_PREFIX, has_lora, inject_vlm_lora
from apt_lightning.masking import PrefixMasks, check_language_mask, language_blind_masks
from apt_lightning.schedule import JOINT, Stage, StageLRFactor, StagePlan

PARAM_GROUPS = ("expert", "fusion", "gates", "vlm")


class APTMixin:
    """Mixin for a ``LightningModule`` holding a VLM and a continuous action expert.

    Declare on the subclass:

    * ``apt_vlm`` (``str``): dotted name of the VLM module (frozen in Stage 1, bit-identical after it).
    * ``apt_fusion`` (:class:`FusionConfig`): the expert modules that get gated cross-attention in Stage 2.
    * :meth:`apt_language_mask`: the per-batch (B, L) bool mask of instruction tokens.
    * optionally ``apt_config`` (:class:`APTConfig`): VLM mode and per-group learning rates.

    The mixin provides :attr:`apt_stage`, the mask/context helpers used in ``forward``, a default
    ``configure_optimizers`` with one param group per role and a stage-aware schedule, and keeps a frozen
    VLM in eval mode whatever ``train()`` Lightning calls.
    """

    apt_vlm: str
    apt_fusion: FusionConfig
    apt_config: APTConfig | None = None

    _apt_stage: Stage = 1
    _apt_plan: StagePlan | None = None

    # ------------------------------------------------------------------ contract
    def apt_language_mask(self, batch: Any) -> torch.Tensor:
        """(B, L) bool mask, True on the instruction tokens of ``batch`` (not on images or state tokens)."""
        raise NotImplementedError

    def apt_validate_contract(self) -> None:
        """Check every declaration at once and raise one :class:`ContractError` listing what is missing."""
        problems: list[str] = []
        module: nn.Module = self  # type: ignore[assignment]
        vlm_name = getattr(self, "apt_vlm", None)
        if not isinstance(vlm_name, str) or not vlm_name:
            problems.append("`apt_vlm` is not set: assign the dotted name of the VLM module, e.g. apt_vlm = 'model.vlm'.")
        else:
            try:
                module.get_submodule(vlm_name)
            except AttributeError:
                names = [n for n, _ in module.named_modules() if n and n.count(".") < 3]
                near = difflib.get_close_matches(vlm_name, names, n=3, cutoff=0.3) or names[:8]
                problems.append(f"`apt_vlm`={vlm_name!r} names no module. Closest names: {near}.")
        if not isinstance(getattr(self, "apt_fusion", None), FusionConfig):
            problems.append(
                "`apt_fusion` is not a FusionConfig: declare where gated fusion goes, e.g. "
                "apt_fusion = FusionConfig(target_modules=r'expert\\.layers\\.\\d+')."
            )
        if type(self).apt_language_mask is APTMixin.apt_language_mask:
            problems.append("`apt_language_mask(batch)` is not implemented: return the (B, L) bool instruction mask.")
        if self.apt_config is not None and not isinstance(self.apt_config, APTConfig):
            problems.append(f"`apt_config` must be an APTConfig, got {type(self.apt_config).__name__}.")
        if problems:
            raise ContractError(
                f"{type(self).__name__} does not satisfy the APTMixin contract:\n- " + "\n- ".join(problems)
            )

    # ------------------------------------------------------------------ structure
    @property
    def apt_cfg(self) -> APTConfig:
        return self.apt_config if self.apt_config is not None else APTConfig()

    @property
    def apt_vlm_module(self) -> nn.Module:
        return self.get_submodule(self.apt_vlm)  # type: ignore[attr-defined]

    @property
    def apt_stage(self) -> Stage:
        """1 while learning the VA prior, 2 once language flows through the gates."""
        return self._apt_stage

    @property
    def apt_plan(self) -> StagePlan:
        if self._apt_plan is None:
            raise ContractError(
                f"{type(self).__name__} has no APT stage plan: add `APTStageScheduler(...)` to the Trainer's "
                "callbacks (or call `apt_prepare(StagePlan(...))` when using the module without a Trainer)."
            )
        return self._apt_plan

    def apt_sites(self) -> dict[str, GatedFusionLayer]:
        return dict(fusion_sites(self))  # type: ignore[arg-type]

    def _apt_fusion_config(self) -> FusionConfig:
        config = self.apt_fusion
        if config.context_dim is None:
            vlm_config = getattr(self.apt_vlm_module, "config", None)
            text_config = getattr(vlm_config, "text_config", None) or vlm_config
            width = getattr(text_config, "hidden_size", None)
            if width is None:
                raise ContractError(
                    f"Cannot infer the language feature width from `{self.apt_vlm}`: set FusionConfig.context_dim."
                )
            config = dataclasses.replace(config, context_dim=width)
        return config

    def apt_prepare(self, plan: StagePlan) -> None:
        """Validate the contract, inject fusion blocks (and LoRA), and fix ``requires_grad`` for the whole plan.

        The joint baseline plan (:data:`~apt_lightning.schedule.JOINT`) injects no fusion blocks and trains the
        VLM from step 0 as ``vlm_mode`` says. Idempotent. ``requires_grad`` is decided once for everything the
        plan will train, so the set of parameters a DDP wrapper registers never changes mid-fit; what a stage
        does not train simply gets no gradient (its modules are skipped or run under ``no_grad``) and a zero
        learning rate.
        """
        self.apt_validate_contract()
        if plan.is_joint and self.apt_sites():
            raise ContractError(
                f"{type(self).__name__} already holds APT fusion blocks, but the plan is the joint baseline, which has "
                "none. Build a fresh model for the baseline (or call `unload_fusion(model)` first)."
            )
        if not plan.is_joint:
            inject_fusion(self, self._apt_fusion_config(), forbidden_prefix=self.apt_vlm)  # type: ignore[arg-type]
        mode = self.apt_cfg.vlm_mode
        vlm = self.apt_vlm_module
        if mode == "lora" and plan.trains_vlm:
            inject_vlm_lora(vlm, self.apt_cfg)
        else:
            vlm.requires_grad_(mode == "full" and plan.trains_vlm)
        for site in self.apt_sites().values():
            site.apt_fusion.requires_grad_(plan.has_stage2)
        self._apt_plan = plan
        self.apt_set_stage(plan.first_stage)

    def apt_set_stage(self, stage: Stage) -> None:
        """Activate (Stage 2) or bypass (Stage 1, joint) every fusion site and put a frozen VLM in eval mode."""
        if stage not in (JOINT, 1, 2):
            raise ValueError(f"`stage` must be 1, 2 or 0 (joint baseline), got {stage!r}.")
        self._apt_stage = stage
        for site in self.apt_sites().values():
            site.active = stage == 2
        if self.apt_vlm_frozen:
            self.apt_vlm_module.eval()
        elif self.training:  # type: ignore[attr-defined]
            self.apt_vlm_module.train()

    @property
    def apt_vlm_frozen(self) -> bool:
        """True when the VLM takes no gradient now: always in Stage 1, otherwise with ``vlm_mode='frozen'``."""
        return self._apt_stage == 1 or self.apt_cfg.vlm_mode == "frozen"

    def train(self, mode: bool = True) -> Any:
        """Lightning calls ``train()`` at every epoch and after validation: keep a frozen VLM in eval mode."""
        result = super().train(mode)  # type: ignore[misc]
        if mode and getattr(self, "apt_vlm", None) and self.apt_vlm_frozen:
            try:
                self.apt_vlm_module.eval()
            except AttributeError:
                pass  # contract not satisfied yet; apt_validate_contract reports it
        return result

    # ------------------------------------------------------------------ helpers for forward
    def apt_masks(self, attention_mask: torch.Tensor, language_mask: torch.Tensor, causal: bool = False) -> PrefixMasks:
        """Language-blind prefix masks for both stages (see :func:`~apt_lightning.language_blind_masks`).

        The same masks serve Stage 1 and Stage 2, which is what makes the switch exact: non-language tokens
        never see the instruction, and Stage 2 adds language only through the gated fusion context. In the
        joint baseline the masks hide nothing (every valid token sees every valid token, as without APT);
        ``language`` still marks the instruction.
        """
        if self._apt_stage == JOINT:
            masks = language_blind_masks(attention_mask, torch.zeros_like(language_mask), causal=causal)
            masks.language = check_language_mask(language_mask, attention_mask)
            return masks
        return language_blind_masks(attention_mask, language_mask, causal=causal)

    def apt_vlm_context(self) -> contextlib.AbstractContextManager:
        """``torch.no_grad()`` while the VLM is frozen, so it builds no graph and can receive no gradient."""
        return torch.no_grad() if self.apt_vlm_frozen else contextlib.nullcontext()

    @contextlib.contextmanager
    def apt_fusion_context(self, features: torch.Tensor | None, mask: torch.Tensor | None) -> Iterator[None]:
        """Make ``features`` (B, S, D) with key ``mask`` (B, S) the language context of every fusion site.

        Set it once per forward or sampling call; all denoising steps inside reuse it. Stage 1 and the
        joint baseline ignore it (``features`` may be ``None`` there, saving the work of computing them).
        """
        if self._apt_stage != 2:
            yield
            return
        if features is None or mask is None:
            raise FusionContextError("Stage 2 needs language features and their mask in `apt_fusion_context`.")
        if features.ndim != 3 or mask.shape != features.shape[:2]:
            raise FusionContextError(
                f"Fusion context must be features (B, S, D) with mask (B, S); got {tuple(features.shape)} and "
                f"{tuple(mask.shape)}."
            )
        sites = self.apt_sites().values()
        for site in sites:
            site.set_context(features, mask.bool())
        try:
            yield
        finally:
            for site in sites:
                site.set_context(None)

    @contextlib.contextmanager
    def apt_rng(self, *keys: int) -> Iterator[None]:
        """Seed the global RNG from ``(apt_config.seed, global_step, rank, *keys)`` for the block.

        Noise and flow-matching time drawn inside depend on the step, not on history, so a run resumed from
        any checkpoint draws exactly what the uninterrupted run drew.
        """
        trainer = getattr(self, "_trainer", None)
        step = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        seed = self.apt_cfg.seed
        for value in (step, rank, *keys):
            seed = (seed * 1_000_003 + int(value) + 1) % (2**63 - 1)
        device = getattr(self, "device", torch.device("cpu"))
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    # ------------------------------------------------------------------ optimisation
    def apt_param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters split by role, each group named and with its own lr: expert, fusion, gates, vlm."""
        cfg = self.apt_cfg
        vlm_ids = {id(p) for p in self.apt_vlm_module.parameters()}
        gate_ids, fusion_ids = set(), set()
        for site in self.apt_sites().values():
            for name, param in site.apt_fusion.named_parameters():
                (gate_ids if name.startswith("apt_gate") else fusion_ids).add(id(param))
        groups: dict[str, list[nn.Parameter]] = {g: [] for g in PARAM_GROUPS}
        for param in self.parameters():  # type: ignore[attr-defined]
            if not param.requires_grad:
                continue
            key = id(param)
            role = "gates" if key in gate_ids else "fusion" if key in fusion_ids else "vlm" if key in vlm_ids else "expert"
            groups[role].append(param)
        lrs = {"expert": cfg.lr, "fusion": cfg.resolved_fusion_lr, "gates": cfg.resolved_gate_lr, "vlm": cfg.resolved_vlm_lr}
        decay = {"expert": cfg.weight_decay, "fusion": cfg.weight_decay, "gates": 0.0, "vlm": cfg.weight_decay}
        return [
            {"name": role, "params": params, "lr": lrs[role], "weight_decay": decay[role]}
            for role, params in groups.items()
            if params
        ]

    def configure_optimizers(self) -> Any:
        """AdamW over :meth:`apt_param_groups` with a per-group, stage-aware ``LambdaLR`` stepped every step."""
        groups = self.apt_param_groups()
        optimizer = torch.optim.AdamW(groups, lr=self.apt_cfg.lr)
        factors = [StageLRFactor(self.apt_plan, g["name"], self.apt_cfg.warmup_steps) for g in groups]
        scheduler = LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ monitoring and loading
    def apt_gate_values(self) -> dict[str, dict[str, float]]:
        """``tanh`` of every gate, per site."""
        return {name: site.apt_fusion.gate_values() for name, site in self.apt_sites().items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the stage, so a module loaded for inference behaves as it did when saved."""
        checkpoint["apt"] = {"stage": int(self._apt_stage), "version": 1}
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild fusion sites and LoRA adapters before weights load, e.g. in ``load_from_checkpoint``.

        The saved stage is restored too: a Stage-2 checkpoint evaluates with its gates open and a joint
        baseline with its ordinary masks. (In a resumed fit the scheduler then sets the stage of the step.)
        """
        saved_stage = checkpoint.get("apt", {}).get("stage")
        plan = self._apt_plan
        if plan is not None and saved_stage is not None and (saved_stage == JOINT) != plan.is_joint:
            saved = "the joint baseline (no APT)" if saved_stage == JOINT else f"APT (stage {saved_stage})"
            raise StageMismatchError(
                f"This checkpoint was trained with {saved}, but this fit runs the {plan.name!r} plan; their modules "
                "differ (the baseline has no fusion blocks). Resume with the checkpoint's own plan "
                "(APTStageScheduler(stage='joint') for the baseline), or start the other plan from a fresh model."
            )
        keys = checkpoint.get("state_dict", {})
        if any(".apt_fusion." in k for k in keys) and not self.apt_sites():
            inject_fusion(self, self._apt_fusion_config(), forbidden_prefix=self.apt_vlm)  # type: ignore[arg-type]
        vlm_prefix = self.apt_vlm + "."
        if any(k.startswith(vlm_prefix) and LORA_PREFIX in k for k in keys) and not has_lora(self.apt_vlm_module):
            inject_vlm_lora(self.apt_vlm_module, self.apt_cfg)
        if saved_stage is not None:
            self.apt_set_stage(saved_stage)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
