#!/usr/bin/env bash
# H200 lease of 2026-12-03 (second session), call 3, right after r6_b.sh (no carry: the backends
# are installed in ~/fa4_site). The gpu conformance tier for torch, flash_2, flash_3 and flash_4 in
# one run (pairwise across all four) from a cold compile cache, with the wall time in the report.
#   run(command="BUDGET=<s> bash scripts/gpu/r6_c.sh", timeout_s=<s + 20>)
# Ran with BUDGET=470: 921 cases in 384 s, 403 s of call; conformance/reports/NVIDIA_H200-2026-12-03-cold-all-backends.*
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-560}
source ~/fa4_site/env.sh
export PYTHONPATH="$PWD:/tmp/fla:$PYTHONPATH" PYTHONFAULTHANDLER=1
stem=$OUT/NVIDIA_H200-gpu-all
conf=$(( budget - 15 ))
TAIL=40 step "$conf" all.log python3 -m conformance --no-progress --tier gpu --backends torch flash_2 flash_3 flash_4 \
  --jobs auto --compile-cache /tmp/cold_cc --time-budget $(( conf - 45 )) --json "$stem.json" --markdown "$stem.md" --junit "$stem.xml"
echo "call: $((SECONDS - t0)) s"
