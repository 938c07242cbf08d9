#!/usr/bin/env bash
# H200 lease of 2026-12-03, call 3 of 3, right after r4_b.sh on the warm machine. No carry.
#   - waits for the flash_2 subset build (r4_a.sh), installs it into flash-attn-4's site folder
#     (flash_attn/ and flash_attn/cute/ share one folder), brings its wheel parts back in $OUT
#   - the flash_2 gpu tier beside torch; benchmarks/backend_bench.py torch / flash_2 with raw calls
#   run(command="BUDGET=<s> bash scripts/gpu/r4_c.sh", timeout_s=<s + 30>)
set -uo pipefail
cd "$(dirname "$0")/../.."
final=$OUT
export OUT=/tmp/r4_c
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-540}
pack() { tar -czf "$final/r4_c.tgz" -C "$OUT" . ; echo "call: $((SECONDS - t0)) s"; }
source ~/fa3_site/seed_env.sh  # (its line is frozen at install time: first, then fa4's appends)
source ~/fa4_site/env.sh
while [ ! -f ~/seed/fa2/status ] && [ $((SECONDS - t0)) -lt $(( budget - 200 )) ]; do sleep 5; done
tail -n 3 ~/seed/fa2/progress.log; cp ~/seed/fa2/progress.log "$OUT/fa2_progress.log"
cat ~/seed/fa2/status 2>/dev/null || { echo "fa2 still building after $((SECONDS - t0)) s"; pack; exit 3; }
grep -q '^ok' ~/seed/fa2/status || { grep -E -m 30 "error|Error" ~/seed/fa2/build.log > "$OUT/fa2_errors.log"; pack; exit 3; }
bash scripts/seed/lease2_install.sh ~/fa4_site ~/seed/fa2/parts > "$OUT/fa2_install.log" 2>&1
export PYTHONPATH=$HOME/fa4_site:$PYTHONPATH
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONFAULTHANDLER=1
python3 -c "import flash_attn, flash_attn.cute; print('flash_attn', flash_attn.__version__, '+ cute')"
stem=$OUT/NVIDIA_H200-gpu-torch-flash_2
left=$(( budget - (SECONDS - t0) ))
TAIL=45 step $(( left * 2 / 3 )) fa2_conf.log python3 -m conformance --no-progress --tier gpu --backends torch flash_2 \
  -k flash_2 --jobs auto --compile-cache ~/cc --time-budget $(( left * 2 / 3 - 25 )) \
  --json "$stem.json" --markdown "$stem.md" --junit "$stem.xml"
pack
left=$(( budget - (SECONDS - t0) - 10 ))
[ "$left" -gt 40 ] && TAIL=30 step "$left" fa2_bench.log python3 benchmarks/backend_bench.py --backends torch,flash_2,flash_3,flash_4 \
  --masks causal,sliding_window,documents --seq-lens 8192,32768 --out "$OUT/backends.json" --markdown "$OUT/backends.md" \
  --write-preference "$OUT/preference.json"
pack
