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

The stage has one rule, the :class:`~apt_lightning.StagePlan` applied to the global step the weights reached,
and one place where it changes, :meth:`APT.set_step`. A plain PyTorch loop calls ``apt.prepare(plan)`` once and
``apt.set_step(step)`` before each step; :class:`~apt_lightning.APTStageScheduler` does the same for Lightning.
Its resumable state (plan and step) is :meth:`APT.state_dict`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

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
from apt_lightning.schedule import JOINT, Stage, StagePlan, check_resume, saved_plan_and_step
from apt_lightning.structure import fusion_sites, is_fusion_key, language_gates

if TYPE_CHECKING:
    from apt_lightning.feature_cache import Stage1FeatureCache

T = TypeVar("T")

CHECKPOINT_KEY = "apt"
"""Key of APT's record (plan, step) in a Lightning checkpoint."""
STATE_VERSION = 3
_MASK_ROW_CHECKS = 16
"""Batches whose language masks are checked row by row on an accelerator (every batch on CPU, where it is free)."""

Counters = Callable[[], "tuple[int, int, int] | None"]
"""Returns ``(global_step, rank, micro_batch)`` from the training loop driving the model, or ``None`` outside it."""


class APT:
    """APT on one model: its plan and step, its fusion sites, and the helpers its forward calls.

    Args:
        model: the VLA (any ``nn.Module``). The controller is not a module: it adds no parameters of its own.
        vlm: dotted name of the VLM module (frozen in Stage 1, bit-identical after it).
        fusion: where gated fusion goes in the expert and how it is shaped. Give the VLM feature width as
            ``context_dim`` unless the VLM carries a transformers config (then it is read from
            ``config.text_config.hidden_size`` or ``config.hidden_size``).
        config: VLM mode, learning rates, language dropout and the seed of APT's random streams.
        counters: where the per-step random streams read ``(global_step, rank, micro_batch)`` from; ``None``
            uses :attr:`step`, :attr:`rank` and :attr:`micro_batch` (a plain loop sets them through
            :meth:`set_step`). :class:`~apt_lightning.APTMixin` passes the Trainer's.

    A fresh controller is *unprepared*: it has no stage until :meth:`prepare` gives it a plan, and its forward
    helpers raise :class:`~apt_lightning.NotPreparedError` instead of guessing one.

    Example::

        >>> from apt_lightning import APT, FusionConfig, StagePlan
        >>> model = nn.ModuleDict({"vlm": nn.Linear(4, 4), "expert": nn.Sequential(nn.Linear(8, 8))})
        >>> apt = APT(model, vlm="vlm", fusion=FusionConfig(target_modules=["expert.0"], context_dim=4, num_heads=2))
        >>> apt.prepare(StagePlan(first_stage=1, switch_step=10))
        >>> apt.stage, list(apt.sites)
        (1, ['expert.0'])
        >>> apt.set_step(10); apt.stage
        2
    """

    def __init__(
        self,
        model: nn.Module,
        vlm: str,
        fusion: FusionConfig,
        config: APTConfig | None = None,
        counters: Counters | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ContractError(f"APT(model=...) must be an nn.Module, got {type(model).__name__}.")
        self.model = model
        self.vlm = vlm
        self.fusion = fusion
        self.config = config if config is not None else APTConfig()
        self.counters = counters
        self.rank = 0
        self.micro_batch = 0
        self._plan: StagePlan | None = None
        self._step = 0
        self._sites: dict[str, GatedFusionLayer] = {}
        self._feature_cache: Stage1FeatureCache | None = None
        self._mask_rows_checked = 0
        self._contexts_seen = False
        problems = self.declaration_problems()
        if problems:
            raise ContractError(f"APT(...) on {type(model).__name__}:\n- " + "\n- ".join(problems))

    def __repr__(self) -> str:
        stage = self.stage if self.is_prepared else "unprepared"
        return f"APT(vlm={self.vlm!r}, plan={self._plan and self._plan.name!r}, step={self._step}, stage={stage})"

    # ------------------------------------------------------------------ contract
    def declaration_problems(self) -> list[str]:
        """Problems with ``vlm``, ``fusion`` and ``config`` (empty when they are usable)."""
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
        problems = self.declaration_problems()
        target_problem = False
        if not problems:
            fusion = self.resolved_fusion
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
    def resolved_fusion(self) -> FusionConfig:
        """``fusion`` with ``context_dim`` read from the VLM's transformers config when unset (left ``None``
        if there is none: :meth:`validate` then asks for it)."""
        if self.fusion.context_dim is not None:
            return self.fusion
        vlm_config = getattr(self.vlm_module, "config", None)
        text_config = getattr(vlm_config, "text_config", None) or vlm_config
        width = getattr(text_config, "hidden_size", None)
        return dataclasses.replace(self.fusion, context_dim=width) if isinstance(width, int) else self.fusion

    # ------------------------------------------------------------------ structure and stage
    @property
    def vlm_module(self) -> nn.Module:
        return self.model.get_submodule(self.vlm)

    @property
    def is_prepared(self) -> bool:
        """Whether :meth:`prepare` gave the model a plan (and with it a stage)."""
        return self._plan is not None

    @property
    def plan(self) -> StagePlan:
        if self._plan is None:
            raise NotPreparedError(
                f"{type(self.model).__name__} has no APT stage plan yet: add `APTStageScheduler(...)` to the "
                "Trainer's callbacks, load a trained model with `load_from_checkpoint`, or (plain loops, inference "
                "scripts, notebooks) call `model.apt.prepare(StagePlan(first_stage=1, switch_step=N), step=...)`."
            )
        return self._plan

    @property
    def step(self) -> int:
        """Global step the weights have reached; with the plan it decides :attr:`stage`."""
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
    def vlm_frozen(self) -> bool:
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

        Raises:
            ContractError: every problem with the declarations, fusion targets and widths, at once.
        """
        if not isinstance(plan, StagePlan):
            raise TypeError(f"`plan` must be a StagePlan, got {type(plan).__name__}.")
        self.validate()
        self._sites = dict(fusion_sites(self.model))
        if plan.is_joint and self._sites:
            raise ContractError(
                f"{type(self.model).__name__} already holds APT fusion blocks, but the plan is the joint baseline, "
                "which has none. Build a fresh model for the baseline (or call `unload_fusion(model)` first)."
            )
        if not plan.is_joint:
            inject_fusion(self.model, self.resolved_fusion, forbidden_prefix=self.vlm)
            self._sites = dict(fusion_sites(self.model))
        vlm = self.vlm_module
        if self.config.vlm_mode == "lora" and plan.trains_vlm:
            inject_vlm_lora(vlm, self.config)
        else:
            vlm.requires_grad_(self.config.vlm_mode == "full" and plan.trains_vlm)
        for site in self._sites.values():
            site.apt_fusion.requires_grad_(plan.has_stage2)
        self._plan = plan
        self.set_step(self._step if step is None else step)

    def start_finetune(self, plan: StagePlan, warm_start: bool = False) -> None:
        """Fine-tune the weights the model holds under ``plan``, from step 0 (a new run on new data).

        What the model computes is kept exactly at step 0 when the plans share their prefix: a Stage-2 model
        keeps its fusion blocks and gates, a Stage-1 model gets fusion blocks at closed gates, a joint model
        fine-tunes jointly. A model trained jointly (its expert read the instruction through the prefix) under
        an APT plan, or an APT model under the joint plan, would compute something else from step 0: that is
        refused unless ``warm_start=True`` says the weights are only a starting point. A model APT never
        prepared (e.g. a public base checkpoint) is taken as it is.

        Raises:
            StageMismatchError: the plans see the instruction differently and ``warm_start`` is False.
        """
        trained = self._plan if self._plan is not None and self._step > 0 else None
        if trained is not None and trained.is_joint != plan.is_joint and not warm_start:
            was = (
                "jointly (no APT: the instruction reached the expert through the prefix)"
                if trained.is_joint
                else (f"with APT ({trained.name}: the prefix hid the instruction)")
            )
            raise StageMismatchError(
                f"This model was trained {was} to step {self._step}; fine-tuning it under the {plan.name!r} plan "
                "changes what it computes from step 0, since the two see the instruction differently. Fine-tune it "
                f"under its own kind of plan ({'stage=' + repr('joint') if trained.is_joint else 'stage=2'}), or pass "
                "`warm_start=True` (APTStageScheduler(..., finetune=True, warm_start=True)) to use its weights as a "
                "starting point only."
            )
        self.prepare(plan, step=0)

    def set_step(self, step: int, micro_batch: int | None = None) -> None:
        """The one place the stage changes: record that the weights reached global step ``step`` and activate
        the stage the plan gives it (fusion sites on in Stage 2 only, a frozen VLM in eval mode).

        ``micro_batch`` (index of the batch within the step's gradient accumulation, or within the epoch as
        Lightning counts it) keys the per-step random streams of a plain loop; Lightning's is read from the
        Trainer.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"`step` must be a global step (int >= 0), got {step!r}.")
        self._step = int(step)
        if micro_batch is not None:
            self.micro_batch = int(micro_batch)
        stage = self.stage
        for site in self._sites.values():
            site.active = stage == 2
        if self.vlm_frozen:
            self.vlm_module.eval()
        elif self.model.training:
            self.vlm_module.train()

    def after_train_mode(self, mode: bool) -> None:
        """Call after ``model.train(mode)``: a frozen VLM goes back to eval mode (the mixin does it for you)."""
        if mode and self.vlm_frozen:
            self.vlm_module.eval()

    # ------------------------------------------------------------------ helpers for forward
    def masks(self, attention_mask: torch.Tensor, language_mask: torch.Tensor, causal: bool = False) -> PrefixMasks:
        """Language-blind prefix masks for both stages (see :func:`~apt_lightning.language_blind_masks`).

        The same masks serve Stage 1 and Stage 2, which is what makes the switch exact: non-language tokens
        never see the instruction, and Stage 2 adds language only through the gated fusion context. In the
        joint baseline they hide nothing (``language`` still marks the instruction); with
        ``APTConfig(joint_prefix="blind")`` the joint prefix is language-blind while the expert sees language.
        """
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
        """``torch.no_grad()`` while the VLM is frozen, so it builds no graph and can receive no gradient."""
        self.plan  # noqa: B018 -- unprepared: no stage to decide this, NotPreparedError
        return torch.no_grad() if self.vlm_frozen else contextlib.nullcontext()

    def attach_feature_cache(self, cache: Stage1FeatureCache | None) -> None:
        """Serve :meth:`cached_vlm` from ``cache`` (``None`` detaches): :class:`Stage1FeatureCache` calls it."""
        self._feature_cache = cache

    @property
    def feature_cache(self) -> Stage1FeatureCache | None:
        return self._feature_cache

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
        keep = self.language_keep(contexts[0][0].shape[0], contexts[0][0].device) if contexts else None
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
        keep = self.language_keep(mask.shape[0], mask.device)
        if keep is not None:
            mask = mask & keep[:, None]
        return guide.prior_rows_blind(mask) if guide is not None else mask

    def language_keep(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """(B,) bool, False on the samples whose instruction language dropout hides this training step; ``None``
        when nothing is hidden (no dropout, or evaluation)."""
        p = self.config.language_dropout
        if p <= 0.0 or not self.model.training:
            return None
        micro_batch = self._counters()[2]
        generator = torch.Generator().manual_seed(self.seed(micro_batch, 0x4C44))  # own stream: no global RNG
        return (torch.rand(batch_size, generator=generator) >= p).to(device)

    def _counters(self) -> tuple[int, int, int]:
        counted = self.counters() if self.counters is not None else None
        return counted if counted is not None else (self._step, self.rank, self.micro_batch)

    def seed(self, *keys: int) -> int:
        """Seed of the per-step stream ``(config.seed, global_step, rank, *keys)``."""
        step, rank, _ = self._counters()
        seed = self.config.seed
        for value in (step, rank, *keys):
            seed = (seed * 1_000_003 + int(value) + 1) % (2**63 - 1)
        return seed

    @contextlib.contextmanager
    def rng(self, *keys: int) -> Iterator[None]:
        """Seed the global RNG from ``(config.seed, global_step, rank, *keys)`` for the block.

        Noise and flow-matching time drawn inside depend on the step, not on history, so a run resumed from
        any checkpoint draws exactly what the uninterrupted run drew.
        """
        device = next(self.model.parameters(), torch.empty(0)).device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed(*keys))
            yield

    # ------------------------------------------------------------------ optimisation and monitoring
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters split by role, each named with its own lr: expert, fusion, gates, vlm."""
        from apt_lightning.optim import param_groups

        return param_groups(self)

    def configure_optimizers(
        self, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **optimizer_kwargs: Any
    ) -> dict[str, Any]:
        """``optimizer_cls`` over :meth:`param_groups` and a per-group, stage-aware ``LambdaLR`` to step once
        per optimizer step; Lightning's ``configure_optimizers`` output format."""
        from apt_lightning.optim import configure_apt_optimizers

        return configure_apt_optimizers(self, optimizer_cls, **optimizer_kwargs)

    def gate_values(self) -> dict[str, dict[str, float]]:
        """``tanh`` of every gate, per site."""
        return {name: site.apt_fusion.gate_values() for name, site in self._sites.items()}

    def fully_shard(self, units: str | list[str] | None = None, **fully_shard_kwargs: Any) -> list[str]:
        """Shard the model with FSDP2 (see :func:`~apt_lightning.fully_shard_apt`); returns the units' names."""
        from apt_lightning.sharding import fully_shard_apt

        return fully_shard_apt(self.model, units, **fully_shard_kwargs)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python resumable state: the plan and the step (the weights live in the model's own)."""
        plan = self._plan.to_dict() if self._plan is not None else None
        stage = int(self._plan.stage_at(self._step)) if self._plan is not None else None
        return {"plan": plan, "step": self._step, "stage": stage, "version": STATE_VERSION}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the plan and step and build the structure they need. Call it before the model's own
        ``load_state_dict``, whose fusion (and LoRA) weights need the modules to exist."""
        plan, step = saved_plan_and_step(state_dict)
        if plan is None:
            self._step = step
            return
        self.prepare(plan, step=step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the plan and the step in a Lightning checkpoint (the step is its ``global_step``, the optimizer
        steps its weights hold)."""
        if self._plan is None:
            return
        step = int(checkpoint.get("global_step", self._step))
        checkpoint[CHECKPOINT_KEY] = {
            "plan": self._plan.to_dict(),
            "step": step,
            "stage": int(self._plan.stage_at(step)),
            "version": STATE_VERSION,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the saved structure before weights load, restore the saved step, and check the saved plan
        against this run's.

        Unprepared (``load_from_checkpoint``), the model takes the checkpoint's plan: a Stage-2 checkpoint
        evaluates with its gates open, a joint baseline with its ordinary masks. Prepared (a resumed fit), the
        plan must be the one the checkpoint was trained under.

        Raises:
            StageMismatchError: the checkpoint was trained under another plan; the message says how to resume.
        """
        saved_plan, saved_step = saved_plan_and_step(checkpoint.get(CHECKPOINT_KEY) or {})
        keys = checkpoint.get("state_dict", {})
        if self._plan is not None and saved_plan is not None:
            check_resume(saved_plan, self._plan, int(checkpoint.get("global_step", saved_step)))
        if self._plan is None and saved_plan is not None:
            self.prepare(saved_plan, step=saved_step)
        else:
            if any(is_fusion_key(k) for k in keys) and not self._sites:
                inject_fusion(self.model, self.resolved_fusion, forbidden_prefix=self.vlm)
                self._sites = dict(fusion_sites(self.model))
            if self._plan is not None:
                self.set_step(saved_step)
        vlm_prefix = self.vlm + "."
        if any(k.startswith(vlm_prefix) and ".lora_" in k for k in keys) and not has_lora(self.vlm_module):
            inject_vlm_lora(self.vlm_module, self.config)


def reading_is_free(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host costs no device synchronisation (it lives on the CPU)."""
    return tensor.device.type == "cpu"
