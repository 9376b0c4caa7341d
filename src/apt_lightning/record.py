"""APT's saved record: plan, step and the configuration the weights were trained with, as plain data.

One record serves every place APT's state is saved (a plain loop's ``apt.state_dict()``, a Lightning checkpoint's
``"apt"`` entry, ``apt_config.json`` beside :meth:`~apt_lightning.APT.save_pretrained`'s weights), and one reader
validates it, so every loader applies the same checks: a malformed record is a :class:`ConfigError` naming the
field, and a record saved from a model configured differently (2 fusion heads vs 4 have equal tensor shapes but
other outputs) is refused field by field.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from apt_lightning.errors import ConfigError
from apt_lightning.schedule import StagePlan, parse_stage

if TYPE_CHECKING:
    from apt_lightning.controller import APT

RECORD_VERSION = 4
"""4: adds ``finetune`` and ``configuration``; 3: plan, step and stage; 1: the stage only."""
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_target_modules")
"""APTConfig fields that shape the model (LoRA adapters); learning rates and seeds do not change what it computes."""


@dataclasses.dataclass(frozen=True)
class StateRecord:
    """What APT saves beside the weights.

    Args:
        plan: the stage plan the weights were trained under (``None``: never prepared).
        step: optimizer steps the weights have taken.
        finetune: whether the run is a fine-tune started by :meth:`~apt_lightning.APT.start_finetune`.
        configuration: the structure-defining configuration (VLM name, resolved fusion config, VLM mode, LoRA
            shape); ``None`` in records older than version 4, which are then not compared.
    """

    plan: StagePlan | None
    step: int
    finetune: bool = False
    configuration: dict[str, Any] | None = None

    @classmethod
    def of(cls, apt: APT, step: int | None = None) -> StateRecord:
        """The record of ``apt`` now (at ``step`` if given: a Lightning checkpoint records its ``global_step``)."""
        return cls(apt._plan, apt.step if step is None else step, apt._finetune, configuration_of(apt))

    def to_dict(self) -> dict[str, Any]:
        stage = int(self.plan.stage_at(self.step)) if self.plan is not None else None
        return {
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "step": self.step,
            "stage": stage,
            "finetune": self.finetune,
            "configuration": self.configuration,
            "version": RECORD_VERSION,
        }


def configuration_of(apt: APT) -> dict[str, Any]:
    """The structure-defining configuration of ``apt``'s model, as JSON-plain data."""
    fusion = dataclasses.asdict(apt._resolved_fusion)
    configuration: dict[str, Any] = {"vlm": apt.vlm, "vlm_mode": apt.config.vlm_mode, "fusion": fusion}
    if apt.config.vlm_mode == "lora":
        configuration["lora"] = {name: getattr(apt.config, name) for name in LORA_FIELDS}
    return json.loads(json.dumps(configuration, default=list))  # tuples become lists, as they read back


def read_record(saved: Any, source: str = "The APT state") -> StateRecord:
    """Validate and read a saved record (any version).

    Raises:
        ConfigError: naming the field that is missing or malformed, and what was found.
    """
    if not isinstance(saved, Mapping):
        raise ConfigError(f"{source} must be a dict (from `apt.state_dict()`), got {type(saved).__name__}.")
    version = saved.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= RECORD_VERSION:
        raise ConfigError(
            f"{source} has `version`={version!r}; this apt_lightning reads versions 1 to {RECORD_VERSION}. "
            "Upgrade apt_lightning to load a record written by a newer one."
        )
    step = saved.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ConfigError(f"{source} has `step`={step!r}; it must be an int >= 0 (optimizer steps taken).")
    plan = _read_plan(saved, source)
    finetune = saved.get("finetune", False)
    if not isinstance(finetune, bool):
        raise ConfigError(f"{source} has `finetune`={finetune!r}; it must be a bool.")
    configuration = saved.get("configuration")
    if configuration is not None and not isinstance(configuration, Mapping):
        raise ConfigError(f"{source} has `configuration`={configuration!r}; it must be a dict.")
    stage = saved.get("stage")
    if plan is not None and stage is not None and "plan" in saved and stage != plan.stage_at(int(step)):
        raise ConfigError(
            f"{source} is inconsistent: it records `stage`={stage!r}, but its plan {plan.to_dict()} gives stage "
            f"{plan.stage_at(int(step))} at step {step}. The record was edited or corrupted: restore it from a copy."
        )
    return StateRecord(plan, int(step), finetune, dict(configuration) if configuration is not None else None)


def _read_plan(saved: Mapping[str, Any], source: str) -> StagePlan | None:
    plan = saved.get("plan")
    if plan is not None:
        if not isinstance(plan, Mapping) or set(plan) - {"first_stage", "switch_step"}:
            raise ConfigError(
                f"{source} has `plan`={plan!r}; it must be a dict with `first_stage` and `switch_step` "
                "(StagePlan.to_dict())."
            )
        try:
            return StagePlan(**plan)
        except ConfigError as error:
            raise ConfigError(f"{source} holds an invalid plan: {error}") from error
    if saved.get("stage") is not None:
        return StagePlan(first_stage=parse_stage(saved["stage"]))
    return None


def configuration_mismatches(record: StateRecord, apt: APT) -> list[str]:
    """``"`field`: saved X, this model Y"`` for every structure-defining field that differs (none for records
    that predate the configuration)."""
    if record.configuration is None:
        return []
    current = configuration_of(apt)
    saved = dict(record.configuration)
    if record.plan is not None and record.plan.is_joint:  # the baseline has no fusion blocks: their config is moot
        saved.pop("fusion", None)
        current.pop("fusion", None)
    return [f"`{name}`: saved {old!r}, this model {new!r}" for name, old, new in _diff(saved, current, "")]


def _diff(saved: Any, current: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        found = []
        for key in sorted(set(saved) | set(current)):
            found += _diff(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
        return found
    return [] if saved == current else [(prefix, saved, current)]
