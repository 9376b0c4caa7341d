"""``SmolVLAAPTPolicy``: LeRobot's ``SmolVLAPolicy`` trained and sampled through APT (see
:mod:`apt_lightning.integrations.lerobot.policy`)."""

import torch
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from apt_lightning.integrations.lerobot import SmolVLAAPT
from apt_lightning.integrations.lerobot.policy import APTPolicyMixin
from lerobot_policy_apt.configuration_smolvla_apt import SmolVLAAPTConfig


class SmolVLAAPTPolicy(APTPolicyMixin, SmolVLAPolicy):
    """``smolvla_apt``: SmolVLA with APT's stages; LeRobot's ``select_action``/``predict_action_chunk`` and their
    action queue unchanged, the chunk itself sampled through APT."""

    config_class = SmolVLAAPTConfig
    name = "smolvla_apt"
    adapter_class = SmolVLAAPT

    def _get_action_chunk(self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None = None, **kwargs):
        return self.apt_sample(batch, noise, **kwargs)
