#!/usr/bin/env bash
# H200 lease of 2026-12-03 (second session), call 2, right after r6_a.sh. Carry: .carry/fa4_1.
# Installs flash_2, flash_3 (the subset wheels stashed by call 1) and flash-attn-4 into one site
# folder (flash-attn 2 first, flash-attn-4 over it: 2.8.3 ships an old flash_attn/cute/), then
# benchmarks/backend_bench.py for all four side by side (adapters and raw calls; the preference
# order it implies) and benchmarks/compile_bench.py (compiled vs eager after the Dynamo fix).
#   run(command="bash scripts/gpu/r6_b.sh", carry=[".carry/fa4_1"], timeout_s=420)
# Ran: 258 s (install 1 s, backend_bench 112 s, compile_bench 116 s; compile_bench's documents cases
# failed with Inductor's SliceView, fixed afterwards): h200-2026-12-03-{backends,compile}.json, preference.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
bash scripts/seed/lease2_install.sh ~/fa4_site ~/seedw 2>&1 | grep -v "^export"
bash ~/fa4_p2/fa4_install.sh .carry/fa4_1 ~/fa4_site > "$OUT/fa4_install.log" 2>&1 || tail -5 "$OUT/fa4_install.log"
source ~/fa4_site/env.sh
export PYTHONPATH="$PWD:/tmp/fla:$PYTHONPATH" PYTHONFAULTHANDLER=1
python3 -c "import flash_attn, flash_attn.cute, flash_attn_interface; print('flash_attn', flash_attn.__version__, '+ cute + FA3 ok')" 2>&1 | tail -1
TAIL=14 step 200 backends.log python3 benchmarks/backend_bench.py --backends torch,flash_2,flash_3,flash_4 \
  --masks causal,sliding_window,documents --seq-lens 8192,32768 --out "$OUT/backends.json" --markdown "$OUT/backends.md" \
  --write-preference "$OUT/preference.json"
left=$(( 400 - (SECONDS - t0) ))
TAIL=30 step "$left" compile.log python3 benchmarks/compile_bench.py --out "$OUT/compile.json"
echo "call: $((SECONDS - t0)) s"
