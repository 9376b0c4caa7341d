"""LeRobot processor steps that give APT's policy types the instruction mask, saved and reloaded with the pipeline.

APT hides the instruction's tokens, and only those, from everything Stage 1 reads. LeRobot's pre-processors tokenize
a prompt that may hold more than the instruction (PI05: ``"Task: <task>, State: <bins>;\\nAction: "``), so the
pipelines of the ``*_apt`` policy types replace two steps of LeRobot's own pipelines by subclasses:

* :class:`APTTokenizerProcessorStep` (``"apt_tokenizer_processor"``): LeRobot's ``TokenizerProcessorStep``, plus
  ``observation.language.instruction_mask`` (True on the instruction's tokens, from the tokenizer's character
  offsets) and a :class:`~apt_lightning.integrations.lerobot.PromptTruncationError` when ``max_length`` cuts the
  prompt's visible part;
* :class:`APTPi05PromptStep` (``"apt_pi05_prepare_state_tokenizer_processor_step"``): PI05's prompt step, which
  first keeps the raw task under ``apt_instruction`` so the mask can find it inside the prompt.

Both are registered in LeRobot's ``ProcessorStepRegistry`` when this module is imported (the ``lerobot_policy_apt``
plugin imports it), so ``make_pre_post_processors(cfg, pretrained_path=...)`` rebuilds them from the saved JSON.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from apt_lightning.errors import ContractError
from apt_lightning.integrations.lerobot._compat import require_lerobot
from apt_lightning.integrations.lerobot.base import INSTRUCTION_MASK
from apt_lightning.integrations.lerobot.data import instruction_token_mask

require_lerobot()

from lerobot.configs import PipelineFeatureType, PolicyFeature  # noqa: E402
from lerobot.configs.types import FeatureType  # noqa: E402
from lerobot.lerobot_types import EnvTransition, TransitionKey  # noqa: E402
from lerobot.policies.pi05.processor_pi05 import Pi05PrepareStateTokenizerProcessorStep  # noqa: E402
from lerobot.processor import ProcessorStepRegistry, TokenizerProcessorStep  # noqa: E402

__all__ = ["INSTRUCTION_KEY", "APTPi05PromptStep", "APTTokenizerProcessorStep", "apt_processor_steps"]

INSTRUCTION_KEY = "apt_instruction"
"""Complementary-data key of the raw task, kept by :class:`APTPi05PromptStep` before PI05 rewrites ``task``."""


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


@ProcessorStepRegistry.register(name="apt_tokenizer_processor")
@dataclass
class APTTokenizerProcessorStep(TokenizerProcessorStep):
    """LeRobot's tokenizer step, adding ``observation.language.instruction_mask`` ((B, L) bool) beside the tokens.

    The instruction is ``complementary_data["apt_instruction"]`` when an earlier step kept it (PI05), else the task
    itself (PI0 and SmolVLA prompts are the task and a newline).

    Raises:
        PromptTruncationError: ``max_length`` cuts the prompt outside its instruction.
        LanguageMaskError: the prompt does not contain its instruction, or the tokenizer is not a "fast" one.
    """

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        tokenized = super().observation(observation)
        prompts = _as_list(self.get_task(self.transition))
        kept = (self.transition.get(TransitionKey.COMPLEMENTARY_DATA) or {}).get(INSTRUCTION_KEY)
        instructions = prompts if kept is None else _as_list(kept)
        tokens = tokenized["observation.language.tokens"]
        mask = instruction_token_mask(
            self.input_tokenizer, prompts, instructions, self.max_length, padding=self.padding
        )
        if mask.shape != tokens.shape:  # the same tokenizer call as LeRobot's step, so never; checked, not assumed
            raise ContractError(f"instruction mask {tuple(mask.shape)} vs tokens {tuple(tokens.shape)}")
        tokenized[INSTRUCTION_MASK] = mask.to(tokens.device)
        return tokenized

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        features = super().transform_features(features)
        features[PipelineFeatureType.OBSERVATION].setdefault(
            INSTRUCTION_MASK, PolicyFeature(type=FeatureType.LANGUAGE, shape=(self.max_length,))
        )
        return features


@ProcessorStepRegistry.register(name="apt_pi05_prepare_state_tokenizer_processor_step")
@dataclass
class APTPi05PromptStep(Pi05PrepareStateTokenizerProcessorStep):
    """PI05's prompt step (state discretised into the prompt), keeping the raw task under ``apt_instruction``."""

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        tasks = (transition.get(TransitionKey.COMPLEMENTARY_DATA) or {}).get(self.task_key)
        transition = super().__call__(transition)
        if tasks is not None:
            transition[TransitionKey.COMPLEMENTARY_DATA][INSTRUCTION_KEY] = _as_list(tasks)
        return transition


@contextlib.contextmanager
def _swapped(module: Any, replacements: dict[str, Callable[..., Any]]) -> Iterator[None]:
    real = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in real.items():
            setattr(module, name, value)


def apt_processor_steps(lerobot_type: str, tokenizer_name: str | None) -> contextlib.AbstractContextManager:
    """While the block runs, LeRobot's ``processor_<lerobot_type>`` module builds its pipelines with APT's steps
    (and the tokenizer from ``tokenizer_name`` when given: a local directory works offline)."""
    module = importlib.import_module(f"lerobot.policies.{lerobot_type}.processor_{lerobot_type}")

    def tokenizer_step(*args: Any, **kwargs: Any) -> APTTokenizerProcessorStep:
        if tokenizer_name is not None:
            kwargs["tokenizer_name"] = tokenizer_name
        return APTTokenizerProcessorStep(*args, **kwargs)

    replacements: dict[str, Callable[..., Any]] = {"TokenizerProcessorStep": tokenizer_step}
    if lerobot_type == "pi05":
        replacements["Pi05PrepareStateTokenizerProcessorStep"] = APTPi05PromptStep
    return _swapped(module, replacements)
