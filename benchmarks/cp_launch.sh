#!/usr/bin/env bash
# Context-parallel evidence on a multi-GPU machine (NCCL): correctness tests, then the benchmark.
#
#   benchmarks/cp_launch.sh [STAGE] [N_GPUS] [RESULTS_DIR]
#     STAGE        tests | bench | all (default all); each stage fits one 10-minute command at N <= 8
#     N_GPUS       world size (default: every visible GPU)
#     RESULTS_DIR  where cp-<gpu>x<N>-<date>.json / .md go (default benchmarks/results)
#
# Extra arguments for the benchmark go in CP_BENCH_ARGS, e.g. CP_BENCH_ARGS="--tokens 8192 16384".
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
N=${2:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
OUT=${3:-benchmarks/results}
if [ "$N" -lt 2 ]; then
  echo "cp_launch.sh needs 2+ GPUs (found $N)" >&2
  exit 2
fi
GPU=$(python3 -c "import torch; n = torch.cuda.get_device_name(0).lower(); print(next((t for t in ('h200', 'h100', 'a100', 'b200', 'gb200') if t in n), n.split()[-1]))")
DATE=$(date -u +%Y-%m-%d)
mkdir -p "$OUT"
status=0
if [ "$STAGE" = tests ] || [ "$STAGE" = all ]; then
  python3 -m pytest tests/cp/test_cp_gpu.py -m multigpu -q -p no:cacheprovider || status=$?
fi
if [ "$STAGE" = bench ] || [ "$STAGE" = all ]; then
  # shellcheck disable=SC2086
  python3 benchmarks/cp_bench.py --launch "$N" --out "$OUT/cp-${GPU}x${N}-${DATE}.json" \
    --markdown "$OUT/cp-${GPU}x${N}-${DATE}.md" ${CP_BENCH_ARGS:-} || status=$?
fi
exit $status
