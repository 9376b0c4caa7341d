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

One owner decides the active stage: the module's :class:`~apt_lightning.StagePlan` applied to the global step
its weights have reached (:attr:`APTMixin.apt_step`). :class:`~apt_lightning.APTStageScheduler` calls
:meth:`apt_prepare` in ``setup`` (structure only) and :meth:`apt_set_step` at every entry point (train,
validate, test, predict, resume); checkpoints store the plan and the step, so ``load_from_checkpoint`` restores
both. Without a Trainer (inference scripts, notebooks), call ``model.apt_prepare(plan, step=...)`` yourself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from apt_lightning.checksum import add_checkpoint_digest
from apt_lightning.config import APTConfig, FusionConfig
from apt_lightning.contexts import check_contexts, per_site_contexts
from apt_lightning.errors import (
    ContractError,
    NoMatchingTargetError,
    NotPreparedError,
    StageMismatchError,
)
from apt_lightning.fusion import GatedFusionLayer
from apt_lightning.guidance import PriorGuidance, check_guidance_scale
from apt_lightning.inject import fusion_geometry_problems, inject_fusion, resolve_targets
from apt_lightning.lora import has_lora, inject_vlm_lora
from apt_lightning.masking import PrefixMasks, check_language_mask, language_blind_masks
from apt_lightning.optim import configure_apt_optimizers, param_groups
from apt_lightning.schedule import JOINT, Stage, StagePlan, parse_stage
from apt_lightning.structure import fusion_sites, is_fusion_key, language_gates

if TYPE_CHECKING:
    from apt_lightning.feature_cache import Stage1FeatureCache

T = TypeVar("T")

CHECKPOINT_KEY = "apt"
_MASK_ROW_CHECKS = 16
"""Batches whose language masks are checked row by row on an accelerator (every batch on CPU, where it is free)."""
_CHECKPOINT_VERSION = 2


class APTMixin:
    """Mixin for a ``LightningModule`` holding a VLM and a continuous action expert.

    Declare on the subclass:

    * ``apt_vlm`` (``str``): dotted name of the VLM module (frozen in Stage 1, bit-identical after it).
    * ``apt_fusion`` (:class:`FusionConfig`): the expert modules that get gated cross-attention in Stage 2.
    * :meth:`apt_language_mask`: the per-batch (B, L) bool mask of instruction tokens.
    * optionally ``apt_config`` (:class:`APTConfig`): VLM mode and per-group learning rates. A model with its
      own learning rate passes it here (``self.apt_config = APTConfig(lr=lr)`` in ``__init__``): the mixin's
      optimiser reads only ``APTConfig``.

    The mixin provides :attr:`apt_stage`, the mask/context helpers used in ``forward``, a default
    ``configure_optimizers`` with one param group per role and a stage-aware schedule (build your own on
    :meth:`apt_configure_optimizers`), and keeps a frozen VLM in eval mode whatever ``train()`` Lightning calls.

    A fresh module is *unprepared*: it has no stage until :meth:`apt_prepare` gives it a plan (the scheduler
    does, in ``setup``; ``load_from_checkpoint`` does, from the checkpoint). The forward helpers refuse to run
    before that with :class:`~apt_lightning.NotPreparedError` instead of guessing a stage.
    """

    apt_vlm: str
    apt_fusion: FusionConfig
    apt_config: APTConfig | None = None

    _apt_plan: StagePlan | None = None
    _apt_step: int = 0
    _apt_feature_cache: Stage1FeatureCache | None = None
    _apt_mask_rows_checked: int = 0
    _apt_contexts_seen: bool = False

    # ------------------------------------------------------------------ contract
    def apt_language_mask(self, batch: Any) -> torch.Tensor:
        """(B, L) bool mask, True on the instruction tokens of ``batch`` (not on images or state tokens)."""
        raise NotImplementedError

    def apt_validate_contract(self) -> None:
        """Check every declaration, fusion target and width at once, without changing the module.

        Raises:
            ContractError: listing every problem, each with its fix (:class:`NoMatchingTargetError`, a
                subclass, when a fusion target is among them).
        """
        problems = self._apt_declaration_problems()
        target_problem = False
        if not problems:
            config = self._apt_fusion_config()
            try:
                sites = resolve_targets(self, config.target_modules, config.exclude_modules, self.apt_vlm)  # type: ignore[arg-type]
            except NoMatchingTargetError as error:
                problems.append(str(error))
                target_problem = True
            else:
                problems += fusion_geometry_problems(self, sites, config)  # type: ignore[arg-type]
        if problems:
            error_cls = NoMatchingTargetError if target_problem else ContractError
            raise error_cls(
                f"{type(self).__name__} does not satisfy the APTMixin contract:\n- " + "\n- ".join(problems)
            )

    def _apt_declaration_problems(self) -> list[str]:
        problems: list[str] = []
        module: nn.Module = self  # type: ignore[assignment]
        vlm_name = getattr(self, "apt_vlm", None)
        if not isinstance(vlm_name, str) or not vlm_name:
            problems.append(
                "`apt_vlm` is not set: assign the dotted name of the VLM module, e.g. apt_vlm = 'model.vlm'."
            )
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
        return problems

    def _apt_fusion_config(self) -> FusionConfig:
        """``apt_fusion`` with ``context_dim`` inferred from the VLM config when unset (left ``None`` if it cannot
        be: :func:`fusion_geometry_problems` reports that)."""
        config = self.apt_fusion
        if config.context_dim is None:
            vlm_config = getattr(self.apt_vlm_module, "config", None)
            text_config = getattr(vlm_config, "text_config", None) or vlm_config
            width = getattr(text_config, "hidden_size", None)
            if isinstance(width, int):
                config = dataclasses.replace(config, context_dim=width)
        return config

    # ------------------------------------------------------------------ structure
    @property
    def apt_cfg(self) -> APTConfig:
        return self.apt_config if self.apt_config is not None else APTConfig()

    @property
    def apt_vlm_module(self) -> nn.Module:
        return self.get_submodule(self.apt_vlm)  # type: ignore[attr-defined]

    @property
    def apt_is_prepared(self) -> bool:
        """Whether :meth:`apt_prepare` gave the module a plan (and with it a stage)."""
        return self._apt_plan is not None

    @property
    def apt_plan(self) -> StagePlan:
        if self._apt_plan is None:
            raise NotPreparedError(
                f"{type(self).__name__} has no APT stage plan yet: add `APTStageScheduler(...)` to the Trainer's "
                "callbacks, load a trained model with `load_from_checkpoint`, or (inference scripts, notebooks) call "
                "`model.apt_prepare(StagePlan(first_stage=1, switch_step=N), step=global_step)` first."
            )
        return self._apt_plan

    @property
    def apt_step(self) -> int:
        """Global step the weights have reached; with the plan it decides :attr:`apt_stage`."""
        return self._apt_step

    @property
    def apt_stage(self) -> Stage:
        """1 while learning the VA prior, 2 once language flows through the gates, 0 for the joint baseline."""
        return self.apt_plan.stage_at(self._apt_step)

    @property
    def apt_needs_language(self) -> bool:
        """Whether :meth:`apt_fusion_context` will use language features now (Stage 2 only). Models whose
        language features cost extra work may skip computing them when this is False."""
        return self.apt_stage == 2

    def apt_sites(self) -> dict[str, GatedFusionLayer]:
        """Fusion sites by name, in module order: the order of per-site contexts."""
        return dict(fusion_sites(self))  # type: ignore[arg-type]

    def apt_prepare(self, plan: StagePlan, step: int | None = None) -> None:
        """Check the contract, build the plan's structure, and activate the stage of ``step``.

        Structure means fusion blocks (unless the plan is the joint baseline), LoRA adapters and
        ``requires_grad`` for everything the plan will ever train, so the set of parameters a DDP wrapper
        registers never changes mid-fit; what a stage does not train gets no gradient and a zero learning rate.
        Idempotent. ``step`` defaults to the step the module has already reached (0 when fresh).

        Raises:
            ContractError: every problem with the declarations, fusion targets and widths, at once.
        """
        self.apt_validate_contract()
        if plan.is_joint and self.apt_sites():
            raise ContractError(
                f"{type(self).__name__} already holds APT fusion blocks, but the plan is the joint baseline, which has "
                "none. Build a fresh model for the baseline (or call `unload_fusion(model)` first)."
            )
        if not plan.is_joint:
            inject_fusion(self, self._apt_fusion_config(), forbidden_prefix=self.apt_vlm)  # type: ignore[arg-type]
        vlm = self.apt_vlm_module
        mode = self.apt_cfg.vlm_mode
        if mode == "lora" and plan.trains_vlm:
            inject_vlm_lora(vlm, self.apt_cfg)
        else:
            vlm.requires_grad_(mode == "full" and plan.trains_vlm)
        for site in self.apt_sites().values():
            site.apt_fusion.requires_grad_(plan.has_stage2)
        self._apt_plan = plan
        self.apt_set_step(self._apt_step if step is None else step)

    def apt_set_step(self, step: int) -> None:
        """Record that the weights reached global step ``step`` and activate the stage the plan gives it:
        fusion sites on in Stage 2 and off otherwise, a frozen VLM in eval mode."""
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"`step` must be a global step (int >= 0), got {step!r}.")
        self._apt_step = int(step)
        stage = self.apt_stage
        for site in self.apt_sites().values():
            site.active = stage == 2
        if self.apt_vlm_frozen:
            self.apt_vlm_module.eval()
        elif self.training:  # type: ignore[attr-defined]
            self.apt_vlm_module.train()

    @property
    def apt_vlm_frozen(self) -> bool:
        """True when the VLM takes no gradient now: in Stage 1, or with ``vlm_mode='frozen'``. False while the
        module is unprepared (it has no stage yet, and nothing of it is frozen)."""
        if self._apt_plan is None:
            return False
        return self.apt_stage == 1 or self.apt_cfg.vlm_mode == "frozen"

    def train(self, mode: bool = True) -> Any:
        """Lightning calls ``train()`` at every epoch and after validation: keep a frozen VLM in eval mode."""
        result = super().train(mode)  # type: ignore[misc]
        if mode and self.apt_vlm_frozen:
            self.apt_vlm_module.eval()
        return result

    # ------------------------------------------------------------------ helpers for forward
    def apt_masks(self, attention_mask: torch.Tensor, language_mask: torch.Tensor, causal: bool = False) -> PrefixMasks:
        """Language-blind prefix masks for both stages (see :func:`~apt_lightning.language_blind_masks`).

        The same masks serve Stage 1 and Stage 2, which is what makes the switch exact: non-language tokens
        never see the instruction, and Stage 2 adds language only through the gated fusion context. In the
        joint baseline the masks hide nothing (every valid token sees every valid token, as without APT);
        ``language`` still marks the instruction. With ``APTConfig(joint_prefix="blind")`` the joint prefix is
        language-blind as in APT while the expert still sees the language tokens.
        """
        # Reading the masks' values syncs an accelerator with the host: do it on the first batches only there.
        check_rows = reading_is_free(attention_mask) or self._apt_mask_rows_checked < _MASK_ROW_CHECKS
        language = check_language_mask(language_mask, attention_mask, check_rows=check_rows)
        if check_rows:
            self._apt_mask_rows_checked += 1
        if self.apt_stage == JOINT:
            masks = language_blind_masks(attention_mask, torch.zeros_like(language), causal=causal, check_rows=False)
            if self.apt_cfg.joint_prefix == "blind":
                blind = language_blind_masks(attention_mask, language, causal=causal, check_rows=False)
                masks.vlm_attention, masks.position_ids = blind.vlm_attention, blind.position_ids
            masks.language = language
            return masks
        return language_blind_masks(attention_mask, language, causal=causal, check_rows=False)

    def apt_vlm_context(self) -> contextlib.AbstractContextManager:
        """``torch.no_grad()`` while the VLM is frozen, so it builds no graph and can receive no gradient."""
        self.apt_plan  # noqa: B018 -- an unprepared module has no stage to decide this: NotPreparedError
        return torch.no_grad() if self.apt_vlm_frozen else contextlib.nullcontext()

    def apt_cached_vlm(self, batch: Any, compute: Callable[[], T]) -> T:
        """``compute()``, or its stored result for ``batch``'s samples when a :class:`Stage1FeatureCache` serves
        this Stage-1 training step.

        Wrap the VLM pass whose outputs the expert reads in Stage 1 (return only those: tensors with the batch
        first, in any tuple/list/dict; no language features, which Stage 1 hides). Store them in an order that
        does not depend on the instruction (:func:`~apt_lightning.feature_cache.visible_first`). Outside Stage-1
        training, or without a cache, this is just ``compute()``.
        """
        cache = self._apt_feature_cache
        if cache is None or self.apt_stage != 1 or not self.training:  # type: ignore[attr-defined]
            return compute()
        device = getattr(self, "device", torch.device("cpu"))
        return cache.get_or_compute(batch, compute, stage=1, device=device)

    @contextlib.contextmanager
    def apt_fusion_context(
        self,
        features: torch.Tensor | Sequence[torch.Tensor] | None,
        mask: torch.Tensor | Sequence[torch.Tensor] | None,
        guidance_scale: float = 1.0,
    ) -> Iterator[PriorGuidance]:
        """Make ``features`` the language context of the fusion sites for the block.

        Args:
            features: one (B, S, D) tensor for every site, or a sequence with one (B, S_i, D_i) tensor per site
                in site order (:meth:`apt_sites`), e.g. the VLM layer each expert layer reads. ``D_i`` must be
                that site's ``context_dim``.
            mask: (B, S) bool key mask (True on language tokens), or one per site.
            guidance_scale: prior-contrast guidance weight ``w`` for sampling (see :mod:`apt_lightning.guidance`):
                ``v = v_prior + w * (v_cond - v_prior)``; 1 is the plain model, and so is any ``w`` while every
                gate is closed (the two branches are then the same computation).

        Yields:
            :class:`~apt_lightning.guidance.PriorGuidance`: pass the expert's per-sample inputs through its
            ``expand`` and the expert's output through its ``combine`` (no-ops unless guidance is on).

        Set it once per forward or sampling call; all denoising steps inside reuse it. Outside Stage 2 it is
        ignored, so pass the features unconditionally (or skip computing them when
        :attr:`apt_needs_language` is False). In Stage-2 training with ``APTConfig.language_dropout`` = p, a
        fraction p of the samples get an empty context: they take exactly the prior path.

        Raises:
            FusionContextError: missing features, a wrong number of per-site tensors, or a shape or width that
                does not fit a site (named).
        """
        guidance_scale = check_guidance_scale(guidance_scale)
        sites = self.apt_sites() if self.apt_needs_language else {}
        gates_open = guidance_scale != 1.0 and (
            any(not site.apt_fusion.is_identity for site in sites.values())
            or any(not gate.is_identity for _, gate in language_gates(self))  # type: ignore[arg-type]
        )
        guidance = PriorGuidance(float(guidance_scale), active=gates_open)  # closed gates: prior == conditional
        first, self._apt_contexts_seen = not self._apt_contexts_seen, True
        if not self.apt_needs_language:
            if first and self.apt_plan.has_stage2:  # a wrong context fails at step 0, not at the switch
                check_contexts(features, mask, self.apt_sites())
            yield guidance
            return
        contexts = per_site_contexts(features, mask, sites)
        keep = self._apt_language_keep(contexts[0][0].shape[0], contexts[0][0].device) if contexts else None
        for site, (context, key_mask) in zip(sites.values(), contexts, strict=True):
            if keep is not None:
                key_mask = key_mask & keep[:, None]
            site.set_context(guidance.expand(context), guidance.prior_rows_blind(key_mask))
        try:
            yield guidance
        finally:
            for site in sites.values():
                site.set_context(None)

    def apt_expert_language_mask(self, mask: torch.Tensor, guide: PriorGuidance | None = None) -> torch.Tensor:
        """Key mask for a language path inside the expert's own layers (behind a :class:`LanguageGate`).

        ``mask`` (B, S) marks the language tokens the expert may read. The result hides them outside Stage 2,
        from the samples that language dropout hides this step (the same samples as the fusion sites), and
        from guidance's prior rows (pass the ``guide`` that :meth:`apt_fusion_context` yielded; the result then
        has the expanded batch). Rows left all False must take the expert's language-free path exactly.
        """
        mask = mask.bool()
        if not self.apt_needs_language:
            return torch.zeros_like(mask)
        keep = self._apt_language_keep(mask.shape[0], mask.device)
        if keep is not None:
            mask = mask & keep[:, None]
        return guide.prior_rows_blind(mask) if guide is not None else mask

    def _apt_language_keep(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """(B,) bool, False on the samples whose instruction language dropout hides this training step."""
        p = self.apt_cfg.language_dropout
        if p <= 0.0 or not self.training:  # type: ignore[attr-defined]
            return None
        trainer = getattr(self, "_trainer", None)
        micro_batch = getattr(trainer.fit_loop.epoch_loop, "batch_idx", 0) if trainer is not None else 0
        generator = torch.Generator().manual_seed(self._apt_seed(micro_batch, 0x4C44))  # own stream: no global RNG
        return (torch.rand(batch_size, generator=generator) >= p).to(device)

    def _apt_seed(self, *keys: int) -> int:
        """Seed of the per-step stream ``(apt_config.seed, global_step, rank, *keys)``."""
        trainer = getattr(self, "_trainer", None)
        step = trainer.global_step if trainer is not None else self._apt_step
        rank = trainer.global_rank if trainer is not None else 0
        seed = self.apt_cfg.seed
        for value in (step, rank, *keys):
            seed = (seed * 1_000_003 + int(value) + 1) % (2**63 - 1)
        return seed

    @contextlib.contextmanager
    def apt_rng(self, *keys: int) -> Iterator[None]:
        """Seed the global RNG from ``(apt_config.seed, global_step, rank, *keys)`` for the block.

        Noise and flow-matching time drawn inside depend on the step, not on history, so a run resumed from
        any checkpoint draws exactly what the uninterrupted run drew.
        """
        device = getattr(self, "device", torch.device("cpu"))
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._apt_seed(*keys))
            yield

    # ------------------------------------------------------------------ sharding
    def apt_fully_shard(self, units: str | list[str] | None = None, **fully_shard_kwargs: Any) -> list[str]:
        """Shard this module with FSDP2 for ``ModelParallelStrategy``: call it from ``configure_model``.

        Every parameter ends in a unit whose forward uses it (see :mod:`apt_lightning.sharding`): the modules
        ``units`` names (a regex or peft-style names, e.g. your transformer layers), every fusion block, and each
        other module that owns parameters. The mesh defaults to the strategy's data-parallel mesh. Returns the
        units' names.

        Example::

            def configure_model(self):
                self.apt_fully_shard(units=r".*layers\\.\\d+")
        """
        from apt_lightning.sharding import fully_shard_apt

        mesh = getattr(self, "device_mesh", None)
        if mesh is not None and "mesh" not in fully_shard_kwargs:
            names = mesh.mesh_dim_names or ()
            fully_shard_kwargs["mesh"] = mesh["data_parallel"] if "data_parallel" in names else mesh
        return fully_shard_apt(self, units, **fully_shard_kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ optimisation
    def apt_param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters split by role, each group named and with its own lr: expert, fusion, gates, vlm."""
        return param_groups(self)

    def apt_configure_optimizers(
        self, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **optimizer_kwargs: Any
    ) -> dict[str, Any]:
        """APT's groups and stage-aware schedule with an optimiser of your choice: the one line to call from your
        own ``configure_optimizers`` (``return self.apt_configure_optimizers(torch.optim.SGD, momentum=0.9)``)."""
        return configure_apt_optimizers(self, optimizer_cls, **optimizer_kwargs)

    def configure_optimizers(self) -> Any:
        """AdamW over :meth:`apt_param_groups` with a per-group, stage-aware ``LambdaLR`` stepped every step."""
        return self.apt_configure_optimizers()

    # ------------------------------------------------------------------ monitoring and loading
    def apt_gate_values(self) -> dict[str, dict[str, float]]:
        """``tanh`` of every gate, per site."""
        return {name: site.apt_fusion.gate_values() for name, site in self.apt_sites().items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the plan and the step, so a module loaded for inference behaves as it did when saved.

        The step is the checkpoint's ``global_step`` (the optimizer steps its weights hold) when Lightning wrote it.
        """
        if self._apt_plan is not None:
            step = int(checkpoint.get("global_step", self._apt_step))
            checkpoint[CHECKPOINT_KEY] = {
                "plan": self._apt_plan.to_dict(),
                "step": step,
                "stage": int(self._apt_plan.stage_at(step)),
                "version": _CHECKPOINT_VERSION,
            }
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        add_checkpoint_digest(checkpoint)  # last: covers the weights as written (apt_lightning.checksum)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the saved structure before weights load and restore the saved step (hence the stage).

        A module without a plan (``load_from_checkpoint``) takes the checkpoint's plan: a Stage-2 checkpoint
        evaluates with its gates open and a joint baseline with its ordinary masks. A module that already has
        one (a resumed fit) keeps it; the scheduler checks that the two agree.
        """
        saved = checkpoint.get(CHECKPOINT_KEY) or {}
        saved_plan, saved_step = _saved_plan_and_step(saved)
        plan = self._apt_plan
        if plan is not None and saved_plan is not None and saved_plan.is_joint != plan.is_joint:
            was = "the joint baseline (no APT)" if saved_plan.is_joint else f"APT ({saved_plan.name})"
            raise StageMismatchError(
                f"This checkpoint was trained with {was}, but this fit runs the {plan.name!r} plan; their modules "
                "differ (the baseline has no fusion blocks). Resume with the checkpoint's own plan "
                "(APTStageScheduler(stage='joint') for the baseline), or start the other plan from a fresh model."
            )
        keys = checkpoint.get("state_dict", {})
        if plan is None and saved_plan is not None:
            self.apt_prepare(saved_plan, step=saved_step)
        else:
            if any(is_fusion_key(k) for k in keys) and not self.apt_sites():
                inject_fusion(self, self._apt_fusion_config(), forbidden_prefix=self.apt_vlm)  # type: ignore[arg-type]
            if self._apt_plan is not None:
                self.apt_set_step(saved_step)
        vlm_prefix = self.apt_vlm + "."
        has_saved_lora = any(k.startswith(vlm_prefix) and ".lora_" in k for k in keys)
        if has_saved_lora and not has_lora(self.apt_vlm_module):
            inject_vlm_lora(self.apt_vlm_module, self.apt_cfg)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)


def reading_is_free(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host costs no device synchronisation (it lives on the CPU)."""
    return tensor.device.type == "cpu"


def _saved_plan_and_step(saved: dict[str, Any]) -> tuple[StagePlan | None, int]:
    """The plan and step a checkpoint records; version-1 checkpoints stored only the stage."""
    if "plan" in saved:
        return StagePlan(**saved["plan"]), int(saved.get("step", 0))
    if "stage" in saved:
        return StagePlan(first_stage=parse_stage(saved["stage"])), 0
    return None, 0
