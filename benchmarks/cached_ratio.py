"""Cached Stage 1 against the expert alone, as paired interleaved steps in one process.

``stage_cost.py`` times each mode in its own process, one after the other: on a machine whose load changes by the
minute (shared CPUs), two modes timed minutes apart are not comparable. Here both models are built in one process
and their steps alternate (order swapped every pair), so each pair sees the same load; the median of the per-pair
ratios is the figure. Both modes prove they ran as named (``cost_harness.check_mode``: one fill, every later step
served by the cache), or the script fails.

    python benchmarks/cached_ratio.py [--archs pi0 groot] [--pairs 12] [--scale 32] [--batch 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from cost_harness import HeldFeatures, Stage1FeatureCache, attach_cache, build, check_mode, make_batch, train_step


def paired_ratio(arch: str, pairs: int, scale: int = 32, batch_size: int = 4, warmup: int = 2) -> dict:
    """Median of ``pairs`` per-pair ratios ``stage1_cached / expert_only`` step time, with the evidence."""
    torch.manual_seed(0)
    runs = {}
    for mode in ("stage1_cached", "expert_only"):
        policy = build(arch, mode, scale).train()
        cache = Stage1FeatureCache(max_memory="64GiB") if mode == "stage1_cached" else HeldFeatures()
        attach_cache(policy, cache)
        batch = make_batch(policy, batch_size, torch.device("cpu"), torch.float32)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
        runs[mode] = (policy, cache, train_step(policy, batch, optimizer, contextlib.nullcontext))
    for _, _, step in runs.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for i in range(pairs):
        for mode in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            start = time.perf_counter()
            runs[mode][2]()
            times[mode].append(time.perf_counter() - start)
    evidence = {mode: check_mode(p, mode, warmup + pairs, batch_size, 0, c) for mode, (p, c, _) in runs.items()}
    ratios = [c / e for c, e in zip(times["stage1_cached"], times["expert_only"], strict=True)]
    return {
        "model": arch,
        "pairs": pairs,
        "median_paired_ratio": round(statistics.median(ratios), 3),
        "paired_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "cached_median_s": round(statistics.median(times["stage1_cached"]), 4),
        "expert_only_median_s": round(statistics.median(times["expert_only"]), 4),
        "evidence": evidence,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["pi0", "groot"], choices=["pi0", "groot"])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--scale", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    for arch in args.archs:
        print(json.dumps(paired_ratio(arch, args.pairs, args.scale, args.batch)), flush=True)


if __name__ == "__main__":
    main()
