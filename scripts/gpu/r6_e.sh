#!/usr/bin/env bash
# H200 lease of 2026-12-03 (second session), call 4 (the last 300 s of device time): Gated DeltaNet
# speed at every benchmark shape beside fla's forward and cuDNN attention, and the whole layer
# (r6_a.sh's speed section had been cut by its time budget). Ran as the inline command below.
#   run(command="bash scripts/gpu/r6_e.sh", timeout_s=310)
# Ran: 244 s; benchmarks/results/h200-2026-12-03-gdn-speed.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TAIL=60 step 290 gdn_speed.log python3 benchmarks/gdn_bench.py --sections triton_speed layer --budget 275 --out "$OUT/gdn-speed.json"
