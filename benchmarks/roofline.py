"""Predicted per-chunk sampling latency on a GPU: a roofline over counted FLOPs and weight bytes.

FLOPs alone (``flop_count``) describe batch 32, where a denoising step is compute-bound. At batch 1, the robot's
case, a step multiplies a few dozen action tokens by every expert and fusion weight: the GPU waits on memory, and
what Stage 2 adds is the fusion blocks' *weights*, read again at every denoising step. This script counts, for
every matrix product and attention call of one ``sample_actions`` call, its FLOPs (``FlopCounterMode``'s rules)
and the bytes of the weights it reads (bf16: 2 bytes per parameter), then sums the roofline time of each op::

    t = sum over ops of max(flops / peak_flops, weight_bytes / memory_bandwidth)

for the model without fusion (every site bypassed) and APT Stage 2, at batch 1 and 32, per fusion option, on the
cards in ``CARDS`` (vendor peak figures: dense bf16 tensor throughput and HBM bandwidth).

What it leaves out, on purpose: kernel launches (the compiled path with CUDA graphs, ``compile_sampling(
mode="reduce-overhead")``, removes most of them), activation traffic (at batch 1 it is small beside the weights,
e.g. pi0's expert reads its prefix KV cache, about 6 MB per step against 0.6 GB of expert weights), element-wise
ops and the efficiency gap to peak. The figures are therefore lower bounds of latency, and the *ratio*
APT / no fusion is what they are for. Counts are deterministic (two runs print the same numbers).

Real size without building it: as in ``flop_count``, each op's FLOPs and weight bytes are ``A / s**2 + B / s`` in
the width divisor ``s`` (the op sequence does not depend on ``s``), so counts at scales 16 and 8 give every op's
figures at the real size, op by op, before the ``max``.

    python benchmarks/roofline.py [--archs pi0 groot] [--options ff4 ff1 no_ff no_ff_every2] [--json out.json]
        [--plot out.png] [--rows-from out.json]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from cost_harness import build, make_batch
from flop_count import extrapolate
from fusion_options import FUSION_OPTIONS
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from apt_lightning.models.base import FlowMatchingPolicy

BYTES_PER_WEIGHT = 2
"""bf16 weights, as a GPU deployment runs them."""

CARDS: dict[str, tuple[float, float]] = {
    "H100 SXM": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
}
"""Card -> (dense bf16 FLOP/s, memory bytes/s), vendor peak figures."""

SCALES = (16, 8)


class OpCostMode(FlopCounterMode):
    """``FlopCounterMode`` that also records, op by op, the FLOPs and the weight elements each counted op reads.

    A weight is any tensor whose storage is one of ``weights``' storages (views such as ``weight.t()`` included);
    each op counts a weight once, as a kernel reads it once from memory.
    """

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__(display=False)
        self.weight_storages = {w.untyped_storage().data_ptr() for w in weights}
        self.ops: list[tuple[int, int]] = []

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            storages = {
                t.untyped_storage().data_ptr(): t.numel()
                for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.weight_storages
            }
            self.ops.append((int(flops), sum(storages.values())))
        return out


def sampling_ops(policy: FlowMatchingPolicy, batch: dict[str, torch.Tensor], fusion: bool) -> list[tuple[int, int]]:
    """(FLOPs, weight elements) of every counted op of one sampling call on ``batch``, in order."""
    for site in policy.apt.sites.values():
        site.active = fusion
    batch_size = batch["state"].shape[0]
    noise = torch.randn(batch_size, policy.chunk_size, policy.noise_dim, generator=torch.Generator().manual_seed(0))
    mode = OpCostMode([*policy.parameters(), *policy.buffers()])
    with mode:
        policy.sample_actions(batch, noise=noise)
    return mode.ops


def real_size_ops(arch: str, option: dict[str, Any], batch_size: int, fusion: bool) -> list[dict[str, float]]:
    """Every op's FLOPs and weight elements at the real size, extrapolated op by op from ``SCALES``."""
    per_scale = {}
    for scale in SCALES:
        torch.manual_seed(0)
        policy = build(arch, "stage2", scale, fusion_options=option).eval()
        batch = make_batch(policy, batch_size, torch.device("cpu"), torch.float32)
        per_scale[scale] = sampling_ops(policy, batch, fusion)
    lengths = {len(ops) for ops in per_scale.values()}
    if len(lengths) != 1:
        raise RuntimeError(f"{arch}: the op sequence changed with the scale ({lengths}); cannot extrapolate op by op")
    real = []
    for ops in zip(*per_scale.values(), strict=True):
        counts = {s: {"flops": op[0], "weights": op[1]} for s, op in zip(per_scale, ops, strict=True)}
        real.append({k: max(v, 0.0) for k, v in extrapolate(counts).items()})
    return real


def roofline_ms(ops: list[dict[str, float]], card: str) -> float:
    """Sum over ops of max(compute time, weight-read time), in milliseconds."""
    peak, bandwidth = CARDS[card]
    return 1e3 * sum(max(op["flops"] / peak, op["weights"] * BYTES_PER_WEIGHT / bandwidth) for op in ops)


GOAL = 1.2
"""Issue 19's goal for APT's batch-1 latency over the model without fusion, drawn on the plot."""


def plot_batch1(rows: list[dict[str, Any]], path: str) -> None:
    """Bars of the predicted batch-1 ratio per fusion option, one group per (model, card), the goal as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["batch"] == 1]
    options = list(dict.fromkeys(r["option"] for r in rows))
    groups = list(dict.fromkeys((r["model"], r["card"]) for r in rows))
    fig = Figure(figsize=(8, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(options)
    for i, option in enumerate(options):
        heights = [
            next(r["apt_over_no_fusion"] for r in rows if (r["model"], r["card"], r["option"]) == (*g, option))
            for g in groups
        ]
        label = f"{option} (default)" if option == "ff4" else option
        bars = ax.bar([j + i * width for j in range(len(groups))], heights, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(GOAL, color="black", linestyle="--", linewidth=1, label=f"goal {GOAL}x")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{m}\n{c}" for m, c in groups])
    ax.set_ylim(1.0, max(r["apt_over_no_fusion"] for r in rows) + 0.08)
    ax.set_ylabel("APT / no fusion, batch 1")
    ax.set_title("Predicted per-chunk latency ratio at batch 1 (roofline, real size, bf16)", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["pi0", "groot"], choices=["pi0", "groot"])
    parser.add_argument("--options", nargs="+", default=list(FUSION_OPTIONS), choices=list(FUSION_OPTIONS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--json", default=None, help="also write every row to this file")
    parser.add_argument("--plot", default=None, help="also draw the batch-1 ratios to this PNG (needs matplotlib)")
    parser.add_argument("--rows-from", default=None, help="read the rows from this --json file instead of counting")
    args = parser.parse_args()
    rows = []
    if args.rows_from:
        with open(args.rows_from) as f:
            rows = json.load(f)["rows"]
        args.archs = []
    for arch in args.archs:
        for batch_size in args.batches:
            base = real_size_ops(arch, FUSION_OPTIONS[args.options[0]], batch_size, fusion=False)
            for name in args.options:
                apt = real_size_ops(arch, FUSION_OPTIONS[name], batch_size, fusion=True)
                for card in CARDS:
                    no_fusion, with_fusion = roofline_ms(base, card), roofline_ms(apt, card)
                    row = {
                        "model": arch,
                        "option": name,
                        "batch": batch_size,
                        "card": card,
                        "no_fusion_ms": round(no_fusion, 3),
                        "apt_ms": round(with_fusion, 3),
                        "apt_over_no_fusion": round(with_fusion / no_fusion, 3),
                        "weight_gb_read": {
                            "no_fusion": round(sum(op["weights"] for op in base) * BYTES_PER_WEIGHT / 1e9, 2),
                            "apt": round(sum(op["weights"] for op in apt) * BYTES_PER_WEIGHT / 1e9, 2),
                        },
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("\nroofline ms per chunk (lower bounds; the ratio is the figure), real size, bf16")
    print(f"{'model':6} {'option':13} {'batch':>5} {'card':9} {'no fusion':>10} {'APT':>10} {'APT / no fusion':>16}")
    for r in rows:
        print(
            f"{r['model']:6} {r['option']:13} {r['batch']:5d} {r['card']:9} {r['no_fusion_ms']:10.2f} "
            f"{r['apt_ms']:10.2f} {r['apt_over_no_fusion']:16.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/roofline.py", "cards": CARDS, "rows": rows}, f, indent=1)
    if args.plot:
        plot_batch1(rows, args.plot)


if __name__ == "__main__":
    main()
