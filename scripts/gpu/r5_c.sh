#!/usr/bin/env bash
# H200, 2026-12-03, one call on a fresh machine (the device time left allowed one, not the two that
# flash-attn-4 needs). Carry: .carry/fa2w, .carry/fa3w (the subset wheels built by r4_a.sh / r3_a.sh),
# .carry/wheels. The gpu tier for torch + flash_2 + flash_3 in one run from a cold compile cache
# (pairwise across the three), then benchmarks/compile_bench.py with the time left.
#   run(command="BUDGET=<s> bash scripts/gpu/r5_c.sh", carry=[".carry/fa2w", ".carry/fa3w", ".carry/wheels"], timeout_s=<s + 30>)
# (Not run: no machine was lent again in that session.)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-330}
bash scripts/seed/lease2_install.sh ~/site .carry/fa2w .carry/fa3w 2>&1 | grep -v "^export"
source ~/site/seed_env.sh
fla_site
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONFAULTHANDLER=1
stem=$OUT/NVIDIA_H200-gpu-torch-flash_2-flash_3
conf=$(( budget - (SECONDS - t0) - 70 ))
s=$SECONDS
TAIL=30 step "$conf" conf.log python3 -m conformance --no-progress --tier gpu --backends torch flash_2 flash_3 \
  --jobs auto --compile-cache /tmp/cold_cc --time-budget $(( conf - 35 )) --json "$stem.json" --markdown "$stem.md" --junit "$stem.xml"
echo "cold gpu tier, torch + flash_2 + flash_3: $((SECONDS - s)) s of wall clock (shell)" | tee -a "$OUT/conf.log"
left=$(( budget - (SECONDS - t0) - 5 ))
[ "$left" -gt 30 ] && TAIL=20 step "$left" compile.log python3 benchmarks/compile_bench.py --out "$OUT/compile.json"
echo "call: $((SECONDS - t0)) s"
