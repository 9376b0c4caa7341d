"""APT (Action expert PreTraining) as LeRobot policy types, found by LeRobot's plugin discovery.

Installed, this distribution registers ``pi0_apt``, ``pi05_apt`` and ``smolvla_apt`` with LeRobot (its scripts
import every installed ``lerobot_policy_*`` distribution), so ``lerobot-train --policy.type=smolvla_apt
--policy.apt_switch_step=N ...``, ``lerobot-eval --policy.path=<checkpoint>`` and ``PreTrainedPolicy`` loading
work without APT code. The options are :class:`apt_lightning.integrations.lerobot.policy.APTPolicyOptions`.
"""

from apt_lightning.integrations.lerobot import processors as _processors  # registers APT's processor steps
from lerobot_policy_apt.configuration_pi0_apt import PI0APTConfig
from lerobot_policy_apt.configuration_pi05_apt import PI05APTConfig
from lerobot_policy_apt.configuration_smolvla_apt import SmolVLAAPTConfig

__all__ = ["PI0APTConfig", "PI05APTConfig", "SmolVLAAPTConfig"]
del _processors
