"""The compiled sampling path: one graph per documented guard, no graph break, same actions as eager."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from apt_lightning import StagePlan
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_lightning.models.sampling import pad_prompt

TOLERANCE = 1e-5
"""Compiled (bucket-padded) and eager actions agree to this, in float32 (measured: ~2e-7 on these models)."""


class CountingBackend:
    """A ``torch.compile`` backend that runs the traced graph eagerly and counts compilations."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, inputs: list) -> object:
        self.graphs += 1
        return graph.forward


def build(arch: str) -> PI0Policy | GR00TStylePolicy:
    torch.manual_seed(0)
    if arch == "pi0":
        policy = PI0Policy(tiny_pi0_config())
    else:
        policy = GR00TStylePolicy(tiny_paligemma_config(), select_layer=1, head_width=16, head_depth=2)
    policy.apt.prepare(StagePlan(first_stage=2))
    with torch.no_grad():  # open gates: the fusion path really runs
        for site in policy.apt.sites.values():
            for gate in site.apt_fusion.gate_parameters():
                gate.fill_(0.5)
    return policy.eval()


def prompt_batch(length: int, batch_size: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(3, 100, (batch_size, length), generator=g)
    return {
        "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=g),
        "state": torch.randn(batch_size, 2, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "language_mask": torch.ones_like(ids, dtype=torch.bool),
    }


def test_one_graph_per_bucket_guidance_and_stage(arch: str) -> None:
    policy = build(arch)
    noise = torch.randn(2, policy.chunk_size, policy.noise_dim)
    eager = {n: policy.sample_actions(prompt_batch(n), noise) for n in (5, 9)}
    guided_eager = policy.sample_actions(prompt_batch(5), noise, guidance_scale=2.0)
    backend = CountingBackend()
    policy.compile_sampling(bucket=16, backend=backend)  # fullgraph=True: a graph break would raise
    for n in (5, 9):  # two instruction lengths, one bucket: one graph for every step of both calls
        torch.testing.assert_close(policy.sample_actions(prompt_batch(n), noise), eager[n], atol=TOLERANCE, rtol=0)
    assert backend.graphs == 1
    guided = policy.sample_actions(prompt_batch(5), noise, guidance_scale=2.0)  # doubled rows: one more graph
    torch.testing.assert_close(guided, guided_eager, atol=TOLERANCE, rtol=0)
    assert backend.graphs == 2
    policy.sample_actions(prompt_batch(20), noise)  # the next bucket (32 tokens)
    assert backend.graphs == 3
    for site in policy.apt.sites.values():  # Stage 1 / fusion bypassed: one more graph
        site.active = False
    policy.sample_actions(prompt_batch(9), noise)
    policy.sample_actions(prompt_batch(5), noise)
    assert backend.graphs == 4
    policy.eager_sampling()
    assert policy.sample_actions(prompt_batch(5), noise).shape == (*noise.shape[:2], policy.action_dim)


def test_padding_a_prompt_keeps_the_actions(arch: str) -> None:
    policy = build(arch)
    noise, batch = torch.randn(2, policy.chunk_size, policy.noise_dim), prompt_batch(5)
    padded = policy.sample_actions(pad_prompt(batch, 8), noise)
    torch.testing.assert_close(padded, policy.sample_actions(batch, noise), atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_inductor_compiled_sampling_matches_eager(arch: str) -> None:
    policy = build(arch)
    noise, batch = torch.randn(2, policy.chunk_size, policy.noise_dim), prompt_batch(7)
    eager = policy.sample_actions(batch, noise, guidance_scale=1.5)
    torch._dynamo.reset()
    policy.compile_sampling(bucket=16)  # the default backend (inductor)
    torch.testing.assert_close(policy.sample_actions(batch, noise, guidance_scale=1.5), eager, atol=1e-4, rtol=0)


def readme_example() -> ModuleType:
    """``examples/add_apt_to_existing_trainer.py``: the README's adapter pattern, runnable."""
    path = Path(__file__).parents[1] / "examples" / "add_apt_to_existing_trainer.py"
    spec = importlib.util.spec_from_file_location("add_apt_to_existing_trainer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_adapter_pattern_compiles_once_per_stage_and_guidance() -> None:
    """A user's expert, compiled as a module, inside ``apt.fusion_context``: no graph break, one graph per
    padded prompt length, guidance and stage, and the same actions as eager."""
    example = readme_example()
    torch.manual_seed(0)
    model = example.MyVLA().eval()
    model.apt.prepare(StagePlan(first_stage=2))
    with torch.no_grad():
        for site in model.apt.sites.values():
            for gate in site.apt_fusion.gate_parameters():
                gate.fill_(0.5)

    def batch(length: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(3, example.VOCAB, (2, length), generator=g)
        prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "language_mask": ids > 0}
        return {"patches": torch.randn(2, example.PATCHES, 12, generator=g), **pad_prompt(prompt, 8)}

    noise = torch.randn(2, example.CHUNK, 2)
    eager = {n: model.sample_actions(batch(n), noise, num_steps=3) for n in (3, 5)}
    guided_eager = model.sample_actions(batch(3), noise, num_steps=3, guidance_scale=2.0)
    backend = CountingBackend()
    model.expert.compile(fullgraph=True, dynamic=False, backend=backend)
    for n in (3, 5):  # one padded length: one graph for every step of both calls
        torch.testing.assert_close(model.sample_actions(batch(n), noise, num_steps=3), eager[n], atol=TOLERANCE, rtol=0)
    assert backend.graphs == 1
    guided = model.sample_actions(batch(3), noise, num_steps=3, guidance_scale=2.0)
    torch.testing.assert_close(guided, guided_eager, atol=TOLERANCE, rtol=0)
    assert backend.graphs == 2
    for site in model.apt.sites.values():  # Stage 1 / fusion bypassed
        site.active = False
    model.sample_actions(batch(3), noise, num_steps=3)
    model.sample_actions(batch(5), noise, num_steps=3)
    assert backend.graphs == 3
