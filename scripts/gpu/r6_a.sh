#!/usr/bin/env bash
# H200 lease of 2026-12-03 (second session), call 1: stash flash-attn-4 part two and the flash_2 /
# flash_3 subset wheels for call 2; then the Gated DeltaNet kernels after the fusions (prep, output
# in the recurrence, states kept for the backward, the L2-norm backward inside dqkwg / wy_bwd):
# per-kernel profile with host time, every kernel choice side by side on the same inputs, then
# speed at all shapes beside fla and cuDNN, correctness against float64, the whole layer.
#   run(command="bash scripts/gpu/r6_a.sh", carry=[".carry/fa4_2", ".carry/fa2w", ".carry/fa3w", ".carry/wheels"], timeout_s=470)
# Ran: 433 s (profile 33 s, choices 50 s, correctness 343 s; the speed section was cut by the budget
# and ran in r6_e.sh): benchmarks/results/h200-2026-12-03-gdn-{profile,choices,triton-correctness}.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
mkdir -p ~/fa4_p2 ~/seedw && cp -r .carry/fa4_2/* ~/fa4_p2/ && cp .carry/fa2w/* .carry/fa3w/* ~/seedw/
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
TAIL=30 step 80 gdn_profile.log python3 scripts/gpu/gdn_profile.py --json "$OUT/gdn-profile.json"
TAIL=14 step 170 gdn_choices.log python3 benchmarks/gdn_bench.py --sections triton_choices --budget 150 --out "$OUT/gdn-choices.json"
left=$(( 440 - (SECONDS - t0) ))
TAIL=45 step "$left" gdn.log python3 benchmarks/gdn_bench.py --sections triton_speed triton_correctness layer \
  --budget $(( left - 25 )) --out "$OUT/gdn.json"
echo "call: $((SECONDS - t0)) s"
