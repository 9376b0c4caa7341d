"""Processors of ``pi0_apt``: LeRobot's ``pi0`` pipelines with APT's tokenizer step (instruction mask,
truncation check) and the tokenizer of ``apt_tokenizer_name`` when set."""

from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors

from apt_lightning.integrations.lerobot.processors import apt_processor_steps


def make_pi0_apt_pre_post_processors(config, dataset_stats=None):
    with apt_processor_steps("pi0", config.apt_tokenizer_name):
        return make_pi0_pre_post_processors(config, dataset_stats=dataset_stats)
