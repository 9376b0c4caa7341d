"""Processors of ``smolvla_apt``: LeRobot's ``smolvla`` pipelines with APT's tokenizer step (instruction mask,
truncation check) and the tokenizer of ``apt_tokenizer_name`` when set."""

from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

from apt_lightning.integrations.lerobot.processors import apt_processor_steps


def make_smolvla_apt_pre_post_processors(config, dataset_stats=None):
    with apt_processor_steps("smolvla", config.apt_tokenizer_name):
        return make_smolvla_pre_post_processors(config, dataset_stats=dataset_stats)
