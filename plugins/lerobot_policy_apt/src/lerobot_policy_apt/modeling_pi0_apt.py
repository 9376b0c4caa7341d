"""``PI0APTPolicy``: LeRobot's ``PI0Policy`` trained and sampled through APT (see
:mod:`apt_lightning.integrations.lerobot.policy`)."""

import torch
from lerobot.policies.pi0.modeling_pi0 import PI0Policy

from apt_lightning.integrations.lerobot import PI0APT
from apt_lightning.integrations.lerobot.policy import APTPolicyMixin
from lerobot_policy_apt.configuration_pi0_apt import PI0APTConfig


class PI0APTPolicy(APTPolicyMixin, PI0Policy):
    """``pi0_apt``: PI0 with APT's stages; LeRobot's action queue in ``select_action``, unchanged."""

    config_class = PI0APTConfig
    name = "pi0_apt"
    adapter_class = PI0APT

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        return self.apt_sample(batch, kwargs.pop("noise", None), **kwargs)
