#!/usr/bin/env bash
# Written 2026-12-04 (seventh session, when no device was lent; not run yet), one call after
# r14_a.sh and the defaults chosen from it: the measurements that close or advance #16.
#   run(command="BUDGET=<s> bash scripts/gpu/r14_b.sh", carry=[".carry/wheels"], timeout_s=<s + 30>)
#   1. gdn_bench triton_speed on every shape;
#   2. the conformance gdn family, --full, for our torch and Triton kernels and fla (give it >= 250 s);
#   3. benchmarks/gdn_order.py from both: the sm_90 kernel order ($OUT/kernel_order.json, to commit
#      as olmo_attn/recurrent/kernel_order.json);
#   4. gdn_bench layer (GatedDeltaNet against causal attention of the same width).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
t0=$SECONDS
budget=${BUDGET:-560}
fla_site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $(( budget - (SECONDS - t0) - ${1:-0} )); }
cp olmo_attn/recurrent/kernel_order.json "$OUT/kernel_order.json"
TAIL=40 step 230 gdn_speed.log python3 benchmarks/gdn_bench.py --sections triton_speed --budget 215 \
  --out "$OUT/gdn-speed.json"
TAIL=8 step "$(left 60)" conf_gdn.log python3 -m conformance --no-progress --tier gpu --full -k gdn \
  --backends torch triton fla --json "$OUT/NVIDIA_H200-gdn.json" --markdown "$OUT/NVIDIA_H200-gdn.md" \
  --junit "$OUT/NVIDIA_H200-gdn.xml"
TAIL=3 step 30 gdn_order.log python3 benchmarks/gdn_order.py "$OUT/gdn-speed.json" "$OUT/NVIDIA_H200-gdn.json" \
  --out "$OUT/kernel_order.json"
c=$(left 5)
[ "$c" -gt 30 ] && TAIL=12 step "$c" gdn_layer.log python3 benchmarks/gdn_bench.py --sections layer \
  --out "$OUT/gdn-layer.json"
echo "call: $((SECONDS - t0)) s"
