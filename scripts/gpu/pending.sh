#!/usr/bin/env bash
# One H200 call (<= 9.5 min) for what the 2026-12-02 runs left open, each step bounded, logs under $OUT:
#   1. flash_3: install the carried wheel parts (.carry/seedfa3, from scripts/gpu/lease_fa3_gdn.sh) or
#      build them (273 s); scripts/flash3/probe.py (which configurations crash FA3's backward);
#      gpu-tier conformance -k flash_3 in 4 shards (the KV-cache fix, and the shards that crashed)
#   2. torch: the containment family on CUDA (-k containment) - what Flex / SDPA do with NaN
#   3. benchmarks/compile_bench.py (compiled vs eager, frames, kernels)
#   4. benchmarks/gdn_bench.py speed with back-to-back timing
#   run(command="bash scripts/gpu/pending.sh", carry=[".carry/seedfa3", ".carry/seed", ".carry/wheels"], timeout_s=590)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
if ls .carry/seedfa3/fa3.tar.xz.part* >/dev/null 2>&1; then
  bash scripts/seed/lease2_install.sh ~/fa3_site .carry/seedfa3 > "$OUT/fa3_install.log" 2>&1
else
  SEED_BUILDS=fa3 FA3_JOBS=14 taskset -c 0-12 bash scripts/seed/lease1_start.sh > "$OUT/fa3_install.log" 2>&1
  while [ ! -f ~/seed/fa3/status ] && [ $((SECONDS - t0)) -lt 320 ]; do sleep 5; done
  grep -q '^ok' ~/seed/fa3/status 2>/dev/null && bash scripts/seed/lease2_install.sh ~/fa3_site ~/seed/fa3/parts >> "$OUT/fa3_install.log" 2>&1
fi
[ -f ~/fa3_site/seed_env.sh ] && source ~/fa3_site/seed_env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fla_site
TAIL=40 step 90 fa3_probe.log python3 scripts/flash3/probe.py --timeout 40 --jobs 6
OUT_CONF=/tmp/conf_fa3
TAIL=30 step 150 fa3_conf.log env OUT=$OUT_CONF PARALLEL_SKIP="host multigpu" bash conformance/gpu_run.sh parallel 4 \
  --backends torch flash_3 -k flash_3 --time-budget 130
cp "$(ls $OUT_CONF/*.json 2>/dev/null | head -1)" "$OUT/fa3_conformance.json" 2>/dev/null
TAIL=20 step 60 containment.log python3 -m conformance --no-progress --tier gpu --backends torch flash_3 -k containment
TAIL=20 step 100 compile.log python3 benchmarks/compile_bench.py --out "$OUT/compile.json"
TAIL=20 step 110 gdn.log python3 benchmarks/gdn_bench.py --out "$OUT/gdn.json" --budget 100 --iters 20 \
  --sections triton_speed --shapes bench T32k FlashQLA
echo "call: $((SECONDS - t0)) s"
