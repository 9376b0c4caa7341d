"""``APT``: the one object that owns APT's state and structure on a model, with or without Lightning.

Like peft's ``BaseTuner``, the controller holds its config and the modules it injected, and a model gets it by
composition::

    class MyVLA(nn.Module):                      # or a LightningModule with APTMixin
        def __init__(self):
            super().__init__()
            self.vlm, self.expert = ..., ...
            self.apt = APT(self, vlm="vlm", fusion=FusionConfig(target_modules=r"expert\\.blocks\\.\\d+"))

        def forward(self, batch, x_t, t):
            masks = self.apt.masks(batch["attention_mask"], batch["language_mask"])
            with self.apt.vlm_context():
                feats = self.vlm(..., attention_mask=masks.vlm_attention, position_ids=masks.position_ids)
            with self.apt.fusion_context(feats, masks.language):
                return self.expert(x_t, t, feats, context_mask=masks.expert_attention)

One clock decides everything that changes with training: :attr:`APT.step`, the number of optimizer steps the
weights have taken. The stage is the :class:`~apt_lightning.StagePlan` applied to it, and the learning-rate factors,
the random streams and the saved record read it too. It advances by itself: the optimizer that
:meth:`APT.configure_optimizers` builds advances it after every ``optimizer.step()`` (an optimizer built elsewhere
calls :meth:`APT.advance`), so a plain loop cannot forget it; under Lightning it is the Trainer's ``global_step``.
Its resumable state (plan, step, and the configuration the weights need) is :meth:`APT.state_dict`; the weights it
added or trained travel as peft-style files through :meth:`APT.save_pretrained` / :meth:`APT.load_pretrained`.
Importing this module does not import Lightning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from apt_lightning.config import APTConfig, FusionConfig
from apt_lightning.contexts import check_contexts, per_site_contexts
from apt_lightning.errors import (
    ConfigError,
    ContractError,
    NoMatchingTargetError,
    NotPreparedError,
    StageMismatchError,
)
from apt_lightning.fusion import GatedFusionLayer
from apt_lightning.guidance import PriorGuidance, check_guidance_scale
from apt_lightning.inject import fusion_geometry_problems, inject_fusion, resolve_targets, unload_fusion
from apt_lightning.lora import check_lora_targets, has_lora, inject_vlm_lora, remove_vlm_lora
from apt_lightning.masking import PrefixMasks, check_language_mask, language_blind_masks
from apt_lightning.record import StateRecord, configuration_mismatches, read_record
from apt_lightning.schedule import JOINT, Stage, StagePlan, check_resume
from apt_lightning.step_watch import UncountedStepWatch
from apt_lightning.structure import fusion_sites, is_fusion_key, language_gates

if TYPE_CHECKING:
    from apt_lightning.feature_cache import Stage1FeatureCache

T = TypeVar("T")

_MASK_ROW_CHECKS = 16
"""Batches whose language masks are checked row by row on an accelerator (every batch on CPU, where it is free)."""

Counters = Callable[[], "tuple[int, int, int] | None"]
"""Returns ``(global_step, rank, micro_batch)`` from a training loop that owns the clock (Lightning's Trainer), or
``None`` when no such loop drives the model."""


class APT:
    """APT on one model: its plan and step, its fusion sites, and the helpers its forward calls.

    Args:
        model: the VLA (any ``nn.Module``). The controller is not a module: it adds no parameters of its own.
        vlm: dotted name of the VLM module (frozen in Stage 1, bit-identical after it).
        fusion: where gated fusion goes in the expert and how it is shaped. Give the VLM feature width as
            ``context_dim`` unless the VLM carries a transformers config (then it is read from
            ``config.text_config.hidden_size`` or ``config.hidden_size``).
        config: VLM mode, learning rates, language dropout and the seed of APT's random streams.

    A fresh controller is *unprepared*: it has no stage until :meth:`prepare` gives it a plan (or
    :meth:`load_state_dict` / :meth:`load_pretrained` restores one), and its forward helpers raise
    :class:`~apt_lightning.NotPreparedError` instead of guessing one.

    The public surface, by concern: plan and clock (:meth:`prepare`, :meth:`start_finetune`, :attr:`plan`,
    :attr:`step`, :attr:`stage`, :meth:`advance`); forward (:meth:`masks`, :meth:`vlm_context`,
    :meth:`fusion_context`, :meth:`expert_language_mask`, :meth:`cached_vlm`, :meth:`rng`); optimisation
    (:meth:`param_groups`, :meth:`configure_optimizers`); state and files (:meth:`state_dict`,
    :meth:`load_state_dict`, :meth:`save_pretrained`, :meth:`load_pretrained`, :meth:`unload`).

    Example::

        >>> from apt_lightning import APT, FusionConfig, StagePlan
        >>> model = nn.ModuleDict({"vlm": nn.Linear(4, 4), "expert": nn.Sequential(nn.Linear(8, 8))})
        >>> apt = APT(model, vlm="vlm", fusion=FusionConfig(target_modules=["expert.0"], context_dim=4, num_heads=2))
        >>> apt.prepare(StagePlan(first_stage=1, switch_step=1))
        >>> apt.stage, list(apt.sites)
        (1, ['expert.0'])
        >>> optimizer = apt.configure_optimizers()["optimizer"]
        >>> optimizer.step()  # after your forward and backward: the step advances with the optimizer
        >>> apt.step, apt.stage
        (1, 2)
    """

    def __init__(self, model: nn.Module, vlm: str, fusion: FusionConfig, config: APTConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ContractError(f"APT(model=...) must be an nn.Module, got {type(model).__name__}.")
        self.model = model
        self.vlm = vlm
        self.fusion = fusion
        self.config = config if config is not None else APTConfig()
        self._counters: Counters | None = None
        self._plan: StagePlan | None = None
        self._step = 0
        self._micro_batch = 0
        self._finetune = False
        self._before_finetune: tuple[StagePlan | None, int, bool] | None = None
        self._sites: dict[str, GatedFusionLayer] = {}
        self._feature_cache: Stage1FeatureCache | None = None
        self._mask_rows_checked = 0
        self._contexts_seen = False
        self._step_watch = UncountedStepWatch()
        problems = self._declaration_problems()
        if problems:
            raise ContractError(f"APT(...) on {type(model).__name__}:\n- " + "\n- ".join(problems))

    def __repr__(self) -> str:
        stage = self.stage if self.is_prepared else "unprepared"
        return f"APT(vlm={self.vlm!r}, plan={self._plan and self._plan.name!r}, step={self._step}, stage={stage})"

    # ------------------------------------------------------------------ contract
    def _declaration_problems(self) -> list[str]:
        problems: list[str] = []
        if not isinstance(self.vlm, str) or not self.vlm:
            problems.append("`vlm` is not set: give the dotted name of the VLM module, e.g. vlm='model.vlm'.")
        else:
            try:
                self.model.get_submodule(self.vlm)
            except AttributeError:
                names = [n for n, _ in self.model.named_modules() if n and n.count(".") < 3]
                near = difflib.get_close_matches(self.vlm, names, n=3, cutoff=0.3) or names[:8]
                problems.append(f"`vlm`={self.vlm!r} names no module. Closest names: {near}.")
        if not isinstance(self.fusion, FusionConfig):
            problems.append(
                f"`fusion` must be a FusionConfig, got {type(self.fusion).__name__}: declare where gated fusion "
                "goes, e.g. FusionConfig(target_modules=r'expert\\.layers\\.\\d+')."
            )
        if not isinstance(self.config, APTConfig):
            problems.append(f"`config` must be an APTConfig, got {type(self.config).__name__}.")
        return problems

    def validate(self) -> None:
        """Check the declarations, every fusion target and every width at once, without changing the model.

        Raises:
            ContractError: listing every problem, each with its fix (:class:`NoMatchingTargetError`, a
                subclass, when a fusion target is among them).
        """
        problems = self._declaration_problems()
        target_problem = False
        if not problems:
            fusion = self._resolved_fusion
            try:
                sites = resolve_targets(self.model, fusion.target_modules, fusion.exclude_modules, self.vlm)
            except NoMatchingTargetError as error:
                problems.append(str(error))
                target_problem = True
            else:
                problems += fusion_geometry_problems(self.model, sites, fusion)
        if problems:
            error_cls = NoMatchingTargetError if target_problem else ContractError
            raise error_cls(f"APT cannot be applied to {type(self.model).__name__}:\n- " + "\n- ".join(problems))

    @property
    def _resolved_fusion(self) -> FusionConfig:
        """``fusion`` with ``context_dim`` read from the VLM's transformers config when unset (left ``None``
        if there is none: :meth:`validate` then asks for it)."""
        if self.fusion.context_dim is not None:
            return self.fusion
        vlm_config = getattr(self.vlm_module, "config", None)
        text_config = getattr(vlm_config, "text_config", None) or vlm_config
        width = getattr(text_config, "hidden_size", None)
        return dataclasses.replace(self.fusion, context_dim=width) if isinstance(width, int) else self.fusion

    # ------------------------------------------------------------------ structure, plan and clock
    @property
    def vlm_module(self) -> nn.Module:
        return self.model.get_submodule(self.vlm)

    @property
    def is_prepared(self) -> bool:
        """Whether the model has a plan (and with it a stage): :meth:`prepare`, or a restored state."""
        return self._plan is not None

    @property
    def plan(self) -> StagePlan:
        if self._plan is None:
            raise NotPreparedError(
                f"{type(self.model).__name__} has no APT stage plan yet: add `APTStageScheduler(...)` to the "
                "Trainer's callbacks, load a trained model (`load_from_checkpoint`, `model.apt.load_pretrained(dir)`),"
                " or (plain loops, inference scripts, notebooks) call "
                "`model.apt.prepare(StagePlan(first_stage=1, switch_step=N))`."
            )
        return self._plan

    @property
    def step(self) -> int:
        """The one clock: optimizer steps the weights have taken. With the plan it decides :attr:`stage`."""
        return self._step

    @property
    def stage(self) -> Stage:
        """1 while learning the VA prior, 2 once language flows through the gates, 0 for the joint baseline."""
        return self.plan.stage_at(self._step)

    @property
    def needs_language(self) -> bool:
        """Whether :meth:`fusion_context` uses language features now (Stage 2 only): models whose language
        features cost extra work may skip computing them when this is False."""
        return self.stage == 2

    @property
    def _vlm_frozen(self) -> bool:
        """True when the VLM takes no gradient now: in Stage 1, or with ``vlm_mode='frozen'``. False while
        unprepared (nothing is frozen yet)."""
        if self._plan is None:
            return False
        return self.stage == 1 or self.config.vlm_mode == "frozen"

    @property
    def sites(self) -> dict[str, GatedFusionLayer]:
        """Fusion sites by name, in module order (the order of per-site contexts); found at :meth:`prepare`."""
        return self._sites

    def prepare(self, plan: StagePlan, step: int | None = None) -> None:
        """Check the contract, build the plan's structure and activate the stage of ``step``.

        Structure means fusion blocks (unless the plan is the joint baseline), LoRA adapters and
        ``requires_grad`` for everything the plan will ever train, so the set of parameters a DDP wrapper
        registers never changes mid-fit; what a stage does not train gets no gradient and a zero learning rate.
        Idempotent. ``step`` defaults to the step already reached (0 when fresh).

        A model whose weights were trained under another plan (a loaded checkpoint, step > 0) is not silently
        re-planned: continuing under a different plan would change what it computes. Fine-tune it with
        :meth:`start_finetune`, which says when that is exact.

        Raises:
            ContractError: every problem with the declarations, fusion targets and widths, at once.
            StageMismatchError: the model holds weights trained under another plan.
        """
        if not isinstance(plan, StagePlan):
            raise ConfigError(f"`plan` must be a StagePlan, got {type(plan).__name__}: e.g. StagePlan(first_stage=1).")
        if step is not None:
            step = _check_step(step)
        if self._plan is not None and plan != self._plan and self._step > 0:
            raise StageMismatchError(
                f"{type(self.model).__name__} holds weights trained under the {self._plan.name!r} plan "
                f"({self._plan.to_dict()}) to step {self._step}; preparing the {plan.name!r} plan ({plan.to_dict()}) "
                "would silently change what it computes. To fine-tune these weights on new data from step 0, use "
                "`model.apt.start_finetune(plan)` (APTStageScheduler(..., finetune=True)); to continue their run, keep "
                "its plan."
            )
        self._build(plan)
        self._set_step(self._step if step is None else step)

    def _build(self, plan: StagePlan) -> None:
        """Structure and ``requires_grad`` for ``plan`` (all checks before the first change)."""
        self.validate()
        self._sites = dict(fusion_sites(self.model))
        if plan.is_joint and self._sites:
            raise ContractError(
                f"{type(self.model).__name__} already holds APT fusion blocks, but the plan is the joint baseline, "
                "which has none. Build a fresh model for the baseline (or call `model.apt.unload()` first)."
            )
        if self.config.vlm_mode == "lora" and plan.trains_vlm:
            check_lora_targets(self.vlm_module, self.config)  # before any change: a refusal leaves the model as it was
        if not plan.is_joint:
            inject_fusion(self.model, self._resolved_fusion, forbidden_prefix=self.vlm)
            self._sites = dict(fusion_sites(self.model))
        vlm = self.vlm_module
        if self.config.vlm_mode == "lora" and plan.trains_vlm:
            inject_vlm_lora(vlm, self.config)
        else:
            vlm.requires_grad_(self.config.vlm_mode == "full" and plan.trains_vlm)
        for site in self._sites.values():
            site.apt_fusion.requires_grad_(plan.has_stage2)
        self._plan = plan

    def start_finetune(self, plan: StagePlan, warm_start: bool = False) -> None:
        """Fine-tune the weights the model holds under ``plan``, from step 0 (a new run on new data).

        What the model computes is kept exactly at step 0 when the plans share their prefix: a Stage-2 model
        keeps its fusion blocks and gates, a Stage-1 model gets fusion blocks at closed gates, a joint model
        fine-tunes jointly. Everything else would compute something else from step 0 and is refused unless
        ``warm_start=True`` says the weights are only a starting point: a model trained jointly (its expert read
        the instruction through the prefix) under an APT plan, an APT model under the joint plan, and a model
        trained into Stage 2 (open gates) under a plan that starts in Stage 1 (gates closed again). A model APT
        never prepared (e.g. a public base checkpoint) is taken as it is. A refusal changes nothing.

        Raises:
            StageMismatchError: the plans see the instruction differently and ``warm_start`` is False.
        """
        if not isinstance(plan, StagePlan):
            raise ConfigError(
                f"`plan` must be a StagePlan, got {plan!r}: e.g. start_finetune(StagePlan(first_stage=2))."
            )
        if not isinstance(warm_start, bool):
            raise ConfigError(f"`warm_start` must be a bool, got {warm_start!r}.")
        trained = self._plan if self._plan is not None and self._step > 0 else None
        if trained is not None and not warm_start:
            problem = _finetune_problem(trained, self._step, plan)
            if problem:
                raise StageMismatchError(
                    f"This model was trained {problem}; fine-tuning it under the {plan.name!r} plan changes what it "
                    "computes from step 0. Fine-tune it under a plan that continues what it computes "
                    f"({_matching_plan_hint(trained, self._step)}), or pass `warm_start=True` "
                    "(APTStageScheduler(..., finetune=True, warm_start=True)) to use its weights as a starting point "
                    "only."
                )
        self._before_finetune = (self._plan, self._step, self._finetune)
        self._build(plan)
        self._finetune = True
        self._set_step(0)

    def _undo_finetune(self) -> None:
        """Return to the plan and step held before :meth:`start_finetune` (weights never changed in between)."""
        if self._before_finetune is not None:
            self._plan, step, self._finetune = self._before_finetune
            self._before_finetune = None
            if self._plan is not None:
                self._set_step(step)

    def advance(self) -> None:
        """Record that the weights took one optimizer step.

        The optimizer :meth:`configure_optimizers` builds calls it for you after each ``optimizer.step()``; call it
        yourself only after stepping an optimizer APT did not build (LeRobot's ``policy.update()`` hook is such a
        place). The stage switches here when the plan says so. Forgotten in a plain loop, the next training forward
        after the weights changed twice without it raises :class:`~apt_lightning.errors.ClockError`
        (:mod:`apt_lightning.step_watch`).
        """
        self._set_step(self._step + 1)

    def _set_step(self, step: int, micro_batch: int | None = None) -> None:
        """Move the clock to ``step`` and activate its stage (fusion sites on in Stage 2 only, a frozen VLM in eval
        mode). The Lightning adapter sets the Trainer's step here; everything else advances."""
        self._step = _check_step(step)
        if micro_batch is not None:
            self._micro_batch = _check_step(micro_batch, "micro_batch")  # Lightning's batch index: language dropout
        stage = self.stage
        for site in self._sites.values():
            site.active = stage == 2
        if self._vlm_frozen:
            self.vlm_module.eval()
        elif self.model.training:
            self.vlm_module.train()

    def _after_train_mode(self, mode: bool) -> None:
        """After ``model.train(mode)``: a frozen VLM goes back to eval mode (the mixin calls it)."""
        if mode and self._vlm_frozen:
            self.vlm_module.eval()

    def unload(self) -> nn.Module:
        """Remove everything APT added (fusion wrappers, LoRA adapters) and forget the plan: the model is back to
        its own modules and keys, unprepared. Returns the model.

        Merge-free: LoRA adapters are dropped, not merged (``export_vlm`` writes a merged VLM)."""
        unload_fusion(self.model)
        if has_lora(self.vlm_module):
            remove_vlm_lora(self.vlm_module)
        self._sites, self._plan, self._step, self._finetune = {}, None, 0, False
        self.model.requires_grad_(True)
        return self.model

    # ------------------------------------------------------------------ helpers for forward
    def masks(self, attention_mask: torch.Tensor, language_mask: torch.Tensor, causal: bool = False) -> PrefixMasks:
        """Language-blind prefix masks for both stages (see :func:`~apt_lightning.language_blind_masks`).

        The same masks serve Stage 1 and Stage 2, which is what makes the switch exact: non-language tokens
        never see the instruction, and Stage 2 adds language only through the gated fusion context. In the
        joint baseline they hide nothing (``language`` still marks the instruction); with
        ``APTConfig(joint_prefix="blind")`` the joint prefix is language-blind while the expert sees language.
        """
        self._keep_frozen_vlm_in_eval()
        check_rows = reading_is_free(attention_mask) or self._mask_rows_checked < _MASK_ROW_CHECKS
        language = check_language_mask(language_mask, attention_mask, check_rows=check_rows)
        if check_rows:
            self._mask_rows_checked += 1
        if self.stage == JOINT:
            masks = language_blind_masks(attention_mask, torch.zeros_like(language), causal=causal, check_rows=False)
            if self.config.joint_prefix == "blind":
                blind = language_blind_masks(attention_mask, language, causal=causal, check_rows=False)
                masks.vlm_attention, masks.position_ids = blind.vlm_attention, blind.position_ids
            masks.language = language
            return masks
        return language_blind_masks(attention_mask, language, causal=causal, check_rows=False)

    def vlm_context(self) -> contextlib.AbstractContextManager:
        """``torch.no_grad()`` while the VLM is frozen, so it builds no graph and can receive no gradient (and eval
        mode, whatever ``model.train()`` did since)."""
        self.plan  # noqa: B018 -- unprepared: no stage to decide this, NotPreparedError
        self._keep_frozen_vlm_in_eval()
        if self._counters is None and self.model.training:  # a plain loop: is the clock advancing?
            self._step_watch.observe(self.model.parameters(), self._step)
        return torch.no_grad() if self._vlm_frozen else contextlib.nullcontext()

    def _keep_frozen_vlm_in_eval(self) -> None:
        """A plain loop's ``model.train()`` puts every submodule in train mode; a frozen VLM must compute as in eval
        mode (dropout off, and kernels such as PyTorch's fused encoder fast path that differ in the last bits), so
        the forward helpers restore it."""
        if self._plan is not None and self._vlm_frozen and self.vlm_module.training:
            self.vlm_module.eval()

    def _attach_feature_cache(self, cache: Stage1FeatureCache | None) -> None:
        """Serve :meth:`cached_vlm` from ``cache`` (``None`` detaches): :class:`Stage1FeatureCache` calls it."""
        self._feature_cache = cache

    def cached_vlm(self, batch: Any, compute: Callable[[], T]) -> T:
        """``compute()``, or its stored result for ``batch``'s samples when a Stage-1 feature cache serves this
        Stage-1 training step.

        Wrap the VLM pass whose outputs the expert reads in Stage 1 (return only those: tensors with the batch
        first, in any tuple/list/dict; no language features, which Stage 1 hides), stored in an order that does
        not depend on the instruction (:func:`~apt_lightning.feature_cache.visible_first`). Outside Stage-1
        training, or without a cache, this is just ``compute()``.
        """
        cache = self._feature_cache
        if cache is None or self.stage != 1 or not self.model.training:
            return compute()
        device = next(self.model.parameters(), torch.empty(0)).device
        return cache.get_or_compute(batch, compute, stage=1, device=device)

    @contextlib.contextmanager
    def fusion_context(
        self,
        features: torch.Tensor | Sequence[torch.Tensor] | None,
        mask: torch.Tensor | Sequence[torch.Tensor] | None,
        guidance_scale: float = 1.0,
    ) -> Iterator[PriorGuidance]:
        """Make ``features`` the language context of the fusion sites for the block.

        Args:
            features: one (B, S, D) tensor for every site, or a sequence with one (B, S_i, D_i) tensor per site
                in site order (:attr:`sites`). ``D_i`` must be that site's ``context_dim``.
            mask: (B, S) bool key mask (True on language tokens), or one per site.
            guidance_scale: prior-contrast guidance weight ``w`` for sampling (:mod:`apt_lightning.guidance`):
                ``v = v_prior + w * (v_cond - v_prior)``; 1 is the plain model, and so is any ``w`` while every
                gate is closed (the two branches are then the same computation).

        Yields:
            :class:`~apt_lightning.guidance.PriorGuidance`: pass the expert's per-sample inputs through its
            ``expand`` and the expert's output through its ``combine`` (no-ops unless guidance is on).

        Set it once per forward or sampling call; all denoising steps inside reuse it (without autograd the
        context keys/values are computed here, once, so a ``torch.compile``-d denoising step sees the same inputs
        at every step and compiles once; docs/performance.md). Outside Stage 2 it is
        ignored, so pass the features unconditionally (or skip them when :attr:`needs_language` is False). With
        ``APTConfig.language_dropout`` = p, a fraction p of the training samples get an empty context: they take
        exactly the prior path.

        Raises:
            FusionContextError: missing features, a wrong number of per-site tensors, or a shape or width that
                does not fit a site (named).
        """
        guidance_scale = check_guidance_scale(guidance_scale)
        sites = self._sites if self.needs_language else {}
        gates_open = guidance_scale != 1.0 and (
            any(not site.apt_fusion.is_identity for site in sites.values())
            or any(not gate.is_identity for _, gate in language_gates(self.model))
        )
        guidance = PriorGuidance(guidance_scale, active=gates_open)  # closed gates: prior == conditional
        first, self._contexts_seen = not self._contexts_seen, True
        if not self.needs_language:
            if first and self.plan.has_stage2:  # a wrong context fails at the first forward, not at the switch
                check_contexts(features, mask, self._sites)
            yield guidance
            return
        contexts = per_site_contexts(features, mask, sites)
        keep = self._language_keep(contexts[0][0].shape[0], contexts[0][0].device) if contexts else None
        for site, (context, key_mask) in zip(sites.values(), contexts, strict=True):
            if keep is not None:
                key_mask = key_mask & keep[:, None]
            site.set_context(guidance.expand(context), guidance.prior_rows_blind(key_mask))
            if not torch.is_grad_enabled():  # sampling: keys/values once here, so every denoising step is the same
                site.precompute_context(site.apt_fusion.to_kv.weight.dtype)  # computation (one compiled graph)
        try:
            yield guidance
        finally:
            for site in sites.values():
                site.set_context(None)

    def expert_language_mask(self, mask: torch.Tensor, guide: PriorGuidance | None = None) -> torch.Tensor:
        """Key mask for a language path inside the expert's own layers (behind a :class:`LanguageGate`).

        ``mask`` (B, S) marks the language tokens the expert may read. The result hides them outside Stage 2,
        from the samples that language dropout hides this step (the same samples as the fusion sites), and from
        guidance's prior rows (pass the ``guide`` :meth:`fusion_context` yielded; the result then has the
        expanded batch). Rows left all False must take the expert's language-free path exactly.
        """
        mask = mask.bool()
        if not self.needs_language:
            return torch.zeros_like(mask)
        keep = self._language_keep(mask.shape[0], mask.device)
        if keep is not None:
            mask = mask & keep[:, None]
        return guide.prior_rows_blind(mask) if guide is not None else mask

    def _language_keep(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """(B,) bool, False on the samples whose instruction language dropout hides this training step; ``None``
        when nothing is hidden (no dropout, or evaluation)."""
        p = self.config.language_dropout
        if p <= 0.0 or not self.model.training:
            return None
        micro_batch = self._clock()[2]
        generator = torch.Generator().manual_seed(self._seed(micro_batch, 0x4C44))  # own stream: no global RNG
        return (torch.rand(batch_size, generator=generator) >= p).to(device)

    def _clock(self) -> tuple[int, int, int]:
        """``(step, rank, micro_batch)``: the Trainer's when one drives the model, else this controller's."""
        counted = self._counters() if self._counters is not None else None
        return counted if counted is not None else (self._step, _rank(), self._micro_batch)

    def _seed(self, *keys: int) -> int:
        """Seed of the per-step stream ``(config.seed, step, rank, *keys)``."""
        step, rank, _ = self._clock()
        seed = self.config.seed
        for value in (step, rank, *keys):
            seed = (seed * 1_000_003 + int(value) + 1) % (2**63 - 1)
        return seed

    @contextlib.contextmanager
    def rng(self, *keys: int) -> Iterator[None]:
        """Seed the global RNG from ``(config.seed, step, rank, *keys)`` for the block.

        Noise and flow-matching time drawn inside depend on the step, not on history, so a run resumed from
        any checkpoint draws exactly what the uninterrupted run drew.
        """
        device = next(self.model.parameters(), torch.empty(0)).device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._seed(*keys))
            yield

    # ------------------------------------------------------------------ optimisation and monitoring
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters split by role, each named with its own lr: expert, fusion, gates, vlm."""
        from apt_lightning.optim import param_groups

        return param_groups(self)

    def configure_optimizers(
        self, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **optimizer_kwargs: Any
    ) -> dict[str, Any]:
        """``optimizer_cls`` over :meth:`param_groups` and a stage-aware learning-rate schedule, in Lightning's
        ``configure_optimizers`` format (``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., ...}}``).

        The optimizer advances :attr:`step` after every ``optimizer.step()``, and refuses to step when it has
        taken a different number of steps than the weights (a resume that forgot the optimizer's state). The
        schedule reads :attr:`step` too and is applied at every optimizer step, so calling ``scheduler.step()``
        is harmless but not needed.
        """
        from apt_lightning.optim import configure_apt_optimizers

        return configure_apt_optimizers(self, optimizer_cls, **optimizer_kwargs)

    def gate_values(self) -> dict[str, dict[str, float]]:
        """``tanh`` of every gate, per site."""
        return {name: site.apt_fusion.gate_values() for name, site in self._sites.items()}

    # ------------------------------------------------------------------ state and files
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python resumable state: the plan, the step, whether this run is a fine-tune, and the configuration
        the weights need (fusion and VLM mode), so that it only loads into a model built the same way. The weights
        live in the model's own ``state_dict`` (or :meth:`save_pretrained`'s files)."""
        return StateRecord.of(self).to_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the plan and step and build the structure they need: the one load path (Lightning checkpoints,
        plain loops and :meth:`load_pretrained` all come through here).

        Call it before the model's own ``load_state_dict``, whose fusion (and LoRA) weights need the modules to
        exist. One rule for plans: an unprepared model takes the saved plan; a prepared one must hold the plan the
        state was saved under (a run resumes under its own plan). Everything is checked before anything changes.

        Raises:
            ConfigError: the state is malformed, or was saved from a model configured differently (fusion
                geometry, VLM mode), named field by field.
            StageMismatchError: the state was saved under another plan than the one this model runs, or it is a
                pretraining state given to a fine-tune.
        """
        record = read_record(state_dict)
        mismatches = configuration_mismatches(record, self)
        if mismatches:
            raise ConfigError(
                f"This APT state was saved from a model configured differently from {type(self.model).__name__}: "
                + "; ".join(mismatches)
                + ". Equal tensor shapes do not make it the same model: build the model with the configuration the "
                "state was saved with (or load it into a fresh model of that configuration)."
            )
        if record.plan is None:  # a record without a plan (never prepared): only the step
            self._step = record.step
            return
        if self._plan is not None:
            if self._finetune and not record.finetune and self._step == 0:
                self._undo_finetune()  # the fit's setup started it: the refusal leaves the model as it was given
                raise StageMismatchError(
                    f"This fit fine-tunes from step 0, but the state being restored is the pretraining run's "
                    f"({record.plan.name!r} plan, step {record.step}), not a fine-tune's: resuming it would continue "
                    "the pretraining. To fine-tune those weights, load them (`load_from_checkpoint`, `load_policy`, "
                    "`model.apt.load_pretrained`) and fit without `ckpt_path`; to continue the pretraining, drop "
                    "`finetune=True`."
                )
            check_resume(record.plan, self._plan, record.step)
        self._build(record.plan)
        self._finetune = record.finetune
        self._set_step(record.step)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write APT's files for this model to ``directory`` (peft's layout): ``apt_config.json`` (plan, step, fusion
        configuration, sites, VLM mode, and a digest of the base VLM) and ``apt_model.safetensors`` (every weight the
        plan trains: the expert, fusion blocks and gates, and the VLM's LoRA adapters or the VLM itself when it
        trains), verified by a content hash and written atomically.

        Returns:
            the directory.
        """
        from apt_lightning.pretrained import save_pretrained

        return save_pretrained(self, directory)

    def load_pretrained(self, directory: str | Path, verify_base: bool = True) -> None:
        """Load :meth:`save_pretrained`'s files into this model, built fresh by your own code (with its pretrained
        VLM): the structure is rebuilt from the stored configuration through :meth:`load_state_dict`, and every
        weight is checked (keys, shapes, content hash, fusion geometry) before any is copied.

        Args:
            directory: what :meth:`save_pretrained` wrote.
            verify_base: compare the digest of this model's VLM weights that stay frozen with the one recorded
                (a different base VLM gives other actions with the same adapter weights).

        Raises:
            ExportError: missing, corrupt or modified files, or weights that do not fit this model.
            ConfigError: the stored configuration differs from this model's declaration (named field by field).
            StageMismatchError: this model is prepared under another plan.
        """
        from apt_lightning.pretrained import load_pretrained

        load_pretrained(self, directory, verify_base=verify_base)

    def _restore_structure_for(self, keys: Sequence[str]) -> None:
        """Build fusion and LoRA modules for state-dict ``keys`` of a file written without an APT record (older
        checkpoints), so their weights have somewhere to load."""
        if any(is_fusion_key(k) for k in keys) and not self._sites:
            inject_fusion(self.model, self._resolved_fusion, forbidden_prefix=self.vlm)
            self._sites = dict(fusion_sites(self.model))
        vlm_prefix = self.vlm + "."
        if any(k.startswith(vlm_prefix) and ".lora_" in k for k in keys) and not has_lora(self.vlm_module):
            inject_vlm_lora(self.vlm_module, self.config)


def _check_step(step: Any, name: str = "step") -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ConfigError(f"`{name}` must be an int >= 0 (a count of optimizer steps), got {step!r}.")
    return int(step)


def _rank() -> int:
    """This process's rank in an initialised default process group, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _finetune_problem(trained: StagePlan, step: int, plan: StagePlan) -> str | None:
    """How fine-tuning weights trained under ``trained`` to ``step`` under ``plan`` would change step 0, or None."""
    if trained.is_joint and not plan.is_joint:
        return f"jointly (no APT: the instruction reached the expert through the prefix) to step {step}"
    if not trained.is_joint and plan.is_joint:
        return f"with APT ({trained.name}: the prefix hid the instruction) to step {step}"
    if not trained.is_joint and trained.stage_at(step - 1) == 2 and plan.first_stage == 1:
        return (
            f"into Stage 2 ({trained.name}, step {step}: its gates are open), and a plan that starts in Stage 1 "
            "closes them"
        )
    return None


def _matching_plan_hint(trained: StagePlan, step: int) -> str:
    if trained.is_joint:
        return "stage='joint'"
    return "stage=2" if trained.stage_at(step - 1) == 2 else "stage=1 or stage=2"


def reading_is_free(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host costs no device synchronisation (it lives on the CPU)."""
    return tensor.device.type == "cpu"
