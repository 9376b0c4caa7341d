"""Per-chunk sampling latency: the model without fusion vs APT Stage 2, eager vs compiled, batch 1 and 32.

One ``sample_actions`` call is one action chunk (VLM prefix once, then every denoising step). Both reference
policies are built at the harness's real proportions (``cost_harness.build``, widths divided by ``--scale``); the
model without fusion is the same Stage-2 model with every fusion site bypassed (exactly the Stage-1 computation).
Compiled runs use :meth:`~apt_lightning.models.base.FlowMatchingPolicy.compile_sampling` (``torch.compile`` of the
denoising step, full graph, static shapes, prompts padded to 16-token buckets); compilation happens in the warm-up
calls and is reported separately. Every cell is the median, min and max over ``--repeats`` calls after warm-up,
all in one run, side by side, the two variants' calls alternating:

    python benchmarks/latency.py [--scale 32] [--batches 1 32] [--repeats 10] [--archs pi0 groot]
        [--fusion-option ff4] [--modes eager compiled] [--precision bf16-true] [--compile-mode reduce-overhead]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from typing import Any

import torch
from cost_harness import FusionCalls, ModeNotInEffectError, build, make_batch
from fusion_options import FUSION_OPTIONS

from apt_lightning.models.base import FlowMatchingPolicy


def cpu_name() -> str:
    """The CPU model as the kernel reports it (``platform.processor()`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed_calls(fns: dict[str, Any], repeats: int, warmup: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Per variant: seconds of the warm-up (compilation included) and median/min/max of ``repeats`` timed calls.

    The variants' calls alternate (A, B, A, B, ...), so a slow spell of a shared machine hits both sides alike
    instead of only the variant that happened to run during it.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm: dict[str, float] = {}
    for name, fn in fns.items():
        tic = time.perf_counter()
        for _ in range(warmup):
            fn()
        sync()
        warm[name] = time.perf_counter() - tic
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            tic = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - tic)
    return {
        name: {
            "median_ms": statistics.median(t) * 1e3,
            "min_ms": min(t) * 1e3,
            "max_ms": max(t) * 1e3,
            "warmup_s": warm[name],
        }
        for name, t in times.items()
    }


def _compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def check_latency_mode(policy: FlowMatchingPolicy, mode: str, fusion_calls: int, new_graphs: int, first: bool) -> None:
    """The timed calls ran as named: the fusion blocks ran (``apt_stage2``), and a ``compiled`` mode sampled
    through its compiled step, which compiled a graph on its first batch size.

    Raises:
        ModeNotInEffectError: otherwise (the figures would time another path).
    """
    problems = []
    if fusion_calls == 0:  # -1: not counted (compiled)
        problems.append("the fusion blocks never ran in the `apt_stage2` variant")
    if mode == "compiled" and (policy._apt_compiled_step is None or (first and new_graphs == 0)):
        problems.append(f"no compiled graph ran (compiled step {policy._apt_compiled_step!r}, {new_graphs} new graphs)")
    if mode == "eager" and policy._apt_compiled_step is not None:
        problems.append("the eager mode sampled through a compiled step")
    if problems:
        raise ModeNotInEffectError(f"Latency mode `{mode}` was not in effect: " + "; ".join(problems) + ".")


def set_fusion(policy: FlowMatchingPolicy, active: bool) -> None:
    for site in policy.apt.sites.values():
        site.active = active


def measure(
    arch: str,
    scale: int,
    batches: list[int],
    repeats: int,
    modes: list[str],
    option: str,
    device: torch.device,
    dtype: torch.dtype,
    compile_mode: str | None = None,
) -> list[dict[str, Any]]:
    """One row per (mode, batch, variant) of ``arch``."""
    torch.manual_seed(0)
    with torch.device(device):
        policy = build(arch, "stage2", scale, fusion_options=FUSION_OPTIONS[option]).to(dtype).eval()
    with torch.no_grad():  # open gates: APT's fusion path runs as after training
        for site in policy.apt.sites.values():
            for gate in site.apt_fusion.gate_parameters():
                gate.fill_(0.1)
    rows = []
    for mode in modes:
        if mode == "compiled":
            torch._dynamo.reset()
            policy.compile_sampling(bucket=16, **({"mode": compile_mode} if compile_mode else {}))
        else:
            policy.eager_sampling()
        for batch_size in batches:
            batch = make_batch(policy, batch_size, device, dtype)
            noise = torch.randn(batch_size, policy.chunk_size, policy.noise_dim, device=device, dtype=dtype)

            def chunk(active: bool) -> None:
                set_fusion(policy, active)
                policy.sample_actions(batch, noise)  # noqa: B023

            variants = {"no_fusion": lambda: chunk(False), "apt_stage2": lambda: chunk(True)}
            graphs_before = _compiled_graphs()
            # hooks inside a compiled step would force recompiles: fusion is counted on the eager path only
            counting = FusionCalls(policy) if mode == "eager" else contextlib.nullcontext()
            with counting:
                timings = timed_calls(variants, repeats, 2, device)
            fusion_calls = counting.calls if mode == "eager" else -1
            check_latency_mode(policy, mode, fusion_calls, _compiled_graphs() - graphs_before, batch_size == batches[0])
            for variant, stats in timings.items():
                row = {"model": arch, "mode": mode, "batch": batch_size, "variant": variant, **stats}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=32, help="divide every width by this (1 = real size)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--archs", nargs="+", default=["pi0", "groot"], choices=["pi0", "groot"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--fusion-option", default="ff4", choices=list(FUSION_OPTIONS))
    parser.add_argument("--precision", default="32", choices=["32", "bf16-true"])
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode of the compiled runs (reduce-overhead: CUDA graphs on a GPU)",
    )
    parser.add_argument("--json", default=None, help="also write every row to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    card = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    print(f"{card}, {torch.get_num_threads()} threads, torch {torch.__version__}, widths / {args.scale}", flush=True)
    rows = []
    for arch in args.archs:
        rows += measure(
            arch,
            args.scale,
            args.batches,
            args.repeats,
            args.modes,
            args.fusion_option,
            device,
            dtype,
            args.compile_mode,
        )
    print(f"\nms per chunk, median [min, max] of {args.repeats} calls; fusion option {args.fusion_option}")
    print(f"{'model':6} {'mode':9} {'batch':>5} {'no fusion':>26} {'APT Stage 2':>26} {'APT / no fusion':>16}")
    for arch in args.archs:
        for mode in args.modes:
            for b in args.batches:
                cell = {r["variant"]: r for r in rows if (r["model"], r["mode"], r["batch"]) == (arch, mode, b)}
                base, apt = cell["no_fusion"], cell["apt_stage2"]
                text = [f"{c['median_ms']:8.1f} [{c['min_ms']:.1f}, {c['max_ms']:.1f}]" for c in (base, apt)]
                ratio = apt["median_ms"] / base["median_ms"]
                print(f"{arch:6} {mode:9} {b:5d} {text[0]:>26} {text[1]:>26} {ratio:16.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": card,
                    "threads": torch.get_num_threads(),
                    "scale": args.scale,
                    "precision": args.precision,
                    "compile_mode": args.compile_mode,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
