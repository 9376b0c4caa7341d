"""A benchmark proves its mode (issue 26, item 6): ``stage1_cached`` is served by the feature cache, ``stage2``
runs its fusion blocks at every step and ``stage2_bypassed`` never, or the measurement fails loudly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cost_harness
from cost_harness import ModeNotInEffectError, measure_mode

CPU = torch.device("cpu")
SMALL = dict(scale=128, batch_size=2, steps=1, device=CPU, sampling=False, warmup=1)


@pytest.mark.parametrize("mode", ["stage1_cached", "expert_only"])
def test_a_cached_mode_fills_once_and_serves_every_later_step(mode):
    result = measure_mode("pi0", mode, **SMALL)
    assert result[f"{mode}_cache_misses"] == 2 and result[f"{mode}_cache_hits"] == 2  # 2 runs x 2 samples
    assert result[f"{mode}_fusion_calls"] == 0


def test_stage2_runs_its_fusion_at_every_step_and_the_bypassed_mode_never():
    stage2 = measure_mode("groot", "stage2", **SMALL)
    bypassed = measure_mode("groot", "stage2_bypassed", **SMALL)
    assert stage2["stage2_fusion_calls"] >= 2 and bypassed["stage2_bypassed_fusion_calls"] == 0


def test_the_old_private_attribute_attach_is_caught_not_measured_as_cached(monkeypatch):
    """What the harness did before: it set `policy._apt_feature_cache`, which the controller does not read."""

    def old_attach(policy, cache):
        policy._apt_feature_cache = cache

    monkeypatch.setattr(cost_harness, "attach_cache", old_attach)
    with pytest.raises(
        ModeNotInEffectError, match=r"`stage1_cached` was not in effect: the cache computed 0 and served 0"
    ):
        measure_mode("pi0", "stage1_cached", **SMALL)


def test_a_fusion_that_does_not_run_in_stage2_is_caught(monkeypatch):
    real_build = cost_harness.build

    def build_bypassed(*args, **kwargs):
        policy = real_build(*args, **kwargs)
        for site in policy.apt.sites.values():
            site.active = False
        return policy

    monkeypatch.setattr(cost_harness, "build", build_bypassed)
    with pytest.raises(ModeNotInEffectError, match=r"`stage2` was not in effect: the fusion blocks ran 0 times"):
        measure_mode("groot", "stage2", **SMALL)


def test_the_latency_benchmark_checks_its_fusion_calls_and_compiled_graph():
    import latency

    rows = latency.measure("groot", 128, [1], 1, ["eager"], "ff4", CPU, torch.float32)  # counts its fusion calls
    assert {row["variant"] for row in rows} == {"no_fusion", "apt_stage2"}
    policy = cost_harness.build("groot", "stage2", 128)
    with pytest.raises(ModeNotInEffectError, match=r"`compiled` was not in effect: .*no compiled graph ran"):
        latency.check_latency_mode(policy, "compiled", fusion_calls=4, new_graphs=0, first=True)
    with pytest.raises(ModeNotInEffectError, match=r"fusion blocks never ran"):
        latency.check_latency_mode(policy, "eager", fusion_calls=0, new_graphs=0, first=True)


def test_the_paired_cached_ratio_benchmark_proves_the_cache_served():
    import cached_ratio

    result = cached_ratio.paired_ratio("groot", pairs=2, scale=128, batch_size=2, warmup=1)
    assert result["evidence"]["stage1_cached"] == {"fusion_calls": 0, "cache_hits": 4, "cache_misses": 2}
    assert result["median_paired_ratio"] > 0
