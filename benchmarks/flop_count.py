"""Deterministic cost of Stage-2 fusion: FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``.

Wall-clock ratios on a shared CPU cannot resolve a 10 % effect; a FLOP count can, and it is the same on every
machine. For one policy of the harness's geometry (:func:`cost_harness.build`) this counts:

* ``train``: one Stage-2 training step (``flow_loss`` forward and backward; the optimiser's element-wise update is
  not a matmul and is not counted), with fusion on and with every fusion site bypassed;
* ``sample``: one ``sample_actions`` call (VLM prefix once, then every denoising step), likewise.

``fusion_flops_overhead`` = train(fusion) / train(bypassed); ``sampling_flops_overhead`` = sample(fusion) /
sample(bypassed). FlopCounterMode counts matrix products, convolutions and attention (the work that scales); at
batch 1 every figure is proportional to the batch size, so the ratios do not depend on it.

Real proportions. The harness divides every width by ``scale`` and keeps depths, head counts (above scale 4),
token counts and chunk sizes, so each count is exactly ``A / scale**2 + B / scale`` (products of two widths,
and attention or small projections with one). Two counts at scales whose divisions are exact (16 and 8) give
``A`` and ``B``, hence the count of the real model (scale 1) without building it; ``real_scale_check`` compares that
fit with a third, directly counted scale.
"""

from __future__ import annotations

from typing import Any

import torch
from cost_harness import build, make_batch
from torch.utils.flop_counter import FlopCounterMode

from apt_lightning.models.base import FlowMatchingPolicy


def count_flops(fn: Any) -> int:
    """Total FLOPs that ``fn()`` runs (FlopCounterMode's count: matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _set_fusion(policy: FlowMatchingPolicy, active: bool) -> None:
    for site in policy.apt.sites.values():
        site.active = active


def policy_flops(policy: FlowMatchingPolicy, batch: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """FLOPs of one Stage-2 training step and one sampling call of ``policy``, with fusion on and bypassed
    (``batch``: the harness's batch of one sample when ``None``)."""
    batch = batch or make_batch(policy, 1, torch.device("cpu"), torch.float32)
    batch_size = batch["state"].shape[0]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch_size, policy.chunk_size, policy.noise_dim, generator=generator)
    time = torch.full((batch_size,), 0.5)
    counts: dict[str, int] = {}
    for active, suffix in ((True, "fusion"), (False, "bypassed")):
        _set_fusion(policy, active)
        policy.train()

        def step() -> None:
            policy.flow_loss(batch, noise, time).backward()

        counts[f"train_{suffix}"] = count_flops(step)
        policy.zero_grad(set_to_none=True)
        policy.eval()
        counts[f"sample_{suffix}"] = count_flops(lambda: policy.sample_actions(batch, noise=noise))
    _set_fusion(policy, True)
    return counts


def overheads(counts: dict[str, float]) -> dict[str, float]:
    """``fusion_flops_overhead`` and ``sampling_flops_overhead`` from :func:`policy_flops`'s counts."""
    return {
        "fusion_flops_overhead": round(counts["train_fusion"] / counts["train_bypassed"], 4),
        "sampling_flops_overhead": round(counts["sample_fusion"] / counts["sample_bypassed"], 4),
    }


def flops_at(arch: str, scale: int, fusion_options: dict[str, Any] | None = None) -> dict[str, int]:
    """:func:`policy_flops` of ``arch`` at ``scale`` (seeded: the count never depends on the weights anyway)."""
    torch.manual_seed(0)
    policy = build(arch, "stage2", scale, fusion_options=fusion_options)
    return policy_flops(policy)


def extrapolate(counts: dict[int, dict[str, int]], scale: int = 1) -> dict[str, float]:
    """Counts at ``scale`` from counts at two scales, each count being ``A / s**2 + B / s``."""
    (s1, c1), (s2, c2) = sorted(counts.items())
    out = {}
    for key in c1:
        # c = A / s^2 + B / s  ->  solve the 2x2 system for A, B
        det = 1 / (s1**2 * s2) - 1 / (s2**2 * s1)
        a = (c1[key] / s2 - c2[key] / s1) / det
        b = (c2[key] / s1**2 - c1[key] / s2**2) / det
        out[key] = a / scale**2 + b / scale
    return out


def fusion_flops(
    arch: str, options: dict[str, dict[str, Any]], scales: tuple[int, int] = (16, 8)
) -> dict[str, dict[str, Any]]:
    """Per option: the overheads at the real size (extrapolated from ``scales``) and at each counted scale."""
    out: dict[str, dict[str, Any]] = {}
    for name, fusion_options in options.items():
        counted = {s: flops_at(arch, s, fusion_options) for s in scales}
        real = extrapolate(counted)
        entry: dict[str, Any] = {**overheads(real), "gflops_real": {k: round(v / 1e9, 1) for k, v in real.items()}}
        for s, c in counted.items():
            entry[f"scale{s}"] = {**overheads(c), "flops": c}
        out[name] = entry
    return out
