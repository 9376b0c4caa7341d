"""Stage invariants on both reference architectures: Stage-1 language blindness, a frozen bit-identical VLM,
an exact switch, and language flowing in through the gates during Stage 2."""

from __future__ import annotations

import copy

import torch

from apt_lightning import APTStageScheduler, GateMonitor, StagePlan
from helpers import LossRecorder, loader, make_batch, make_policy, trainer


def _noise(policy, batch_size=2, seed=123):
    return torch.randn(batch_size, policy.chunk_size, policy.noise_dim, generator=torch.Generator().manual_seed(seed))


def test_stage1_actions_ignore_instruction_of_other_length(arch):
    policy = make_policy(arch)
    policy.apt.prepare(StagePlan(first_stage=1))
    policy.eval()
    left, right = make_batch("left"), make_batch("right", pad=2)  # 2 vs 3 words, plus padding
    assert left["input_ids"].shape != right["input_ids"].shape
    noise = _noise(policy)
    diff = (policy.sample_actions(left, noise) - policy.sample_actions(right, noise)).abs().max().item()
    assert diff <= 1e-6, diff
    # and the observation still matters: a different image changes the actions
    other = make_batch("left", seed=9)
    assert (policy.sample_actions(left, noise) - policy.sample_actions(other, noise)).abs().max() > 1e-4


def test_stage1_training_leaves_vlm_bit_identical_and_in_eval_mode(arch):
    policy = make_policy(arch)
    vlm_before = copy.deepcopy(policy.apt.vlm_module.state_dict())
    expert_before = {k: v.clone() for k, v in policy.named_parameters() if not k.startswith(policy.apt.vlm)}
    modes: list[bool] = []

    class ModeProbe(LossRecorder):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(any(m.training for m in pl_module.apt.vlm_module.modules()))

    t = trainer(20, [APTStageScheduler(stage=1), ModeProbe()], limit_val_batches=1, val_check_interval=2)
    t.fit(policy, loader(), loader(size=4))
    assert t.global_step == 20
    assert modes and not any(modes), "VLM must stay in eval mode through Lightning's train() calls"
    for name, value in policy.apt.vlm_module.state_dict().items():
        assert torch.equal(value, vlm_before[name]), name
    assert all(p.grad is None for p in policy.apt.vlm_module.parameters())
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in policy.apt.vlm_module.parameters()}, "VLM must not be in the optimizer"
    changed = [k for k, v in policy.named_parameters() if k in expert_before and not torch.equal(v, expert_before[k])]
    assert changed, "the expert must have trained"


def test_switch_is_exact_and_stage2_learns_language(arch):
    policy = make_policy(arch, gate_lr=3e-2)
    monitor = GateMonitor(every_n_steps=1)
    t = trainer(30, [APTStageScheduler(switch_at_step=10), monitor])
    stages: dict[int, int] = {}
    batch = make_batch(["left", "right"])
    noise = _noise(policy)

    class StageProbe(LossRecorder):
        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            stages[trainer.global_step] = pl_module.apt.stage  # the scheduler's hook ran first

    t.callbacks.append(StageProbe())
    t.fit(policy, loader())
    assert stages[9] == 1 and stages[10] == 2 and stages[29] == 2
    policy.eval()
    assert policy.apt.stage == 2, "after a fit that ended in Stage 2 the model stays in Stage 2"
    policy.apt._set_step(9)  # the same weights, run as Stage 1
    for site in policy.apt.sites.values():
        assert site.apt_fusion.gate_values()["attn"] != 0.0, "gates must open during Stage 2"
    # exact identity at the switch: same weights, Stage 1 vs Stage 2 with gates reset to zero
    stage1 = policy.sample_actions(batch, noise)
    saved = {
        n: (s.apt_fusion.apt_gate_attn.detach().clone(), s.apt_fusion.apt_gate_ff.detach().clone())
        for n, s in policy.apt.sites.items()
    }
    for s in policy.apt.sites.values():
        s.apt_fusion.reset_gates()
    policy.apt._set_step(10)
    assert (policy.sample_actions(batch, noise) - stage1).abs().max().item() <= 1e-6
    # with the trained gates, the instruction changes the actions
    for name, s in policy.apt.sites.items():
        s.apt_fusion.apt_gate_attn.data.copy_(saved[name][0])
        s.apt_fusion.apt_gate_ff.data.copy_(saved[name][1])
    same_obs = make_batch(["left", "left"]), make_batch(["right", "right"])
    delta = (policy.sample_actions(same_obs[0], noise) - policy.sample_actions(same_obs[1], noise)).abs().max().item()
    assert delta > 1e-2, delta
    stages = [h["stage"] for h in monitor.history]
    assert stages[0] == 1 and stages[-1] == 2


def test_switch_during_fit_preserves_output(arch):
    """The model right before the first Stage-2 step computes exactly what it computed in Stage 1."""
    policy = make_policy(arch)
    batch, noise = make_batch(["left", "right"]), _noise(policy)
    seen: dict[int, torch.Tensor] = {}

    class Probe(LossRecorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            if trainer.global_step == 6:  # weights after the last Stage-1 update; next batch is Stage 2
                pl_module.eval()
                seen[1] = pl_module.sample_actions(batch, noise)
                pl_module.apt._set_step(6)
                seen[2] = pl_module.sample_actions(batch, noise)
                pl_module.apt._set_step(5)
                pl_module.train()

    trainer(7, [APTStageScheduler(switch_at_step=6), Probe()]).fit(policy, loader())
    assert (seen[1] - seen[2]).abs().max().item() <= 1e-6
