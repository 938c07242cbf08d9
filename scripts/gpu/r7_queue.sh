#!/usr/bin/env bash
# The detached queue of the H200 lease of 2026-12-03 (third session), started by r7_b.sh in ~/olmo
# (a copy of the repository); logs and results in ~/r7, brought back by r7_poll.sh.
#   1. benchmarks/compile_bench.py on a quiet GPU (compiled vs eager; documents re-timed after the
#      SliceView fix);
#   2. the --full gpu tier for torch + flash_4 from a cold compile cache (its wall time), while
#      Transformer Engine builds (r7_te.sh) and, once built, the quick gpu tier for te beside torch
#      and flash_4 runs alongside (TE's kernel choice logged first by scripts/te/probe.py);
#   3. benchmarks/backend_bench.py for te, torch, flash_4 (adapters and raw calls) on a quiet GPU;
#   4. Gated DeltaNet at the long-T shapes with and without filling the SMs (TILES["fill_sms"]),
#      then every shape and the layer, as far as the budget goes.
# QUEUE_SECONDS: the whole budget (default 1380); SKIP_COMPILE=1 leaves out step 1.
# Ran (first machine, 14:56 UTC): compile_bench 130 s (benchmarks/results/h200-2026-12-03-compile.json),
# TE built in ~150 s; the machine was then given back idle (a gap between two calls), so --full,
# the te tier and the rest never ran. (The te wait now also waits for te_env.sh: the status file
# is written first, which made r8_queue.sh's te tier run without TE.)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/lib.sh
queue_init 1380
if [ -z "${SKIP_COMPILE:-}" ]; then
  TAIL=30 step "$(queue_cap 200)" compile.log python3 benchmarks/compile_bench.py --out "$R/compile.json"
  queue_note "compile_bench done"
fi

te_tier() {  # waits for scripts/te/build.sh, then the quick gpu tier for te (GPU shared with --full)
  while { [ ! -f ~/seed/te/status ] || { grep -q "^ok" ~/seed/te/status && [ ! -f ~/te_site/te_env.sh ]; }; } && [ $(( total - SECONDS )) -gt 400 ]; do sleep 5; done
  if ! grep -q '^ok' ~/seed/te/status 2>/dev/null; then queue_note "te build not ok: $(cat ~/seed/te/status 2>/dev/null)"; return; fi
  queue_note "te built: $(cat ~/seed/te/status)"
  source ~/te_site/te_env.sh
  NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 step 120 te_probe.log python3 scripts/te/probe.py
  queue_note "te probe done"
  local c
  c=$(queue_cap 400 200)
  step "$c" te_conf.log python3 -m conformance --no-progress --tier gpu --backends te torch flash_4 --jobs 3 \
    --time-budget $(( c - 40 )) --json "$R/NVIDIA_H200-te.json" --markdown "$R/NVIDIA_H200-te.md" --junit "$R/NVIDIA_H200-te.xml"
  queue_note "te tier done"
}
te_tier > "$R/te_tier.out" 2>&1 &
te_pid=$!

c=$(queue_cap 1000 200)
step "$c" full.log python3 -m conformance --no-progress --tier gpu --full --backends torch flash_4 --jobs auto \
  --compile-cache /tmp/full_cc --time-budget $(( c - 40 )) --json "$R/NVIDIA_H200-full.json" \
  --markdown "$R/NVIDIA_H200-full.md" --junit "$R/NVIDIA_H200-full.xml"
queue_note "full done"
wait "$te_pid"
if grep -q '^ok' ~/seed/te/status 2>/dev/null; then
  source ~/te_site/te_env.sh
  TAIL=14 step "$(queue_cap 150 60)" backends.log python3 benchmarks/backend_bench.py --backends te,torch,flash_4 \
    --masks causal,sliding_window,documents --seq-lens 8192,32768 --out "$R/backends.json" --markdown "$R/backends.md"
  queue_note "backend_bench done"
fi
TAIL=30 step "$(queue_cap 100 15)" gdn_fill.log python3 benchmarks/gdn_bench.py --sections triton_speed --shapes 32k FlashQLA \
  --budget "$(( $(queue_cap 100 15) - 10 ))" --out "$R/gdn-fill-on.json"
TAIL=30 step "$(queue_cap 80 15)" gdn_nofill.log python3 benchmarks/gdn_bench.py --sections triton_speed --shapes 32k \
  --set fill_sms=0 --budget "$(( $(queue_cap 80 15) - 10 ))" --out "$R/gdn-fill-off.json"
queue_note "gdn fill done"
if [ "$(queue_cap 999)" -gt 60 ]; then
  TAIL=40 step "$(queue_cap 300 5)" gdn_speed.log python3 benchmarks/gdn_bench.py --sections triton_speed layer \
    --budget "$(( $(queue_cap 300 5) - 15 ))" --out "$R/gdn-speed.json"
fi
queue_note "queue done"
touch "$R/done"
