#!/usr/bin/env bash
# Device call A on a 2-GPU machine (NCCL): stash flash-attn-4 part one for call B, check the torch
# backend's bundled-flash LSE kernel on the GPU, the CP correctness tests, the CP benchmark (torch).
# carry: .carry/fa4_1 .carry/wheels
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
mkdir -p ~/fa4_stash && cp .carry/fa4_1/* ~/fa4_stash/
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
TAIL=12 step 80 aten_flash.log python3 -m pytest tests/ops/test_aten_flash.py -m gpu -q -p no:cacheprovider
TAIL=25 step 230 cp_tests.log python3 -m pytest tests/cp/test_cp_gpu.py -m multigpu -q -p no:cacheprovider
TAIL=40 step 255 cp_bench_torch.log python3 benchmarks/cp_bench.py --launch 2 --tokens 8192 16384 32768 \
  --iters 10 --time-budget 185 --timeout 245 --out "$OUT/cp_torch.json" --markdown "$OUT/cp_torch.md"
[ -f "$OUT/cp_torch.json" ] && rm -f "$OUT/cp_torch.partial.json"
exit 0
