"""Full-size pi0 and GR00T-N1.5-size policies on one GPU: step time, peak memory and tokens per second for
joint training, APT Stage 1, cached Stage 1, the expert-only bound and Stage 2 (random weights, bf16).

    python benchmarks/gpu_scale.py [--batch 32] [--steps 10] [--precision bf16-true bf16-mixed] [--json out.json]

Needs a CUDA GPU with about 80 GB for pi0's joint step in bf16-mixed (fp32 master weights and AdamW states
for 3.3B parameters); prints the card's name with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
from cost_harness import MODES, measure, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--archs", nargs="+", default=["pi0", "groot"])
    parser.add_argument("--precision", nargs="+", default=["bf16-true"], choices=["bf16-true", "bf16-mixed", "32"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--fusion-ff-mult", type=int, default=4, help="fusion feed-forward expansion (default 4)")
    parser.add_argument("--json", default=None, help="also write every result to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_scale.py needs a CUDA GPU; use benchmarks/stage_cost.py on CPU.")
    device = torch.device("cuda")
    card = torch.cuda.get_device_name()
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{card}, torch {torch.__version__}, batch {args.batch}, median of {args.steps} steps", flush=True)
    results = []
    for precision in args.precision:
        for arch in args.archs:
            start = time.perf_counter()
            try:
                row = ratios(
                    measure(
                        arch,
                        1,
                        args.batch,
                        args.steps,
                        device,
                        precision,
                        tuple(args.modes),
                        log=lambda line: print(line, flush=True),
                        ff_mult=args.fusion_ff_mult,
                    )
                )
            except Exception as error:
                traceback.print_exc()
                row = {"model": arch, "precision": precision, "error": f"{type(error).__name__}: {error}"[:300]}
                torch.cuda.empty_cache()
            row["card"], row["wall_s"] = card, round(time.perf_counter() - start, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every model, so a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
