#!/usr/bin/env bash
# H200 lease of 2026-12-02 (evening), call 2 of 3 (<= 9.5 min), right after r3_a.sh on the warm machine:
# flash-attn-4 installed from the stash of call 1 + .carry/fa4_2, then the measured cold GPU run:
#   olmo-attn conformance --tier gpu --backends torch flash_4 --jobs auto --compile-cache <empty folder>
# (the default quick matrix; an empty Inductor/Triton cache folder; CuTe DSL has not compiled anything
# on this machine yet), timed by the report's own duration and by the shell.
#   run(command="bash scripts/gpu/r3_b.sh", carry=[".carry/fa4_2"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/../.."
final=$OUT
export OUT=/tmp/r3_b
source scripts/gpu/lib.sh
t0=$SECONDS
fa4_site
[ -f ~/fa3_site/seed_env.sh ] && echo "(flash_3 installed too, not selected)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONFAULTHANDLER=1
python3 -c "import flash_attn.cute, torch; print('flash_attn.cute ok', torch.__version__)"
rm -rf /tmp/cold_cc && mkdir -p /tmp/cold_cc
jobs=(--jobs auto)
python3 -m conformance --help | grep -q -- '--jobs' || jobs=()
stem=$OUT/NVIDIA_H200-gpu-torch-flash_4
s=$SECONDS
TAIL=60 step 560 cold.log python3 -m conformance --tier gpu --backends torch flash_4 "${jobs[@]}" \
  --compile-cache /tmp/cold_cc --time-budget 500 --no-progress \
  --json "$stem.json" --markdown "$stem.md" --junit "$stem.xml"
echo "cold gpu tier: $((SECONDS - s)) s of wall clock (shell)" | tee -a "$OUT/cold.log"
tar -czf "$final/r3_b.tgz" -C "$OUT" .
echo "call: $((SECONDS - t0)) s"
