"""``smolvla_apt``: LeRobot's ``smolvla`` config with APT's options (``--policy.apt_*``)."""

import warnings
from dataclasses import dataclass

from lerobot.configs import PreTrainedConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from apt_lightning.integrations.lerobot.policy import APTPolicyOptions


@PreTrainedConfig.register_subclass("smolvla_apt")
@dataclass
class SmolVLAAPTConfig(APTPolicyOptions, SmolVLAConfig):
    """LeRobot's ``SmolVLAConfig`` plus :class:`~apt_lightning.integrations.lerobot.policy.APTPolicyOptions`."""

    lerobot_type = "smolvla"

    pad_language_to: str = "max_length"
    """APT pads every prompt to ``tokenizer_max_length`` (LeRobot's default pads to the batch's longest): with a
    fixed length every Stage-1 attention sum runs over the same slots whatever the instruction, so Stage-1 actions
    are bit-identical across instructions, not only close."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pad_language_to != "max_length":
            warnings.warn(
                f"`pad_language_to`={self.pad_language_to!r}: prompts padded to each batch's longest make Stage-1 "
                "actions depend on the batch's longest instruction in the last bits of float arithmetic. Use "
                "'max_length' for bit-identical Stage-1 actions.",
                UserWarning,
                stacklevel=3,
            )
