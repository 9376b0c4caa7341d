"""Two-fit workflow through safetensors exports, and LoRA mode."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from apt_lightning import (
    AptError,
    APTStageScheduler,
    export_fusion,
    export_va_prior,
    export_vlm,
    load_fusion,
    load_va_prior,
    load_vlm,
)
from helpers import loader, make_batch, make_policy, trainer


def test_two_fit_workflow_reproduces_stage1_outputs(arch, tmp_path):
    stage1 = make_policy(arch)
    trainer(8, [APTStageScheduler(stage=1)]).fit(stage1, loader())
    prior = export_va_prior(stage1, tmp_path / "prior.safetensors")
    keys = load_file(str(prior)).keys()
    assert not any(".base_layer" in k or "apt_fusion" in k or k.startswith(stage1.apt.vlm) for k in keys)

    stage1.eval()
    batch = make_batch(["left", "right"])
    noise = torch.randn(2, stage1.chunk_size, stage1.noise_dim, generator=torch.Generator().manual_seed(5))
    reference = stage1.sample_actions(batch, noise)

    torch.manual_seed(123)  # a different random init of the expert: the prior must overwrite all of it
    stage2 = make_policy(arch)
    stage2_scheduler = APTStageScheduler(stage=2)
    load_va_prior(stage2, prior)
    stage2_trainer = trainer(0, [stage2_scheduler])
    stage2_trainer.fit(stage2, loader())  # setup only: injects fusion, stage 2 active
    assert stage2.apt.stage == 2
    stage2.eval()
    assert (stage2.sample_actions(batch, noise) - reference).abs().max().item() <= 1e-6

    fusion = export_fusion(stage2, tmp_path / "fusion.safetensors")
    for site in stage2.apt.sites.values():
        site.apt_fusion.apt_gate_attn.data.fill_(0.3)
    load_fusion(stage2, fusion)
    assert all(s.apt_fusion.apt_gate_attn.item() == 0.0 for s in stage2.apt.sites.values())


def test_load_va_prior_rejects_a_foreign_export(tmp_path):
    pi0, groot = make_policy("pi0"), make_policy("groot")
    path = export_va_prior(pi0, tmp_path / "pi0.safetensors")
    with pytest.raises(AptError, match="does not fit GR00TStylePolicy: missing"):
        load_va_prior(groot, path)
    with pytest.raises(AptError, match="not an APT 'fusion' export"):
        load_fusion(pi0, path)


def test_lora_mode_changes_only_lora_weights_and_merged_export_loads(arch, tmp_path):
    policy = make_policy(arch, vlm_mode="lora", vlm_lr=1e-2, lora_rank=4)
    trainer(4, [APTStageScheduler(stage=2)]).fit(policy, loader())  # injects LoRA, trains Stage 2
    before = {k: v.clone() for k, v in policy.apt.vlm_module.state_dict().items()}
    trainer(6, [APTStageScheduler(stage=2)]).fit(policy, loader())
    after = policy.apt.vlm_module.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert any("lora_B" in k for k in changed)

    policy.eval()
    batch = make_batch(["left", "right"])
    noise = torch.randn(2, policy.chunk_size, policy.noise_dim, generator=torch.Generator().manual_seed(1))
    reference = policy.sample_actions(batch, noise)
    path = export_vlm(policy, tmp_path / "vlm.safetensors")
    assert not any("lora_" in k for k in load_file(str(path)))

    merged = copy.deepcopy(policy)  # same expert and fusion sites; its VLM is replaced by a plain one
    fresh_vlm = make_policy(arch).apt.vlm_module  # a plain VLM, no adapters
    parent_name, _, child = merged.apt.vlm.rpartition(".")
    setattr(merged.get_submodule(parent_name) if parent_name else merged, child, fresh_vlm)
    load_vlm(merged, path)
    merged.eval()
    assert (merged.sample_actions(batch, noise) - reference).abs().max().item() <= 1e-5
