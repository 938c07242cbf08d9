#!/usr/bin/env bash
# Third H200 lease of 2026-12-04 (sixth session), one call: Gated DeltaNet with the defaults
# chosen from the first two leases (key-tiled _wy_bwd at 32 columns, the no-grad forward's
# fused read-out only where it fills the GPU), and its decode step as a custom op.
#   run(command="BUDGET=<s> bash scripts/gpu/r13_final.sh", carry=[".carry/wheels"], timeout_s=<s + 30>)
#   1. compile_bench gdn/documents and gdn/decode (compiled vs eager, frames, top kernels);
#   2. the conformance gdn family, --full, for our torch and Triton kernels and fla;
#   3. gdn_bench triton_speed on every shape (benchmark, B1 T32k, documents, FlashQLA's two);
#   4. tests/recurrent/test_gdn_gpu.py with what is left.
# Ran (20:57 UTC, BUDGET=470, 456 s): 1. 140 s, both cases compiled (h200-2026-12-04-gdn-compile.json);
# 2. cut at 107 s after 22 of 42 cases, none failed (NVIDIA_H200-2026-12-04-gdn-partial.md);
# 3. cut at 208 s after four of the five shapes (h200-2026-12-04-r13-gdn-speed.json, from the log);
# 4. not reached.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-480}
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $(( budget - (SECONDS - t0) - ${1:-0} )); }
TAIL=12 step 150 compile_gdn.log python3 benchmarks/compile_bench.py --cases gdn/documents gdn/decode \
  --out "$OUT/compile-gdn.json"
TAIL=8 step "$(left 230)" conf_gdn.log python3 -m conformance --no-progress --tier gpu --full -k gdn \
  --backends torch triton fla --json "$OUT/NVIDIA_H200-gdn.json" --markdown "$OUT/NVIDIA_H200-gdn.md" \
  --junit "$OUT/NVIDIA_H200-gdn.xml"
TAIL=40 step "$(left 15)" gdn_speed.log python3 benchmarks/gdn_bench.py --sections triton_speed \
  --budget "$(left 30)" --out "$OUT/gdn-speed.json"
c=$(left 5)
[ "$c" -gt 30 ] && TAIL=6 step "$c" gdn_gpu_tests.log python3 -m pytest -q -x tests/recurrent/test_gdn_gpu.py
echo "call: $((SECONDS - t0)) s"
