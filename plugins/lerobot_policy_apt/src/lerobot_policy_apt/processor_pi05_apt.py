"""Processors of ``pi05_apt``: LeRobot's ``pi05`` pipelines with APT's tokenizer step (instruction mask,
truncation check) and the tokenizer of ``apt_tokenizer_name`` when set."""

from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors

from apt_lightning.integrations.lerobot.processors import apt_processor_steps


def make_pi05_apt_pre_post_processors(config, dataset_stats=None):
    with apt_processor_steps("pi05", config.apt_tokenizer_name):
        return make_pi05_pre_post_processors(config, dataset_stats=dataset_stats)
