"""``pi0_apt``: LeRobot's ``pi0`` config with APT's options (``--policy.apt_*``)."""

from dataclasses import dataclass

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0.configuration_pi0 import PI0Config

from apt_lightning.integrations.lerobot.policy import APTPolicyOptions


@PreTrainedConfig.register_subclass("pi0_apt")
@dataclass
class PI0APTConfig(APTPolicyOptions, PI0Config):
    """LeRobot's ``PI0Config`` plus :class:`~apt_lightning.integrations.lerobot.policy.APTPolicyOptions`."""

    lerobot_type = "pi0"
