"""Unit tests of the building blocks: masks, injection, schedule, config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apt_lightning import (
    APTConfig,
    FusionConfig,
    GatedFusionLayer,
    StageLRFactor,
    StagePlan,
    language_blind_masks,
    resolve_targets,
)
from apt_lightning.errors import FusionContextError, NoMatchingTargetError
from apt_lightning.inject import inject_fusion, unload_fusion


def test_language_blind_mask_semantics():
    attention = torch.tensor([[1, 1, 1, 1, 1, 0]])
    language = torch.tensor([[False, False, True, True, False, False]])  # image, image, lang, lang, state, pad
    masks = language_blind_masks(attention, language)
    allowed = masks.vlm_attention[0, 0]
    assert not allowed[0, 2] and not allowed[4, 3], "image and state queries must not see language keys"
    assert allowed[2, 0] and allowed[2, 3] and allowed[3, 4], "language queries see images, language and state"
    assert not allowed[:5, 5].any(), "nobody sees padding"
    assert masks.expert_attention.tolist() == [[1, 1, 0, 0, 1, 0]]
    assert masks.position_ids[0, [0, 1, 4]].tolist() == [0, 1, 2], "non-language positions skip the instruction"
    assert masks.language.tolist() == language.tolist()
    causal = language_blind_masks(attention, language, causal=True).vlm_attention[0, 0]
    assert not causal[0, 1] and causal[1, 0]


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vlm = nn.Sequential(nn.Linear(4, 4))
        self.expert = nn.ModuleDict(
            {"blocks": nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]), "out": nn.Linear(4, 2)}
        )


@pytest.mark.parametrize(
    "targets, exclude, expected",
    [
        (r"expert\.blocks\.\d+", None, ["expert.blocks.0", "expert.blocks.1", "expert.blocks.2"]),
        (["blocks.1"], None, ["expert.blocks.1"]),
        (["expert.out", "blocks.0"], None, ["expert.blocks.0", "expert.out"]),
        (r"expert\.blocks\.\d+", ["blocks.1"], ["expert.blocks.0", "expert.blocks.2"]),
        (r"expert\.blocks\.[02]", None, ["expert.blocks.0", "expert.blocks.2"]),  # every other layer, explicit
    ],
)
def test_target_resolution_follows_peft_semantics(targets, exclude, expected):
    assert sorted(resolve_targets(Toy(), targets, exclude)) == expected


def test_all_excluded_is_its_own_error():
    with pytest.raises(NoMatchingTargetError, match="were excluded"):
        resolve_targets(Toy(), ["blocks.1"], ["blocks.1"])


def test_injection_is_idempotent_and_unload_restores_keys():
    model = Toy()
    keys = set(model.state_dict())
    config = FusionConfig(target_modules=r"expert\.blocks\.\d+", context_dim=3, num_heads=2)
    inject_fusion(model, config)
    wrapped = set(model.state_dict())
    assert "expert.blocks.0.base_layer.weight" in wrapped and "expert.blocks.0.apt_fusion.apt_gate_attn" in wrapped
    inject_fusion(model, config)
    assert set(model.state_dict()) == wrapped
    assert isinstance(model.expert["blocks"][0], GatedFusionLayer)
    assert model.expert["blocks"][0].in_features == 4, "attributes fall through to base_layer"
    unload_fusion(model)
    assert set(model.state_dict()) == keys


def test_active_site_without_context_raises():
    model = Toy()
    inject_fusion(model, FusionConfig(target_modules=["blocks.0"], context_dim=3, num_heads=2))
    site = model.expert["blocks"][0]
    x = torch.randn(1, 2, 4)
    assert torch.equal(site(x), site.base_layer(x))  # inactive: pass-through
    site.active = True
    with pytest.raises(FusionContextError, match="must be set before forward"):
        site(x)
    site.set_context(torch.randn(1, 5, 3), torch.ones(1, 5, dtype=torch.bool))
    assert torch.equal(site(x), site.base_layer(x)), "zero gates: exact identity"


def test_stage_lr_factors_follow_the_plan():
    plan = StagePlan(first_stage=1, switch_step=10)
    expert, gates = StageLRFactor(plan, "expert", 4), StageLRFactor(plan, "gates", 4)
    assert [expert(s) for s in (0, 3, 9, 10, 13)] == [0.25, 1.0, 1.0, 0.25, 1.0]
    assert [gates(s) for s in (0, 9, 10, 11, 13, 50)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    only2 = StageLRFactor(StagePlan(first_stage=2), "fusion", 0)
    assert only2(0) == 1.0
    with pytest.raises(ValueError, match="Unknown parameter group"):
        StageLRFactor(plan, "decoder", 0)


def test_config_validation_and_warnings():
    with pytest.raises(ValueError, match="`vlm_mode` must be one of"):
        APTConfig(vlm_mode="partial")
    with pytest.warns(UserWarning, match="LoRA options only apply"):
        APTConfig(lora_rank=8)
    with pytest.warns(UserWarning, match="`vlm_lr` has no effect"):
        APTConfig(vlm_lr=1e-5)
    assert APTConfig(vlm_mode="full").resolved_vlm_lr == 1e-5
    with pytest.raises(ValueError, match="`target_modules` is empty"):
        FusionConfig(target_modules=[])
    with pytest.raises(ValueError, match="`switch_step` only applies"):
        StagePlan(first_stage=2, switch_step=3)


def test_resumable_loader_keeps_its_own_order_when_lightning_adds_a_distributed_sampler():
    from torch.utils.data import DistributedSampler

    from apt_lightning.data import ResumableDataLoader

    data = list(range(8))
    own = [b.tolist() for b in ResumableDataLoader(data, batch_size=2, shuffle=True, seed=3)]
    # what Lightning's use_distributed_sampler=True (its DDP/FSDP default) passes when it re-creates the loader
    wrapped = ResumableDataLoader(
        data, batch_size=2, shuffle=True, seed=3, sampler=DistributedSampler(data, num_replicas=2, rank=1)
    )
    assert [b.tolist() for b in wrapped] == own and own != [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_context_keys_values_are_computed_once_per_context_when_sampling():
    from apt_lightning import GatedCrossAttentionBlock

    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=8, context_dim=6, num_heads=2)
    with torch.no_grad():
        block.apt_gate_attn.fill_(0.5)
        block.apt_gate_ff.fill_(0.5)
    calls = []
    block.to_kv.register_forward_hook(lambda *_: calls.append(1))
    x, context, mask = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        first, second = block(x, context, mask), block(x, context, mask)  # two denoising steps, one context
        fresh = block(x, context.clone(), mask)  # a new context is recomputed
    assert len(calls) == 2 and torch.equal(first, second) and torch.equal(first, fresh)
    block(x, context, mask).sum().backward()  # with autograd nothing is memoised
    block(x, context, mask)
    assert len(calls) == 4
