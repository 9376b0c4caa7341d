"""``PI05APTPolicy``: LeRobot's ``PI05Policy`` trained and sampled through APT (see
:mod:`apt_lightning.integrations.lerobot.policy`)."""

import torch
from lerobot.policies.pi05.modeling_pi05 import PI05Policy

from apt_lightning.integrations.lerobot import PI05APT
from apt_lightning.integrations.lerobot.policy import APTPolicyMixin
from lerobot_policy_apt.configuration_pi05_apt import PI05APTConfig


class PI05APTPolicy(APTPolicyMixin, PI05Policy):
    """``pi05_apt``: PI05 with APT's stages; LeRobot's action queue in ``select_action``, unchanged."""

    config_class = PI05APTConfig
    name = "pi05_apt"
    adapter_class = PI05APT

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        return self.apt_sample(batch, kwargs.pop("noise", None), **kwargs)
