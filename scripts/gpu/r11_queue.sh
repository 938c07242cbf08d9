#!/usr/bin/env bash
# The detached queue of the H200 lease of 2026-12-04 (sixth session), started by r11_a.sh in
# ~/olmo; logs and results in ~/r7, brought back by r7_poll.sh.
#   A. GatedDeltaNet compiled vs eager (compile_bench gdn/documents, gdn/decode), before the TE
#      build loads the cores (a decode step is host-bound);
#   B. gdn_bench triton_choices: the new kernel choices (whole-chunk prep with the doubling
#      inverse, TF32x3 inverse products, key-tiled _wy_bwd) against the defaults, same inputs;
#   C. once TE is built (r11_te.sh): scripts/te/docs_overhead.py (adapter vs raw, both orders,
#      profiled), then backend_bench te documents 8k / 32k.
# QUEUE_SECONDS: the whole budget.
# Ran (20:15 UTC, QUEUE_SECONDS=900): A 40 s, but both compile cases failed on the GPU (fla's
# wrappers traced under compile; fixed since); B 95 s (h200-2026-12-04-gdn-choices.json); TE built
# in 141 s beside B; C 37 s (h200-2026-12-04-te-docs-overhead.json, -backends-te-docs.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
queue_init 900
step "$(queue_cap 150 600)" compile_gdn.log python3 benchmarks/compile_bench.py --cases gdn/documents gdn/decode \
  --out "$R/compile-gdn.json"
queue_note "compile_bench gdn done"
c=$(queue_cap 330 300)
TAIL=40 step "$c" gdn_choices.log python3 benchmarks/gdn_bench.py --sections triton_choices \
  --choices "prep:" "wy_bwd:" "doubling prep" --budget $(( c - 20 )) --out "$R/gdn-choices.json"
queue_note "gdn choices done"
while [ ! -f ~/seed/te/status ] && [ $(( total - SECONDS )) -gt 150 ]; do sleep 3; done
queue_note "te: $(cat ~/seed/te/status 2>/dev/null)"
if grep -q '^ok' ~/seed/te/status 2>/dev/null; then
  source ~/te_site/te_env.sh
  NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 TAIL=30 step "$(queue_cap 150 60)" te_overhead.log \
    python3 scripts/te/docs_overhead.py --out "$R/te-docs-overhead.json"
  queue_note "te docs_overhead done"
  TAIL=14 step "$(queue_cap 120 10)" backends.log python3 benchmarks/backend_bench.py --backends te --masks documents \
    --seq-lens 8192,32768 --out "$R/backends-te-docs.json" --markdown "$R/backends-te-docs.md"
  queue_note "backend_bench te documents done"
  mkdir -p "$R/te_parts" && cp ~/seed/te/parts/* "$R/te_parts/" 2>/dev/null
fi
queue_note "queue done"
touch "$R/done"
