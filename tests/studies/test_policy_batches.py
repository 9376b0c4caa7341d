"""The reference policies read benchmark batches as the benchmark means them: image ids and padded steps."""

from __future__ import annotations

import pytest
import torch

from apt_lightning import JOINT, StagePlan
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_lightning.models.base import chunk_mse
from apt_studies import collect_demonstrations, default_tokenizer
from apt_studies.datamodule import policy_batch

TOKENIZER = default_tokenizer()


def _policy(arch: str) -> PI0Policy | GR00TStylePolicy:
    """A policy trained jointly (language reaches the actions through the VLM, so a misread prompt shows)."""
    torch.manual_seed(0)
    if arch == "pi0":
        policy = PI0Policy(tiny_pi0_config(chunk_size=6, **TOKENIZER.vlm_vocabulary))
    else:
        policy = GR00TStylePolicy(
            tiny_paligemma_config(**TOKENIZER.vlm_vocabulary), select_layer=1, chunk_size=6, head_width=32, head_depth=2
        )
    policy.apt.prepare(StagePlan(first_stage=JOINT))
    return policy.eval()


def _batch(num_image_tokens: int = 0) -> dict[str, torch.Tensor]:
    data = collect_demonstrations("train", 6, seed=0, chunk_size=6, num_image_tokens=num_image_tokens)
    return policy_batch([data[i] for i in range(0, len(data), max(len(data) // 8, 1))][:8])


@pytest.mark.parametrize("arch", ["pi0", "groot"])
def test_prompts_with_image_placeholders_are_read_as_images(arch: str) -> None:
    """``build_prompt(num_image_tokens=n)`` writes the tokenizer's ``<image>``, which the VLM must recognise."""
    policy = _policy(arch)
    text_only, with_images = _batch(0), _batch(policy.num_image_tokens)
    assert with_images["input_ids"][:, : policy.num_image_tokens].eq(TOKENIZER.image_id).all()
    noise = torch.randn(text_only["state"].shape[0], policy.chunk_size, policy.noise_dim)
    torch.testing.assert_close(
        policy.sample_actions(with_images, noise=noise), policy.sample_actions(text_only, noise=noise), rtol=0, atol=0
    )


def test_vlm_vocabulary_is_the_tokenizers() -> None:
    assert TOKENIZER.vlm_vocabulary == {"vocab_size": TOKENIZER.vocab_size, "image_token_id": TOKENIZER.image_id}
    assert tiny_paligemma_config(**TOKENIZER.vlm_vocabulary).image_token_id == TOKENIZER.image_id
    assert TOKENIZER.vlm_mismatches(tiny_paligemma_config(**TOKENIZER.vlm_vocabulary)) == []
    small = TOKENIZER.vlm_mismatches(tiny_paligemma_config(vocab_size=64, image_token_id=TOKENIZER.image_id))
    assert small == ["VLM vocabulary 64 < the tokenizer's 130 ids (prompt words + <image>)"]


@pytest.mark.parametrize("arch", ["pi0", "groot"])
def test_padded_chunk_steps_do_not_count_in_the_loss(arch: str) -> None:
    policy = _policy(arch)
    batch = _batch()
    pad = batch["action_pad_mask"]
    assert pad.any() and not pad.all(), "the batch must hold padded and real steps"
    noise, _ = policy.draw_noise_time(pad.shape[0], 0)
    # At the time where x_t is pure noise (pi0: t = 1, GR00T: t = 0) actions enter the loss only as targets;
    # elsewhere padded actions are also inputs that the expert's attention mixes into every step.
    time = torch.full((pad.shape[0],), 1.0 if arch == "pi0" else 0.0)
    loss = policy.flow_loss(batch, noise, time)
    changed = {**batch, "actions": batch["actions"].masked_fill(pad.unsqueeze(-1), 5.0)}
    assert torch.equal(policy.flow_loss(changed, noise, time), loss)
    unmasked = {k: v for k, v in changed.items() if k != "action_pad_mask"}
    assert not torch.equal(policy.flow_loss(unmasked, noise, time), loss)  # the mask is what makes them not count


def test_chunk_mse_means_over_real_steps() -> None:
    prediction, target = torch.zeros(2, 3, 2), torch.ones(2, 3, 2)
    target[1, 2] = 100.0
    pad = torch.tensor([[False, False, False], [False, False, True]])
    assert chunk_mse(prediction, target, pad).item() == 1.0
    assert torch.equal(chunk_mse(prediction, target), torch.nn.functional.mse_loss(prediction, target))
    assert chunk_mse(prediction, target, torch.ones(2, 3, dtype=torch.bool)).item() == 0.0  # nothing to learn
