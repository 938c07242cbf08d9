#!/usr/bin/env bash
# The detached queue of the second H200 lease of 2026-12-04, started by r12_a.sh in ~/olmo; logs
# and results in ~/r7, brought back by r7_poll.sh.
#   A. GatedDeltaNet compiled vs eager (compile_bench gdn/documents, gdn/decode) after the fix
#      for the first lease's failure (fla's wrappers traced under compile);
#   B. gdn_bench triton_choices: the key-tiled _wy_bwd (now the default) against the whole-row
#      kernel and its tile / stage variants, narrower state_out tiles, dqkwg / dstate at 4 warps;
#   C. once flash-attn-4 and TE are installed: scripts/te/docs_overhead.py and backend_bench
#      te + flash_4 documents with flash-attn-4 importable (as in the 2026-12-03 runs that showed
#      the te adapter's +22.9% forward at 32k; the first 2026-12-04 lease, without it, showed 0.0%);
#   D. triton_speed (benchmark shape, B1 T32k, documents, FlashQLA's two shapes), the layer
#      section, then triton_correctness with what is left.
# QUEUE_SECONDS: the whole budget.
# Ran (20:38 UTC, QUEUE_SECONDS=720): A 114 s (documents compiled; decode failed on Triton's
# launcher, a custom op since); B 93 s (h200-2026-12-04-r12-gdn-choices.json); C 68 s; D speed
# 185 s, layer 74 s, correctness 172 s (its first cases only, then its time budget).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
queue_init 720
step "$(queue_cap 120 500)" compile_gdn.log python3 benchmarks/compile_bench.py --cases gdn/documents gdn/decode \
  --out "$R/compile-gdn.json"
queue_note "compile_bench gdn done"
c=$(queue_cap 200 400)
TAIL=40 step "$c" gdn_choices.log python3 benchmarks/gdn_bench.py --sections triton_choices \
  --choices "wy_bwd:" "state_out:" "dqkwg" "dstate" --budget $(( c - 20 )) --out "$R/gdn-choices.json"
queue_note "gdn choices done"
while { [ ! -f ~/seed/te/status ] || [ ! -f ~/fa4_site/env.sh ]; } && [ $(( total - SECONDS )) -gt 380 ]; do sleep 3; done
queue_note "te: $(cat ~/seed/te/status 2>/dev/null); fa4: $(ls ~/fa4_site/env.sh 2>/dev/null)"
if grep -q '^ok' ~/seed/te/status 2>/dev/null && [ -f ~/fa4_site/env.sh ]; then
  ( source ~/fa4_site/env.sh; source ~/te_site/te_env.sh
    NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 TAIL=30 step 120 te_overhead.log \
      python3 scripts/te/docs_overhead.py --out "$R/te-docs-overhead-fa4.json"
    TAIL=14 step 120 backends.log python3 benchmarks/backend_bench.py --backends te,flash_4 --masks documents \
      --seq-lens 8192,32768 --out "$R/backends-te-fa4-docs.json" --markdown "$R/backends-te-fa4-docs.md" )
  queue_note "te with flash-attn-4 done"
fi
c=$(queue_cap 240 130)
TAIL=40 step "$c" gdn_speed.log python3 benchmarks/gdn_bench.py --sections triton_speed \
  --budget $(( c - 20 )) --out "$R/gdn-speed.json"
queue_note "gdn speed done"
TAIL=20 step "$(queue_cap 90 60)" gdn_layer.log python3 benchmarks/gdn_bench.py --sections layer --out "$R/gdn-layer.json"
queue_note "gdn layer done"
c=$(queue_cap 200 10)
[ "$c" -gt 40 ] && TAIL=20 step "$c" gdn_correct.log python3 benchmarks/gdn_bench.py --sections triton_correctness \
  --budget $(( c - 15 )) --out "$R/gdn-correctness.json"
queue_note "queue done"
touch "$R/done"
