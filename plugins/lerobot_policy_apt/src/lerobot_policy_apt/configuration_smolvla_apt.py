"""``smolvla_apt``: LeRobot's ``smolvla`` config with APT's options (``--policy.apt_*``)."""

from dataclasses import dataclass

from lerobot.configs import PreTrainedConfig
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

from apt_lightning.integrations.lerobot.policy import APTPolicyOptions


@PreTrainedConfig.register_subclass("smolvla_apt")
@dataclass
class SmolVLAAPTConfig(APTPolicyOptions, SmolVLAConfig):
    """LeRobot's ``SmolVLAConfig`` plus :class:`~apt_lightning.integrations.lerobot.policy.APTPolicyOptions`."""

    lerobot_type = "smolvla"
