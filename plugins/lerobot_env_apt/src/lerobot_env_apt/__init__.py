"""The APT benchmark's environments as LeRobot env types, found by LeRobot's plugin discovery.

Installed (``pip install -e plugins/lerobot_env_apt``), this distribution registers ``apt_tabletop`` with LeRobot
(its scripts import every installed ``lerobot_env_*`` distribution), so ``lerobot-eval --env.type=apt_tabletop
--policy.path=<checkpoint> ...`` rolls a policy out on the tabletop benchmark's splits and reports LeRobot's own
metrics (``pc_success``, rewards, videos) in ``eval_info.json``. See
:class:`~lerobot_env_apt.configuration_tabletop.AptTabletopEnvConfig`.
"""

from lerobot_env_apt.configuration_tabletop import AptTabletopEnvConfig
from lerobot_env_apt.tabletop import TabletopGymEnv

__all__ = ["AptTabletopEnvConfig", "TabletopGymEnv"]
