#!/usr/bin/env bash
# Second H200 lease of 2026-12-03 (fourth session), one call: Gated DeltaNet after the recurrences
# stopped loading each chunk's span inside their sequential loop (FUSED["seq_offsets"]).
#   run(command="BUDGET=<s> bash scripts/gpu/r10_gdn.sh", carry=[".carry/wheels"], timeout_s=<s + 30>)
#   1. gdn_bench triton_choices: every kernel choice against the defaults on the same inputs (B2 T8k);
#   2. triton_speed at the benchmark shape, B1 T32k and packed documents, beside fla's forward and
#      cuDNN attention; 3. triton_correctness against float64, with what is left (choices judge
#      every choice against float64 at the benchmark shape too).
# Ran (18:47 UTC, BUDGET=400, after three failed starts): choices 93 s, speed 114 s, correctness cut
# by its step timeout at 184 s after its first cases (all passing; the log is kept). 391 s in all.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-500}
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $(( budget - (SECONDS - t0) - ${1:-0} )); }
TAIL=30 step "$(left 150)" gdn_choices.log python3 benchmarks/gdn_bench.py --sections triton_choices \
  --budget "$(left 165)" --out "$OUT/gdn-choices.json"
TAIL=30 step "$(left 15)" gdn_speed.log python3 benchmarks/gdn_bench.py --sections triton_speed \
  --shapes bench "B1 T32k" docs --budget "$(left 35)" --out "$OUT/gdn-speed.json"
c=$(left 10)
[ "$c" -gt 40 ] && TAIL=20 step "$c" gdn_correct.log python3 benchmarks/gdn_bench.py --sections triton_correctness \
  --budget $(( c - 15 )) --out "$OUT/gdn-correctness.json"
echo "call: $((SECONDS - t0)) s"
