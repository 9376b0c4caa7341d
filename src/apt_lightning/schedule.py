"""Which stage runs at which global step, and the per-group learning-rate factors that follow from it.

Stages are ``1`` (vision-action prior: VLM frozen, language masked) and ``2`` (language through the gated
fusion). :data:`JOINT` (``0``) is the ordinary single-stage training APT replaces: the expert sees the
instruction from step 0 through the model's own attention and the VLM trains as ``vlm_mode`` says. It exists
so a baseline runs through exactly the same code, data and optimiser groups as APT.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal

from apt_lightning.errors import ConfigError, StageMismatchError

Stage = Literal[0, 1, 2]
JOINT: Stage = 0
"""The baseline "stage": ordinary joint training, no APT masking, no fusion blocks."""
_STAGES: dict[int, Stage] = {JOINT: JOINT, 1: 1, 2: 2}
GROUP_STAGES: dict[str, tuple[int, ...]] = {"expert": (0, 1, 2), "fusion": (2,), "gates": (2,), "vlm": (0, 2)}


def parse_stage(value: Any, name: str = "stage") -> Stage:
    """The one check of a stage value: 1, 2, or ``"joint"``/``0`` for the baseline; never a bool.

    Example::

        >>> parse_stage("joint"), parse_stage(2)
        (0, 2)
    """
    if isinstance(value, str) and value == "joint":
        return JOINT
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in (JOINT, 1, 2):
        hint = ""
        if isinstance(value, bool):
            hint = " (a bool is ambiguous: write stage='joint' for the baseline)"
        elif isinstance(value, (float, str)):
            hint = f" (a {type(value).__name__} is not a stage: write the int {name}=1 or {name}=2)"
        raise ConfigError(f"`{name}` must be 1, 2 or 'joint' (0), got {value!r}{hint}.")
    return _STAGES[int(value)]


@dataclass(frozen=True)
class StagePlan:
    """The stages one ``Trainer.fit`` runs.

    Args:
        first_stage: stage at global step 0 of this plan: 1, 2, or :data:`JOINT` (0) for the ordinary
            single-stage baseline.
        switch_step: global step at which Stage 2 starts (``first_stage=1`` only); ``None`` for a fit that
            stays in ``first_stage`` (the two-fit workflow).

    Example::

        >>> plan = StagePlan(first_stage=1, switch_step=100)
        >>> plan.stage_at(99), plan.stage_at(100), plan.name
        (1, 2, 'stage1->stage2')
        >>> StagePlan(first_stage=JOINT).name
        'joint'
    """

    first_stage: Stage = 1
    switch_step: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "first_stage", parse_stage(self.first_stage, "first_stage"))
        if self.switch_step is not None:
            if self.first_stage != 1:
                raise ConfigError("`switch_step` only applies to a plan that starts in Stage 1.")
            if isinstance(self.switch_step, bool) or not isinstance(self.switch_step, int) or self.switch_step < 0:
                raise ConfigError(f"`switch_step` must be an int >= 0, got {self.switch_step!r}.")

    @property
    def name(self) -> str:
        if self.switch_step is not None:
            return "stage1->stage2"
        return "joint" if self.is_joint else f"stage{self.first_stage}"

    @property
    def is_joint(self) -> bool:
        """The ordinary single-stage baseline (no APT)."""
        return self.first_stage == JOINT

    @property
    def trains_vlm(self) -> bool:
        """Whether any step of the plan may train the VLM (Stage 2 or joint, as ``vlm_mode`` allows)."""
        return self.has_stage2 or self.is_joint

    @property
    def has_stage2(self) -> bool:
        return self.first_stage == 2 or self.switch_step is not None

    def stage_at(self, global_step: int) -> Stage:
        if self.switch_step is not None and global_step >= self.switch_step:
            return 2
        return self.first_stage

    def stage_start(self, stage: Stage) -> int:
        """Global step at which ``stage`` starts in this plan."""
        if stage == 2 and self.switch_step is not None:
            return self.switch_step
        return 0

    def to_dict(self) -> dict[str, int | None]:
        return {"first_stage": self.first_stage, "switch_step": self.switch_step}


class StageLRFactor:
    """Learning-rate factor of one parameter group as a function of APT's step: 0 outside the group's stages,
    linear warm-up from the start of each stage in which it trains, 1 afterwards. Holds plain ints only.

    Example::

        >>> factor = StageLRFactor(StagePlan(first_stage=1, switch_step=4), "gates", warmup_steps=2)
        >>> [factor(step) for step in range(3, 7)]
        [0.0, 0.5, 1.0, 1.0]
    """

    def __init__(self, plan: StagePlan, group: str, warmup_steps: int) -> None:
        if group not in GROUP_STAGES:
            raise ConfigError(f"Unknown parameter group {group!r}; expected one of {sorted(GROUP_STAGES)}.")
        self.first_stage, self.switch_step = plan.first_stage, plan.switch_step
        self.group, self.warmup_steps = group, warmup_steps

    def __call__(self, step: int) -> float:
        plan = StagePlan(self.first_stage, self.switch_step)
        stage = plan.stage_at(step)
        if stage not in GROUP_STAGES[self.group]:
            return 0.0
        if self.warmup_steps <= 0:
            return 1.0
        since = step - plan.stage_start(stage)
        return min(1.0, (since + 1) / self.warmup_steps)


def check_resume(saved: StagePlan, plan: StagePlan, step: int) -> None:
    """Raise :class:`StageMismatchError` unless a checkpoint trained under ``saved`` to ``step`` may resume
    under ``plan``."""
    if saved == plan:
        return
    if saved.is_joint != plan.is_joint:
        was = "the joint baseline (no APT)" if saved.is_joint else f"APT ({saved.name})"
        raise StageMismatchError(
            f"This checkpoint was trained with {was}, but this fit runs the {plan.name!r} plan; their modules "
            "differ (the baseline has no fusion blocks). Resume with the checkpoint's own plan "
            "(APTStageScheduler(stage='joint') for the baseline), or start the other plan from a fresh model."
        )
    trained_stage2 = step > 0 and saved.stage_at(step - 1) == 2
    if trained_stage2 and not plan.has_stage2:
        raise StageMismatchError(
            f"This checkpoint (global step {step}) was trained in Stage 2 under plan {saved.name!r}, but this fit "
            f"runs the Stage-1-only plan {plan.name!r}. Resume with "
            f"APTStageScheduler(switch_at_step={saved.switch_step}) (or stage=2 to match the checkpoint's plan), "
            "or start Stage 1 from a fresh model."
        )
    if not trained_stage2 and plan.first_stage == 2:
        raise StageMismatchError(
            f"This checkpoint (global step {step}) holds Stage-1 training under plan {saved.name!r}, but this fit "
            "runs a Stage-2-only plan. To start Stage 2 from it, export the prior with `export_va_prior` and load "
            "it with `load_va_prior` into a fresh Stage-2 run; to continue this run, resume with the "
            f"checkpoint's own plan ({saved.to_dict()})."
        )
    raise StageMismatchError(
        f"The checkpoint was trained under stage plan {saved.to_dict()} but this fit uses {plan.to_dict()}. "
        "Resume with the same APTStageScheduler arguments; the learning-rate schedule and optimizer groups "
        "depend on them."
    )
