#!/usr/bin/env bash
# H200 lease of 2026-12-02 (evening), call 3 of 3 (<= 9.5 min), after r3_b.sh on the warm machine:
#   - benchmarks/compile_bench.py (compiled vs eager, frames, kernels) for the three attention modules
#   - benchmarks/backend_bench.py torch / flash_3 / flash_4 (causal, window, documents; T 8k, 32k;
#     adapters and the libraries' raw calls), with the per-architecture order it implies
#   - benchmarks/gdn_bench.py --sections triton_tune (launch settings of our Gated DeltaNet kernels)
#   run(command="BUDGET=<s> bash scripts/gpu/r3_c.sh", timeout_s=<s + 30>)  (packs after every step)
set -uo pipefail
cd "$(dirname "$0")/../.."
final=$OUT
export OUT=/tmp/r3_c
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-560}  # seconds this call may use (the rest of the session's device time)
pack() { tar -czf "$final/r3_c.tgz" -C "$OUT" . ; }
source ~/fa4_site/env.sh 2>/dev/null
[ -f ~/fa3_site/seed_env.sh ] && source ~/fa3_site/seed_env.sh
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TAIL=25 step 150 compile.log python3 benchmarks/compile_bench.py --out "$OUT/compile.json"
pack
be=torch,flash_4
python3 -c "import flash_attn_interface" 2>/dev/null && be=torch,flash_3,flash_4
TAIL=30 step 210 backends.log python3 benchmarks/backend_bench.py --backends $be --masks causal,sliding_window,documents \
  --seq-lens 8192,32768 --out "$OUT/backends.json" --markdown "$OUT/backends.md" --write-preference "$OUT/preference.json"
pack
left=$(( budget - (SECONDS - t0) ))
[ "$left" -gt 40 ] && TAIL=40 step "$left" gdn_tune.log python3 benchmarks/gdn_bench.py --sections triton_tune \
  --budget $(( left - 20 )) --out "$OUT/gdn_tune.json"
pack
echo "call: $((SECONDS - t0)) s"
