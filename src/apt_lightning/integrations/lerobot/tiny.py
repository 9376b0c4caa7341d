"""Tiny, offline, randomly initialised LeRobot policies for tests, examples and CI (no weights downloaded).

LeRobot 0.6.1 builds PI0/PI05 only from the ``gemma_300m``/``gemma_2b`` variants (a ~3B-parameter model that takes
minutes and ~18 GB to build) with a fixed SigLIP-So400m vision tower. :func:`tiny_pi_policy` swaps two private
names of ``lerobot.policies.pi0[5].modeling_pi0[5]`` (``get_gemma_config``, and the PaliGemma class, to shrink the
vision config LeRobot filled in) for the duration of the constructor only: the policy object is LeRobot's own
class, its modules and state-dict keys are LeRobot's, and ``save_pretrained``/``from_pretrained`` work on it as
on any PI0. Private names: this module is
pinned to LeRobot ``0.6.1`` (:data:`~apt_lightning.integrations.lerobot._compat.LEROBOT_VERSION`).

Attention in LeRobot's joint PI0 forward is reshaped for exactly 8 heads, so the tiny Gemmas keep 8 heads of
width 4 (and 1 key-value head), as the real ones do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from apt_lightning.errors import ConfigError
from apt_lightning.integrations.lerobot._compat import lerobot_module

__all__ = [
    "TINY_IMAGE_SIZE",
    "tiny_builds",
    "tiny_pi_config",
    "tiny_pi_policy",
    "tiny_smolvla_config",
    "tiny_smolvla_policy",
    "tiny_tokenizer",
    "write_tiny_smolvlm",
]

TINY_IMAGE_SIZE = 16
"""Image side of the tiny policies: 16 px images in 8 px patches give 4 image tokens per camera."""


def _tiny_gemma(module: Any, width: int, depth: int) -> Any:
    return module.GemmaConfig(width=width, depth=depth, mlp_dim=2 * width, num_heads=8, num_kv_heads=1, head_dim=4)


def _tiny_vision(vision: Any, text_width: int) -> None:
    """Shrink the SigLIP config LeRobot filled in (So400m sizes) to one 16-wide layer over 8 px patches."""
    vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers = 16, 32, 1
    vision.num_attention_heads, vision.patch_size = 2, 8
    vision.projection_dim = text_width  # the projector maps image features to the text width


@contextlib.contextmanager
def tiny_builds(kind: str = "pi0", vlm_width: int = 32, expert_width: int = 16, depth: int = 2) -> Iterator[None]:
    """Inside the block, LeRobot's ``PI0Policy``/``PI05Policy`` (``kind``) construct tiny: wrap
    ``PI0Policy.from_pretrained(directory)`` of a tiny policy's saved directory in it, too."""
    module = lerobot_module(f"policies.{kind}.modeling_{kind}")
    real_get, real_vlm = module.get_gemma_config, module.PaliGemmaForConditionalGenerationWithPiGemma

    def get_gemma_config(variant: str) -> Any:
        return _tiny_gemma(module, vlm_width if variant == "gemma_2b" else expert_width, depth)

    def build_vlm(config: Any) -> Any:
        _tiny_vision(config.vision_config, config.text_config.hidden_size)
        return real_vlm(config)

    module.get_gemma_config, module.PaliGemmaForConditionalGenerationWithPiGemma = get_gemma_config, build_vlm
    try:
        yield
    finally:
        module.get_gemma_config, module.PaliGemmaForConditionalGenerationWithPiGemma = real_get, real_vlm


def tiny_pi_config(
    kind: str = "pi0",
    state_dim: int = 2,
    action_dim: int = 2,
    chunk_size: int = 4,
    config_class: type | None = None,
    **overrides: Any,
):
    """A ``PI0Config``/``PI05Config`` for the tiny builds: one camera ``observation.images.top`` of
    :data:`TINY_IMAGE_SIZE` px, float32, CPU, ``tokenizer_max_length`` 12. ``config_class`` builds a subclass
    instead (the plugin's ``PI0APTConfig``)."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    configuration = lerobot_module(f"policies.{kind}.configuration_{kind}")
    cls = config_class or (configuration.PI0Config if kind == "pi0" else configuration.PI05Config)
    options: dict[str, Any] = dict(
        input_features={
            "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)),
            "observation.state": PolicyFeature(FeatureType.STATE, (state_dim,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (action_dim,))},
        chunk_size=chunk_size,
        n_action_steps=chunk_size,
        max_state_dim=8,
        max_action_dim=8,
        image_resolution=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
        tokenizer_max_length=12,
        num_inference_steps=3,
        dtype="float32",
        device="cpu",
    )
    options.update(overrides)
    return cls(**options)


def tiny_pi_policy(
    kind: str = "pi0", config: Any = None, vlm_width: int = 32, expert_width: int = 16, depth: int = 2, seed: int = 0
) -> Any:
    """LeRobot's own ``PI0Policy`` (``kind="pi0"``) or ``PI05Policy`` (``"pi05"``), tiny and random (seeded).

    Args:
        kind: ``"pi0"`` or ``"pi05"``.
        config: the policy config; :func:`tiny_pi_config` when ``None``.
        vlm_width, expert_width, depth: Gemma widths (8 heads of 4 whatever the width) and the shared depth.
        seed: ``torch.manual_seed`` before construction (weights are random).
    """
    if kind not in ("pi0", "pi05"):
        raise ConfigError(f"`kind` must be 'pi0' or 'pi05', got {kind!r}.")
    config = config if config is not None else tiny_pi_config(kind)
    modeling = lerobot_module(f"policies.{kind}.modeling_{kind}")
    cls = modeling.PI0Policy if kind == "pi0" else modeling.PI05Policy
    torch.manual_seed(seed)
    with tiny_builds(kind, vlm_width, expert_width, depth):
        return cls(config)


def tiny_tokenizer(words: Sequence[str] = (), max_digits: int = 256) -> Any:
    """An offline word-level "fast" tokenizer (``PreTrainedTokenizerFast``) over ``words``, the integers
    ``0..max_digits-1`` (PI05 writes the discretised state as numbers) and the words of PI05's prompt.

    It gives character offsets, which :class:`~apt_lightning.integrations.lerobot.LeRobotDataModule` needs to mark
    the instruction. Ids stay far below the tiny policies' (PaliGemma-sized) vocabulary.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    prompt_words = ["task", "state", "action", ":", ",", ";", "."]
    vocabulary = list(dict.fromkeys([*specials, *prompt_words, *(str(i) for i in range(max_digits)), *words]))
    model = models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


SMOLVLM_SPECIAL = {
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "image_token": "<image>",
    "end_of_utterance_token": "<end_of_utterance>",
}


def write_tiny_smolvlm(directory: str | Path, words: Sequence[str] = ()) -> Path:
    """Write a tiny SmolVLM (config, processor, word-level tokenizer) to ``directory`` for
    ``SmolVLAConfig(vlm_model_name=directory, load_vlm_weights=False)``: 4 text layers of width 32, a 1-layer
    SigLIP on 32 px images in 8 px patches, 2x2 pixel shuffle (4 image tokens per camera). Returns the path."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    directory = Path(directory)
    words_tokenizer = tiny_tokenizer(words)
    backend = words_tokenizer.backend_tokenizer
    backend.add_special_tokens(list(SMOLVLM_SPECIAL.values()))
    tokenizer = type(words_tokenizer)(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens=SMOLVLM_SPECIAL,
    )
    config = SmolVLMConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=8,
            image_size=32,
        ),
        scale_factor=2,
        image_token_id=tokenizer.image_token_id,
    )
    config.save_pretrained(directory)
    images = SmolVLMImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    processor = SmolVLMProcessor(
        image_processor=images, tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(), image_seq_len=4
    )
    processor.save_pretrained(directory)
    return directory


def tiny_smolvla_config(
    vlm_directory: str | Path,
    state_dim: int = 2,
    action_dim: int = 2,
    config_class: type | None = None,
    **overrides: Any,
) -> Any:
    """A ``SmolVLAConfig`` (or ``config_class``, e.g. the plugin's ``SmolVLAAPTConfig``) over a
    :func:`write_tiny_smolvlm` directory: one 32 px camera, chunk 4, CPU."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    configuration = lerobot_module("policies.smolvla.configuration_smolvla")
    options: dict[str, Any] = dict(
        vlm_model_name=str(vlm_directory),
        load_vlm_weights=False,
        input_features={
            "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 32, 32)),
            "observation.state": PolicyFeature(FeatureType.STATE, (state_dim,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (action_dim,))},
        chunk_size=4,
        n_action_steps=4,
        max_state_dim=8,
        max_action_dim=8,
        resize_imgs_with_padding=(32, 32),
        num_vlm_layers=4,
        tokenizer_max_length=12,
        num_steps=3,
        device="cpu",
    )
    options.update(overrides)
    return (config_class or configuration.SmolVLAConfig)(**options)


def tiny_smolvla_policy(vlm_directory: str | Path, config: Any = None, seed: int = 0) -> Any:
    """LeRobot's own ``SmolVLAPolicy``, tiny and random (seeded), over a :func:`write_tiny_smolvlm` directory."""
    modeling = lerobot_module("policies.smolvla.modeling_smolvla")
    torch.manual_seed(seed)
    return modeling.SmolVLAPolicy(config if config is not None else tiny_smolvla_config(vlm_directory))
