"""Reference VLAs adopting APT through the public :class:`~apt_lightning.APTMixin` contract only."""

from apt_lightning.models.base import FlowMatchingPolicy, PolicyCheckpointError, load_policy, registered_policies
from apt_lightning.models.dit import DiTActionHead
from apt_lightning.models.groot import GR00TStylePolicy, tiny_paligemma_config
from apt_lightning.models.pi0 import PI0Policy, tiny_pi0_config

__all__ = [
    "DiTActionHead",
    "FlowMatchingPolicy",
    "GR00TStylePolicy",
    "PI0Policy",
    "PolicyCheckpointError",
    "load_policy",
    "registered_policies",
    "tiny_paligemma_config",
    "tiny_pi0_config",
]
