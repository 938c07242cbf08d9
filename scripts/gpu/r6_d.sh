#!/usr/bin/env bash
# H200 lease of 2026-12-03 (second session), a fifth call if device time is left: the Gated DeltaNet
# launch-settings sweep (num_warps / num_stages / tiles) for the default kernel choices, with
# optional overrides (SET="wy_lowp=1 ..." goes to gdn_bench.py --set).
#   run(command="BUDGET=<s> SET='...' bash scripts/gpu/r6_d.sh", timeout_s=<s + 20>)
# (Not run: the session's device time ran out after r6_e.sh.)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-300}
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2086
TAIL=40 step $(( budget - 10 )) gdn_tune.log python3 benchmarks/gdn_bench.py --sections triton_tune triton_stages \
  --budget $(( budget - 30 )) ${SET:+--set $SET} --out "$OUT/gdn-tune.json"
echo "call: $((SECONDS - t0)) s"
