"""Cheaper fusion options keep the exact switch and the gates' meaning; FLOP counts are deterministic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from apt_lightning import FusionConfig, StagePlan
from apt_lightning.fusion import GatedCrossAttentionBlock
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flop_count import extrapolate, overheads, policy_flops
from fusion_options import FUSION_OPTIONS

from helpers import make_batch


def build(arch: str, options: dict, stage: int = 2) -> PI0Policy | GR00TStylePolicy:
    torch.manual_seed(0)
    if arch == "pi0":
        policy = PI0Policy(tiny_pi0_config(), fusion_options=options)
    else:
        vlm = tiny_paligemma_config()
        policy = GR00TStylePolicy(vlm, select_layer=1, head_width=16, head_depth=4, fusion_options=options)
    policy.apt.prepare(StagePlan(first_stage=stage))
    return policy.eval()


def open_gates(policy: PI0Policy | GR00TStylePolicy, value: float = 0.5) -> None:
    with torch.no_grad():
        for site in policy.apt.sites.values():
            for gate in site.apt_fusion.gate_parameters():
                gate.fill_(value)


@pytest.mark.parametrize(
    "option", [pytest.param(o, marks=pytest.mark.slow) if o in ("ff4", "no_ff") else o for o in FUSION_OPTIONS]
)
def test_each_option_is_an_exact_identity_at_the_switch(arch: str, option: str) -> None:
    stage2 = build(arch, FUSION_OPTIONS[option])
    stage1 = build(arch, FUSION_OPTIONS[option], stage=1)
    stage1.load_state_dict(stage2.state_dict())
    batch, noise = make_batch("left"), torch.randn(2, 4, stage2.noise_dim)
    time = torch.tensor([0.3, 0.7])
    assert torch.equal(stage2.flow_loss(batch, noise, time), stage1.flow_loss(batch, noise, time))
    assert torch.equal(stage2.sample_actions(batch, noise), stage1.sample_actions(batch, noise))
    open_gates(stage2)  # the gates are live: opening them lets the instruction in
    left, right = stage2.sample_actions(batch, noise), stage2.sample_actions(make_batch("right"), noise)
    assert not torch.equal(left, right)


def test_no_feed_forward_block_has_only_the_attention_gate() -> None:
    block = GatedCrossAttentionBlock(dim=8, context_dim=4, num_heads=2, ff_mult=0)
    assert not block.has_ff and len(block.gate_parameters()) == 1
    assert set(block.gate_values()) == {"attn"}
    assert not any(isinstance(m, torch.nn.Linear) for m in block.ff.modules())
    x, ctx, mask = torch.randn(2, 3, 8), torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(block(x, ctx, mask), x)
    with torch.no_grad():
        block.apt_gate_attn.fill_(1.0)
    assert not torch.equal(block(x, ctx, mask), x)
    mask[1] = False  # a row without language takes the prior path exactly
    assert torch.equal(block(x, ctx, mask)[1], x[1])
    block.reset_gates()
    assert block.is_identity


def test_ff_mult_zero_is_valid_and_negative_is_not() -> None:
    assert FusionConfig(target_modules="x", ff_mult=0).ff_mult == 0
    with pytest.raises(ValueError, match="ff_mult"):
        FusionConfig(target_modules="x", ff_mult=-1)


def test_every_second_layer_option_fuses_odd_layers() -> None:
    policy = build("groot", FUSION_OPTIONS["no_ff_every2"])
    assert list(policy.apt.sites) == ["action_head.blocks.1", "action_head.blocks.3"]


def test_flop_counts_are_deterministic_and_rank_the_options() -> None:
    batch = make_batch("left", batch_size=1)
    policies = {name: build("groot", FUSION_OPTIONS[name]) for name in ("ff4", "no_ff")}
    counts = {name: policy_flops(policy, batch) for name, policy in policies.items()}
    assert counts["ff4"] == policy_flops(policies["ff4"], batch)  # two runs, same numbers
    default, no_ff = overheads(counts["ff4"]), overheads(counts["no_ff"])
    assert 1 < no_ff["sampling_flops_overhead"] < default["sampling_flops_overhead"]
    assert 1 < no_ff["fusion_flops_overhead"] < default["fusion_flops_overhead"]
    assert counts["ff4"]["sample_bypassed"] == counts["no_ff"]["sample_bypassed"]  # bypassed: the same model


def test_extrapolation_recovers_a_quadratic_in_the_inverse_scale() -> None:
    def flops(s: int) -> dict[str, int]:
        return {"train_fusion": 7e6 / s**2 + 3e3 / s}

    assert extrapolate({16: flops(16), 8: flops(8)})["train_fusion"] == pytest.approx(7_003_000, rel=1e-12)


def test_op_cost_mode_counts_each_weight_once_per_op() -> None:
    from roofline import OpCostMode

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    with OpCostMode(list(net.parameters())) as mode:
        net(torch.randn(3, 8))
    assert mode.ops == [(2 * 3 * 8 * 16, 8 * 16 + 16), (2 * 3 * 16 * 4, 16 * 4 + 4)]  # activations are no weights


def test_sampling_reads_fusion_weights_every_step_and_context_keys_once(arch: str) -> None:
    """APT's extra weight traffic per sampling call: each block's query/output/feed-forward weights at every
    denoising step, its context key/value projection once (the context is the same at every step)."""
    from roofline import sampling_ops

    policy = build(arch, FUSION_OPTIONS["ff4"])
    open_gates(policy)
    batch = make_batch("left")
    base = sampling_ops(policy, batch, fusion=False)
    apt = sampling_ops(policy, batch, fusion=True)
    assert apt == sampling_ops(policy, batch, fusion=True)  # deterministic
    blocks = [site.apt_fusion for site in policy.apt.sites.values()]
    per_step = sum(b.to_q.weight.numel() + b.to_out.weight.numel() for b in blocks)
    per_step += sum(p.numel() for b in blocks for m in b.ff if isinstance(m, torch.nn.Linear) for p in m.parameters())
    once = sum(b.to_kv.weight.numel() for b in blocks)
    extra = sum(w for _, w in apt) - sum(w for _, w in base)
    assert extra == policy.default_sampling_steps * per_step + once
