"""What each APT stage costs against ordinary joint training, at each architecture's real proportions.

Both reference policies are built with the released models' geometry (pi0: PaliGemma 3B beside a Gemma-300M
expert; GR00T N1.5: a 12-layer Qwen3-1.7B-shaped backbone beside a 16-block DiT; see ``cost_harness``), widths
divided by ``--scale`` so they fit 2 CPU cores, and every mode runs side by side in one invocation (each in a
fresh process, so peak memory is the mode's own):

    python benchmarks/stage_cost.py [--scale 32] [--batch 4] [--steps 5] [--precision 32] [--fusion-ff-mult 4]
        [--flops-options ff4 no_ff ...] [--no-timing] [--json]

``--json`` prints one JSON object per model with ``stage1_over_joint``, ``stage1_cached_over_expert_only``,
``stage2_over_joint``, ``fusion_overhead``, ``sampling_overhead``, the step times and peak memory per mode, and the
FLOP-counted ``fusion_flops_overhead`` / ``sampling_flops_overhead`` of the default fusion at the real size
(deterministic; ``flop_count``), with the same for every fusion option under ``flops`` (``--flops-options``; none:
``--flops-options`` with no names). ``--no-timing`` prints the FLOP figures alone (a minute or two, no timing).
For full-size models on a GPU, run ``benchmarks/gpu_scale.py``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from cost_harness import MODES, measure, ratios
from flop_count import fusion_flops
from fusion_options import FUSION_OPTIONS

COLUMNS = ("joint", "stage1", "stage1_cached", "expert_only", "stage2", "stage2_bypassed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=32, help="divide every width by this (1 = real size)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (median), after 3 warm-up")
    parser.add_argument("--archs", nargs="+", default=["pi0", "groot"], choices=["pi0", "groot"])
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "bf16-true"])
    parser.add_argument("--fusion-ff-mult", type=int, default=4, help="fusion feed-forward expansion (default 4)")
    parser.add_argument(
        "--flops-options",
        nargs="*",
        default=list(FUSION_OPTIONS),
        choices=list(FUSION_OPTIONS),
        help="fusion options whose FLOP overheads are counted (benchmarks/fusion_options.py)",
    )
    parser.add_argument("--no-timing", action="store_true", help="FLOP counts only (no timed modes)")
    parser.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")
    args = parser.parse_args()
    device = torch.device("cpu")
    rows = []
    for arch in args.archs:
        start = time.perf_counter()
        row = {"model": arch}
        if not args.no_timing:
            row = ratios(
                measure(
                    arch,
                    args.scale,
                    args.batch,
                    args.steps,
                    device,
                    args.precision,
                    MODES,
                    isolate=True,
                    ff_mult=args.fusion_ff_mult,
                )
            )
        options = {name: FUSION_OPTIONS[name] for name in args.flops_options}
        default = fusion_flops(arch, {"default": {}})["default"]  # the FusionConfig defaults, whatever they are
        row["fusion_flops_overhead"] = default["fusion_flops_overhead"]
        row["sampling_flops_overhead"] = default["sampling_flops_overhead"]
        row["flops"] = fusion_flops(arch, options) if options else {}
        row["wall_s"] = round(time.perf_counter() - start, 1)
        row["threads"] = torch.get_num_threads()
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if args.json:
        return
    print("FLOP-counted overheads at the real size (fusion: Stage-2 training step, sampling: one sampling call)")
    for row in rows:
        for name, entry in {"default": row, **row["flops"]}.items():
            print(
                f"{row['model']:6} {name:14} fusion_flops_overhead {entry['fusion_flops_overhead']:.4f}  "
                f"sampling_flops_overhead {entry['sampling_flops_overhead']:.4f}"
            )
    if args.no_timing:
        return
    print(
        f"median step time (ms), batch {args.batch}, widths / {args.scale}, precision {args.precision}, "
        f"{torch.get_num_threads()} threads; peak memory (MiB) below"
    )
    print(f"{'model':6} {'VLM:expert':>10} " + " ".join(f"{c:>15}" for c in COLUMNS))
    for row in rows:
        share = f"{row['vlm_params'] / row['expert_params']:.1f}:1"
        print(f"{row['model']:6} {share:>10} " + " ".join(f"{row[c + '_s'] * 1e3:15.1f}" for c in COLUMNS))
        print(f"{'':6} {'':>10} " + " ".join(f"{row[c + '_peak_bytes'] / 2**20:15.0f}" for c in COLUMNS))
    keys = (
        "stage1_over_joint",
        "stage1_cached_over_expert_only",
        "stage2_over_joint",
        "fusion_overhead",
        "sampling_overhead",
    )
    for row in rows:
        print(f"{row['model']:6} " + ", ".join(f"{k} {row[k]:.2f}" for k in keys))


if __name__ == "__main__":
    main()
