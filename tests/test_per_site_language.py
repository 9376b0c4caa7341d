"""Reference models with per-site language contexts: fusion site i reads the VLM layer at its own depth."""

from __future__ import annotations

import pytest
import torch

from apt_lightning import APTConfig, StagePlan
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_lightning.models.base import site_layers
from helpers import make_batch

SWITCH = 4


def build(arch: str, per_site: bool):
    torch.manual_seed(0)
    config = APTConfig(lr=3e-3)
    if arch == "pi0":
        return PI0Policy(tiny_pi0_config(), apt_config=config, per_site_language=per_site)
    vlm = tiny_paligemma_config()
    return GR00TStylePolicy(
        vlm, select_layer=1, head_width=32, head_depth=4, apt_config=config, per_site_language=per_site
    )


def noise(policy):
    return torch.randn(2, policy.chunk_size, policy.noise_dim, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ["pi0", "groot"])
def test_sites_read_their_own_layers_and_the_switch_stays_exact(arch):
    policy = build(arch, per_site=True)
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH))
    policy.eval()
    batch = make_batch(["left", "right"])
    stage1 = policy.sample_actions(batch, noise(policy))
    policy.apt._set_step(SWITCH)
    assert torch.equal(policy.sample_actions(batch, noise(policy)), stage1)  # closed gates: identity
    seen: dict[str, torch.Tensor] = {}
    for name, site in policy.apt.sites.items():
        original = site.set_context

        def record(context, mask=None, name=name, original=original):
            if context is not None:
                seen[name] = context
            original(context, mask)

        site.set_context = record
    for site in policy.apt.sites.values():
        for gate in site.apt_fusion.gate_parameters():
            gate.data.fill_(0.5)
    policy.sample_actions(batch, noise(policy))
    contexts = list(seen.values())
    layers = site_layers(len(contexts), 2)  # the tiny VLMs have 2 text layers
    assert len(contexts) == len(policy.apt.sites) and layers[0] != layers[-1]
    assert not torch.equal(contexts[0], contexts[-1])  # first and last sites read different layers


def test_site_layers_spread_by_depth():
    assert site_layers(4, 2) == [1, 1, 2, 2] and site_layers(2, 4) == [2, 4] and site_layers(18, 18)[-1] == 18
