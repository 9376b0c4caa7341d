"""Measure what hides the instruction from LeRobot's GR00T N1.7 action head, on a tiny offline build (not collected by
pytest, imports LeRobot only when run: run it by hand, it needs ``pip install "lerobot[groot]==0.6.1"``)::

    HF_HUB_OFFLINE=1 .cache/venv-lerobot/bin/python tests/integrations/lerobot/groot_probe.py

Prints the four findings of docs/integrations.md ("GR00T N1.7: measured, not adapted yet") and asserts them: image
tokens' backbone features do not depend on the instruction; LeRobot's head does; masking the instruction in
``backbone_attention_mask`` is not enough; dropping every token from the instruction on makes actions bit-identical.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

IM_START, IM_END, VISION_START, VISION_END, IMAGE, USER, PAD = 1, 2, 3, 4, 5, 7, 0
TEMPLATE_AND_IMAGES = 8  # [im_start, user, vision_start, image x 4, vision_end]: every token before the instruction


def write_tiny_groot(directory: Path) -> Path:
    """A tiny Qwen3-VL config and a randomly initialised tiny GR00T N1.7 saved under ``directory``."""
    from lerobot.policies.groot.groot_n1_7 import GR00TN17, GR00TN17Config
    from transformers import Qwen3VLConfig

    qwen = directory / "qwen3vl"
    Qwen3VLConfig(
        image_token_id=IMAGE,
        video_token_id=6,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=64,
            max_position_embeddings=512,
            rope_scaling={"mrope_interleaved": True, "mrope_section": [2, 1, 1], "rope_type": "default"},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
    ).save_pretrained(qwen)
    dit = dict(
        positional_embeddings=None,
        num_layers=4,
        num_attention_heads=2,
        attention_head_dim=16,
        norm_type="ada_norm",
        dropout=0.0,
        final_dropout=True,
        output_dim=32,
        interleave_self_attention=True,
    )
    head_attention = dict(
        positional_embeddings=None, num_layers=1, num_attention_heads=2, attention_head_dim=16, dropout=0.0
    )
    config = GR00TN17Config(
        model_name=str(qwen),
        backbone_embedding_dim=32,
        select_layer=2,
        hidden_size=32,
        input_embedding_dim=32,
        max_state_dim=8,
        max_action_dim=8,
        action_horizon=4,
        max_seq_len=16,
        max_num_embodiments=2,
        model_dtype="float32",
        dtype="float32",
        diffusion_model_cfg=dit,
        vl_self_attention_cfg=head_attention,
    )
    torch.manual_seed(0)
    GR00TN17(config, load_backbone_weights=False).save_pretrained(directory / "groot")
    return directory / "groot"


def inputs(instruction: list[int], pixels: torch.Tensor, state: torch.Tensor, length: int = 14) -> dict:
    ids = [IM_START, USER, VISION_START, IMAGE, IMAGE, IMAGE, IMAGE, VISION_END, *instruction, IM_END]
    valid = [1] * len(ids) + [0] * (length - len(ids))
    ids += [PAD] * (length - len(ids))
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.tensor([valid]),
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[1, 4, 4]]),  # 16 patches of 8 px, merged 2x2: 4 image tokens
        "state": state,
        "embodiment_id": torch.tensor([0]),
    }


def main() -> None:
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.groot.configuration_groot import GrootConfig
    from lerobot.policies.groot.modeling_groot import GrootPolicy
    from transformers.feature_extraction_utils import BatchFeature

    start = time.perf_counter()
    directory = write_tiny_groot(Path(tempfile.mkdtemp(prefix="tiny_groot_")))
    features = {
        "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 32, 32)),
        "observation.state": PolicyFeature(FeatureType.STATE, (2,)),
    }
    config = GrootConfig(
        base_model_path=str(directory),
        chunk_size=4,
        n_action_steps=4,
        max_state_dim=8,
        max_action_dim=8,
        input_features=features,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))},
        device="cpu",
        use_bf16=False,
    )
    model = GrootPolicy(config)._groot_model.eval()
    print(
        f"tiny GR00T N1.7: {sum(p.numel() for p in model.parameters())} parameters, {time.perf_counter() - start:.1f} s"
    )
    g = torch.Generator().manual_seed(1)
    pixels, state = torch.randn(16, 3 * 2 * 8 * 8, generator=g), torch.randn(1, 1, 8, generator=g)
    short, long = inputs([20, 21], pixels, state), inputs([30, 31, 32, 33], pixels, state)

    def encode(batch):
        backbone_input, action_input = model.prepare_input(batch)
        return dict(model.backbone(backbone_input)), action_input

    def act(backbone_output, action_input):
        torch.manual_seed(3)  # the head draws its own noise
        return model.action_head.get_action(BatchFeature(data=dict(backbone_output)), action_input)["action_pred"]

    def masked(out, n):
        mask = out["backbone_attention_mask"].clone()
        mask[:, TEMPLATE_AND_IMAGES : TEMPLATE_AND_IMAGES + n] = False
        return {**out, "backbone_attention_mask": mask}

    def visible(out):
        return {k: v[:, :TEMPLATE_AND_IMAGES] for k, v in out.items()}

    with torch.no_grad():
        (a, a_in), (b, b_in) = encode(short), encode(long)
        images = slice(3, 7)
        same_images = torch.equal(a["backbone_features"][:, images], b["backbone_features"][:, images])
        plain = (act(a, a_in) - act(b, b_in)).abs().max().item()
        masked_only = (act(masked(a, 2), a_in) - act(masked(b, 4), b_in)).abs().max().item()
        dropped = (act(visible(a), a_in) - act(visible(b), b_in)).abs().max().item()
    print(f"1. image tokens' backbone features equal across instructions: {same_images}")
    print(f"2. LeRobot's head, instruction visible: max |difference| {plain:.2e}")
    print(f"3. instruction masked in backbone_attention_mask only: max |difference| {masked_only:.2e}")
    print(f"4. tokens from the instruction on dropped before the head: max |difference| {dropped}")
    assert same_images and plain > 0 and masked_only > 0 and dropped == 0.0


if __name__ == "__main__":
    main()
