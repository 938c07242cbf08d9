#!/usr/bin/env bash
# Written 2026-12-04 (seventh session, when no device was lent; not run yet), one call: where the
# Gated DeltaNet forward's time goes, kernel by kernel, against fla's forward; and the variants
# prepared that session: the prep's W/U from T read back (prep_wu 1) or by _wu (2), P stored for
# the read-out (pre_p), the separate prep kernels at other warp counts, _dqkwg over key tiles,
# the forward recurrence's value tile alone (state_values).
#   run(command="BUDGET=570 bash scripts/gpu/r14_a.sh", carry=[".carry/wheels"], timeout_s=600)
#   (about 100 s for the profile, 25 s per choice; choices past the budget are listed as skipped)
#   1. gdn_bench kernel_profile (ours forward and forward+backward, fla's forward);
#   2. gdn_bench triton_choices for those choices (each against the defaults and
#      float64 on the same inputs). Then set the defaults from it and run r14_b.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-570}
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $(( budget - (SECONDS - t0) - ${1:-0} )); }
TAIL=4 step 120 gdn_profile.log python3 benchmarks/gdn_bench.py --sections kernel_profile \
  --out "$OUT/gdn-profile.json"
TAIL=30 step "$(left 5)" gdn_choices.log python3 benchmarks/gdn_bench.py --sections triton_choices \
  --choices "prep:" "solve w" "dqkwg: key" "state BV32" --budget "$(left 15)" --out "$OUT/gdn-choices.json"
echo "call: $((SECONDS - t0)) s"
