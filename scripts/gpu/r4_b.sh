#!/usr/bin/env bash
# H200 lease of 2026-12-03, call 2 of 3 (<= 9 min), right after r4_a.sh on the warm machine.
# Carry: .carry/fa4_1 (flash-attn-4 part one; part two was stashed by r4_a.sh).
#   - flash-attn-4 installed; the flash_2 build (r4_a.sh) keeps running on cores 6-15
#   - benchmarks/backend_bench.py torch / flash_3 / flash_4 (causal, window, documents; T 8k, 32k;
#     adapters and the libraries' raw calls) with the per-architecture order it implies
#   - the torch backend with fault containment on (documents, T 8k / 32k): its measured cost
#   - benchmarks/compile_bench.py (compiled vs eager, graphs, kernels) with the time left
#   run(command="BUDGET=540 bash scripts/gpu/r4_b.sh", carry=[".carry/fa4_1"], timeout_s=580)
set -uo pipefail
cd "$(dirname "$0")/../.."
final=$OUT
export OUT=/tmp/r4_b
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-540}
pack() { tar -czf "$final/r4_b.tgz" -C "$OUT" . ; echo "call: $((SECONDS - t0)) s"; }
bash ~/fa4_p2/fa4_install.sh .carry/fa4_1 ~/fa4_site > "$OUT/fa4_install.log" 2>&1 || tail -5 "$OUT/fa4_install.log"
source ~/fa3_site/seed_env.sh  # (its line is frozen at install time: first, then fa4's appends)
source ~/fa4_site/env.sh
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONFAULTHANDLER=1
tail -n 1 ~/seed/fa2/progress.log
TAIL=40 step 240 backends.log taskset -c 0-5 python3 benchmarks/backend_bench.py --backends torch,flash_3,flash_4 \
  --masks causal,sliding_window,documents --seq-lens 8192,32768 --out "$OUT/backends.json" \
  --markdown "$OUT/backends.md" --write-preference "$OUT/preference.json"
pack
if python3 benchmarks/backend_bench.py --help | grep -q -- --contain-faults; then
  TAIL=20 step 120 contain.log taskset -c 0-5 python3 benchmarks/backend_bench.py --backends torch --masks documents \
    --seq-lens 8192,32768 --no-raw --contain-faults both --out "$OUT/contain.json" --markdown "$OUT/contain.md"
  pack
fi
left=$(( budget - (SECONDS - t0) - 15 ))
[ "$left" -gt 40 ] && TAIL=25 step "$left" compile.log taskset -c 0-5 python3 benchmarks/compile_bench.py --out "$OUT/compile.json"
tail -n 2 ~/seed/fa2/progress.log
pack
