#!/usr/bin/env bash
# H200 lease of 2026-12-03, call 1 of 3 (<= 9 min). Carry: .carry/seed (flash-attn 2 sdist),
# .carry/fa3w (the FA3 3.0.0 subset wheel built on 2026-12-03), .carry/fa4_2, .carry/wheels.
#   - the flash_2 subset build (scripts/flash2/build.sh) detached on cores 6-15 (FA2_JOBS=10)
#   - flash-attn-4 part two stashed in ~/fa4_p2 for call 2 (which carries part one)
#   - on cores 0-5: FA3 installed from the carried wheel; the gpu tier for torch + flash_3 (pairwise
#     included; deterministic backward refused above head_dim 128), two workers;
#     benchmarks/gdn_bench.py --sections triton_tune with the time left
#   run(command="BUDGET=540 bash scripts/gpu/r4_a.sh", carry=[".carry/seed", ".carry/fa3w", ".carry/fa4_2", ".carry/wheels"], timeout_s=580)
set -uo pipefail
cd "$(dirname "$0")/../.."
final=$OUT
export OUT=/tmp/r4_a
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-540}
pack() { tar -czf "$final/r4_a.tgz" -C "$OUT" . ; echo "call: $((SECONDS - t0)) s"; }
mkdir -p ~/fa4_p2 && cp -r .carry/fa4_2/* ~/fa4_p2/
SEED_BUILDS=fa2 FA2_JOBS=10 taskset -c 6-15 bash scripts/seed/lease1_start.sh > "$OUT/fa2_start.log" 2>&1
tail -n 7 "$OUT/fa2_start.log"
bash scripts/seed/lease2_install.sh ~/fa3_site .carry/fa3w > "$OUT/fa3_install.log" 2>&1
source ~/fa3_site/seed_env.sh
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONFAULTHANDLER=1
mkdir -p ~/cc
stem=$OUT/NVIDIA_H200-gpu-torch-flash_3
TAIL=45 step 420 fa3_conf.log taskset -c 0-5 python3 -m conformance --no-progress --tier gpu --backends torch flash_3 \
  --jobs 2 --compile-cache ~/cc --time-budget 390 --json "$stem.json" --markdown "$stem.md" --junit "$stem.xml"
pack
left=$(( budget - (SECONDS - t0) - 15 ))
[ "$left" -gt 40 ] && TAIL=30 step "$left" gdn_tune.log taskset -c 0-5 python3 benchmarks/gdn_bench.py \
  --sections triton_tune --budget $(( left - 15 )) --out "$OUT/gdn_tune.json"
tail -n 2 ~/seed/fa2/progress.log
pack
