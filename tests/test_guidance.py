"""Prior-contrast guidance, language dropout and the fusion gate variants (issue 10)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning import APTConfig, APTStageScheduler, FusionConfig, StagePlan
from helpers import LossRecorder, loader, make_batch, make_policy, trainer

SWITCH = 4


def _noise(policy, batch_size=2, seed=123):
    return torch.randn(batch_size, policy.chunk_size, policy.noise_dim, generator=torch.Generator().manual_seed(seed))


def _stage2(arch, gates: float | None = 0.7, **apt):
    policy = make_policy(arch, **apt)
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH), step=SWITCH)
    policy.eval()
    if gates is not None:
        for site in policy.apt.sites.values():
            for gate in site.apt_fusion.gate_parameters():
                gate.data.fill_(gates)
    return policy


def test_guidance_scale_one_is_the_plain_model_bit_for_bit(arch):
    policy = _stage2(arch)
    batch, noise = make_batch(["left", "right"]), _noise(policy)
    assert torch.equal(policy.sample_actions(batch, noise, guidance_scale=1.0), policy.sample_actions(batch, noise))


@pytest.mark.parametrize("scale", [0.0, 2.0, 3.5])
def test_closed_gates_make_any_guidance_scale_the_plain_model(arch, scale):
    policy = _stage2(arch, gates=0.0)
    batch, noise = make_batch(["left", "right"]), _noise(policy)
    assert torch.equal(policy.sample_actions(batch, noise, guidance_scale=scale), policy.sample_actions(batch, noise))


def test_guided_velocity_is_prior_plus_w_times_the_language_contrast(arch):
    """One Euler step: guided actions = prior + w (conditional - prior), the prior being the Stage-1 path."""
    policy = _stage2(arch)
    batch, noise = make_batch(["left", "right"]), _noise(policy)
    conditional = policy.sample_actions(batch, noise, num_steps=1)
    policy.apt._set_step(SWITCH - 1)
    prior = policy.sample_actions(batch, noise, num_steps=1)
    policy.apt._set_step(SWITCH)
    guided = policy.sample_actions(batch, noise, num_steps=1, guidance_scale=2.5)
    assert (conditional - prior).abs().max() > 1e-3, "open gates must make language matter"
    assert (guided - (prior + 2.5 * (conditional - prior))).abs().max().item() <= 1e-5


def test_guidance_is_off_outside_stage2(arch):
    policy = _stage2(arch)
    policy.apt._set_step(0)
    batch, noise = make_batch(["left", "right"]), _noise(policy)
    assert torch.equal(policy.sample_actions(batch, noise, guidance_scale=3.0), policy.sample_actions(batch, noise))


# ---------------------------------------------------------------------------- language dropout
def test_dropped_rows_take_exactly_the_stage1_path():
    policy = _stage2("groot", language_dropout=0.5)
    policy.train()
    batch = make_batch(["left", "right"] * 4)
    vl_tokens, visible, language, language_mask, _ = policy.encode(batch)
    x, time = torch.randn(8, 4, 2, generator=torch.Generator().manual_seed(0)), torch.full((8,), 0.3)
    keep = policy.apt._language_keep(8, x.device)
    assert 0 < int(keep.sum()) < 8, keep
    with torch.no_grad(), policy.apt.fusion_context(language, language_mask):
        fused = policy.action_head(x, time, batch["state"], vl_tokens, visible)
    policy.apt._set_step(SWITCH - 1)
    with torch.no_grad():
        prior = policy.action_head(x, time, batch["state"], vl_tokens, visible)
    assert torch.equal(fused[~keep], prior[~keep])
    assert (fused[keep] - prior[keep]).abs().amax(dim=(1, 2)).min() > 1e-4


def test_language_dropout_draws_the_configured_fraction_and_only_in_training():
    policy = _stage2("groot", language_dropout=0.3)
    policy.train()
    drawn = []
    for step in range(50):
        policy.apt._set_step(SWITCH + step)
        drawn.append(policy.apt._language_keep(64, torch.device("cpu")))
    dropped = 1 - torch.stack(drawn).float().mean().item()
    assert 0.25 < dropped < 0.35, dropped
    assert not torch.equal(drawn[0], drawn[1]), "a new draw every step"
    policy.eval()
    assert policy.apt._language_keep(64, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="`language_dropout` must be in"):
        APTConfig(language_dropout=1.0)


def test_language_dropout_is_exact_on_resume(tmp_path):
    def run(ckpt_path=None):
        recorder = LossRecorder()
        callbacks = [APTStageScheduler(switch_at_step=2), recorder]
        if ckpt_path is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}"))
        policy = make_policy("groot", language_dropout=0.5, gate_lr=3e-2)
        trainer(8, callbacks, enable_checkpointing=ckpt_path is None).fit(policy, loader(), ckpt_path=ckpt_path)
        return recorder.losses

    reference = run()
    resumed = run(tmp_path / "step=3.ckpt")
    assert {s: resumed[s] for s in range(3, 8)} == {s: reference[s] for s in range(3, 8)}


# ---------------------------------------------------------------------------- gate variants
def test_sigmoid_gates_start_at_one_half_and_the_switch_is_not_an_identity():
    with pytest.warns(UserWarning, match="starts at 0.5: the Stage-2 switch changes the model's outputs"):
        fusion = FusionConfig(target_modules=r"action_head\.blocks\.\d+", num_heads=2, gate="sigmoid")
    policy = make_policy("groot")
    policy.apt.fusion = fusion
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH))
    policy.eval()
    assert all(v == {"attn": 0.5, "ff": 0.5} for v in policy.apt.gate_values().values())
    batch, noise = make_batch(["left", "right"]), _noise(policy)
    stage1 = policy.sample_actions(batch, noise)
    policy.apt._set_step(SWITCH)
    assert (policy.sample_actions(batch, noise) - stage1).abs().max() > 1e-4


def test_per_channel_gates_have_one_gate_per_channel_and_keep_the_exact_switch():
    policy = make_policy("groot")
    policy.apt.fusion = FusionConfig(target_modules=r"action_head\.blocks\.\d+", num_heads=2, gate_shape="channel")
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH))
    policy.eval()
    block = next(iter(policy.apt.sites.values())).apt_fusion
    assert [tuple(g.shape) for g in block.gate_parameters()] == [(32,), (32,)]
    batch, noise = make_batch(["left", "right"]), _noise(policy)
    stage1 = policy.sample_actions(batch, noise)
    policy.apt._set_step(SWITCH)
    assert torch.equal(policy.sample_actions(batch, noise), stage1)
