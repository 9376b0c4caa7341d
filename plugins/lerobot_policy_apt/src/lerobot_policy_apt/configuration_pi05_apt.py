"""``pi05_apt``: LeRobot's ``pi05`` config with APT's options (``--policy.apt_*``)."""

from dataclasses import dataclass

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi05.configuration_pi05 import PI05Config

from apt_lightning.integrations.lerobot.policy import APTPolicyOptions


@PreTrainedConfig.register_subclass("pi05_apt")
@dataclass
class PI05APTConfig(APTPolicyOptions, PI05Config):
    """LeRobot's ``PI05Config`` plus :class:`~apt_lightning.integrations.lerobot.policy.APTPolicyOptions`."""

    lerobot_type = "pi05"
