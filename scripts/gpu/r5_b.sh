#!/usr/bin/env bash
# H200 lease of 2026-12-03 (second machine), call 2 of 2, right after r5_a.sh. Carry: .carry/fa4_1.
# flash-attn 2's wheel is extracted into the site folder FIRST and flash-attn-4 over it (flash-attn
# 2.8.3 ships an old flash_attn/cute/ of its own, which broke flash-attn-4 when extracted last);
# FA3 into the same folder (no name in common). Then benchmarks/backend_bench.py for all four side by
# side (adapters and raw calls; the preference order it implies), the gpu tier for all four in one
# run from a cold compile cache (pairwise across all of them), and benchmarks/compile_bench.py.
#   run(command="BUDGET=<s> bash scripts/gpu/r5_b.sh", carry=[".carry/fa4_1"], timeout_s=<s + 30>)
# (Not run: no machine was lent again in that session.)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-480}
bash scripts/seed/lease2_install.sh ~/fa4_site ~/seedw 2>&1 | grep -v "^export"   # fa2 and fa3 parts
bash ~/fa4_p2/fa4_install.sh .carry/fa4_1 ~/fa4_site > "$OUT/fa4_install.log" 2>&1 || tail -5 "$OUT/fa4_install.log"
source ~/fa4_site/env.sh
export PYTHONPATH="$PWD:/tmp/fla:$PYTHONPATH" PYTHONFAULTHANDLER=1
python3 -c "import flash_attn, flash_attn.cute, flash_attn_interface; print('flash_attn', flash_attn.__version__, '+ cute + FA3 ok')" 2>&1 | tail -1
TAIL=12 step 150 backends.log python3 benchmarks/backend_bench.py --backends torch,flash_2,flash_3,flash_4 \
  --masks causal,sliding_window,documents --seq-lens 8192,32768 --out "$OUT/backends.json" --markdown "$OUT/backends.md" \
  --write-preference "$OUT/preference.json"
stem=$OUT/NVIDIA_H200-gpu-all
conf=$(( budget - (SECONDS - t0) - 75 ))
s=$SECONDS
TAIL=30 step "$conf" all.log python3 -m conformance --no-progress --tier gpu --backends torch flash_2 flash_3 flash_4 \
  --jobs auto --compile-cache /tmp/cold_cc --time-budget $(( conf - 40 )) --json "$stem.json" --markdown "$stem.md" --junit "$stem.xml"
echo "cold gpu tier, four backends: $((SECONDS - s)) s of wall clock (shell)" | tee -a "$OUT/all.log"
left=$(( budget - (SECONDS - t0) - 10 ))
[ "$left" -gt 30 ] && TAIL=30 step "$left" compile.log python3 benchmarks/compile_bench.py --out "$OUT/compile.json"
echo "call: $((SECONDS - t0)) s"
