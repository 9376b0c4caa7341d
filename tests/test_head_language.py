"""GR00T-style head reading language through its own cross-attention behind zero-initialised LanguageGates."""

from __future__ import annotations

import pytest
import torch

from apt_lightning import APTConfig, APTStageScheduler, StagePlan
from apt_lightning.fusion import LanguageGate
from apt_lightning.models import GR00TStylePolicy, tiny_paligemma_config
from apt_lightning.structure import gate_parameters, language_gates
from helpers import LossRecorder, loader, make_batch, trainer

SWITCH = 4


def head_policy(**apt) -> GR00TStylePolicy:
    torch.manual_seed(0)
    return GR00TStylePolicy(
        tiny_paligemma_config(),
        select_layer=1,
        head_width=32,
        head_depth=2,
        apt_config=APTConfig(lr=3e-3, **apt),
        head_reads_language=True,
    )


def open_gates(policy, value=0.7, fusion=True):
    for _, gate in language_gates(policy):
        gate.apt_gate.data.fill_(value)
    if fusion:
        for site in policy.apt.sites.values():
            for gate in site.apt_fusion.gate_parameters():
                gate.data.fill_(value)


def noise(policy, n=2):
    return torch.randn(n, policy.chunk_size, policy.noise_dim, generator=torch.Generator().manual_seed(5))


def test_the_switch_is_exact_and_stage1_ignores_the_instruction():
    policy = head_policy()
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH))
    policy.eval()
    left, right = make_batch("left"), make_batch("right", pad=2)
    stage1 = policy.sample_actions(left, noise(policy))
    assert (stage1 - policy.sample_actions(right, noise(policy))).abs().max() <= 1e-6
    policy.apt._set_step(SWITCH)
    assert torch.equal(policy.sample_actions(left, noise(policy)), stage1)  # every gate closed: identity


def test_open_head_gates_alone_make_the_instruction_matter():
    policy = head_policy()
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH), step=SWITCH)
    policy.eval()
    open_gates(policy, fusion=False)  # fusion blocks closed: language only through the head's own attention
    difference = policy.sample_actions(make_batch("left"), noise(policy)) - policy.sample_actions(
        make_batch("right"), noise(policy)
    )
    assert difference.abs().max() > 1e-3


def test_guidance_and_dropped_rows_take_the_language_free_path_exactly():
    policy = head_policy(language_dropout=0.5)
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH), step=SWITCH)
    open_gates(policy)
    policy.eval()
    batch, x = make_batch(["left", "right"]), noise(policy)
    assert torch.equal(policy.sample_actions(batch, x, guidance_scale=1.0), policy.sample_actions(batch, x))
    open_gates(policy, 0.0)
    assert torch.equal(policy.sample_actions(batch, x, guidance_scale=2.5), policy.sample_actions(batch, x))
    # training-time language dropout: the dropped rows equal the Stage-1 computation bit for bit
    open_gates(policy)
    policy.train()
    batch = make_batch(["left", "right"] * 4)
    keep = policy.apt._language_keep(8, torch.device("cpu"))
    assert 0 < int(keep.sum()) < 8
    x, time = torch.randn(8, 4, 2, generator=torch.Generator().manual_seed(0)), torch.full((8,), 0.3)
    with torch.no_grad():
        encoded = policy.encode(batch)
        with policy.apt.fusion_context(encoded.language, encoded.language_mask):
            fused = policy.action_head(
                x, time, batch["state"], encoded.vl_tokens, encoded.visible, policy._head_language(encoded)
            )
        policy.apt._set_step(SWITCH - 1)
        prior = policy.action_head(x, time, batch["state"], encoded.vl_tokens, encoded.visible)
    assert torch.equal(fused[~keep], prior[~keep])
    assert (fused[keep] - prior[keep]).abs().amax(dim=(1, 2)).min() > 1e-4


def test_head_gates_join_the_gates_group_and_learn_from_the_switch():
    policy = head_policy()
    names = [name for name, _ in language_gates(policy)]
    assert names == ["action_head.blocks.0.language_gate"]  # the even (cross-attention) block of a 2-block head
    recorder = LossRecorder()
    t = trainer(8, [APTStageScheduler(switch_at_step=SWITCH), recorder])
    t.fit(policy, loader(size=16, batch_size=4))
    gate = next(g for _, g in language_gates(policy))
    assert any(p is gate.apt_gate for p in gate_parameters(policy))
    groups = {g["name"]: g for g in t.optimizers[0].param_groups}
    assert any(p is gate.apt_gate for p in groups["gates"]["params"])
    assert float(gate.apt_gate.abs()) > 0  # trained in Stage 2


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_language_gate_is_caught(value):
    from lightning.pytorch.callbacks import Callback

    from apt_lightning import NonFiniteGateError

    class Poison(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == SWITCH + 1:
                next(g for _, g in language_gates(pl_module)).apt_gate.data.fill_(value)

    t = trainer(8, [Poison(), APTStageScheduler(switch_at_step=SWITCH)])
    with pytest.raises(NonFiniteGateError, match=r"language gate `action_head\.blocks\.0\.base_layer\.language_gate`"):
        t.fit(head_policy(), loader(size=16, batch_size=4))


def test_language_gate_is_an_identity_at_zero():
    gate = LanguageGate()
    prior = torch.randn(3, 4)
    assert torch.equal(gate(prior, prior + 5), prior) and gate.is_identity
