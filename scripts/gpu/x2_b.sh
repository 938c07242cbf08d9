#!/usr/bin/env bash
# Device call B, right after x2_a.sh on the same 2-GPU machine: install flash-attn-4, run
# `--tier all` as parallel shards (gpu tier over both GPUs, host and multigpu tiers beside them) and
# merge the reports, then the CP benchmark on flash_4.  carry: .carry/fa4_2 .carry/wheels
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
fa4_site
fla_site
export PYTHONWARNINGS=ignore::UserWarning
python3 -c "import flash_attn.cute; print('flash_attn.cute OK')"
TAIL=40 step 350 conformance.log env OUT=/tmp/conf bash conformance/gpu_run.sh parallel 8 --time-budget 285
cp /tmp/conf/*.json /tmp/conf/*.md /tmp/conf/*.xml "$OUT/" 2>/dev/null
tar -czf "$OUT/conf_chunks.tgz" -C /tmp/conf chunks
TAIL=40 step 185 cp_bench_fa4.log python3 benchmarks/cp_bench.py --backend flash_4 --launch 2 \
  --tokens 8192 16384 32768 --iters 10 --time-budget 120 --timeout 175 --out "$OUT/cp_fa4.json"
[ -f "$OUT/cp_fa4.json" ] && rm -f "$OUT/cp_fa4.partial.json"
exit 0
