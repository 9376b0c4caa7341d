#!/usr/bin/env bash
# Issue 19's GPU check, prepared as one command for a lent GPU (docs/performance.md, "Latency per action chunk"):
# per-chunk latency at the real size in bf16, batch 1 and 32, eager and compiled, default fusion and ff_mult=0,
# then CUDA graphs (compile mode reduce-overhead) at batch 1. Every part has its own time limit (PART_TIMEOUT), so
# one that runs long still leaves the others' results; its log keeps every measured cell as a JSON line (the .json
# file is written only when a part finishes). Results: $OUT (default runs/gpu_latency).
#
#   bash benchmarks/gpu_latency.sh                 # on the GPU machine, from the repository root
#   SCALE=32 REPEATS=2 bash benchmarks/gpu_latency.sh   # a dry run of the script on CPU, small widths
set -uo pipefail
out="$(mkdir -p "${OUT:-runs/gpu_latency}" && cd "${OUT:-runs/gpu_latency}" && pwd)"
scale="${SCALE:-1}"
repeats="${REPEATS:-20}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd benchmarks || exit 1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" \
    | tee "$out/card.txt"
for option in ff4 no_ff; do
    timeout "${PART_TIMEOUT:-200}" python3 latency.py --scale "$scale" --precision bf16-true --fusion-option "$option" \
        --repeats "$repeats" --json "$out/latency_$option.json" 2>&1 | tee "$out/latency_$option.log"
done
timeout "${PART_TIMEOUT:-200}" python3 latency.py --scale "$scale" --precision bf16-true --modes compiled \
    --compile-mode reduce-overhead --batches 1 --repeats "$repeats" --json "$out/latency_cudagraphs.json" 2>&1 \
    | tee "$out/latency_cudagraphs.log"
