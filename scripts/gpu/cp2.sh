#!/usr/bin/env bash
# Device call on a 2-GPU machine (NCCL): the CP correctness tests, the CP benchmark (bounded), and a
# re-run of the GPU conformance cases that hit Inductor's flex-decoding lowering error.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TAIL=12 step 110 cp_tests.log python3 -m pytest tests/cp/test_cp_gpu.py -m multigpu -q -p no:cacheprovider
TAIL=30 step 170 cp_bench.log python3 benchmarks/cp_bench.py --launch 2 --tokens 8192 16384 --iters 10 \
  --time-budget 140 --timeout 165 --out "$OUT/cp_h2.json" --markdown "$OUT/cp_h2.md"
ids="gpu/attn/torch/window/bfloat16/d256/gqa4 or gpu/attn/torch/documents/float16/d64/gqa4 or gpu/kernel/torch/non_causal/bfloat16/d64/mqa or gpu/kernel/torch/causal/bfloat16/d128/mqa or gpu/kernel/torch/window_bidir/float16/d256/gqa4"
TAIL=8 step 70 conf_rerun.log python3 -m conformance --tier gpu --backends torch -k "$ids" --time-budget 55 --json "$OUT/conf_rerun.json"
