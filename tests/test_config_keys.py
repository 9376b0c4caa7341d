"""A misspelt key in a reference policy's transformers config is refused at construction (transformers would store
it and build the default), naming the key and the closest valid ones; keys transformers reads still pass."""

from __future__ import annotations

import copy

import pytest
from transformers import PI0Config

from apt_lightning import ConfigError
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_lightning.models.hf_config import unknown_config_keys


def pi0_dict(**edits: dict) -> dict:
    config = tiny_pi0_config().to_dict()
    for path, value in edits.items():
        *parents, key = path.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[key] = value
    return config


@pytest.mark.parametrize(
    ("edit", "named", "closest"),
    [
        ({"dit_config__hidden_sizee": 64}, "config.dit_config.hidden_sizee", "hidden_size"),
        ({"dit_config__num_atention_heads": 4}, "config.dit_config.num_atention_heads", "num_attention_heads"),
        ({"vlm_config__text_config__hidden_sizee": 64}, "config.vlm_config.text_config.hidden_sizee", "hidden_size"),
        ({"chunk_sise": 8}, "config.chunk_sise", "chunk_size"),
    ],
)
def test_pi0_refuses_a_misspelt_key_naming_the_closest(edit, named, closest):
    with pytest.raises(ConfigError, match=rf"`{named}` is not a key of \w+Config \(closest: \[.*'{closest}'"):
        PI0Policy(pi0_dict(**edit))
    with pytest.raises(ConfigError, match="Fix the spelling"):  # a config object holding the typo too
        PI0Policy(PI0Config.from_dict(pi0_dict(**edit)))


def test_groot_refuses_a_misspelt_vlm_key():
    config = tiny_paligemma_config().to_dict()
    config["text_config"]["num_atention_heads"] = 4
    with pytest.raises(ConfigError, match=r"`vlm_config\.text_config\.num_atention_heads`.*'num_attention_heads'"):
        GR00TStylePolicy(config, select_layer=1, head_width=16, head_depth=2)
    with pytest.raises(ConfigError, match=r"vlm_config\.text_config\.num_atention_heads"):
        GR00TStylePolicy.vlm_text_width({"vlm_config": config})  # the command line's sizing path checks too


def test_keys_transformers_reads_still_pass():
    config = pi0_dict(dtype="float32", dit_config__rope_theta=10000.0, vlm_config__torch_dtype="float32")
    config["vlm_config"]["text_config"]["attn_implementation"] = "eager"
    config["dit_config"]["is_causal"] = True  # what PI0Config itself writes into its expert's config
    assert unknown_config_keys(config, PI0Config.from_dict(config), "config") == []
    policy = PI0Policy(config)
    again = copy.deepcopy(dict(policy.hparams)["config"])  # a checkpoint's stored config loads back
    assert unknown_config_keys(again, PI0Config.from_dict(again), "config") == []
    PI0Policy(again)
    paligemma = tiny_paligemma_config().to_dict()
    GR00TStylePolicy(paligemma, select_layer=1, head_width=16, head_depth=2)
